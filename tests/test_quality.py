"""The quality benchmark (bench/quality.py), reduced: both beds, 1 seed, 2 epochs, CE vs ours vs the fixed stock copy.
Slow (a few minutes on 2 cores): ``pytest -m slow tests/test_quality.py``. The full benchmark is
``python bench/quality.py`` (docs/quality.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_benchmark_reduced(testbed, tmp_path):
    """Both beds, 1 seed, 2 epochs, one lr: CE, ours online and with the cache, the fixed stock copy."""
    q = _quality()
    doc = tmp_path / "quality.md"
    res = q.main(["--out", str(tmp_path / "q"), "--testbed", str(testbed.root), "--seeds", "1", "--beds", "a,b",
                  "--methods", "ce,fkl,cache,stock", "--lrs", "0.003", "--epochs", "2", "--no-fidelity",
                  "--doc", str(doc), "--jobs", "2"])
    for b in ("a", "b"):
        runs = {r["method"]: r for r in res["runs"] if r["bed"] == b}
        assert set(runs) == {"ce", "fkl", "cache", "stock"}
        assert runs["cache"]["steps"] == runs["fkl"]["steps"] == 54
        assert runs["cache"]["teacher_forwards"] == 27 and runs["stock"]["teacher_forwards"] == 54
        info = res["beds"][b]
        assert info["warm"]["kl"] < 0.6 * info["cold"]["kl"]
        for r in runs.values():
            assert 0.0 < r["kl"] < info["cold"]["kl"] and 0.0 <= r["top1"] <= 1.0
            assert Path(r["adapter"], "adapter_config.json").is_file()
        # distillation moves the student closer to the teacher than CE on the labels alone
        assert runs["fkl"]["kl"] < runs["ce"]["kl"] and runs["stock"]["kl"] < runs["ce"]["kl"]
    # the two beds are different beds
    assert res["beds"]["a"]["warm"]["kl"] != res["beds"]["b"]["warm"]["kl"]
    assert res["beds"]["a"]["lengths"]["mean"] != res["beds"]["b"]["lengths"]["mean"]
    text = doc.read_text()
    for m in ("## The two beds", "Ours at its best against stock at its best", "v.detach().clone().cpu()",
              "Learning-rate grid", "transformers + peft", "Over both beds"):
        assert m in text
    assert json.loads((tmp_path / "q" / "results.json").read_text())["seeds_n"] == 1


def _quality():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import quality
    finally:
        sys.path.pop(0)
    return quality


def test_method_values_and_teacher_forwards():
    """A method's own epochs / lr win over the benchmark's; the teacher-forward count follows the method (CE none,
    the cache only epoch 1); ours and stock train the same LoRA."""
    q = _quality()
    assert q._method_value("fkl_e1", "epochs", 3) == 1 and q._method_value("fkl", "epochs", 3) == 3
    assert q._method_value("fkl", "optimizer.lr", 0.003) == 0.003
    assert q._teacher_forwards("ce", 81) == 0 and q._teacher_forwards("fkl", 81) == 81
    assert q._teacher_forwards("cache", 81) == q.STEPS_PER_EPOCH
    cmd = q._kd_cmd("fkl_e1", 1, Path("/w"), Path("/o"), 1, 0.003)
    assert "epochs=1" in cmd and cmd.count("epochs=1") == 1 and not any(c.startswith("optimizer.lr=0.") and
                                                                          c != "optimizer.lr=0.003" for c in cmd)
    assert f"model.lora_rank={q.LORA['lora_rank']}" in cmd
    assert q.RECOMMENDED in q.DEFAULT_METHODS and "stock" in q.DEFAULT_METHODS
    # ours, CE and stock share the learning-rate grid (each reported at its own best)
    assert {q.RECOMMENDED, "ce", "stock"} <= set(q.GRID_METHODS)
    # stock runs the fixed copy of torchtune's recipe
    assert "bench/stock_kd_fixed.py" in q._stock_cmd.__code__.co_consts


def test_bed_b_is_its_own_data_and_parity_rule():
    """Bed b's data: the same questions, other answers and order, another length mix; the parity rule."""
    import json

    from kd.data.alpaca import DEMO_DATA_PATH

    q = _quality()
    a = json.loads(Path(DEMO_DATA_PATH).read_text())
    b = q.bed_b_records()
    assert len(b) == len(a) and sorted(r["instruction"] for r in a) == sorted(r["instruction"] for r in b)
    assert [r["instruction"] for r in a] != [r["instruction"] for r in b]
    changed = sum(1 for r in b if r["output"] not in {x["output"] for x in a})
    assert changed > len(b) // 2
    assert q.bed_b_records() == b  # deterministic
    assert q.verdict([1.0, 1.1, 0.9], [1.05, 1.0, 1.1]) == "parity"
    assert q.verdict([0.5, 0.51, 0.49], [1.0, 1.01, 0.99]) == "lower"


def test_stock_fixed_copy_changes_only_the_merge_line():
    """bench/stock_kd_fixed.py is the installed stock recipe's text with exactly one line replaced, and that line is
    what makes torchtune's in-place LoRA merge write into the live model on CPU (issue 32)."""
    import difflib

    import torch
    from torchtune.models.qwen2 import lora_qwen2
    from torchtune.modules.peft import get_merged_lora_ckpt

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import stock_kd_fixed as F
    finally:
        sys.path.pop(0)
    src = Path(F.stock_path()).read_text()
    fixed = F.fixed_source(src)
    diff = [l for l in difflib.unified_diff(src.splitlines(), fixed.splitlines(), lineterm="", n=0)
            if l[:1] in "+-" and not l.startswith(("+++", "---"))]
    assert [l[1:].strip() for l in diff] == [F.BUGGY_LINE, F.FIXED_LINE]
    with pytest.raises(RuntimeError, match="expected the epoch-end line"):
        F.fixed_source(src.replace(F.BUGGY_LINE, "pass"))

    torch.manual_seed(0)
    m = lora_qwen2(lora_attn_modules=["q_proj"], vocab_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                   embed_dim=16, intermediate_dim=32, max_seq_len=16, lora_rank=2, lora_alpha=4)
    for n, p in m.named_parameters():
        if "lora_b" in n:
            torch.nn.init.normal_(p)
    key = "layers.0.attn.q_proj.weight"
    before = m.state_dict()[key].clone()
    # the fixed line: the live weight is untouched by the merge
    get_merged_lora_ckpt({k: v.detach().clone().cpu() for k, v in m.state_dict().items()}, rank=2, alpha=4)
    assert torch.equal(m.state_dict()[key], before)
    # stock's line: on CPU the merge writes the LoRA delta into the live base weight
    get_merged_lora_ckpt({k: v.cpu() for k, v in m.state_dict().items()}, rank=2, alpha=4)
    assert not torch.equal(m.state_dict()[key], before)
