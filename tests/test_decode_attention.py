"""kd.generate.decode_attention: the fused decode attention against float64 (odd shapes, left padding, the slot
range), in the Triton interpreter on CPU (a subprocess: TRITON_INTERPRET is read when kernels are defined), through
StaticDecoder (same greedy tokens as generate_batch, fp32), and on CUDA."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton")

KERNEL_CHECK = r"""
import torch
from kd.generate import decode_attention as DA

torch.manual_seed(0)
for B, H, nkv, d, L, Lmax, bl, dt in [(3, 12, 4, 32, 37, 50, 16, torch.bfloat16), (2, 14, 2, 64, 130, 131, 32,
                                       torch.bfloat16), (1, 4, 4, 16, 9, 12, 16, torch.float32),
                                      (4, 6, 2, 32, 70, 70, 16, torch.float32)]:
    q = torch.randn(B, H, d).to(dt)
    k = torch.randn(B, nkv, Lmax, d).to(dt)
    v = torch.randn(B, nkv, Lmax, d).to(dt)
    k0, v0 = k.clone(), v.clone()
    last = torch.tensor([L - 4])
    first = torch.randint(0, max(1, L - 5), (B,))
    pos = torch.arange(L)[None]
    mask = (pos >= first[:, None]) & (pos <= last)
    # slots outside [first, last] hold huge values: read without the mask, they would swamp the output
    k[:, :, :L][~mask[:, None, :].expand(B, nkv, L)] = 300.0
    v[:, :, :L][~mask[:, None, :].expand(B, nkv, L)] = 1e4
    ref = DA.decode_attention_reference(q, k[:, :, :L], v[:, :, :L], mask, d ** -0.5)
    tol = 3e-2 if dt == torch.bfloat16 else 1e-5
    for kw in ({}, {"first": first, "last": last}):
        out = DA.decode_attention(q, k[:, :, :L], v[:, :, :L], mask[:, None], scale=d ** -0.5, block_l=bl, **kw)
        assert out.shape == (B, H * d) and out.dtype == dt
        err = (out.double() - ref).abs().max().item()
        assert err < tol, (B, H, nkv, d, L, dt, kw.keys(), err)
    # the range alone (mask all True) reads exactly [first, last] when first is block aligned
    fa = (first // bl) * bl
    m2 = (pos >= fa[:, None]) & (pos <= last)
    ref2 = DA.decode_attention_reference(q, k0[:, :, :L], v0[:, :, :L], m2, d ** -0.5)
    out2 = DA.decode_attention(q, k0[:, :, :L], v0[:, :, :L], torch.ones(B, L, dtype=torch.bool), scale=d ** -0.5,
                               block_l=bl, first=first, last=last)
    assert (out2.double() - ref2).abs().max().item() < tol
print("KERNEL OK")
"""

DECODER_CHECK = r"""
import sys
import torch
from kd.testing.testbed import build_testbed
from kd.generate import decode_attention as DA
from kd.generate.generation import generate_batch, stop_token_ids
from kd.generate.static_decode import StaticDecoder
sys.path.insert(0, "tests")
from test_generation import _prompts, _teacher

tb = build_testbed(sys.argv[1])
teacher = _teacher(tb)
tok = tb.tokenizer()
ps = _prompts(tb, tok, [0, 4, 5, 10, 22, 41])
kw = dict(max_new_tokens=24, stop_ids=stop_token_ids(tok), pad_id=tok.pad_id)
calls = []
real = DA.decode_attention
DA.decode_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
DA.available = lambda device: True
StaticDecoder._attention_fills_gpu = lambda self, B: True
dec = StaticDecoder(teacher, device=torch.device("cpu"), attn_bucket=8, check_every=3)
assert dec.fused_attention
got = dec.generate(ps, **kw)
ref = generate_batch(teacher, ps, **kw)
assert calls, "the fused kernel was not used"
assert [g.tokens for g in got] == [g.tokens for g in ref]
print("DECODER OK", len(calls))
"""


def _interpret(script: str, *args: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_kernel_matches_float64_in_interpreter():
    assert "KERNEL OK" in _interpret(KERNEL_CHECK)


def test_static_decoder_with_fused_attention_equals_generate_batch(testbed):
    """fp32 teacher, attention buckets of 8 slots, left-padded prompts: the fused kernel (interpreted) gives the
    same greedy tokens as today's path."""
    assert "DECODER OK" in _interpret(DECODER_CHECK, str(testbed.root))


def test_rejects_what_it_cannot_do():
    from kd.generate.decode_attention import decode_attention

    q = torch.zeros(2, 6, 32)
    k = torch.zeros(2, 4, 8, 32)
    with pytest.raises(ValueError, match="n_heads % n_kv"):
        decode_attention(q, k, k, torch.ones(2, 8, dtype=torch.bool), scale=1.0)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        decode_attention(torch.zeros(2, 4, 24), torch.zeros(2, 2, 8, 24), torch.zeros(2, 2, 8, 24),
                         torch.ones(2, 8, dtype=torch.bool), scale=1.0)
    kt = torch.zeros(2, 2, 32, 8).transpose(-1, -2)
    with pytest.raises(ValueError, match="contiguous in head_dim"):
        decode_attention(torch.zeros(2, 4, 32), kt, kt, torch.ones(2, 8, dtype=torch.bool), scale=1.0)


@pytest.mark.gpu
def test_gpu_kernel_matches_float64():
    from kd.generate import decode_attention as DA

    g = torch.Generator(device="cuda").manual_seed(0)
    for B, H, nkv, d, L, dt in [(33, 64, 8, 128, 300, torch.bfloat16), (5, 12, 4, 64, 77, torch.float32)]:
        q = torch.randn(B, H, d, device="cuda", generator=g).to(dt)
        k = torch.randn(B, nkv, L + 13, d, device="cuda", generator=g).to(dt)
        v = torch.randn(B, nkv, L + 13, d, device="cuda", generator=g).to(dt)
        first = torch.randint(0, L // 2, (B,), device="cuda", generator=g)
        last = torch.tensor([L - 7], device="cuda")
        pos = torch.arange(L, device="cuda")[None]
        mask = (pos >= first[:, None]) & (pos <= last)
        ref = DA.decode_attention_reference(q, k[:, :, :L], v[:, :, :L], mask, d ** -0.5)
        out = DA.decode_attention(q, k, v, mask[:, None], scale=d ** -0.5, first=first, last=last)
        tol = 3e-2 if dt == torch.bfloat16 else 1e-5
        assert (out.double() - ref).abs().max().item() < tol, (B, dt)
