"""One fused kernel for a decode step's grouped-query attention (one new token per row, KV cache read once).

:func:`kd.generate.generation.grouped_decode_attend` does the same maths in eight launches (QK^T batched GEMM, fp32
cast, scale, mask, softmax, bf16 cast, PV batched GEMM, head transpose): at batch 512 every one of them passes over
``[B, n_kv, g, L]`` fp32 scores, more than twice the time of reading the cache once (docs/offline.md). :func:`decode_attention` is one Triton program per (row, KV head):
the ``g`` query heads of the group against their shared K/V in blocks of ``BLOCK_L`` cache slots, online softmax
in fp32 (FlashAttention's recurrence, Dao et al. 2022, eq. in Alg. 1: ``m' = max(m, max_j s_j)``,
``l' = e^(m - m') l + sum_j e^(s_j - m')``, ``acc' = e^(m - m') acc + sum_j e^(s_j - m') v_j``), written straight
into the ``[B, n_h * d]`` layout the output projection reads.

Numerics: scores ``q . k * d^-0.5`` and the softmax in fp32, ``p`` rounded to K/V's dtype before ``p @ v`` (as the
eager path rounds the probabilities), fp32 accumulation; the result differs from the eager path by rounding only
(tests/test_decode_attention.py: against a float64 reference, in the Triton interpreter on CPU and on CUDA).
CPU decoding keeps the eager path (bit-for-bit the earlier tokens).
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - CPU wheels without Triton
    triton = tl = None
    _HAS_TRITON = False

__all__ = ["decode_attention", "decode_attention_reference", "available"]


def available(device: torch.device) -> bool:
    """Triton present and ``device`` is CUDA (the interpreter runs it on CPU for tests only)."""
    return _HAS_TRITON and device.type == "cuda"


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Float64 reference. q [B, H, d]; k, v [B, n_kv, L, d]; mask [B, L] bool (True = attend) -> [B, H * d] fp64."""
    B, H, d = q.shape
    nkv = k.shape[1]
    qg = q.double().reshape(B, nkv, H // nkv, d)
    s = torch.einsum("bkgd,bkld->bkgl", qg, k.double()) * scale
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bkgl,bkld->bkgd", p, v.double()).reshape(B, H * d)


if _HAS_TRITON:

    @triton.jit
    def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lo_ptr, hi_ptr, L, scale,
                            sqb, sqh, skb, skh, skl, svb, svh, svl, smb, sml, sob,
                            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
                            HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, DOT_F32: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1).to(tl.int64)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        gmask = g < G
        # the group's query heads [GP, D] (rows >= G are padding for tl.dot's minimum of 16)
        q = tl.load(q_ptr + b * sqb + (kv * G + g)[:, None] * sqh + d[None, :], mask=gmask[:, None], other=0.0)
        # finite start: a block whose slots are all masked (left padding) leaves m at -1e30 and adds exp(-inf) = 0
        m_i = tl.full([GP], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, D], dtype=tl.float32)
        kbase = k_ptr + b * skb + kv * skh
        vbase = v_ptr + b * svb + kv * svh
        # the slots a row can attend to: from its first unmasked slot (left padding, lo [B]) to the current one
        # (hi [1]: the slot just written); the mask still decides inside that range
        end = L
        if HAS_HI:
            end = tl.minimum(tl.load(hi_ptr).to(tl.int32) + 1, L)
        start = 0
        if HAS_LO:
            start = (tl.load(lo_ptr + b).to(tl.int32) // BLOCK_L) * BLOCK_L
        while start < end:  # (a while loop: the Triton interpreter cannot range() over a runtime bound)
            lo = start + tl.arange(0, BLOCK_L)
            lmask = lo < end
            keep = tl.load(m_ptr + b * smb + lo * sml, mask=lmask, other=0) != 0
            kt = tl.load(kbase + lo[:, None] * skl + d[None, :], mask=lmask[:, None], other=0.0)  # [BLOCK_L, D]
            if DOT_F32:  # the Triton interpreter's bf16 tl.dot is wrong (numpy has no bf16): the same products in fp32
                s = tl.dot(q.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(kt)) * scale  # [GP, BLOCK_L] fp32
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(vbase + lo[:, None] * svl + d[None, :], mask=lmask[:, None], other=0.0)
            pv = p.to(vt.dtype)  # probabilities rounded to the cache dtype, as the eager path does
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(pv.to(tl.float32), vt.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pv, vt)
            m_i = m_new
            start += BLOCK_L
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * sob + (kv * G + g)[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=gmask[:, None])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *,
                     scale: float, first: Optional[torch.Tensor] = None, last: Optional[torch.Tensor] = None,
                     block_l: int = 64, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Grouped-query attention of one decode token per row, one Triton launch.

    q: [B, H, d] (any strides with d contiguous; e.g. ``[B, 1, H, d]`` squeezed); k, v: [B, n_kv, L', d] caches
    (d contiguous; only the first ``L = mask.shape[-1]`` slots are read); mask: [B, L] or [B, 1, L] bool, True =
    attend (every row must attend to at least one slot: a decode row always sees its own token).
    first: optional [B] int64 device tensor, each row's first slot that can be unmasked (its left padding);
    last: optional [1] int64 device tensor, the last slot any row can attend to (the one just written). Blocks
    outside ``[first, last]`` are not read at all: the step reads the filled cache, not the whole bucket of ``L``.
    Returns [B, H * d] in q's dtype, heads in order (the layout of ``out.transpose(1, 2).reshape(B, 1, -1)``)."""
    if not _HAS_TRITON:
        raise RuntimeError("kd: decode_attention needs Triton")
    B, H, D = q.shape
    nkv = k.shape[1]
    if H % nkv or D & (D - 1) or D < 16:
        raise ValueError(f"kd: decode_attention wants n_heads % n_kv == 0 and a power-of-two head_dim >= 16 "
                         f"(got {H}, {nkv}, {D})")
    m = mask.reshape(B, -1)
    L = m.shape[-1]
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.stride(-1) != 1:
            raise ValueError(f"kd: decode_attention wants {name} contiguous in head_dim")
    G = H // nkv
    GP = max(16, triton.next_power_of_2(G))
    out = torch.empty(B, H * D, dtype=q.dtype, device=q.device)
    _decode_attn_kernel[(B, nkv)](
        q, k, v, m, out, first if first is not None else m, last if last is not None else m, L, float(scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        m.stride(0), m.stride(1), out.stride(0),
        G=G, GP=GP, D=D, BLOCK_L=block_l, HAS_LO=first is not None, HAS_HI=last is not None,
        DOT_F32=not q.is_cuda or q.dtype == torch.float32,  # fp32 caches: IEEE products, not TF32
        num_warps=num_warps, num_stages=num_stages)
    return out
