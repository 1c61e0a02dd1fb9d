"""kd.teacher.linear_groups: which projections are grouped, that the grouped GEMM returns each member's output
(plumbing checked on CPU with the CUDA kernels swapped for their bit-identical torch references), that nothing
changes where the route does not apply, and the real kernels on CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd.teacher import linear_groups as LG


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
    m = _tiny(precision, "cuda", seed=2)
    set_decode_(m, "auto", 1024)
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


def _layer_order(ahead):
    """Every projection group in a decode step's call order (layer by layer: q/k/v, output, w1/w3, w2)."""
    return [g for grps in ahead.layers for g in grps]


@pytest.mark.parametrize("precision", ["nf4", "nf4_fp8"])
def test_dequant_ahead_pass_matches_the_direct_route(monkeypatch, precision):
    """On CPU (issue order = stream order) a pass takes every weight from the half of the double buffer that the
    pass filled one layer ahead: outputs bit-equal to dequantise-then-GEMM. Three layers with different weights,
    so a GEMM reading the wrong half (or a half overwritten too early) fails; an out-of-order call abandons the pass
    and still returns the right outputs; the output / w2 fallback is used where the route does not apply."""
    m = _tiny(precision, seed=5, num_layers=3)
    groups = LG.LinearGroups(m, ahead_carveout=8, device=torch.device("cpu"))
    ahead = groups.ahead
    assert ahead is not None and len(ahead.layers) == 3 and len(ahead.singles) == 6
    order = _layer_order(ahead)
    assert [len(g.mods) for g in order[:4]] == [3, 1, 2, 1]
    _fake_kernels(monkeypatch)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 1, u.mods[0].in_features, generator=g).to(torch.bfloat16) for u in order]
    with torch.no_grad():
        ref = [u.gemm(x, u.dequant_into(None, x.device)) for u, x in zip(order, xs)]
        for _ in range(2):  # two passes: the second reuses the buffers
            for u, x, r in zip(order, xs, ref):
                got = groups.call(u, x)
                assert all(torch.equal(a, b) for a, b in zip(got, r)), u
        assert ahead.n_passes == 2 and len(ahead.halves) == 2
        # out of order (layer 0's w1/w3 before its output projection): abandoned, right outputs, no pass counted
        got = [groups.call(order[0], xs[0]), groups.call(order[2], xs[2]), groups.call(order[1], xs[1])]
        for a, r in zip(got, (ref[0], ref[2], ref[1])):
            assert all(torch.equal(p, q) for p, q in zip(a, r))
        assert ahead.n_passes == 2
        # the next layer-0 q/k/v starts a fresh pass that completes
        for u, x, r in zip(order, xs, ref):
            assert all(torch.equal(a, b) for a, b in zip(groups.call(u, x), r))
        assert ahead.n_passes == 3
        # a call that does not take the route runs the fallback (the module's class forward for output / w2)
        monkeypatch.setattr(LG.LinearGroup, "fused_here", lambda self, x: False)
        mod, single = ahead.singles[0]
        x = xs[1]
        assert torch.equal(ahead.run(single, x, fallback=lambda: (type(mod).forward(mod, x),))[0], mod(x))
        ahead.close()
        assert ahead.halves == []


def test_dequant_ahead_needs_every_layer_grouped():
    """A decoder whose projections are not all NF4 (here: bf16 linears) gets no DequantAhead: nothing changes."""
    from torchtune.models.qwen2 import qwen2

    m = qwen2(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=384,
              max_seq_len=64, norm_eps=1e-6)
    groups = LG.LinearGroups(m, ahead_carveout=8, device=torch.device("cpu"))
    assert groups.ahead is None and len(groups) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["nf4", "nf4_fp8"])
def test_gpu_static_decoder_dequant_ahead_same_tokens(precision):
    """StaticDecoder with DequantAhead (side stream, SM carve-out, CUDA graphs) gives the tokens of the same decoder
    without it, and every captured step ran its layers ahead."""
    from kd.teacher import nf4_cuda
    from kd.teacher.generation import install_last_token_head
    from kd.teacher.static_decode import StaticDecoder

    if not nf4_cuda.available(torch.device("cuda")):
        pytest.skip(nf4_cuda.why_unavailable(torch.device("cuda")))
    m = _tiny(precision, "cuda", seed=4)
    install_last_token_head(m)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 90, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (300,), generator=g)]
    toks = {}
    for ahead, blas in ((None, "cublas"), (16, "cublas"), (16, "cublaslt")):
        dec = StaticDecoder(m, device=torch.device("cuda"), dequant_ahead=ahead, dequant_ahead_blas=blas,
                            attn_bucket=16)
        gens = dec.generate(prompts, max_new_tokens=12, stop_ids=[], pad_id=95)
        toks[ahead, blas] = [x.tokens for x in gens]
        if ahead is not None:
            assert dec.groups.ahead is not None and dec.groups.ahead.n_passes > 0 and dec.n_captures > 0
            assert dec.groups.ahead.blas == blas
        dec.close()
    assert toks[16, "cublas"] == toks[None, "cublas"]
    assert toks[16, "cublaslt"] == toks[None, "cublas"]


def test_sm_carveout_rejects_an_unknown_library():
    with pytest.raises(ValueError, match="cublas"):
        with LG.sm_carveout(8, "cutlass"):
            pass
    m = _tiny("nf4")
    with pytest.raises(ValueError, match="cublas"):
        LG.LinearGroups(m, ahead_carveout=8, device=torch.device("cpu"), ahead_blas="cutlass")


@pytest.mark.gpu
@pytest.mark.parametrize("blas", ["cublas", "cublaslt"])
def test_gpu_sm_carveout_runs_and_restores(blas):
    """GEMMs under a carve-out give the product (cuBLAS's own rounding: a different kernel may sum in another
    order), cuBLAS's SM-count function is found, and the BLAS settings are PyTorch's again afterwards."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 1024, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(3072, 1024, device="cuda", generator=g).to(torch.bfloat16)
    bias = torch.randn(3072, device="cuda", generator=g).to(torch.bfloat16)
    ref = x.double() @ w.double().T
    lib, c = torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental()
    with LG.sm_carveout(16, blas):
        y, yb = F.linear(x, w), F.linear(x, w, bias)
    torch.cuda.synchronize()
    assert ((y.double() - ref).norm() / ref.norm()) < 5e-3
    assert ((yb.double() - ref - bias.double()).norm() / ref.norm()) < 5e-3
    assert torch.backends.cuda.preferred_blas_library() == lib and torch._C._get_sm_carveout_experimental() == c
    assert LG._cublas_sm_count_target() is not None


def test_check_dequant_ahead_one_line_errors():
    LG.check_dequant_ahead(None, "cpu")
    LG.check_dequant_ahead(10_000, "cpu")  # no SM count to compare with off CUDA; the pass is CUDA-only
    with pytest.raises(ValueError, match=r"^dequant_ahead: -1 SMs: give 0 or more"):
        LG.check_dequant_ahead(-1, "cpu")
