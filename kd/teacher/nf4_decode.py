"""Decode-time NF4 matmul that reads the 4-bit weights ONCE: ``y = x @ dequant(W).T`` with no bf16 weight written.

During generation every step multiplies a few rows (M = batch size, 1..512) by every teacher weight. The training
path (:func:`kd.teacher.nf4.linear_nf4_fast`) dequantises each weight to a transient bf16 copy and runs cuBLAS: 0.5 B read +
2 B written + 2 B read per weight and step, ~9x the bytes the 4-bit weight itself occupies. Here the weight is read
as packed nibbles and dequantised in registers:

- ``impl="cuda"`` (:mod:`kd.teacher.nf4_cuda`, ``auto``'s choice on CUDA): kd's NVRTC-compiled CUDA kernels -- the
  tensor-core GEMV for up to 8 rows (0.233 ms per 72B layer on the H200 against bitsandbytes' 0.434; bias added
  in the kernel), and for more rows the CUDA dequantisation (bit-identical to torchao, cached scalers) + cuBLAS.
- ``impl="triton"`` (:func:`nf4_matmul_triton`): one Triton kernel, any M. A program owns a
  ``BLOCK_M x BLOCK_N`` tile of ``y`` and walks ``K`` in ``BLOCK_K`` steps: it loads ``BLOCK_N x BLOCK_K/2`` packed
  bytes, looks the two nibbles up in the 16-entry NF4 code book (high nibble = even column, low = odd, torchao's
  layout), multiplies by the block scaler (one per 64 weights) and rounds to bf16 -- the same value as
  ``NF4Tensor.get_original_weight()`` because a product of two bf16 numbers is exact in fp32 and rounded once --
  then accumulates ``x_even @ w_hi.T + x_odd @ w_lo.T`` in fp32 (``tl.dot`` when ``BLOCK_M >= 16``, a broadcast
  multiply-and-sum for ``BLOCK_M == 1``). ``SPLIT_K > 1`` gives small-M shapes enough programs; the partial sums are
  added by ``sum(0)`` afterwards, never by atomics, so results are deterministic run to run.
- ``impl="gemv"`` (:func:`nf4_gemv`, batch 1, bf16): kd's Triton GEMV: ``[BLOCK_N, bytes]`` tiles of packed
  nibbles, the code book gathered from L1, products accumulated in registers and reduced once; the block scaler
  multiplies the per-block sum, so it is not bit-identical to dequantise + matmul (within the weights' bf16
  rounding). Measured on the H200 (CUDA-graph replay, one 72B layer's seven projections): 0.69 ms, against
  bitsandbytes' 0.43, the tiled kernel's 2.68 and a 0.11 ms floor: the fallback when bitsandbytes is missing.
- ``impl="bnb"`` (batch 1 only): bitsandbytes' ``gemv_4bit`` CUDA kernel on the SAME packed bytes (torchao and
  bitsandbytes both pack row-major with the first element in the high nibble; checked in tests/test_nf4_decode.py).
  bitsandbytes wants fp32 ``absmax`` (one per 64 weights: +0.0625 B/weight, 2x the bf16 scalers) and takes the code
  book as an argument: we pass torchao's bf16 table, because the two libraries' NF4 tables differ in one entry
  (index 6: torchao -0.0913, bitsandbytes -0.0908 after rounding to bf16), so the weights stay torchao's.
- ``impl="dequant"``: today's path (Triton dequant to bf16 + cuBLAS), kept for large M where the GEMM is
  compute-bound and cuBLAS wins.

torchao's own int4 kernels (``tinygemm``/``int4_weight_only``) need an asymmetric int4 layout with per-group zero
points, not NF4, so they do not apply without re-quantising the teacher (which would change its outputs).

The per-block scalers are expanded once per weight (:func:`decode_scalers`, bit-identical to torchao's
``dequantize_scalers``; 2 B per 64 weights) and cached in a dict keyed by the weight, not on the tensor.
Without CUDA + Triton everything falls back to the eager math (used on CPU); ``TRITON_INTERPRET=1`` runs the
Triton kernel on CPU for tests.

Public API:
- ``nf4_matmul(x, w: NF4Tensor, *, impl="auto"|"cuda"|"gemv"|"triton"|"bnb"|"dequant"|"torch", bias=None) -> Tensor``
  x [..., K] -> [..., N]
- ``nf4_gemv(x, w)`` (one bf16 row), ``GemvConfig`` / ``tune_gemv(N, K)``
- ``decode_scalers(w) -> Tensor [N*K/64]`` (bf16), ``clear_cache()``
- ``DecodeConfig`` / ``tune_config(M, N, K)``: the Triton tile choice (timed once per shape on CUDA)
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from kd.teacher.nf4 import dequantize_nf4, dequantize_scalers

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - CPU-only environments without triton
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = ["nf4_matmul", "nf4_matmul_triton", "nf4_gemv", "GemvConfig", "tune_gemv", "nf4_matmul_bnb", "decode_scalers", "clear_cache", "DecodeConfig",
           "tune_config", "fused_available", "bnb_available"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_available(device: torch.device) -> bool:
    """The Triton kernel can run on tensors of ``device`` (CUDA with Triton, or the Triton interpreter)."""
    return _HAS_TRITON and (device.type == "cuda" or _INTERPRET)


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401

        return torch.cuda.is_available()
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------ caches
# keyed by id(weight) (NF4Tensor supports no ``==``, so no WeakKeyDictionary); an entry is dropped when its weight
# is garbage-collected (weakref callback) and checked to still belong to the same object on every hit.
_SCALERS: Dict[int, Tuple["weakref.ref", torch.Tensor]] = {}  # bf16 scalers
_ABSMAX: Dict[int, Tuple["weakref.ref", Tuple[torch.Tensor, torch.Tensor]]] = {}  # fp32 absmax, fp32 code


def clear_cache() -> None:
    _SCALERS.clear()
    _ABSMAX.clear()


def _cached(cache: dict, w, make):
    hit = cache.get(id(w))
    if hit is not None and hit[0]() is w:
        return hit[1]
    val = make()
    key = id(w)
    cache[key] = (weakref.ref(w, lambda _r, c=cache, k=key: c.pop(k, None)), val)
    return val


def decode_scalers(w) -> torch.Tensor:
    """Per-64-weight scalers of ``w`` in ``w.dtype`` (torchao's formula, bit-identical), computed once per weight."""

    return _cached(_SCALERS, w, lambda: dequantize_scalers(w).contiguous())


def _bnb_state(w) -> Tuple[torch.Tensor, torch.Tensor]:
    return _cached(_ABSMAX, w, lambda: (decode_scalers(w).float().contiguous(), w.nf4.float().contiguous()))


# ------------------------------------------------------------------------------------------------ Triton
if _HAS_TRITON:

    @triton.jit
    def _nf4_mm_kernel(x_ptr, q_ptr, s_ptr, nf4_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_os,
                       N_ITER: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, IEEE: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        HALF: tl.constexpr = BLOCK_K // 2
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_h = tl.arange(0, HALF)
        m_mask = offs_m < M
        n_mask = offs_n < N
        rows = offs_n.to(tl.int64)
        q_row = q_ptr + rows[:, None] * (K // 2)
        s_row = s_ptr + rows[:, None] * (K // QBLOCK)
        x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * (N_ITER * BLOCK_K)
        for it in range(0, N_ITER):  # a constexpr trip count (also keeps the Triton interpreter happy)
            k0 = k_lo + it * BLOCK_K
            kk = k0 + 2 * offs_h  # even columns of this K tile
            k_ok = kk < K
            b = tl.load(q_row + (k0 // 2 + offs_h)[None, :], mask=n_mask[:, None] & k_ok[None, :], other=0)
            b = b.to(tl.int32)
            s = tl.load(s_row + (kk // QBLOCK)[None, :], mask=n_mask[:, None] & k_ok[None, :], other=0.0)
            s = s.to(tl.float32)
            # bf16 code * bf16 scaler is exact in fp32; one rounding to the weight dtype = torchao's dequant
            w_hi = (tl.load(nf4_ptr + (b >> 4)).to(tl.float32) * s).to(nf4_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            w_lo = (tl.load(nf4_ptr + (b & 15)).to(tl.float32) * s).to(nf4_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            xm = m_mask[:, None] & k_ok[None, :]
            x_e = tl.load(x_row + kk[None, :], mask=xm, other=0.0)
            x_o = tl.load(x_row + (kk + 1)[None, :], mask=xm, other=0.0)
            if BLOCK_M >= 16:
                if IEEE:  # fp32 weights: no TF32 rounding
                    acc += tl.dot(x_e.to(w_hi.dtype), tl.trans(w_hi), input_precision="ieee")
                    acc += tl.dot(x_o.to(w_lo.dtype), tl.trans(w_lo), input_precision="ieee")
                else:
                    acc += tl.dot(x_e.to(w_hi.dtype), tl.trans(w_hi))
                    acc += tl.dot(x_o.to(w_lo.dtype), tl.trans(w_lo))
            else:
                acc += tl.sum(x_e.to(tl.float32)[:, None, :] * w_hi.to(tl.float32)[None, :, :], axis=2)
                acc += tl.sum(x_o.to(tl.float32)[:, None, :] * w_lo.to(tl.float32)[None, :, :], axis=2)
        o = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


    @triton.jit
    def _gemv_rows(N, BLOCK_N: tl.constexpr):
        """This program's output rows of a GEMV (shared by both GEMV kernels): (K split, rows, mask, rows as int64)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        return tl.program_id(1), rows, rows < N, rows.to(tl.int64)


    @triton.jit
    def _nf4_gemv_kernel(x_ptr, q_ptr, s_ptr, nf4_ptr, out_ptr, N, K, stride_os,
                         N_ITER: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
        """One row of ``x`` (batch-1 decode): a program owns ``BLOCK_N`` outputs and a K range of
        ``N_ITER * NB`` scaler blocks. Each step loads ``[BLOCK_N, NB, QBLOCK/2]`` packed bytes (contiguous per
        row), the matching ``x`` pairs as int32 words (two bf16 each: even column low half, odd column high half),
        and sums ``code * x`` per scaler block BEFORE multiplying by the block's scaler: one multiply per 64
        weights instead of one per weight (the price: the weight is not rounded to bf16 first, so the result is
        not bit-identical to dequantise + matmul; within the bf16 rounding of the weights)."""
        HB: tl.constexpr = QBLOCK // 2
        pid_k, rows, n_mask, rows64 = _gemv_rows(N, BLOCK_N)
        nb = tl.arange(0, NB)
        j = tl.arange(0, HB)
        n_blocks = K // QBLOCK
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        blk0 = pid_k * (N_ITER * NB)
        for it in range(0, N_ITER):
            blk = blk0 + it * NB + nb  # [NB] scaler-block index along K
            b_ok = blk < n_blocks
            byte = blk[None, :, None] * HB + j[None, None, :]  # [1, NB, HB] byte offset in the row
            m3 = n_mask[:, None, None] & b_ok[None, :, None]
            b = tl.load(q_ptr + rows64[:, None, None] * (K // 2) + byte, mask=m3, other=0).to(tl.int32)
            hi = tl.load(nf4_ptr + (b >> 4)).to(tl.float32)
            lo = tl.load(nf4_ptr + (b & 15)).to(tl.float32)
            xw = tl.load(x_ptr + byte, mask=b_ok[None, :, None], other=0)  # int32 = (x[2i+1] << 16) | x[2i]
            x_e = (xw << 16).to(tl.float32, bitcast=True)
            x_o = (xw & -65536).to(tl.float32, bitcast=True)
            part = tl.sum(hi * x_e + lo * x_o, axis=2)  # [BLOCK_N, NB]
            sc = tl.load(s_ptr + rows64[:, None] * n_blocks + blk[None, :], mask=n_mask[:, None] & b_ok[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(part * sc, axis=1)
        tl.store(out_ptr + pid_k * stride_os + rows, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


    @triton.jit
    def _nf4_gemv2_kernel(x_ptr, q_ptr, s_ptr, nf4_ptr, out_ptr, N, K, stride_os,
                          N_ITER: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
        """2-D variant of :func:`_nf4_gemv_kernel`: ``[BLOCK_N, BLOCK_B]`` bytes per step, the block scaler
        gathered per byte (32 neighbouring bytes share one: an L1 hit), products accumulated elementwise in
        registers and reduced once after the K loop (no per-step reductions)."""
        HB: tl.constexpr = QBLOCK // 2
        pid_k, rows, n_mask, rows64 = _gemv_rows(N, BLOCK_N)
        jb = tl.arange(0, BLOCK_B)
        KB = K // 2
        acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
        b0 = pid_k * (N_ITER * BLOCK_B)
        for it in range(0, N_ITER):
            byte = b0 + it * BLOCK_B + jb  # [BLOCK_B] byte offset in the row
            k_ok = byte < KB
            m2 = n_mask[:, None] & k_ok[None, :]
            b = tl.load(q_ptr + rows64[:, None] * KB + byte[None, :], mask=m2, other=0).to(tl.int32)
            hi = tl.load(nf4_ptr + (b >> 4)).to(tl.float32)
            lo = tl.load(nf4_ptr + (b & 15)).to(tl.float32)
            xw = tl.load(x_ptr + byte, mask=k_ok, other=0)[None, :]
            x_e = (xw << 16).to(tl.float32, bitcast=True)
            x_o = (xw & -65536).to(tl.float32, bitcast=True)
            sc = tl.load(s_ptr + rows64[:, None] * (K // QBLOCK) + (byte // HB)[None, :], mask=m2,
                         other=0.0).to(tl.float32)
            acc += sc * (hi * x_e + lo * x_o)
        tl.store(out_ptr + pid_k * stride_os + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=n_mask)


@dataclass(frozen=True)
class DecodeConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _candidates(M: int, N: int, K: int):
    """A small search space (each config is one Triton compile per shape): ~8 per (M, N, K)."""
    if M == 1:
        for bn in (32, 64):
            for bk in (256, 512):
                for sk in (1, 4):
                    yield DecodeConfig(1, bn, bk, sk, 4, 3)
    elif M <= 16:
        for bn in (32, 64):
            for bk in (128, 256):
                for sk in (1, 4):
                    yield DecodeConfig(16, bn, bk, sk, 4, 3)
    else:
        for bm in ((64, 128) if M >= 128 else (32, 64)):
            for bk in (64, 128):
                for ns in (3, 4):
                    yield DecodeConfig(bm, 128, bk, 1, 8, ns)


def _default_config(M: int, N: int, K: int) -> DecodeConfig:
    if M == 1:
        return DecodeConfig(1, 32, 512, 4 if N <= 2048 else 1, 4)
    if M <= 16:
        return DecodeConfig(16, 64, 256, 4 if N <= 2048 else 1, 4)
    return DecodeConfig(64 if M < 128 else 128, 128, 64, 1, 8, 3)


_TUNED: Dict[Tuple[int, int, int, torch.dtype], DecodeConfig] = {}


def _can_time(w, x: Optional[torch.Tensor]) -> bool:
    """Tile timing runs on CUDA only, never while a CUDA graph is being captured, and not with KD_NF4_TUNE=0."""
    return (w is not None and x is not None and x.is_cuda and not torch.cuda.is_current_stream_capturing()
            and os.environ.get("KD_NF4_TUNE", "1") != "0")


def _fastest(candidates, run, iters: int, graph: bool = False):
    """The candidate whose ``run(cfg)`` takes the least GPU time (2 eager warm-up calls, then ``iters`` calls between
    CUDA events); candidates that fail to compile or launch (shared memory, registers) are skipped. None if all
    fail. ``graph=True`` times ``iters`` calls captured in one CUDA graph (replayed 3 times), as the decode step
    runs them: for kernels launched from Python (NVRTC, ctypes) eager timing would measure the launch, not the
    kernel."""
    best, best_t = None, float("inf")
    for cfg in candidates:
        try:
            for _ in range(2):
                run(cfg)
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if graph:
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(iters):
                        run(cfg)
                g.replay()
                st.record()
                for _ in range(3):
                    g.replay()
                en.record()
                en.synchronize()
                t = st.elapsed_time(en) / (3 * iters)
                del g
            else:
                st.record()
                for _ in range(iters):
                    run(cfg)
                en.record()
                en.synchronize()
                t = st.elapsed_time(en) / iters
        except Exception:  # a config that does not compile/fit is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    return best


def _launch(x2: torch.Tensor, w, s: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    M, K = x2.shape
    N = w.shape[0]
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), cfg.split_k)
    if cfg.split_k == 1:
        out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        stride_os = 0
    else:
        out = torch.empty((cfg.split_k, M, N), dtype=torch.float32, device=x2.device)
        stride_os = M * N
    k_chunk = triton.cdiv(K, cfg.split_k * cfg.block_k) * cfg.block_k  # K per split, a multiple of BLOCK_K
    _nf4_mm_kernel[grid](x2, w.quantized_data, s, w.nf4, out, M, N, K, x2.stride(0), N, stride_os,
                         N_ITER=k_chunk // cfg.block_k, QBLOCK=w.block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                         SPLIT_K=cfg.split_k, IEEE=w.nf4.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if cfg.split_k == 1 else out.sum(0).to(x2.dtype)


def tune_config(M: int, N: int, K: int, w=None, x2: Optional[torch.Tensor] = None) -> DecodeConfig:
    """Tile choice for an ``M x K @ K x N`` product: timed once per (M, N, K, dtype) on CUDA (never while a CUDA
    graph is being captured: the graph warm-up replays run eagerly first), the default elsewhere."""
    key = (M, N, K, x2.dtype if x2 is not None else None)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if not _can_time(w, x2):
        return _default_config(M, N, K)
    s = decode_scalers(w)
    best = _fastest(_candidates(M, N, K), lambda cfg: _launch(x2, w, s, cfg), iters=5) or _default_config(M, N, K)
    _TUNED[key] = best
    return best


def nf4_matmul_triton(x: torch.Tensor, w, cfg: Optional[DecodeConfig] = None) -> torch.Tensor:
    """``x [..., K] @ dequant(w).T -> [..., N]`` with the fused Triton kernel (weights read once)."""
    if not _HAS_TRITON:
        raise RuntimeError("kd: the fused NF4 decode kernel needs triton")
    K = x.shape[-1]
    N = w.shape[0]
    if w.shape[1] != K or K % w.block_size:
        raise ValueError(f"shape mismatch: x [..., {K}] vs weight {tuple(w.shape)} (block {w.block_size})")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    cfg = cfg or tune_config(x2.shape[0], N, K, w, x2)
    return _launch(x2, w, decode_scalers(w), cfg).reshape(*x.shape[:-1], N)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    nb: int  # scaler blocks (of 64 weights = 32 bytes) per row and step
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    flat: bool = False  # the 2-D kernel (_nf4_gemv2_kernel: nb * 32 bytes per row and step)


def _gemv_candidates(N: int, K: int):
    sks = (1, 2, 4) if N >= 4096 else (4, 8, 16)
    for bn, nb in ((4, 8), (8, 4), (8, 8), (16, 4), (2, 16)):
        for sk in sks:
            yield GemvConfig(bn, nb, sk, 4, 2, True)
    yield GemvConfig(8, 8, sks[0], 8, 3, True)
    yield GemvConfig(16, 4, sks[1], 4, 2)  # the 3-D kernel


def _gemv_default(N: int, K: int) -> GemvConfig:
    return GemvConfig(8, 8, 1 if N >= 4096 else 8, 4, 2, True)


_TUNED_GEMV: Dict[Tuple[int, int], GemvConfig] = {}


def _launch_gemv(x1: torch.Tensor, w, s: torch.Tensor, cfg: GemvConfig) -> torch.Tensor:
    K = x1.shape[-1]
    N = w.shape[0]
    n_blocks = K // w.block_size
    per_split = triton.cdiv(n_blocks, cfg.split_k * cfg.nb)  # steps per split
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    out = torch.empty((cfg.split_k, N), dtype=torch.float32 if cfg.split_k > 1 else x1.dtype, device=x1.device)
    if cfg.flat:
        _nf4_gemv2_kernel[grid](x1.view(torch.int32), w.quantized_data, s, w.nf4, out, N, K, N,
                                N_ITER=per_split, QBLOCK=w.block_size, BLOCK_N=cfg.block_n,
                                BLOCK_B=cfg.nb * (w.block_size // 2), num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages)
    else:
        _nf4_gemv_kernel[grid](x1.view(torch.int32), w.quantized_data, s, w.nf4, out, N, K, N,
                               N_ITER=per_split, QBLOCK=w.block_size, BLOCK_N=cfg.block_n, NB=cfg.nb,
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out[0] if cfg.split_k == 1 else out.sum(0).to(x1.dtype)


def tune_gemv(N: int, K: int, w=None, x1: Optional[torch.Tensor] = None) -> GemvConfig:
    """The GEMV tile choice for an ``N x K`` weight: timed once per shape on CUDA (never during graph capture),
    the default elsewhere (``KD_NF4_TUNE=0`` skips the timing)."""
    cfg = _TUNED_GEMV.get((N, K))
    if cfg is not None:
        return cfg
    if not _can_time(w, x1):
        return _gemv_default(N, K)
    s = decode_scalers(w)
    best = _fastest(_gemv_candidates(N, K), lambda cfg: _launch_gemv(x1, w, s, cfg), iters=10)
    best = best or _gemv_default(N, K)
    _TUNED_GEMV[(N, K)] = best
    return best


def nf4_gemv(x: torch.Tensor, w, cfg: Optional[GemvConfig] = None) -> torch.Tensor:
    """Batch-1 ``x [..., K] @ dequant(w).T -> [..., N]`` (``x.numel() == K``, bf16) with kd's Triton GEMV: the
    4-bit weight read once, the code book looked up in registers' reach (L1), one scaler multiply per 64
    weights."""
    if not _HAS_TRITON:
        raise RuntimeError("kd: the NF4 GEMV kernel needs triton")
    K = x.shape[-1]
    N = w.shape[0]
    if x.numel() != K:
        raise ValueError("kd: nf4_gemv is for one row (batch 1)")
    if w.shape[1] != K or K % w.block_size or w.block_size % 2:
        raise ValueError(f"shape mismatch: x [..., {K}] vs weight {tuple(w.shape)} (block {w.block_size})")
    if x.dtype != torch.bfloat16:
        raise ValueError(f"kd: nf4_gemv takes bf16 activations, got {x.dtype}")
    x1 = x.reshape(K).contiguous()
    cfg = cfg or tune_gemv(N, K, w, x1)
    return _launch_gemv(x1, w, decode_scalers(w), cfg).reshape(*x.shape[:-1], N)


def nf4_matmul_bnb(x: torch.Tensor, w) -> torch.Tensor:
    """Batch-1 product through bitsandbytes' ``gemv_4bit`` kernel on torchao's packed bytes (CUDA)."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    K = x.shape[-1]
    if x.numel() != K:
        raise ValueError("kd: bitsandbytes gemv_4bit is for one row (batch 1)")
    absmax, code = _bnb_state(w)
    B = w.quantized_data.view(-1, 1)
    y = torch.ops.bitsandbytes.gemv_4bit.default(x.reshape(1, 1, K).contiguous(), B, [w.shape[0], K], absmax,
                                                 code, w.block_size)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _nf4_matmul_torch(x: torch.Tensor, w) -> torch.Tensor:
    """Eager reference of the fused kernel: dequantise (bit-identical to torchao) and multiply."""

    return F.linear(x, dequantize_nf4(w, impl="torch").to(x.dtype))


def _nf4_matmul_cuda(x: torch.Tensor, w, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """kd's CUDA kernels (:mod:`kd.teacher.nf4_cuda`): the tensor-core GEMV for at most 8 rows, else the CUDA
    dequantisation (bit-identical to torchao) + cuBLAS."""
    from kd.teacher import nf4_cuda

    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M <= 8 and x.dtype == torch.bfloat16:
        cfg = nf4_cuda.tune(N, K, M, w, x2)
        return nf4_cuda.gemv(x2, w, decode_scalers(w), cfg, bias).reshape(*x.shape[:-1], N)
    return F.linear(x, nf4_cuda.dequant(w, decode_scalers(w)).to(x.dtype), bias)


#: ``auto`` sends more rows than this to dequantise + cuBLAS (compute-bound there; the tiled kernel is 14x slower
#: at 512 rows, docs/offline.md)
_TILED_MAX_ROWS = 64


def _cuda_ok(x: torch.Tensor, w) -> bool:
    if not x.is_cuda or w.block_size != 64 or w.nf4.dtype != torch.bfloat16 or x.shape[-1] % 64:
        return False
    from kd.teacher import nf4_cuda

    return nf4_cuda.available(x.device)


def nf4_matmul(x: torch.Tensor, w, *, impl: str = "auto", bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, dequant(w), bias)`` for decode-sized ``x``. ``auto`` on CUDA: kd's CUDA kernels (``cuda``:
    the tensor-core NF4 GEMV up to 8 bf16 rows, NVRTC-compiled; 0.233 ms per 72B layer against bitsandbytes' 0.434,
    docs/offline.md) where NVRTC works, else bitsandbytes' ``gemv_4bit`` at one row when it is installed, kd's
    Triton GEMV at one row without it, the tiled Triton kernel up to 64 rows; above 64 rows dequantise + cuBLAS
    (the CUDA dequantisation where NVRTC works); the eager math on CPU. ``gemv`` with
    more than one row (or non-bf16) uses the tiled kernel; ``cuda`` with more than 8 rows is the CUDA
    dequantisation + cuBLAS, and falls back to ``auto``'s next choice where NVRTC does not work."""
    if impl == "fused":
        from kd.generate.nf4_matmul import nf4_matmul_fused

        return nf4_matmul_fused(x, w, bias)
    if impl == "next":  # the proposed auto: CUDA GEMV <= 8 rows, fused read-once kernel <= FUSED_MAX_ROWS, else dequant
        from kd.generate.nf4_matmul import FUSED_MAX_ROWS, nf4_matmul_fused

        rows = x.numel() // x.shape[-1]
        if rows > 8 and rows <= FUSED_MAX_ROWS:
            return nf4_matmul_fused(x, w, bias)
        if _cuda_ok(x, w):
            return _nf4_matmul_cuda(x, w, bias)
        return F.linear(x, dequantize_nf4(w).to(x.dtype), bias)
    rows = x.numel() // x.shape[-1]
    if impl in ("auto", "cuda") and _cuda_ok(x, w) and (
            impl == "cuda" or (rows <= 8 and x.dtype == torch.bfloat16) or rows > _TILED_MAX_ROWS):
        return _nf4_matmul_cuda(x, w, bias)
    y = _nf4_matmul_nobias(x, w, "auto" if impl == "cuda" else impl)
    return y if bias is None else y + bias


def _nf4_matmul_nobias(x: torch.Tensor, w, impl: str) -> torch.Tensor:
    one_row = x.numel() == x.shape[-1]
    if impl == "auto":
        if x.is_cuda and one_row and bnb_available():
            impl = "bnb"
        elif fused_available(x.device):
            impl = "gemv" if one_row and x.dtype == torch.bfloat16 else (
                "triton" if x.numel() <= _TILED_MAX_ROWS * x.shape[-1] else "dequant")
        else:
            impl = "torch"
    if impl == "gemv":
        if one_row and x.dtype == torch.bfloat16:
            return nf4_gemv(x, w)
        impl = "triton"
    if impl == "triton":
        return nf4_matmul_triton(x, w)
    if impl == "bnb":
        if x.numel() != x.shape[-1]:  # more than one row: the Triton kernel
            return nf4_matmul_triton(x, w)
        return nf4_matmul_bnb(x, w)
    if impl == "dequant":
        from kd.teacher.nf4 import dequantize_nf4

        return F.linear(x, dequantize_nf4(w).to(x.dtype))
    if impl == "torch":
        return _nf4_matmul_torch(x, w)
    raise ValueError(f"kd: unknown NF4 decode impl {impl!r} (auto, cuda, gemv, triton, bnb, dequant, torch)")
