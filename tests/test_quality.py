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
                        "--methods", "ce,fkl,op_fkl_l05,stock", "--epochs", "1", "--doc", str(doc)])
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == {"ce", "fkl", "op_fkl_l05", "stock"}
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
    text = doc.read_text()
    for m in ("`ce`", "`fkl`", "`op_fkl_l05`", "`stock`", "Teacher fidelity", "transformers + peft"):
        assert m in text
    assert json.loads((tmp_path / "q" / "results.json").read_text())["seeds_n"] == 1
