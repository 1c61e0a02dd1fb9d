"""kd.teacher.precision: the FP8 rounding against an independent float64 reference, NF4 -> FP8, the registry/fallbacks,
FSDP2 rules, preflight, and the tiny recipe through the real `tune run` with every precision."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from kd.teacher import precision as P

FP8 = torch.float8_e4m3fn


# --------------------------------------------------------------------------------------------------
# float64 references (written from the format definition, not from torch's float8 cast)
# --------------------------------------------------------------------------------------------------
def e4m3_round_ref(v: torch.Tensor) -> torch.Tensor:
    """Round float64 values (|v| <= 448) to the nearest e4m3fn value, ties to even: 3 mantissa bits, exponent
    bias 7, normals from 2^-6, subnormals k * 2^-9."""
    v = v.to(torch.float64)
    a = v.abs()
    _, ex = torch.frexp(a)  # a = f * 2^ex, f in [0.5, 1)
    e = torch.clamp(ex.to(torch.float64) - 1, min=-6)  # exponent of the leading bit (subnormals share -6)
    quantum = torch.exp2(e - 3)
    r = torch.round(a / quantum) * quantum  # torch.round: half to even; a / quantum is exact (power of 2)
    assert (r <= 448).all()
    return torch.where(a == 0, torch.zeros_like(a), r) * torch.sign(v)


def fp32_round(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float32).to(torch.float64)


def quantize_rowwise_ref(x: torch.Tensor):
    """Reference of kd.teacher.precision.quantize_rowwise in float64: scale = amax / 448 evaluated in x's dtype (torch
    computes it in fp32 and rounds to x's dtype), x / scale correctly rounded to fp32, then e4m3."""
    amax = x.to(torch.float64).abs().amax(-1, keepdim=True)
    scale = fp32_round(amax / 448.0).to(x.dtype).to(torch.float64)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = fp32_round(x.to(torch.float64) / scale).clamp(-448, 448)
    return e4m3_round_ref(q), scale


def _odd_values(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x *= torch.exp2(torch.randint(-12, 6, (shape[0], 1), generator=g).to(torch.float64))  # rows of every scale
    x[:, 0] *= 40.0  # outliers set the row scale
    return x


def test_e4m3_reference_agrees_with_known_values():
    vals = torch.tensor([0.0, 448.0, -448.0, 1.0, 1.0625, 1.125, 1.1875, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -10,
                         2.0 ** -6, 240.0, 248.0, 464.0 - 16, 0.3])
    # 1.0625 is the tie between 1 and 1.125 -> even (1.0); 1.1875 -> 1.25; 2^-10 tie between 0 and 2^-9 -> 0;
    # 3*2^-10 tie between 2^-9 and 2^-8 -> 2^-8 (even mantissa); 248 tie 240/256 -> 256; 0.3 -> 0.3125
    want = torch.tensor([0.0, 448.0, -448.0, 1.0, 1.0, 1.125, 1.25, 2.0 ** -9, 0.0, 2.0 ** -8,
                         2.0 ** -6, 240.0, 256.0, 448.0, 0.3125], dtype=torch.float64)
    assert torch.equal(e4m3_round_ref(vals.to(torch.float64)), want)
    # and torch's cast implements the same rounding on the full grid of fp32 values in range (dense sample)
    v = torch.linspace(-448, 448, 200_001, dtype=torch.float64)
    v = torch.cat([v, torch.linspace(-2 ** -5, 2 ** -5, 100_001, dtype=torch.float64)])
    v32 = fp32_round(v)
    assert torch.equal(v32.to(torch.float32).to(FP8).to(torch.float64), e4m3_round_ref(v32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 96), (5, 176), (1, 32)])
def test_quantize_rowwise_equals_float64_reference(dtype, shape):
    x = _odd_values(shape, seed=shape[0] * shape[1]).to(dtype)
    x[-1] = 0.0  # an all-zero row (padding) stays 0, with scale 1
    x8, s = P.quantize_rowwise(x)
    assert x8.dtype == FP8 and s.dtype == torch.float32 and s.shape == (shape[0], 1)
    q_ref, s_ref = quantize_rowwise_ref(x)
    assert torch.equal(s.to(torch.float64), s_ref)
    assert torch.equal(x8.to(torch.float64), q_ref)
    assert (x8[-1].to(torch.float32) == 0).all() and s[-1].item() == 1.0
    # dequantised error bounded by half an e4m3 ulp of the row max (2^-4 relative) -- the format's promise
    err = (x8.to(torch.float64) * s_ref - x.to(torch.float64)).abs().amax(-1)
    assert (err <= x.to(torch.float64).abs().amax(-1) * 2.0 ** -4 + 1e-30).all()


def test_quantize_rowwise_equals_torchao_rounding():
    """Bit for bit what torchao's Float8 PerRow quantisation (kernel 'torch') computes, for weights and tokens."""
    qp = pytest.importorskip("torchao.quantization.quant_primitives")
    x = _odd_values((33, 160), seed=1).to(torch.bfloat16)
    x8, s = P.quantize_rowwise(x)
    s_ao = qp._choose_scale_float8(x, block_size=[1, 160], float8_dtype=FP8)
    q_ao = qp._quantize_affine_float8(x, s_ao, FP8)
    assert torch.equal(s.reshape(-1), s_ao.reshape(-1))
    assert torch.equal(x8.view(torch.uint8), q_ao.view(torch.uint8))


@pytest.mark.parametrize("bias", [False, True])
def test_emulated_fp8_linear_equals_float64_reference(bias):
    torch.manual_seed(0)
    M, K, N = 19, 208, 48  # odd token count, GEMM dims multiples of 16
    x = _odd_values((M, K), seed=7).to(torch.bfloat16).reshape(1, M, K)
    lin = nn.Linear(K, N, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(_odd_values((N, K), seed=8) * 0.02)
    m = P.RowwiseFP8Linear.from_linear(lin, impl="emulate")
    y = m(x)
    assert y.shape == (1, M, N) and y.dtype == torch.bfloat16
    xq, sx = quantize_rowwise_ref(x[0])
    wq, sw = quantize_rowwise_ref(lin.weight.detach())
    acc = xq @ wq.t()  # exact in float64: e4m3 products have <= 8 significant bits, the sum stays < 2^53 ulps
    ref = acc * sx * sw.reshape(1, -1)
    if bias:
        ref = ref + lin.bias.detach().to(torch.float64)
    # the emulation sums in fp32 (its only difference from the reference) and rounds once to bf16
    tol = (xq.abs() @ wq.abs().t()) * sx * sw.reshape(1, -1) * 2.0 ** -20 + ref.abs() * 2.0 ** -8
    assert ((y[0].to(torch.float64) - ref).abs() <= tol).all()
    # and it is an FP8 approximation of the dense layer, not the dense layer
    dense = lin(x)
    rel = ((y - dense).float().norm() / dense.float().norm()).item()
    assert 1e-3 < rel < 0.1, rel


def test_scaled_mm_cpu_agrees_with_emulation():
    """torch._scaled_mm also exists on CPU: the 'scaled_mm' impl and the emulation agree to bf16 rounding
    (263 rows: at least FP8_GEMM_MIN_ROWS, and padded to 272 for cuBLASLt)."""
    x = _odd_values((263, 64), seed=3).to(torch.bfloat16)
    lin = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    a = P.RowwiseFP8Linear.from_linear(lin, impl="emulate")(x).float()
    try:
        b = P.RowwiseFP8Linear.from_linear(lin, impl="scaled_mm")(x).float()
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no CPU _scaled_mm here: {e}")
    assert (a - b).abs().max() <= a.abs().max() * 2.0 ** -7


# --------------------------------------------------------------------------------------------------
# NF4 -> FP8
# --------------------------------------------------------------------------------------------------
def _nf4(shape, seed, dtype=torch.bfloat16):
    from torchao.dtypes.nf4tensor import to_nf4

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w[:, 3] *= 8  # outlier columns: row scales differ from block scales
    return to_nf4(w.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nf4_row_absmax_is_exact(dtype):
    w4 = _nf4((48, 1024), seed=2, dtype=dtype)
    dense = w4.get_original_weight().to(torch.float64)
    assert torch.equal(P.nf4_row_absmax(w4).to(torch.float64), dense.abs().amax(1))


@pytest.mark.parametrize("shape", [(48, 1024), (16, 1024)])
def test_nf4_to_fp8_equals_float64_reference(shape):
    from kd.teacher.nf4 import dequantize_scalers

    w4 = _nf4(shape, seed=shape[1])
    s, inv = P.nf4_fp8_scales(w4)
    w8 = P.nf4_to_fp8(w4, inv, impl="torch")
    assert w8.dtype == FP8 and w8.shape == shape
    # reference: code * scaler exact in float64, times inv rounded like one fp32 multiply, then e4m3
    q = w4.quantized_data.reshape(-1).long()
    codes = torch.stack([q >> 4, q & 15], -1).reshape(-1)
    vals = w4.nf4.to(torch.float64)[codes].reshape(-1, w4.block_size)
    vals = vals * dequantize_scalers(w4).to(torch.float64).reshape(-1, 1)
    vals = fp32_round(vals.reshape(shape) * inv.to(torch.float64).reshape(-1, 1)).clamp(-448, 448)
    assert torch.equal(w8.to(torch.float64), e4m3_round_ref(vals))
    # the row max lands on 448 exactly (the scale is tight), and w8 * s approximates the NF4 weight
    assert torch.equal(w8.to(torch.float32).abs().amax(1), torch.full((shape[0],), 448.0))
    dense = w4.get_original_weight().float()
    assert ((w8.float() * s.reshape(-1, 1) - dense).abs().amax(1) <= dense.abs().amax(1) * 2.0 ** -4).all()


def test_nf4_fp8_linear_keeps_nf4_parameter_and_matches_reference():
    from torchao.dtypes.nf4tensor import NF4Tensor

    w4 = _nf4((64, 256), seed=4)
    bias = torch.randn(64).to(torch.bfloat16)
    m = P.NF4FP8Linear(w4, bias)
    assert isinstance(m.weight, nn.Parameter) and isinstance(m.weight.data, NF4Tensor)
    assert not m.weight.requires_grad and [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    x = _odd_values((2 * 7, 256), seed=5).to(torch.bfloat16).reshape(2, 7, 256)
    y = m(x)
    w8 = P.nf4_to_fp8(w4, m.weight_inv_scale, impl="torch")
    ref = P.emulated_scaled_mm(*P.quantize_rowwise(x.reshape(-1, 256)), w8, m.weight_scale, bias, torch.bfloat16)
    assert torch.equal(y.reshape(-1, 64), ref)


def test_linear_bytes_per_precision():
    from torchao.dtypes.nf4tensor import to_nf4

    lin = nn.Linear(256, 128, bias=False, dtype=torch.bfloat16)
    dense = P.linear_bytes(nn.Sequential(lin))
    fp8 = P.linear_bytes(nn.Sequential(P.RowwiseFP8Linear.from_linear(lin)))
    nf4fp8 = P.linear_bytes(nn.Sequential(P.NF4FP8Linear(to_nf4(lin.weight.detach()), None)))
    assert dense == 256 * 128 * 2
    assert fp8 == 256 * 128 + 128 * 4
    assert 256 * 128 * 0.5 < nf4fp8 < 256 * 128 * 0.6 + 128 * 8


# --------------------------------------------------------------------------------------------------
# Registry, fallbacks, sharding rules
# --------------------------------------------------------------------------------------------------
def test_parse_precision_names_and_errors():
    from kd.core.config import ConfigError

    assert P.parse_precision(None) == "bf16"
    assert P.parse_precision("NF4_FP8") == "nf4_fp8"
    for bad, hint in (("fp16", "did you mean 'bf16'"), ("nf4fp8", "did you mean 'nf4_fp8'"), (8, "")):
        with pytest.raises(ConfigError) as e:
            P.parse_precision(bad)
        msg = str(e.value)
        assert "\n" not in msg and "bf16 | nf4 | fp8 | nf4_fp8" in msg and hint in msg


def test_cpu_paths():
    got = {q: P.resolve_precision(q, "cpu").impl for q in (None, "bf16", "nf4", "fp8", "nf4_fp8")}
    assert got == {None: "dense", "bf16": "dense", "nf4": "nf4:torch", "fp8": "fp8:emulated",
                   "nf4_fp8": "nf4_fp8:emulated"}


def test_gpu_without_fp8_falls_back_with_one_warning(monkeypatch, caplog):
    """An sm_80 GPU: fp8 -> bf16, nf4_fp8 -> nf4, one warning each, no crash (no CUDA needed: mocked)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    monkeypatch.setattr(P, "_PROBE_CACHE", {})
    monkeypatch.setattr(P, "_WARNED", set())
    dev = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="kd.teacher.precision"):
        a = P.resolve_precision("fp8", dev)
        b = P.resolve_precision("nf4_fp8", dev)
        P.resolve_precision("fp8", dev)
    assert (a.name, a.impl) == ("bf16", "dense") and b.name == "nf4" and b.impl.startswith("nf4:")
    assert "sm_80" in a.fallback_reason and "requested fp8" in a.describe()
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 2 and "runs bf16" in warns[0] and "runs nf4" in warns[1]


def test_registry_is_pluggable(monkeypatch, caplog):
    """A new entry (the shape an nvfp4 precision would take) with a failing probe falls back along its chain."""
    monkeypatch.setattr(P, "REGISTRY", dict(P.REGISTRY))
    monkeypatch.setattr(P, "_WARNED", set())
    P.register(P.PrecisionSpec("fake4", "fp8", "fp8", "nf4_fp8", True, "test entry",
                               lambda d, t: (None, "no such kernel here")))
    with caplog.at_level(logging.WARNING, logger="kd.teacher.precision"):
        p = P.resolve_precision("fake4", "cpu")
    assert (p.requested, p.name, p.impl) == ("fake4", "nf4_fp8", "nf4_fp8:emulated")
    assert "no such kernel here" in caplog.text
    with pytest.raises(ValueError):
        P.register(P.PrecisionSpec("orphan", "fp8", "fp8", "missing", True, "", lambda d, t: ("x", "")))


def test_sharding_rules():
    from kd.core.config import ConfigError

    for q in ("bf16", "nf4", "nf4_fp8", "fp8"):
        p = P.resolve_precision(q, "cpu")
        P.check_sharding(p, "replicate", fsdp=True)  # every precision replicates
        P.check_sharding(p, "shard", fsdp=False)  # one process: nothing is sharded
        if q == "fp8":
            with pytest.raises(ConfigError, match="teacher_sharding=replicate"):
                P.check_sharding(p, "shard", fsdp=True)
        else:
            P.check_sharding(p, "shard", fsdp=True)


def test_preflight_reports_precision_path(testbed, tmp_path, monkeypatch):
    monkeypatch.setenv("KD_TESTBED_DIR", str(testbed.root))
    from kd.ops.preflight import NodeReport, _precision_check, load_config

    cfg = load_config("configs/tiny/kd_lora.yaml", [f"output_dir={tmp_path}", "teacher_quantization=nf4_fp8"])
    rep = NodeReport(0, 0, "h", "0", {}, "", 0, "", "cpu")
    assert _precision_check(cfg, rep, torch.device("cpu"), torch.float32, 1) == []
    assert any(i.startswith("teacher precision: nf4_fp8 [nf4_fp8:emulated]") for i in rep.info)
    cfg = load_config("configs/tiny/kd_lora.yaml", [f"output_dir={tmp_path}", "teacher_quantization=fp8"])
    probs = _precision_check(cfg, rep, torch.device("cpu"), torch.float32, 2)
    assert len(probs) == 1 and "teacher_sharding=shard is not supported" in probs[0]


# --------------------------------------------------------------------------------------------------
# Through the real recipe
# --------------------------------------------------------------------------------------------------
RUN = ["epochs=1", "max_steps_per_epoch=2", "~eval_every_n_steps", "save_every_n_steps=100", "progress_bar=False",
       "log_every_n_steps=1"]
# first-step KL(teacher || student) on the tiny bed (fp32 run, seed 42), CPU torch 2.13: the teacher's precision
# is the only difference between the runs (same student, same batch)
GOLDEN_KL1 = {"bf16": 5.5776, "nf4": 5.549, "fp8": 5.5784, "nf4_fp8": 5.542}


@pytest.mark.parametrize("quant", ["bf16", "nf4", "fp8", "nf4_fp8"])
def test_recipe_runs_each_precision(testbed, tmp_path, quant):
    from recipe_utils import metrics, tune_run

    out = tmp_path / quant
    p = tune_run(testbed, [*RUN, f"output_dir={out}", f"teacher_quantization={quant}"])
    line = [l for l in p.stdout.splitlines() if "teacher precision:" in l]
    impl = {"bf16": "dense", "nf4": "nf4:torch", "fp8": "fp8:emulated", "nf4_fp8": "nf4_fp8:emulated"}[quant]
    assert len(line) == 1 and f"teacher precision: {quant} [{impl}]" in line[0], p.stdout[-3000:]
    assert ("0 quantized linears" in line[0]) == (quant == "bf16") and ("28 quantized" in line[0]) != (quant == "bf16")
    m = metrics(out)
    assert len(m) == 2
    assert m[0]["kl"] == pytest.approx(GOLDEN_KL1[quant], rel=1e-3)


def test_recipe_bad_precision_is_one_clear_line(testbed, tmp_path):
    from recipe_utils import tune_run

    p = tune_run(testbed, [*RUN, f"output_dir={tmp_path}/x", "teacher_quantization=fp16"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    err = [l for l in p.stderr.splitlines() if l.startswith("kd: error")]
    assert len(err) == 1 and "'teacher_quantization' must be one of" in err[0] and "did you mean 'bf16'" in err[0]


@pytest.mark.slow  # three tune runs, two of them with two processes (~1 min on 2 busy cores)
def test_recipe_fsdp2_shard_nf4_fp8_matches_single_and_fp8_shard_is_refused(testbed, tmp_path):
    """Two processes (gloo, FSDP2): nf4_fp8 teacher sharded like nf4 gives the one-process numbers; an fp8
    teacher cannot be sharded and says so."""
    from recipe_utils import metrics, tune_run

    single = tmp_path / "single"
    tune_run(testbed, [*RUN, f"output_dir={single}", "teacher_quantization=nf4_fp8"])
    two = tmp_path / "two"
    tune_run(testbed, [*RUN, f"output_dir={two}", "teacher_quantization=nf4_fp8", "teacher_sharding=shard",
                       "batch_size=2"], launcher=["--nproc_per_node", "2"])
    for a, b in zip(metrics(two), metrics(single)):
        for k in ("loss", "kl", "top1_agreement"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), (k, a[k], b[k])
    p = tune_run(testbed, [*RUN, f"output_dir={tmp_path}/x", "teacher_quantization=fp8", "teacher_sharding=shard",
                           "batch_size=2"], launcher=["--nproc_per_node", "2"], check=False)
    assert p.returncode != 0
    assert "teacher_quantization=fp8 with teacher_sharding=shard is not supported" in p.stderr


# --------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA; bench/fp8_bench.py --parts check does the same at more shapes)
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_path_rounds_like_the_cpu_emulation():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (sm_89+)")
    w4 = _nf4((256, 1024), seed=9)
    s, inv = P.nf4_fp8_scales(w4)
    ref = P.nf4_to_fp8(w4, inv, impl="torch")
    w4c = P.nf4_to_device(w4, "cuda")
    s_c, inv_c = P.nf4_fp8_scales(w4c)  # computed on the GPU: must round as the CPU does
    assert torch.equal(s_c.cpu(), s) and torch.equal(inv_c.cpu(), inv)
    got = P.nf4_to_fp8(w4c, inv_c, impl="triton").cpu()
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    x = _odd_values((300, 1024), seed=10).to(torch.bfloat16)  # >= FP8_GEMM_MIN_ROWS: the FP8 GEMM, padded to 304
    xq, sx = P.quantize_rowwise(x)
    xq_e, sx_e = P.quantize_rowwise(x.cuda())  # eager on the device: bit for bit
    assert torch.equal(xq_e.cpu().view(torch.uint8), xq.view(torch.uint8)) and torch.equal(sx_e.cpu(), sx)
    # the compiled activation quantisation the GPU linears run (dynamic shapes): the same scales; codes equal
    # except where Triton's fp32 division rounds the other way (2.3e-5 of them on the H200), then one code apart
    xq_c, sx_c = P._act_quant(x.cuda())
    assert torch.equal(sx_c.cpu(), sx)
    a, b = xq_c.cpu().view(torch.uint8).int(), xq.view(torch.uint8).int()
    assert (a == b).float().mean().item() > 0.9995 and (a - b).abs().max().item() <= 1
    y_gpu = P.NF4FP8Linear(w4c, None)(x.cuda()).float().cpu()
    y_emu = P.NF4FP8Linear(w4, None, impl="emulate")(x).float()
    assert ((y_gpu - y_emu).norm() / y_emu.norm()).item() < 1e-2


def test_nf4_to_device_keeps_codes_and_scalers():
    w4 = _nf4((32, 512), seed=4)
    c = P.nf4_to_device(w4, "cpu")
    for n in ("quantized_scalers", "quantization_factor", "scaler_mean", "quantized_data", "nf4"):
        assert torch.equal(getattr(c, n), getattr(w4, n))
    assert torch.equal(c.get_original_weight(), w4.get_original_weight())


def test_compiled_activation_quant_equals_eager_bit_for_bit():
    """`compile: True` runs the FP8 quantisation inside the compiled layers: inductor must keep eager's bf16
    rounding of amax/448 (without emulate_precision_casts ~80% of the scales differ), or the CPU emulation stops
    describing the compiled GPU path."""
    x = torch.randn(37, 160, dtype=torch.bfloat16) * 3
    x[5] = 0  # an all-zero (padding) row keeps scale 1
    q_ref, s_ref = P.quantize_rowwise(x)
    P.exact_casts_under_compile()
    torch._dynamo.reset()
    q_c, s_c = torch.compile(P.quantize_rowwise, dynamic=False)(x)
    assert torch.equal(s_c, s_ref)
    assert torch.equal(q_c.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("M", [1, 15, 16, 17])
def test_fp8_rows_padded_to_16_for_cublas(M):
    """cuBLASLt has no FP8 GEMM for M % 16 != 0 (batch-1 decode failed on the H200): the rows are padded with
    zeros (scale 1) and the product of the real rows is unchanged."""
    x8, sx = P.quantize_rowwise(torch.randn(M, 64, dtype=torch.bfloat16))
    w8, sw = P.quantize_rowwise(torch.randn(48, 64, dtype=torch.bfloat16))
    xp, sp = P.pad_rows16(x8, sx)
    assert xp.shape[0] % 16 == 0 and xp.shape[0] - M < 16 and sp.shape == (xp.shape[0], 1)
    assert (xp[M:].to(torch.float32) == 0).all() and (sp[M:] == 1).all()
    ref = P.emulated_scaled_mm(x8, sx, w8, sw.reshape(-1), None, torch.float32)
    got = P.emulated_scaled_mm(xp, sp, w8, sw.reshape(-1), None, torch.float32)[:M]
    assert torch.equal(got, ref)


def test_few_rows_use_the_dequantised_fp8_weight():
    """Below FP8_GEMM_MIN_ROWS (batch-1 decode: no FP8 GEMM kernel on the H200) the scaled_mm impl multiplies the
    FP8 weight dequantised to bf16: same weights, bf16 activations."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=True, dtype=torch.bfloat16)
    m = P.RowwiseFP8Linear.from_linear(lin, impl="scaled_mm")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = (m.weight_fp8.to(torch.float32) * m.weight_scale.reshape(-1, 1)).to(torch.bfloat16)
    ref = torch.nn.functional.linear(x, w, m.bias.to(torch.bfloat16))
    assert torch.equal(m(x), ref)
