"""kd.teacher.linear_groups: which projections are grouped, that the grouped GEMM returns each member's output
(plumbing checked on CPU with the CUDA kernels swapped for their bit-identical torch references), that nothing
changes where the route does not apply, and the real kernels on CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd.teacher import linear_groups as LG


def _tiny(precision: str, device="cpu", seed=0):
    """A 2-layer torchtune Qwen2 (bf16, q/k/v of unequal widths with biases) with NF4 / nf4_fp8 linears (every
    weight a whole number of torchao's 256-block scaler groups)."""
    from torchtune.models.qwen2 import qwen2

    from kd.teacher import precision as P

    torch.manual_seed(seed)
    m = qwen2(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=384,
              max_seq_len=64, norm_eps=1e-6).to(torch.bfloat16)
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
        out.copy_(real(w, inv, impl="torch"))
        return out

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


def _units(groups, model):
    """Every projection group of the model in a layer's call order (q/k/v, output, w1/w3, w2)."""
    seq = []
    for layer in model.layers:
        seq += [groups.attn[id(layer.attn)], groups.out[id(layer.attn)], groups.ffn[id(layer.mlp)],
                groups.down[id(layer.mlp)]]
    return seq


@pytest.mark.parametrize("precision", ["nf4", "nf4_fp8"])
def test_weight_prefetch_follows_recorded_order(monkeypatch, precision):
    """Pass 1 records the order and sizes the buffers; pass 2 takes every weight from a prefetch issued BEFORE the
    previous unit's GEMM (in issue order on CPU, as a stream keeps it): outputs bit-equal to the direct route, so a
    prefetch overwriting a buffer that a pending GEMM still reads fails here; an out-of-order call falls back."""
    m = _tiny(precision, seed=3)
    groups = LG.LinearGroups(m, prefetch=torch.device("cpu"))
    units = _units(groups, m)
    assert [len(u.mods) for u in units[:4]] == [3, 1, 2, 1]
    _fake_kernels(monkeypatch)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 1, u.mods[0].in_features, generator=g).to(torch.bfloat16) for u in units]
    pf = groups.prefetch
    with torch.no_grad():
        ref = [u(x) for u, x in zip(units, xs)]  # no prefetcher: dequantise, then GEMM
        pf.begin(5)
        assert all(all(torch.equal(a, b) for a, b in zip(u(x, pf), r)) for u, x, r in zip(units, xs, ref))
        pf.end()
        assert pf.orders[5] == units and pf.n_overlapped == 0
        assert len(pf.bufs) == 2 and pf.bufs[0].numel() == max(u.weight_bytes for u in units)
        for _ in range(2):
            pf.begin(5)
            for u, x, r in zip(units, xs, ref):
                assert all(torch.equal(a, b) for a, b in zip(u(x, pf), r)), u
            pf.end()
        assert pf.n_overlapped == 2 * len(units)
        # another batch bucket: recorded separately, nothing prefetched in its first pass
        pf.begin(9)
        units[0](torch.randn(9, 1, 256).to(torch.bfloat16), pf)
        pf.end()
        assert pf.orders[9] == units[:1] and pf.n_overlapped == 2 * len(units)
        # out of order: unit 2 before unit 1 -> direct from there, still the right outputs
        pf.begin(5)
        got = [units[0](xs[0], pf), units[2](xs[2], pf), units[1](xs[1], pf)]
        pf.end()
        for a, r in zip(got, (ref[0], ref[2], ref[1])):
            assert all(torch.equal(p, q) for p, q in zip(a, r))
        assert pf.n_overlapped == 2 * len(units) + 1
        pf.close()
        assert pf.bufs == [] and pf.orders == {}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["nf4", "nf4_fp8"])
def test_gpu_static_decoder_prefetch_same_tokens(precision):
    """StaticDecoder with the side-stream prefetch (CUDA graphs) gives the tokens of the same decoder without it."""
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
    for pre in (False, True):
        dec = StaticDecoder(m, device=torch.device("cuda"), prefetch_weights=pre, attn_bucket=16)
        gens = dec.generate(prompts, max_new_tokens=12, stop_ids=[], pad_id=95)
        toks[pre] = [x.tokens for x in gens]
        if pre:
            assert dec.groups.prefetch.n_overlapped > 0 and dec.n_captures > 0
        dec.close()
    assert toks[True] == toks[False]
