"""kd.teacher.nf4_cuda: the NVRTC-compiled NF4 kernels. On CPU: the source builds for Hopper and for the DGX Spark's
GB10 with no register spills (nvcc, where installed) and the code-book tables are laid out as the kernels read them;
on a GPU (`gpu`): one-hot inputs return torchao's dequantised columns bit for bit, random inputs match float64,
odd shapes (N not a multiple of 16, a ragged last K step, 1..8 rows), and the dequantisation is bit-identical."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torchao.dtypes.nf4tensor import to_nf4

from kd.generate import nf4_matmul as NM
from kd.teacher import nf4_cuda as nc
from kd.teacher.nf4 import cached_scalers


def _w4(n, k, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    sb = next(b for b in (256, 128, 64, 40, 32, 8) if (n * k // 64) % b == 0)  # scaler blocks must divide
    return to_nf4((torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).to(device), 64, sb)


@pytest.mark.parametrize("arch", ["sm_90", "sm_121"])
def test_source_builds_without_spills(tmp_path, arch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    for cfg in (nc.CudaGemvConfig("mma_a", 8, 2, 4, 4), nc.CudaGemvConfig("mma", 8, 8, 6, 8)):
        defines = cfg.defines()
        src = tmp_path / "k.cu"
        src.write_text("".join(f"#define {k} {v}\n" for k, v in defines.items()) + nc.SOURCE)
        r = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-Xptxas", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        for name in ("kd_nf4_gemv_mma_a", "kd_nf4_gemv_mma", "kd_nf4_gemv", "kd_nf4_dequant", "kd_nf4_fp8"):
            assert f"'{name}'" in r.stderr
        assert "0 bytes spill stores" in r.stderr and " bytes spill stores" in r.stderr
        assert all(l.strip().startswith("0 bytes stack") for l in r.stderr.splitlines() if "spill stores" in l), r.stderr


def test_code_book_tables():
    """The pair table holds, for every byte, the code of its HIGH nibble (the even column, torchao's packing) in the
    low 16 bits and the low nibble's code in the high 16 bits, as bf16; the 16-entry table is fp32."""
    w = _w4(64, 128, seed=0)
    pair = nc._lut(w, True)
    assert pair.dtype == torch.int32 and pair.numel() == 256
    bits = w.nf4.view(torch.int16).to(torch.int64) & 0xFFFF
    for b in (0x00, 0x0F, 0xF0, 0x5A, 0xA5, 0xFF, 0x70):
        word = int(pair[b]) & 0xFFFFFFFF
        assert word & 0xFFFF == int(bits[b >> 4]) and word >> 16 == int(bits[b & 15])
    lut16 = nc._lut(w, False)
    assert torch.equal(lut16.view(torch.float32), w.nf4.float())


def test_gemv_rejects_what_it_cannot_do():
    w = _w4(64, 512, seed=1)
    with pytest.raises(ValueError, match="bf16 x"):
        nc.gemv(torch.zeros(1, 512), w, cached_scalers(w), nc.CudaGemvConfig())
    with pytest.raises(ValueError, match="at most 8 rows"):
        nc.gemv(torch.zeros(9, 512, dtype=torch.bfloat16), w, cached_scalers(w), nc.CudaGemvConfig())
    with pytest.raises(ValueError, match="at most 1 rows"):
        nc.gemv(torch.zeros(2, 512, dtype=torch.bfloat16), w, cached_scalers(w), nc.CudaGemvConfig("lut16"))
    with pytest.raises(ValueError, match="K % 128"):
        w2 = _w4(64, 576, seed=2)
        nc.gemv(torch.zeros(1, 576, dtype=torch.bfloat16), w2, cached_scalers(w2), nc.CudaGemvConfig("mma_a", 8, 2))
    assert nc.why_unavailable(torch.device("cpu")) == "not a CUDA device"


@pytest.mark.gpu
def test_gpu_kernels_compile():
    assert nc.why_unavailable(torch.device("cuda")) is None


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(1024, 8192), (40, 576), (8192, 29568)])
def test_gpu_gemv_every_kind(N, K):
    w4 = _w4(N, K, seed=N, device="cuda")
    wd = w4.get_original_weight()
    s = cached_scalers(w4)
    cands = list(nc.gemv_candidates(N, K, 1))
    assert {c.kind for c in cands} == ({"mma_a", "mma", "lut16"} if K % 128 == 0 else {"mma", "lut16"})
    for cfg in cands:
        # one-hot rows: scaler * code, rounded once: torchao's dequantised column bit for bit
        for c in (0, 65, K - 1):
            x = torch.zeros(1, K, device="cuda", dtype=torch.bfloat16)
            x[0, c] = 1
            assert torch.equal(nc.gemv(x, w4, s, cfg)[0], wd[:, c]), (cfg, c)
        g = torch.Generator(device="cuda").manual_seed(N + K)
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16, generator=g)
        for M in ((1, 3, 8) if cfg.kind != "lut16" else (1,)):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
            ref = F.linear(x.double(), wd.double())
            y = nc.gemv(x, w4, s, cfg)
            assert y.shape == (M, N) and y.dtype == torch.bfloat16
            assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2 ** -7, (cfg, M)
            yb = nc.gemv(x, w4, s, cfg, bias)  # the bias inside the kernel
            # one bf16 rounding of (product + bias): relative to the output, which the bias can dominate
            refb = ref + bias.double()
            assert ((yb.double() - refb).abs().max() / refb.abs().max()).item() < 2 ** -7, (cfg, M)


@pytest.mark.gpu
def test_gpu_dequant_bit_exact_and_matmul_paths():
    for N, K in ((1024, 8192), (40, 576), (29568, 512)):
        w4 = _w4(N, K, seed=K, device="cuda")
        wd = w4.get_original_weight()
        assert torch.equal(nc.dequant(w4, cached_scalers(w4)), wd)
        for M in (1, 5, 16, 300):
            x = torch.randn(2, M, K, device="cuda", dtype=torch.bfloat16)[1]  # a view: the wrapper copies it
            ref = F.linear(x.double(), wd.double())
            y = NM.nf4_matmul(x, w4, impl="auto", max_fused_rows=0 if M > 8 else 128)  # GEMV / dequant + cuBLAS
            assert NM.route(x, w4, "auto", 0 if M > 8 else 128) == ("gemv" if M <= 8 else "dequant")
            assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2, (N, K, M)
