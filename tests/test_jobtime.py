"""kd plan --time (kd.jobtime): units, linear scaling with epochs and samples, the generation estimate, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kd import jobtime
from kd.preflight import load_config

REPO = Path(__file__).resolve().parents[1]
KD = str(Path(sys.executable).parent / "kd")
TINY = str(REPO / "configs/tiny/kd_lora.yaml")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _cfg(testbed, *ov):
    return load_config(TINY, [f"dataset.source={testbed.root / 'demo_buddhist_qa.json'}", *ov])


def test_epochs_scale_linearly(testbed, cache):
    e1 = jobtime.estimate_job(_cfg(testbed, "epochs=1"), jobtime.H200)
    e3 = jobtime.estimate_job(_cfg(testbed, "epochs=3"), jobtime.H200)
    assert e1.epoch_s > 0 and e3.epoch_s == pytest.approx(e1.epoch_s)
    assert e3.run_s == pytest.approx(3 * e1.run_s)
    names = [c.name for c in e1.components]
    assert names[:2] == ["teacher forward", "student forward + backward"]


def test_samples_scale_linearly(testbed, cache):
    recs = json.loads((testbed.root / "demo_buddhist_qa.json").read_text())
    big = cache / "x4.json"
    big.write_text(json.dumps(recs * 4, ensure_ascii=False))
    # no validation / checkpoint terms: they do not scale with the data
    ov = ["~eval_every_n_steps", "~save_every_n_steps", "dataset.val_size=0", "max_steps_per_epoch=null"]
    e1 = jobtime.estimate_job(_cfg(testbed, *ov), jobtime.H200)
    e4 = jobtime.estimate_job(load_config(TINY, [f"dataset.source={big}", *ov]), jobtime.H200)
    assert e4.processed_tokens_per_epoch == pytest.approx(4 * e1.processed_tokens_per_epoch, rel=0.05)
    train = lambda e: sum(c.seconds for c in e.components if c.name != "checkpoints")  # noqa: E731
    assert train(e4) == pytest.approx(4 * train(e1), rel=0.05)
    # the data set's real token counts drive it: answers are counted, padding is a fraction
    assert 0 <= e1.padding_fraction < 1 and e1.answer_tokens_per_epoch > 0


def test_gb10_slower_than_h200_and_flagged(testbed, cache):
    cfg = _cfg(testbed)
    h, g = jobtime.estimate_job(cfg, jobtime.H200), jobtime.estimate_job(cfg, jobtime.GB10)
    assert g.epoch_s > h.epoch_s
    assert "NOT measured" in g.table() and "NOT measured" not in h.table()


def test_cli_units_and_run_line(testbed, cache):
    p = subprocess.run([KD, "plan", "--time", "--config", TINY, "--hardware", "h200",
                        f"dataset.source={testbed.root / 'demo_buddhist_qa.json'}", "epochs=2"],
                       capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ,
                                                                      "KD_CACHE_DIR": str(cache / "c2")})
    assert p.returncode == 0, p.stderr
    unit = r"[\d.]+ (s|min)|\d+ h \d\d min"
    assert re.search(rf"one epoch\s+({unit})", p.stdout), p.stdout
    assert re.search(rf"whole run \(2 epochs\)\s+({unit})", p.stdout), p.stdout
    assert "teacher forward" in p.stdout and "optimizer step:" in p.stdout


def test_cli_bad_hardware(testbed, cache):
    p = subprocess.run([KD, "plan", "--time", "--config", TINY, "--hardware", "tpu9"], capture_output=True, text=True,
                       cwd=REPO)
    assert p.returncode == 2 and "--hardware 'tpu9'" in p.stderr and "Traceback" not in p.stderr


def test_generation_estimate_scales_with_prompts(testbed, cache):
    from omegaconf import OmegaConf

    gen = OmegaConf.create({"model": OmegaConf.load(TINY).teacher_model, "batch_size": 4, "max_new_tokens": 64})
    a = jobtime.estimate_generation(gen, jobtime.H200, expected_new_tokens=[50] * 40)
    b = jobtime.estimate_generation(gen, jobtime.H200, expected_new_tokens=[50] * 80)
    assert b.hours[1] == pytest.approx(2 * a.hours[1], rel=1e-6)
    assert a.hours[2] == pytest.approx(a.hours[1] / 2)
    assert a.fused_step_ms < a.step_ms  # fewer weight bytes per step
    capped = jobtime.estimate_generation(gen, jobtime.H200, expected_new_tokens=[500] * 40)
    assert capped.generated_tokens == 64 * 40  # max_new_tokens caps the answers
