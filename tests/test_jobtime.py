"""kd plan --time (kd.ops.jobtime): units, linear scaling with epochs and samples, the generation estimate, errors."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kd.ops import jobtime
from kd.ops.preflight import load_config

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
    unit = r"[\d.]+ (µs|ms|s|min)|\d+ h \d\d min"
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


def _stats_72b(n=1500, seed=0):
    """Token counts shaped like the user's data (150-900 tokens, ~55% answer), packed 2 x 2048 as the 1-node
    config trains: the 72B/7B models are built on the meta device, no tokenizer or weights are read."""
    import random

    rng = random.Random(seed)
    lengths = [rng.randint(150, 900) for _ in range(n)]
    answers = [int(x * rng.uniform(0.4, 0.7)) for x in lengths]
    return jobtime.DataStats(lengths, answers, 60, 2048, True, 2, "best_fit")


def _cfg72(*ov):
    return load_config(str(REPO / "configs/qwen2_5/72B_to_7B_kd_lora_1node.yaml"), ["epochs=3", *ov])


def test_teacher_cache_modes_count_teacher_forwards_and_cost_cache_epochs_student_only():
    """3 epochs, 72B -> 7B: online_then_cache runs the teacher forward in epoch 1 and in the fill pass only,
    epochs 2-3 are student-only steps plus the cache read; build is teacher-only; use never runs the teacher.
    The 3-epoch online_then_cache job is about half of online every epoch (the issue's target is <= 0.55x;
    the teacher forward is ~3/4 of the online step): fails if the cache is ignored (ratio 1)."""
    from kd.ops.planner import teacher_forward_epochs

    stats = _stats_72b()
    on = jobtime.estimate_job(_cfg72("~teacher_cache"), jobtime.H200, stats)  # the shipped config's cache off
    otc = jobtime.estimate_job(_cfg72("teacher_cache.mode=online_then_cache"), jobtime.H200, stats)
    use = jobtime.estimate_job(_cfg72("teacher_cache.mode=use"), jobtime.H200, stats)
    build = jobtime.estimate_job(_cfg72("teacher_cache.mode=build"), jobtime.H200, stats)
    comp = lambda ph, name: sum(c.seconds for c in ph.components if c.name == name)  # noqa: E731

    assert [ph.count for ph in on.phases] == [3] and on.run_s == pytest.approx(3 * on.epoch_s)
    # online_then_cache: epoch 1 + fill + 2 cache epochs; the teacher forward runs teacher_forward_epochs times
    e1, fill, cached = otc.phases
    assert (e1.count, fill.count, cached.count) == (1, 1, 2)
    assert teacher_forward_epochs(_cfg72("teacher_cache.mode=online_then_cache")) == (1.0, 0.0)
    assert teacher_forward_epochs(_cfg72()) == (1.0, 0.0)  # what the shipped config runs
    t_fwd_online = comp(on.phases[0], "teacher forward")
    assert sum(ph.count * comp(ph, "teacher forward") for ph in (e1, cached)) == pytest.approx(t_fwd_online)
    assert 0 < comp(fill, "teacher forward") < 0.2 * t_fwd_online  # the few samples epoch 1 did not see
    assert comp(cached, "teacher forward") == 0 and comp(cached, "teacher cache read") > 0
    # epoch 1 = the online epoch + the cache write (a small overhead); cache epochs = student-only
    assert 0 < comp(e1, "teacher cache write") < 0.03 * on.epoch_s
    assert e1.seconds == pytest.approx(on.epoch_s + comp(e1, "teacher cache write"))
    assert comp(cached, "student forward + backward") == pytest.approx(comp(on.phases[0], "student forward + backward"))
    assert otc.run_s == pytest.approx(e1.seconds + fill.seconds + 2 * cached.seconds)
    ratio = otc.run_s / on.run_s
    assert 0.4 < ratio < 0.6, ratio
    assert f"{ratio:.2f}x" in otc.table()
    # use: every epoch from the cache; build: one teacher-only pass, no student
    assert use.run_s == pytest.approx(3 * cached.seconds) and use.run_s < 0.4 * on.run_s
    names = [c.name for c in build.components]
    assert "teacher forward" in names and "student forward + backward" not in names
    assert build.run_s == pytest.approx(build.epoch_s)
    # the pass computes every sample once: about one epoch's teacher forward (padding differs)
    assert comp(build.phases[0], "teacher forward") == pytest.approx(t_fwd_online, rel=0.25)


def test_static_decode_model_reproduces_the_h200_measurements():
    """The planner's static-decode step (kd.ops.jobtime.static_step_ms) against the two H200 measurements it is
    calibrated on (bench/logs/decode_bench_h200_s5.json: 23.4 ms at batch 1, context ~112;
    bench/logs/decode_bench_h200_s6_call3.json: 171.4 ms at batch 512, context ~128), and the GB10 profile (273 GB/s)
    far slower at batch 1, where the weights' bytes dominate."""
    from kd.generate.static_decode import QWEN2_5_72B_SHAPE

    dims = dict(QWEN2_5_72B_SHAPE)
    assert jobtime.static_step_ms(jobtime.H200, 1, 112, dims) == pytest.approx(23.4, rel=0.03)
    assert jobtime.static_step_ms(jobtime.H200, 512, 128, dims) == pytest.approx(171.4, rel=0.01)
    g1 = jobtime.static_step_ms(jobtime.GB10, 1, 112, dims)
    assert g1 > 10 * jobtime.static_step_ms(jobtime.H200, 1, 112, dims) * 0.9 and g1 > 250


def test_static_decode_model_reproduces_the_h100_call_of_the_read_once_kernel():
    """The H100 call that measured the read-once kernel (bench/logs/nf4_mm_h100_s12_call2: copy 2.996 TB/s, bf16
    GEMM 798 TFLOP/s; 80-layer decode steps extrapolated from 2 and 6 layers at context ~128: 32.9, 117.6, 184.9 ms
    at batches 1 (GEMV), 128 (read-once kernel) and 512 (dequantise + cuBLAS)): the planner's step with the H200's
    efficiencies and that call's two rates lands within 10% of each."""
    import dataclasses

    from kd.generate.static_decode import QWEN2_5_72B_SHAPE

    h100 = dataclasses.replace(jobtime.H200, name="h100", mem_gbps=2996.0, bf16_tflops=798.0)
    for B, measured in ((1, 32.9), (128, 117.6), (512, 184.9)):
        assert jobtime.static_step_ms(h100, B, 128, dict(QWEN2_5_72B_SHAPE)) == pytest.approx(measured, rel=0.10), B


def test_decode_routes_and_the_read_once_kernel_cost():
    """The planner takes the decoder's route (kd.generate.nf4_matmul.route on CUDA): kd's GEMV up to 8 rows under
    auto, the read-once kernel up to nf4_fused_max_batch, dequantise + cuBLAS above; the read-once kernel costs the
    longer of its 0.53 B/weight and its measured work per weight at the profile's CUDA-core rate; the generation
    estimate follows the config's two keys."""
    from omegaconf import OmegaConf

    from kd.generate.static_decode import QWEN2_5_72B_SHAPE

    dims = dict(QWEN2_5_72B_SHAPE)
    assert [jobtime.decode_route(B) for B in (1, 8, 9, 128, 129, 512)] == \
        ["gemv", "gemv", "fused", "fused", "dequant", "dequant"]
    assert jobtime.decode_route(1, "fused") == "fused" and jobtime.decode_route(16, "dequant") == "dequant"
    assert jobtime.decode_route(300, "auto", fused_max_rows=512) == "fused"
    hw = jobtime.H200
    pts = {int(k): v for k, v in hw.fused_ops_per_weight.items()}
    assert jobtime.fused_ops(hw, 16) == pts[16] and jobtime.fused_ops(hw, 4096) == pts[max(pts)]
    assert pts[16] < jobtime.fused_ops(hw, 64) < pts[128]  # linear between the measured points
    n_lin = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 29568)
    for prof in (jobtime.H200, jobtime.GB10):
        rest = jobtime.static_step_ms(prof, 64, 128, dims) - 1e3 * max(
            n_lin * (0.5 + 2 / 64) / (prof.mem_gbps * 1e9), n_lin * jobtime.fused_ops(prof, 64) / (prof.fp32_tflops * 1e12))
        kv = 1e3 * jobtime.decode_step_cost(64, 128, weight_format="nf4", **dims).kv_bytes / (prof.mem_gbps * 1e9)
        assert rest == pytest.approx(kv + prof.static_overhead_ms + prof.static_overhead_ms_per_row * 63, rel=1e-9)
    # on the GB10 (273 GB/s) reading 4 bits once beats dequantise + cuBLAS by far at the config's batch; on the H200
    # at 512 rows dequantise + cuBLAS is the cheaper, which is why auto stops at 128
    g = {k: jobtime.static_step_ms(jobtime.GB10, 128, 300, dims, kernel=k) for k in ("auto", "dequant")}
    assert g["dequant"] > 2.5 * g["auto"]
    h = {k: jobtime.static_step_ms(hw, 512, 128, dims, kernel=k, fused_max_rows=512) for k in ("fused", "dequant")}
    assert h["dequant"] < h["fused"]
    base = dict(model={"_component_": "torchtune.models.qwen2_5.qwen2_5_72b_instruct"}, max_new_tokens=100,
                batch_size=128)

    def est(**kw):
        return jobtime.estimate_generation(OmegaConf.create({**base, **kw}), jobtime.GB10,
                                           expected_new_tokens=[100] * 256)
    assert est().route == "fused" and est(nf4_decode_kernel="dequant").route == "dequant"
    assert est(nf4_fused_max_batch=64).route == "dequant"
    assert est(nf4_decode_kernel="dequant").fused_step_ms > 2.5 * est().fused_step_ms
    assert "NF4 route at batch 128: fused" in est().table()


def test_dequant_traffic_link_and_full_finetune_terms(tmp_path, monkeypatch):
    """The cost model's terms that decide what a second Spark buys: nf4_fp8 moves 2.5 B per teacher linear weight per
    micro-batch (nf4 4.5 B, fp8 none); the inter-node link shows only beyond the compute it overlaps; a full fine-tune
    pays the weight gradients (its student backward > LoRA's) and AdamW over its shard of every weight."""
    from kd.ops.planner import build_and_count
    from kd.ops.preflight import load_config

    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path))
    lengths = jobtime.parse_lengths("records=400,prompt=40,answer=300")
    hw = jobtime.GB10

    def est(config, *ov, ws=1):
        cfg = load_config(str(REPO / config), list(ov))
        jobtime.resolve_tokenizer(cfg)  # no /models here: kd's offline Qwen2.5 tokenizer
        return cfg, jobtime.estimate_job(cfg, hw, jobtime.data_stats(cfg, lengths=lengths), world_size=ws)

    def comp(e, name):
        return next((c.seconds for c in e.components if c.name.startswith(name)), 0.0)

    cfg, e = est("configs/qwen2_5/72B_to_7B_kd_lora_1node.yaml", "~teacher_cache")
    lin = build_and_count(cfg.teacher_model).linear
    assert comp(e, "teacher NF4 dequantisation") == pytest.approx(
        e.micro_batches_per_epoch * 2.5 * lin / (hw.mem_gbps * 1e9), rel=1e-9)
    _, e4 = est("configs/qwen2_5/72B_to_7B_kd_lora_1node.yaml", "~teacher_cache", "teacher_quantization=nf4")
    assert comp(e4, "teacher NF4 dequantisation") == pytest.approx(comp(e, "teacher NF4 dequantisation") * 4.5 / 2.5)
    _, e8 = est("configs/qwen2_5/72B_to_7B_kd_lora_1node.yaml", "~teacher_cache", "teacher_quantization=fp8")
    assert comp(e8, "teacher NF4 dequantisation") == 0.0
    # two nodes, LoRA hybrid: the LoRA gradients cross, hidden behind compute; the bf16 sharded teacher's gathers at a
    # slow link do not hide
    _, e2 = est("configs/qwen2_5/72B_to_7B_kd_lora.yaml", "~teacher_cache", ws=2)
    assert comp(e2, "inter-node link") == 0.0
    slow = dataclasses.replace(hw, interconnect_gbps=1.0)
    cfg_b = load_config(str(REPO / "configs/qwen2_5/72B_to_7B_kd_lora_bf16_2node.yaml"), ["~teacher_cache"])
    jobtime.resolve_tokenizer(cfg_b)
    eb = jobtime.estimate_job(cfg_b, slow, jobtime.data_stats(cfg_b, lengths=lengths), world_size=2)
    assert comp(eb, "inter-node link") > 0.5 * comp(eb, "teacher forward")
    # full fine-tune vs LoRA on the same two nodes: more backward, AdamW over every (sharded) student weight
    # (the LoRA two-Spark config: the same student, batch, accumulation and AC as the full fine-tune config)
    cfg_f, ef = est("configs/qwen2_5/72B_to_7B_kd_full_2node.yaml", ws=2)
    assert comp(ef, "student forward + backward") > 1.3 * comp(e2, "student forward + backward")
    n = build_and_count(cfg_f.model).total
    assert comp(ef, "optimizer") == pytest.approx(
        ef.steps_per_epoch * 16.0 * n / 2 / (hw.mem_gbps * 1e9 * hw.optimizer_eff), rel=1e-9)
