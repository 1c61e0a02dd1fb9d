"""Issue 31 item 5: export checks every key -- quantize= and calibration.* included -- before it writes anything,
so a mistake there leaves no merged/ behind and the corrected re-run is not refused by the overwrite rail."""

from __future__ import annotations

import pytest
from recipe_utils import tune_run


@pytest.fixture(scope="module")
def adapter(testbed, tmp_path_factory):
    run = tmp_path_factory.mktemp("x5") / "run"
    tune_run(testbed, [f"output_dir={run}", "epochs=1", "max_steps_per_epoch=1", "~eval_every_n_steps",
                       "progress_bar=False", "save_every_n_steps=1"])
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return run / "checkpoints" / latest / "adapter"


def _export(testbed, adapter, out, *extra):
    return tune_run(testbed, [f"adapter_dir={adapter}", f"output_dir={out}", *extra], recipe="recipes/export.py",
                    config="configs/tiny/export.yaml", check=False)


@pytest.mark.parametrize("bad, names", [
    (["quantize=fp9_magic"], "quantize='fp9_magic'"),
    # the others are `slow`: each is two tune runs (~11 s); the first case runs in the default suite
    pytest.param(["quantize=[fp8_dynamic,nope]"], "quantize='nope'", marks=pytest.mark.slow),
    pytest.param(["quantize=w4a16", "~calibration.source"], "calibration.source", marks=pytest.mark.slow),
    pytest.param(["quantize=w4a16", "calibration.source=/nonexistent/train.json"], "/nonexistent/train.json",
                 marks=pytest.mark.slow),
    pytest.param(["quantize=fp8_dynamic", "calibration.num_sampels=4"], "num_sampels", marks=pytest.mark.slow),
])
def test_bad_quantize_writes_nothing_and_the_corrected_rerun_runs(testbed, adapter, tmp_path, bad, names):
    out = tmp_path / "export"
    p = _export(testbed, adapter, out, *bad)
    assert p.returncode == 2, p.stderr[-3000:]
    last = [l for l in p.stderr.splitlines() if l.strip()][-1]
    assert last.startswith("kd: error") and names in last, last
    assert "Traceback" not in p.stderr
    assert not any(out.iterdir()) if out.exists() else True, sorted(x.name for x in out.iterdir())
    p = _export(testbed, adapter, out)  # the corrected command (no quantized copy), without overwrite=True
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "merged" / "config.json").is_file()
