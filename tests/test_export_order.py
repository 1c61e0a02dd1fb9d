"""Issue 31 item 11: the README's order -- the plain export, then the quantized export of the same adapter into the
same output_dir -- runs: the second keeps merged/ (it is that adapter's export, kd_export.json says so) and only
adds the quantized copy; another adapter's export there is still refused."""

from __future__ import annotations

import json

import pytest
from recipe_utils import tune_run


def _export(testbed, adapter, out, *extra):
    return tune_run(testbed, [f"adapter_dir={adapter}", f"output_dir={out}", *extra], recipe="recipes/export.py",
                    config="configs/tiny/export.yaml", check=False)


@pytest.mark.slow  # two exports with GPTQ calibration (~22 s)
def test_quantized_export_after_the_plain_one_reuses_merged(testbed, tmp_path):
    run = tmp_path / "run"
    tune_run(testbed, [f"output_dir={run}", "epochs=1", "max_steps_per_epoch=2", "~eval_every_n_steps",
                       "progress_bar=False", "save_every_n_steps=1", "keep_last_n_checkpoints=5"])
    a1, a2 = (run / "checkpoints" / s / "adapter" for s in ("step_0000001", "step_0000002"))
    out = tmp_path / "export"
    p = _export(testbed, a2, out)
    assert p.returncode == 0, p.stderr[-3000:]
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in (out / "merged").iterdir()}
    p = _export(testbed, a2, out, "quantize=fp8_dynamic")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already holds this adapter's merged export" in p.stdout + p.stderr
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in (out / "merged").iterdir()} == before
    assert json.loads((out / "quantized-fp8_dynamic" / "config.json").read_text())["quantization_config"]
    # another adapter: merged/ is not its export, so it is not replaced without overwrite=True
    p = _export(testbed, a1, out)
    assert p.returncode == 2 and "merged already exists and is not empty" in p.stderr.splitlines()[-1], p.stderr[-2000:]
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in (out / "merged").iterdir()} == before
