"""kd.generate.static_decode: same tokens as today's generate_batch (CPU, fp32 and NF4), buckets reused, cost model."""
from __future__ import annotations

import pytest
import torch
from test_generation import _prompts, _teacher

from kd.generate.generation import (
    SamplingParams,
    counter_uniform,
    generate_batch,
    sample_next,
    sample_seed,
    stop_token_ids,
)
from kd.generate.static_decode import StaticDecoder, decode_step_cost


@pytest.fixture(scope="module")
def teacher(testbed):
    return _teacher(testbed)


def test_counter_uniform_tensor_step_equals_int_step():
    seeds = torch.tensor([sample_seed(0, i) for i in range(64)], dtype=torch.int64)
    for step in (0, 1, 7, 1023, 5000):
        assert torch.equal(counter_uniform(seeds, step), counter_uniform(seeds, torch.tensor([step])))
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=20)
    assert torch.equal(sample_next(logits, sp, seeds, 3), sample_next(logits, sp, seeds, torch.tensor([3])))


def test_static_decoder_equals_generate_batch(testbed, teacher, tiny_tokenizer):
    """Greedy and sampled tokens equal today's path (fp32, CPU), with many attention-length buckets per answer."""
    tok = tiny_tokenizer
    ids = [0, 4, 5, 10, 22, 41]
    ps = _prompts(testbed, tok, ids)
    kw = dict(max_new_tokens=40, stop_ids=stop_token_ids(tok), pad_id=tok.pad_id)
    dec = StaticDecoder(teacher, device=torch.device("cpu"), attn_bucket=8, check_every=3)
    ref = generate_batch(teacher, ps, **kw)
    got = dec.generate(ps, **kw)
    assert [g.tokens for g in got] == [g.tokens for g in ref]
    assert [g.finish for g in got] == [g.finish for g in ref]
    assert {g.finish for g in ref} == {"stop", "length"}  # both ways of ending are exercised
    sp = SamplingParams(temperature=0.7, top_p=0.9)
    seeds = [sample_seed(0, i) for i in ids]
    ref = generate_batch(teacher, ps, params=sp, seeds=seeds, **kw)
    got = dec.generate(ps, params=sp, seeds=seeds, **kw)
    assert [g.tokens for g in got] == [g.tokens for g in ref]
    # the same bucket serves a second batch of the same size (cache reset, state refilled)
    bk = dec._bucket
    got2 = dec.generate(ps[::-1], params=sp, seeds=seeds[::-1], **kw)
    assert dec._bucket is bk and [g.tokens for g in got2] == [g.tokens for g in got][::-1]
    # a batch of 4 rides in the 6-row bucket (padding rows), a batch of 1 gets its own bucket; both match
    four = dec.generate(ps[1:5], params=sp, seeds=seeds[1:5], **kw)
    assert dec._bucket is bk
    assert [g.tokens for g in four] == [g.tokens for g in generate_batch(teacher, ps[1:5], params=sp, seeds=seeds[1:5], **kw)]
    one = dec.generate(ps[2:3], **kw)
    assert dec._bucket is not bk
    assert one[0].tokens == generate_batch(teacher, ps[2:3], **kw)[0].tokens
    dec.close()


@pytest.mark.slow
def test_static_decoder_one_length_bucket(testbed, teacher, tiny_tokenizer):
    """One bucket covering prompt + answer (attention over the whole cache, as today's path)."""
    ps = _prompts(testbed, tiny_tokenizer, [1, 7, 30])
    kw = dict(max_new_tokens=24, stop_ids=stop_token_ids(tiny_tokenizer), pad_id=tiny_tokenizer.pad_id)
    got = StaticDecoder(teacher, device=torch.device("cpu"), attn_bucket=4096).generate(ps, **kw)
    assert [g.tokens for g in got] == [g.tokens for g in generate_batch(teacher, ps, **kw)]


def test_static_decoder_nf4_equals_generate_batch(testbed, tiny_tokenizer):
    """NF4 teacher (bf16): the decode hook (auto -> eager dequant on CPU) gives today's tokens."""
    from omegaconf import OmegaConf

    from kd.generate.generation import install_last_token_head
    from kd.teacher.nf4 import use_fast_nf4
    from kd.train.models import build_on_meta, load_hf_into_model

    cfg = OmegaConf.create({"_component_": "torchtune.models.qwen2.qwen2", **testbed.teacher_dims})
    m = build_on_meta(cfg, torch.bfloat16)
    load_hf_into_model(m, testbed.teacher_dir, device=torch.device("cpu"), dtype=torch.bfloat16, nf4=True)
    use_fast_nf4(m)
    install_last_token_head(m.eval())
    ps = _prompts(testbed, tiny_tokenizer, [0, 9, 13])
    kw = dict(max_new_tokens=16, stop_ids=stop_token_ids(tiny_tokenizer), pad_id=tiny_tokenizer.pad_id)
    ref = generate_batch(m, ps, cache_dtype=torch.bfloat16, **kw)
    got = StaticDecoder(m, device=torch.device("cpu"), cache_dtype=torch.bfloat16, attn_bucket=16).generate(ps, **kw)
    assert [g.tokens for g in got] == [g.tokens for g in ref]
    assert all(mod.decode_fn is None for mod in m.modules() if hasattr(mod, "decode_fn"))  # switched off again


def test_decode_step_cost_72b():
    c1 = decode_step_cost(1, 0)
    lin = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 29568)
    assert abs(lin - 69.9e9) / 69.9e9 < 0.01  # Qwen2.5-72B: ~70 B decoder-layer weights
    # NF4 fused: ~0.53 B/weight + a 2.5 GB bf16 head -> ~39.6 GB per step
    assert 38e9 < c1.bytes < 41e9 and abs(c1.flops - 2 * (lin + 152064 * 8192)) < 1e6
    d = decode_step_cost(1, 0, weight_format="nf4_dequant")
    assert d.weight_bytes - c1.weight_bytes == pytest.approx(4.0 * lin)  # the bf16 copy written and read back
    c = decode_step_cost(512, 600)
    assert c.kv_bytes == 512 * 80 * 2 * 1024 * 2 * 601  # read 600 slots + write 1, K and V, bf16
    assert c.seconds(4.2e12, 700e12) == max(c.bytes / 4.2e12, c.flops / 700e12)
    with pytest.raises(ValueError):
        decode_step_cost(1, 0, weight_format="int3")


@pytest.mark.gpu
def test_cuda_graphs_equal_eager_static_step(testbed, tiny_tokenizer):
    """On the GPU: graph replays give exactly the eager static step's tokens (same kernels), NF4 teacher with the
    fused decode kernels; fp32 teacher: same greedy tokens as generate_batch."""
    from omegaconf import OmegaConf

    from kd.generate.generation import install_last_token_head
    from kd.teacher.nf4 import use_fast_nf4
    from kd.train.models import build_on_meta, load_hf_into_model

    dev = torch.device("cuda")
    cfg = OmegaConf.create({"_component_": "torchtune.models.qwen2.qwen2", **testbed.teacher_dims})
    m = build_on_meta(cfg, torch.bfloat16)
    load_hf_into_model(m, testbed.teacher_dir, device=dev, dtype=torch.bfloat16, nf4=True)
    use_fast_nf4(m)
    install_last_token_head(m.eval())
    ps = _prompts(testbed, tiny_tokenizer, [0, 9, 13, 21])
    sp = SamplingParams(temperature=0.7, top_p=0.9)
    seeds = [sample_seed(0, i) for i in range(4)]
    kw = dict(max_new_tokens=40, stop_ids=stop_token_ids(tiny_tokenizer), pad_id=tiny_tokenizer.pad_id)
    for kernel in ("triton", "auto"):
        for batch in (ps, ps[:1]):
            s = seeds[:len(batch)]
            g = StaticDecoder(m, device=dev, attn_bucket=16, nf4_kernel=kernel, cuda_graphs=True, fuse_glue=False)
            e = StaticDecoder(m, device=dev, attn_bucket=16, nf4_kernel=kernel, cuda_graphs=False, fuse_glue=False)
            a = g.generate(batch, params=sp, seeds=s, **kw)
            assert g.n_captures > 0
            g.close()
            b = e.generate(batch, params=sp, seeds=s, **kw)
            e.close()
            assert [x.tokens for x in a] == [x.tokens for x in b]
    t = _teacher(testbed).to(dev)
    ref = generate_batch(t, ps, device=dev, **kw)
    got = StaticDecoder(t, device=dev, attn_bucket=16).generate(ps, **kw)  # fp32, compiled glue (fuse_glue)
    assert [x.tokens for x in got] == [x.tokens for x in ref]
    from kd.generate.static_decode import _Glue

    assert _Glue.failed is None and _Glue.fns is not None


def test_fused_glue_formulas_and_patching(testbed, teacher, monkeypatch):
    """The decode glue's functions (uncompiled here: Inductor is the GPU path) are the torchtune modules' own math,
    bit for bit in fp32 and bf16; fused_glue patches RMSNorm / RoPE / SiLU feed-forward and restores them; a compile
    failure warns once and falls back to the eager modules."""
    from torchtune.modules import FeedForward, RMSNorm

    from kd.generate import static_decode as sd

    rms, rope, silu_mul = sd._Glue.raw()
    layer = teacher.layers[0]
    pe = layer.attn.pos_embeddings
    for dt in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 1, layer.sa_norm.scale.numel(), generator=g).to(dt)
        assert torch.equal(rms(x, layer.sa_norm.scale, float(layer.sa_norm.eps)), layer.sa_norm(x))
        q = torch.randn(3, 1, layer.attn.num_heads, layer.attn.head_dim, generator=g).to(dt)
        pos = torch.tensor([[5], [0], [17]])
        assert torch.equal(rope(q, pe.cache, pos), pe(q, input_pos=pos))
        a, b = torch.randn(2, 3, 1, 40, generator=g).to(dt)
        assert torch.equal(silu_mul(a, b), torch.nn.functional.silu(a) * b)
    monkeypatch.setattr(sd._Glue, "fns", sd._Glue.raw())
    monkeypatch.setattr(sd._Glue, "failed", None)
    x = torch.randn(2, 1, layer.sa_norm.scale.numel())
    pos = torch.tensor([[3], [9]])
    with torch.no_grad():
        ref = layer(x, input_pos=pos)
        with sd.fused_glue(teacher) as fg:
            kinds = {type(m) for m, _ in fg.mods}
            assert RMSNorm in kinds and FeedForward in kinds and type(pe) in kinds
            assert "forward" in layer.sa_norm.__dict__
            assert torch.equal(layer(x, input_pos=pos), ref)
        assert "forward" not in layer.sa_norm.__dict__ and "forward" not in pe.__dict__

        def broken():
            raise RuntimeError("no compiler")
        monkeypatch.setattr(sd._Glue, "fns", None)
        monkeypatch.setattr(sd._Glue, "get", classmethod(lambda cls: broken()))
        with sd.fused_glue(teacher), pytest.warns(UserWarning, match="fused decode glue disabled"):
            assert torch.equal(layer(x, input_pos=pos), ref)
        assert sd._Glue.failed == "RuntimeError: no compiler"
