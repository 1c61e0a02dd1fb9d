"""kd.teacher.nf4_decode: the fused NF4 decode matmul (Triton interpreter on CPU), bitsandbytes' view of torchao's layout,
the FastNF4Linear decode hook; GPU-only checks marked `gpu`."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchao.dtypes.nf4tensor import to_nf4

from kd.teacher import nf4 as knf4
from kd.teacher import nf4_decode as nd

REPO = Path(__file__).resolve().parents[1]


def _w4(n, k, seed, dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return to_nf4((torch.randn(n, k, generator=g) * 0.02).to(dtype).to(device))


def test_bnb_reads_torchao_packed_layout():
    """bitsandbytes dequantises torchao's packed bytes (fp32 absmax = torchao's scalers) to torchao's weights, up to
    the code books' one differing entry and bf16 rounding; with the nibbles swapped it would be far off."""
    bf = pytest.importorskip("bitsandbytes.functional")
    w4 = _w4(256, 512, seed=1)
    absmax = nd.decode_scalers(w4).float()
    code = bf.get_4bit_type("nf4", device="cpu")
    assert (code.bfloat16() != w4.nf4).sum() == 1  # index 6: -0.0908 (bnb) vs -0.0913 (torchao) -> pass torchao's
    qs = bf.QuantState(absmax=absmax, shape=w4.shape, code=w4.nf4.float(), blocksize=64, quant_type="nf4",
                       dtype=torch.bfloat16)
    ref = w4.get_original_weight().float()
    scale = absmax.repeat_interleave(64).view(w4.shape)
    err = (bf.dequantize_4bit(w4.quantized_data.view(-1, 1), qs).float() - ref).abs() / scale
    assert err.max() < 6e-3 and err.mean() < 1e-3
    q = w4.quantized_data
    swapped = ((q & 15) << 4) | (q >> 4)
    assert ((bf.dequantize_4bit(swapped.view(-1, 1), qs).float() - ref).abs() / scale).mean() > 0.1


def test_cpu_auto_path_is_todays_math_and_hook_switches():
    w4 = _w4(128, 384, seed=2)
    x = torch.randn(3, 1, 384, dtype=torch.bfloat16)
    ref = F.linear(x, w4.get_original_weight())
    assert torch.equal(nd.nf4_matmul(x, w4), ref)  # CPU auto -> eager dequant + F.linear, bit for bit
    lin = torch.nn.Linear(384, 128, bias=True).to(torch.bfloat16)
    m = knf4.FastNF4Linear.from_linear(lin)
    mod = torch.nn.Sequential(m)
    with torch.no_grad():
        y0 = m(x)
        assert knf4.set_decode_(mod, "torch", max_tokens=4) == 1
        assert torch.equal(m(x), y0)
        calls = []
        orig = nd.nf4_matmul
        nd.nf4_matmul = lambda *a, **k: calls.append(1) or orig(*a, **k)
        try:
            m(x)  # 3 rows <= 4: decode kernel
            m(torch.randn(5, 384, dtype=torch.bfloat16))  # 5 rows: dequantise + GEMM
        finally:
            nd.nf4_matmul = orig
        assert calls == [1]
        knf4.set_decode_(mod, None)
        assert m.decode_impl is None
    with pytest.raises(ValueError, match="unknown NF4 decode impl"):
        nd.nf4_matmul(x, w4, impl="int4")


_INTERP = textwrap.dedent("""
    import torch
    from torchao.dtypes.nf4tensor import to_nf4
    from kd.teacher import nf4_decode as nd
    torch.manual_seed(0)
    cfgs = [nd.DecodeConfig(1, 32, 128, 1), nd.DecodeConfig(1, 16, 256, 2), nd.DecodeConfig(16, 32, 128, 3),
            nd.DecodeConfig(32, 64, 64, 1)]
    worst = {}
    cases = [(torch.float32, 96, 512), (torch.float32, 128, 384), (torch.bfloat16, 128, 384)]
    for dt, n, k in cases:
            w = to_nf4((torch.randn(n, k) * 0.02).to(dt))
            wd = w.get_original_weight().double()
            for m in (1, 3, 17):
                x = torch.randn(m, k)
                ref = x.double() @ wd.T
                for c in cfgs:
                    if dt == torch.bfloat16 and c.block_m >= 16:
                        continue  # the interpreter's bf16 tl.dot is broken (checked on the GPU instead)
                    if c.block_m == 1 and m > 3:
                        continue  # one program per row: slow in the interpreter, nothing new to see
                    y = nd.nf4_matmul_triton(x, w, c)
                    assert y.shape == (m, n) and y.dtype == x.dtype
                    if c.split_k > 1 and m == 3:
                        assert torch.equal(y, nd.nf4_matmul_triton(x, w, c))  # split-K sums: deterministic
                    e = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                    worst[str(dt)] = max(worst.get(str(dt), 0.0), e)
    x3 = torch.randn(2, 1, 512)
    w = to_nf4((torch.randn(96, 512) * 0.02))
    assert nd.nf4_matmul_triton(x3, w).shape == (2, 1, 96)  # leading dims kept, default config
    print("WORST", worst["torch.float32"], worst["torch.bfloat16"])
""")


def test_triton_kernel_in_interpreter():
    """The fused kernel under TRITON_INTERPRET=1: fp32 NF4 weights give the dequantised product to fp32 accuracy
    (so layout, scaler indexing, split-K and masking are right); bf16 weights within the interpreter's bf16
    truncation (it rounds toward zero; the GPU rounds to nearest, bit-exact with torchao, see the gpu test)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _INTERP], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("WORST"))
    e32, e16 = map(float, line.split()[1:])
    assert e32 < 1e-6, e32
    assert e16 < 1e-2, e16  # truncated bf16 weights: < 2^-8 relative each


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "bnb", "gemv"])
def test_gpu_decode_kernels(impl):
    if impl == "bnb":
        pytest.importorskip("bitsandbytes")
    w4 = _w4(1024, 8192, seed=3, device="cuda")
    wd = w4.get_original_weight()
    for m in ((1,) if impl in ("bnb", "gemv") else (1, 8, 64, 512)):
        x = torch.randn(m, 8192, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), wd.float())
        y = nd.nf4_matmul(x, w4, impl=impl)
        assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    if impl == "gemv":  # one-hot row: the column of torchao's dequantised weight, bit for bit
        for c in (0, 37, 8191):
            x = torch.zeros(1, 8192, device="cuda", dtype=torch.bfloat16)
            x[0, c] = 1
            assert torch.equal(nd.nf4_gemv(x, w4)[0], wd[:, c])
    if impl == "triton":  # one-hot rows pick weight columns: the in-register weights are torchao's, bit for bit
        cols = torch.arange(16, device="cuda") * 37
        x = torch.zeros(16, 8192, device="cuda", dtype=torch.bfloat16)
        x[torch.arange(16), cols] = 1
        y = nd.nf4_matmul_triton(x, w4, nd.DecodeConfig(16, 64, 128, 1))
        assert torch.equal(y, wd[:, cols].T.contiguous())


_INTERP_GEMV = textwrap.dedent("""
import torch
import torch.nn.functional as F
from torchao.dtypes.nf4tensor import to_nf4
from kd.teacher import nf4_decode as nd
torch.manual_seed(0)
worst = 0.0
for N, K in ((48, 1024), (130, 640)):  # N not a multiple of BLOCK_N; K / 64 = 10 blocks: ragged last split
    w = to_nf4((torch.randn(N, K) * 0.05).to(torch.bfloat16), 64, 4)  # 4: 130 * 640 / 64 scalers divide
    wd = w.get_original_weight()
    for cfg in (nd.GemvConfig(8, 4, 2), nd.GemvConfig(16, 2, 1, flat=True), nd.GemvConfig(2, 1, 3, flat=True)):
        # one-hot rows: y = scaler * code, one rounding = torchao's dequantised column, bit for bit (split_k > 1:
        # torch rounds the fp32 sum; split_k 1: the interpreter truncates its bf16 store, so within one ulp)
        for c in (1, 64, K - 1):
            x = torch.zeros(1, K, dtype=torch.bfloat16)
            x[0, c] = 1
            y = nd.nf4_gemv(x, w, cfg)
            if cfg.split_k > 1:
                assert torch.equal(y[0], wd[:, c]), (N, K, cfg, c)
            else:
                assert ((y[0].float() - wd[:, c].float()).abs() <= wd[:, c].float().abs() * 2 ** -7).all()
        x = torch.randn(3, 1, K).to(torch.bfloat16)[1:2]  # leading dims kept
        ref = F.linear(x.double(), wd.double())
        y = nd.nf4_gemv(x, w, cfg)
        assert y.shape == (1, 1, N) and y.dtype == torch.bfloat16
        worst = max(worst, ((y.double() - ref).abs().max() / ref.abs().max()).item())
x = torch.randn(1, 1024).to(torch.bfloat16)
w = to_nf4((torch.randn(48, 1024) * 0.05).to(torch.bfloat16))
assert torch.equal(nd.nf4_matmul(x, w, impl="gemv"), nd.nf4_gemv(x, w))
print("WORST", worst)
""")


def test_gemv_kernel_in_interpreter():
    """kd's batch-1 GEMV under TRITON_INTERPRET=1: one-hot inputs return torchao's dequantised columns bit for bit
    (nibble order, scaler indexing, x word split, masking of ragged N and K splits); random inputs match the
    float64 product within the bf16 output rounding."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _INTERP_GEMV], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    worst = float(next(l for l in r.stdout.splitlines() if l.startswith("WORST")).split()[1])
    assert worst < 2 ** -7, worst


def test_gemv_rejects_what_it_cannot_do():
    w = _w4(64, 512, seed=1)
    with pytest.raises(ValueError, match="one row"):
        nd.nf4_gemv(torch.zeros(2, 512, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="bf16"):
        nd.nf4_gemv(torch.zeros(1, 512), w)
    with pytest.raises(ValueError, match="shape mismatch"):
        nd.nf4_gemv(torch.zeros(1, 256, dtype=torch.bfloat16), w)


def test_auto_routing_by_rows(monkeypatch):
    """``auto`` where kd's CUDA kernels work: up to 8 bf16 rows the CUDA GEMV, 9..64 the tiled Triton kernel, more
    than 64 the CUDA dequantisation + cuBLAS (both through _nf4_matmul_cuda), the bias passed along; where they do not
    work, more than 64 rows dequantise + cuBLAS instead of the tiled kernel (14x slower there)."""
    w = _w4(64, 512, seed=5)
    bias = torch.randn(64, dtype=torch.bfloat16)
    seen = []
    monkeypatch.setattr(nd, "_cuda_ok", lambda x, w: True)
    monkeypatch.setattr(nd, "_nf4_matmul_cuda", lambda x, w, b=None: seen.append(("cuda", x.numel() // 512, b is bias))
                        or torch.zeros(*x.shape[:-1], 64, dtype=x.dtype))
    monkeypatch.setattr(nd, "nf4_matmul_triton", lambda x, w, cfg=None: seen.append(("triton", x.numel() // 512))
                        or torch.zeros(*x.shape[:-1], 64, dtype=x.dtype))
    monkeypatch.setattr(nd, "fused_available", lambda dev: True)
    for rows in (1, 8, 9, 64, 65, 512):
        nd.nf4_matmul(torch.zeros(rows, 1, 512, dtype=torch.bfloat16), w, bias=bias)
    assert seen == [("cuda", 1, True), ("cuda", 8, True), ("triton", 9), ("triton", 64), ("cuda", 65, True),
                    ("cuda", 512, True)]
    seen.clear()
    monkeypatch.setattr(nd, "_cuda_ok", lambda x, w: False)
    x = torch.randn(65, 512, dtype=torch.bfloat16)
    y = nd.nf4_matmul(x, w, bias=bias)
    assert seen == []  # dequantise + cuBLAS, not the tiled kernel
    assert torch.equal(y, F.linear(x, w.get_original_weight()) + bias)
