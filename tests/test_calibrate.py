"""kd calibrate (kd.ops.calibrate): the profile it writes, the derivation (kd plan --time reproduces the measured
component times), its one-line errors, and the CPU check against a real tiny run."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from recipe_utils import REPO, env_for, metrics, tune_run

from kd.ops import calibrate as cal
from kd.ops import jobtime
from kd.ops.preflight import load_config

KD = str(Path(sys.executable).parent / "kd")
TINY = str(REPO / "configs/tiny/kd_lora.yaml")


def _kd(args, env=None, cwd=REPO):
    return subprocess.run([KD, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _one_line_error(p, *needles):
    err = [l for l in p.stderr.splitlines() if l.startswith("kd calibrate: error:")]
    assert p.returncode == 2 and len(err) == 1, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


# --------------------------------------------------------------------------------------------------
# The profile file
# --------------------------------------------------------------------------------------------------
def test_profile_round_trips_through_load_hardware(tmp_path):
    hw = replace(jobtime.H200, name="my_box", bf16_tflops=123.456789, fp8_tflops=250.5, mem_gbps=3000.0,
                 interconnect_gbps=11.5, teacher_eff=0.61234, student_eff=0.4, head_eff=0.55, disk_gbps=2.5,
                 optimizer_eff=0.3, teacher_calibrated_for="nf4_fp8+compile",
                 sources={"device": "NVIDIA H100 80GB HBM3", "teacher_eff": "one 72B layer, nf4_fp8+compile"})
    path = cal.write_profile(hw, tmp_path / "p.yaml")
    back = jobtime.load_hardware(str(path))
    a, b = asdict(hw), asdict(back)
    for k, v in a.items():
        if isinstance(v, float):
            assert b[k] == pytest.approx(v, rel=1e-4), k  # written with 5 significant digits
        else:
            assert b[k] == v, k
    assert back.measured is True and back.name == "my_box"


def test_profile_missing_fields_take_the_base_values(tmp_path):
    # an old profile (before kd calibrate) with only some fields: the rest are the H200's, the new fields' defaults
    p = tmp_path / "old.yaml"
    p.write_text("name: old\nbf16_tflops: 100\nmem_gbps: 500\nmeasured: true\n")
    hw = jobtime.load_hardware(str(p))
    assert hw.bf16_tflops == 100 and hw.mem_gbps == 500
    assert hw.student_eff == jobtime.H200.student_eff and hw.head_eff == jobtime.H200.head_eff
    assert hw.optimizer_eff == 1.0 and hw.teacher_calibrated_for == ""
    # and a calibrated profile with a field deleted by hand
    full = cal.write_profile(replace(jobtime.H200, name="x", student_eff=0.123), tmp_path / "x.yaml")
    text = "".join(l for l in full.read_text().splitlines(True) if not l.startswith("student_eff:"))
    full.write_text(text)
    assert jobtime.load_hardware(str(full)).student_eff == jobtime.H200.student_eff


def test_write_profile_refuses_to_overwrite(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("keep me\n")
    with pytest.raises(jobtime.ConfigError, match="--overwrite"):
        cal.write_profile(jobtime.H200, p)
    assert p.read_text() == "keep me\n"
    cal.write_profile(jobtime.H200, p, overwrite=True)
    assert jobtime.load_hardware(str(p)).bf16_tflops == jobtime.H200.bf16_tflops


# --------------------------------------------------------------------------------------------------
# The derivation: kd plan --time's own model reproduces what was measured
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prec,packed", [("null", False), ("nf4", False), ("fp8", True), ("nf4_fp8", True)])
def test_derived_profile_reproduces_the_measured_times(prec, packed):
    cfg = load_config(TINY, [f"teacher_quantization={prec}", f"dataset.packed={packed}", "compile=True"])
    batch = cal.job_batch(cfg, doc_len=60, use_data=False)
    assert batch.tokens == 4 * (256 if packed else 60)
    m = {"bf16_tflops": 0.1, "fp8_tflops": 0.3, "mem_gbps": 20.0, "teacher_layer_s": 0.0123,
         "student_layer_s": 0.0071, "head_s": 0.0456, "optimizer_s": 0.0012}
    hw, check = cal.derive(cfg, jobtime.H200, batch, m, name="t", sources={})
    assert hw.bf16_tflops == 0.1 and hw.fp8_tflops == 0.3 and hw.mem_gbps == 20.0
    assert hw.teacher_calibrated_for == {"null": "bf16"}.get(prec, prec) + "+compile"
    got = cal.model_components(cfg, hw, batch)
    teacher = got["teacher forward"] + got.get("teacher NF4 dequantisation", 0.0)
    assert teacher == pytest.approx(4 * 0.0123, rel=1e-3)  # 4 teacher layers
    assert got["student forward + backward"] == pytest.approx(2 * 0.0071, rel=1e-3)  # 2 student layers
    assert got["loss head (fused)"] == pytest.approx(0.0456, rel=1e-3)
    assert got["optimizer"] == pytest.approx(0.0012, rel=1e-3)
    assert all(v[0] == pytest.approx(v[1], rel=1e-3) for v in check.values()) and len(check) == 4
    # the eff is relative to the rate the model uses for this precision: fp8 GEMMs for fp8 / nf4_fp8
    hw2, _ = cal.derive(cfg, jobtime.H200, batch, {**m, "fp8_tflops": 0.6}, name="t", sources={})
    if prec in ("fp8", "nf4_fp8"):
        assert hw2.teacher_eff < hw.teacher_eff
    else:
        assert hw2.teacher_eff == hw.teacher_eff


def test_derived_profile_with_activation_checkpointing_on_some_layers():
    cfg = load_config(TINY, ["ac_mode=selective", "ac_option=2"])  # 1 of the 2 student layers checkpointed
    batch = cal.job_batch(cfg, doc_len=64, use_data=False)
    m = {"student_layer_s": 0.010, "student_layer_ac_s": 0.014}
    hw, check = cal.derive(cfg, jobtime.H200, batch, m, name="t", sources={})
    got = cal.model_components(cfg, hw, batch)
    assert got["student forward + backward"] == pytest.approx(0.010 + 0.014, rel=1e-3)
    # a measurement that is missing leaves the base value
    hw3, check3 = cal.derive(cfg, jobtime.H200, batch, {"student_layer_s": 0.01}, name="t", sources={})
    assert hw3.student_eff == jobtime.H200.student_eff and "student forward + backward" not in check3


def test_teacher_precision_mismatch_warns_once():
    hw = replace(jobtime.H200, name="cal", teacher_calibrated_for="nf4_fp8+compile")
    stats = jobtime.DataStats([60] * 8, [30] * 8, 0, 60, False, 4)
    same = jobtime.estimate_job(load_config(TINY, ["teacher_quantization=nf4_fp8", "compile=True"]), hw, stats)
    other = jobtime.estimate_job(load_config(TINY, ["teacher_quantization=nf4"]), hw, stats)
    assert "warning" not in same.table()
    warn = [l for l in other.table().splitlines() if "warning" in l]
    assert len(warn) == 1 and "nf4_fp8+compile" in warn[0] and "runs nf4" in warn[0]
    # built-in profiles are not calibrated for a precision: never a warning
    assert "warning" not in jobtime.estimate_job(load_config(TINY, []), jobtime.H200, stats).table()


def test_data_sheet_profile_is_labelled_and_sub_second_times_in_ms():
    stats = jobtime.DataStats([60] * 8, [30] * 8, 0, 60, False, 4)
    t = jobtime.estimate_job(load_config(TINY, []), jobtime.GB10, stats).table()
    assert jobtime.GB10.measured is False
    head = t.splitlines()[0]
    assert "data sheet" in head and "NOT measured" in head and "kd calibrate" in head and "Spark" in head
    assert " 0.0 s" not in t and re.search(r"optimizer step: [\d.]+ (µs|ms)", t), t
    assert jobtime._hms(0.0123) == "12.3 ms" and jobtime._hms(5.0) == "5.0 s" and jobtime._hms(4e-5) == "40.0 µs"


# --------------------------------------------------------------------------------------------------
# One-line errors
# --------------------------------------------------------------------------------------------------
def test_cli_refuses_to_overwrite(tmp_path):
    out = tmp_path / "mine.yaml"
    out.write_text("name: mine\n")
    p = _kd(["calibrate", "--config", TINY, "--out", str(out)])
    _one_line_error(p, "--overwrite", str(out))
    assert out.read_text() == "name: mine\n"


@pytest.mark.parametrize("args,needle", [
    (["--config", "configs/tiny/nope.yaml"], "nope.yaml"),
    (["--config", TINY, "batch_sise=2"], "batch_sise"),
    (["--config", TINY, "--allreduce-mb", "16000"], "256"),
    (["--config", TINY, "--disk-mb", "0"], "--disk-mb"),
    (["--config", TINY, "--frobnicate"], "--frobnicate"),
    (["--config", TINY, "--device", "tpu"], "tpu"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, monkeypatch, args, needle):
    from kd.ops.cli import main

    monkeypatch.chdir(REPO)
    rc = main(["calibrate", *args, "--out", str(tmp_path / "p.yaml")])
    _one_line_error(subprocess.CompletedProcess([], rc, "", capsys.readouterr().err), needle)
    assert not (tmp_path / "p.yaml").exists()


# --------------------------------------------------------------------------------------------------
# The CPU check: calibrate, predict, run, compare
# --------------------------------------------------------------------------------------------------
STEPS, SKIP = 16, 4
# measured / predicted optimizer step must lie in [1/TOL, TOL]. Why 1.5: (1) the model misses part of the tiny CPU
# step even on a quiet core: measured / predicted was 1.29 at load 1.3 (teacher forward exact, 36.7 vs 36.9 ms; the
# whole-model student forward + fused loss + backward 52.7 ms against 35.1 ms of calibrated layer + head pieces;
# docs/benchmarks.md "kd calibrate"); (2) this 2-core machine is shared: other processes change wall times 2-3x within
# a minute (one teacher layer timed 8.7 then 21 ms a minute apart; 0.93 and 1.26 at load 6-7). Calibrating right
# before AND right after the run and using the mean of the two predictions takes out the slow drift, not the jitter.
TOL = 1.5


def _predicted_step(env, out, overrides, cli=True):
    if not cli:  # the same estimate in-process (saves an interpreter start on a loaded machine)
        cfg = load_config(TINY, [f"dataset.source={Path(env['KD_TESTBED_DIR']) / 'demo_buddhist_qa.json'}", *overrides])
        est = jobtime.estimate_job(cfg, jobtime.load_hardware(str(out)))
        return est.step_s, est.table()
    p = _kd(["plan", "--time", "--config", TINY, "--hardware", str(out), *overrides], env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"optimizer step: ([\d.]+) (ms|s)\b", p.stdout)
    assert m, p.stdout
    assert " 0.0 s" not in p.stdout, p.stdout
    return float(m.group(1)) * (1e-3 if m.group(2) == "ms" else 1.0), p.stdout


def test_calibrated_plan_predicts_the_tiny_cpu_step(testbed, tmp_path):
    env = env_for(testbed, {"KD_CACHE_DIR": str(tmp_path / "cache")})
    run_dir = tmp_path / "run"
    ov = [f"output_dir={run_dir}", f"max_steps_per_epoch={STEPS}", "epochs=1", "~eval_every_n_steps",
          "save_every_n_steps=null", "log_every_n_steps=1", "device=cpu"]
    loads, preds, tables = [os.getloadavg()[0]], [], []
    for i in (1, 2):
        out = tmp_path / f"cpu{i}.yaml"
        p = _kd(["calibrate", "--config", TINY, *ov, "--out", str(out)], env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"wrote {out}" in p.stdout and "teacher layer forward" in p.stdout
        prof = jobtime.load_hardware(str(out))
        assert prof.measured and prof.teacher_calibrated_for == "bf16"
        for k in ("bf16_tflops", "mem_gbps", "disk_gbps", "teacher_eff", "student_eff", "head_eff", "optimizer_eff"):
            assert "measured" in prof.sources.get(k, "") or "derived" in prof.sources.get(k, ""), (k, prof.sources)
        assert "not available" in prof.sources["fp8_tflops"] and prof.fp8_tflops == jobtime.H200.fp8_tflops
        assert "base" in prof.sources["decode"] and prof.decode_overhead_ms == jobtime.H200.decode_overhead_ms
        assert prof.dequant_bw_eff == jobtime.H200.dequant_bw_eff and "nf4_dequant" in prof.sources
        assert not list(run_dir.parent.glob(".kd_calibrate_*"))  # the disk test's file is gone
        pred, table = _predicted_step(env, out, ov, cli=i == 1)
        preds.append(pred)
        tables.append(table)
        if i == 1:
            tune_run(testbed, ov, extra_env={"KD_CACHE_DIR": str(tmp_path / "cache")})
            loads.append(os.getloadavg()[0])
    steps = [r["step_seconds"] for r in metrics(run_dir)]
    assert len(steps) == STEPS
    measured = statistics.median(steps[SKIP:])
    predicted = statistics.mean(preds)
    ratio = measured / predicted
    report = (f"tiny CPU step: predicted {predicted * 1e3:.1f} ms (calibrations before/after the run: "
              f"{preds[0] * 1e3:.1f} / {preds[1] * 1e3:.1f} ms), measured median {measured * 1e3:.1f} ms over steps "
              f"{SKIP + 1}-{STEPS} ({', '.join(f'{s * 1e3:.0f}' for s in steps)} ms), ratio {ratio:.2f}; "
              f"load average {', '.join(f'{x:.1f}' for x in loads)} on {os.cpu_count()} CPUs")
    print(report)
    (tmp_path / "report.txt").write_text(report + "\n" + tables[0])
    assert 1 / TOL <= ratio <= TOL, report
