"""The quality benchmark (bench/quality.py), reduced: 1 seed, 1 epoch, CE vs forward-KL KD vs on-policy vs stock.
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
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import quality
    finally:
        sys.path.pop(0)
    doc = tmp_path / "quality.md"
    res = quality.main(["--out", str(tmp_path / "q"), "--testbed", str(testbed.root), "--seeds", "1",
                        "--methods", "ce,fkl,cache,op_fkl_l05,stock,stock_e1", "--epochs", "2", "--doc", str(doc)])
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == {"ce", "fkl", "cache", "op_fkl_l05", "stock", "stock_e1"}
    # the cache's epoch 2 reads the cache: half the teacher forwards of online KD, the same steps
    assert runs["cache"]["steps"] == runs["fkl"]["steps"] == 54
    assert runs["cache"]["teacher_forwards"] == runs["stock_e1"]["teacher_forwards"] == 27
    assert runs["stock_e1"]["steps"] == 27
    # the warm base starts much closer to the teacher than the cold test-bed student
    assert res["warm"]["kl"] < 0.6 * res["cold"]["kl"]
    for r in runs.values():
        assert 0.0 < r["kl"] < res["cold"]["kl"] and 0.0 <= r["top1"] <= 1.0
        assert Path(r["adapter"], "adapter_config.json").is_file()
    # distillation moves the student closer to the teacher than CE on the labels alone
    assert runs["fkl"]["kl"] < runs["ce"]["kl"]
    assert runs["op_fkl_l05"]["kl"] < runs["ce"]["kl"]
    assert runs["ce"]["teacher_forwards"] == 0 and runs["fkl"]["teacher_forwards"] == runs["stock"]["teacher_forwards"]
    assert 0.0 < runs["op_fkl_l05"]["on_policy_fraction"] < 1.0 and runs["op_fkl_l05"]["gen_mean_length"] > 0
    # teacher fidelity: bf16 is closer to fp32 than NF4, and neither is exact
    fid = res["fidelity"]
    assert 0.0 < fid["bf16"]["kl"] < fid["nf4 (bf16 compute)"]["kl"]
    assert 0.0 < fid["fp8 (rowwise FP8 weights and activations, FP8 GEMM emulated)"]["kl"]
    assert fid["nf4_fp8 (NF4 storage, FP8 GEMM emulated)"]["kl"] > 0.0
    text = doc.read_text()
    for m in ("`ce`", "`fkl`", "`cache`", "`op_fkl_l05`", "`stock`", "Teacher fidelity", "transformers + peft",
              "vs stock at ≥ its teacher forwards", "## Targets"):
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
    assert q.RECOMMENDED in q.DEFAULT_METHODS and "stock" in q.DEFAULT_METHODS and "stock_e1" in q.DEFAULT_METHODS
