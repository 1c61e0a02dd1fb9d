"""kd.generate.linear_groups: which projections are grouped, that the grouped GEMM returns each member's output
(plumbing checked on CPU with the CUDA kernels swapped for their bit-identical torch references), that nothing
changes where the route does not apply, and the real kernels on CUDA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kd.generate import linear_groups as LG


def _tiny(precision: str, device="cpu", seed=0, num_layers=2):
    """A ``num_layers``-layer torchtune Qwen2 (bf16, q/k/v of unequal widths with biases) with NF4 / nf4_fp8 linears (every
    weight a whole number of torchao's 256-block scaler groups)."""
    from torchtune.models.qwen2 import qwen2

    from kd.teacher import precision as P

    torch.manual_seed(seed)
    m = qwen2(vocab_size=96, num_layers=num_layers, num_heads=4, num_kv_heads=2, embed_dim=256,
              intermediate_dim=384, max_seq_len=64, norm_eps=1e-6).to(torch.bfloat16)
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    for layer in m.layers:
        P.quantize_layer_(layer, precision)
    return m.to(device).eval()


def test_groups_found_and_idle_off_the_gpu():
    m = _tiny("nf4")
    groups = LG.LinearGroups(m)
    assert len(groups.attn) == 2 and len(groups.ffn) == 2
    g = next(iter(groups.attn.values()))
    assert g.kind == "nf4" and g.sizes == [256, 128, 128] and g.offsets == [0, 256, 384]
    x = torch.randn(80, 256, dtype=torch.bfloat16)
    assert not g.fused_here(x)  # CPU: the members run one by one, bit for bit as before
    with torch.no_grad():
        for got, mod in zip(g(x), g.mods):
            assert torch.equal(got, mod(x))
    # mixed members are not grouped
    assert LG.LinearGroup([nn.Linear(4, 4), nn.Linear(4, 4)]).kind is None


def _fake_kernels(monkeypatch):
    """The CUDA dequantisations replaced by their bit-identical torch references (writing into ``out``)."""
    from kd.teacher import nf4_cuda
    from kd.teacher import precision as P
    from kd.teacher.nf4 import dequantize_nf4

    def deq(w, s, out=None):
        out.copy_(dequantize_nf4(w, impl="torch").to(out.dtype))
        return out

    real = P.nf4_to_fp8

    def to8(w, inv, impl="auto", out=None):
        ref = real(w, inv, impl="torch")
        return ref if out is None else out.copy_(ref)

    monkeypatch.setattr(nf4_cuda, "dequant", deq)
    monkeypatch.setattr(P, "nf4_to_fp8", to8)
    monkeypatch.setattr(LG.LinearGroup, "fused_here", lambda self, x: True)


@pytest.mark.parametrize("precision", ["nf4", "nf4_fp8"])
def test_grouped_gemm_returns_each_members_output(monkeypatch, precision):
    m = _tiny(precision, seed=1)
    groups = LG.LinearGroups(m)
    assert len(groups) == 4
    x = torch.randn(3, 1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = {id(g): [mod(x) for mod in g.mods] for g in groups.members()}
        _fake_kernels(monkeypatch)
        for g in groups.members():
            outs = g(x)
            assert len(outs) == len(g.mods)
            for got, want, n in zip(outs, ref[id(g)], g.sizes):
                assert got.shape == (3, 1, n) == want.shape
                rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
                assert rel < 1e-2, (g, rel)  # one GEMM over the stacked weights: the same sums


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["nf4", "nf4_fp8"])
def test_gpu_grouped_gemm(precision):
    from kd.teacher import nf4_cuda
    from kd.teacher.nf4 import set_decode_

    if not nf4_cuda.available(torch.device("cuda")):
        pytest.skip(nf4_cuda.why_unavailable(torch.device("cuda")))
    from kd.generate.nf4_matmul import DecodeRoute

    m = _tiny(precision, "cuda", seed=2)
    set_decode_(m, DecodeRoute("auto", 128), 1024)  # past 128 rows: the dequantise + GEMM route, grouped
    groups = LG.LinearGroups(m)
    x = torch.randn(300, 1, 256, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for g in groups.members():
            assert g.fused_here(x) and not g.fused_here(x[:8])
            for got, mod in zip(g(x), g.mods):
                want = mod(x)
                rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
                assert rel < 1e-2, (g, rel)


@pytest.mark.gpu
def test_gpu_nf4_to_fp8_cuda_bit_exact():
    from torchao.dtypes.nf4tensor import to_nf4

    from kd.teacher import nf4_cuda
    from kd.teacher import precision as P

    if not nf4_cuda.fp8_available(torch.device("cuda")):
        pytest.skip("no FP8 / NVRTC here")
    for N, K in ((1024, 8192), (64, 576), (384, 256)):  # N * K / 64 scalers: whole 64-scaler groups
        w4 = to_nf4((torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16), 64, 64)
        _, inv = P.nf4_fp8_scales(w4)
        ref = P.nf4_to_fp8(w4, inv, impl="torch")
        assert torch.equal(P.nf4_to_fp8(w4, inv).view(torch.uint8), ref.view(torch.uint8))
        assert torch.equal(P.nf4_to_fp8(w4, inv, impl="triton").view(torch.uint8), ref.view(torch.uint8))
        buf = torch.empty(N + 16, K, dtype=torch.float8_e4m3fn, device="cuda")
        P.nf4_to_fp8(w4, inv, out=buf[16:])
        assert torch.equal(buf[16:].view(torch.uint8), ref.view(torch.uint8))


