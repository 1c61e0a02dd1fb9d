"""Decode-time NF4 product that reads the packed 4-bit weight once: ``y = x @ dequant(W).T (+ bias)``.

During generation every step multiplies a few rows (``M`` = batch size, 1..512) by every teacher weight. The
training path dequantises each weight to a transient bf16 copy and runs cuBLAS: 0.5 B read + 2 B written + 2 B read
per weight and step, ~9x the bytes of the 4-bit weight. The routes, and no more (the measurements that chose them:
docs/offline.md, "Decode routes"):

- ``fused`` (CUDA, and the Triton interpreter on CPU for tests): one Triton kernel for every ``M``. A program owns a
  ``BLOCK_N x BLOCK_M`` tile of ``y.T`` and walks its share of ``K`` in ``BLOCK_K`` steps. Each step loads
  ``BLOCK_N x BLOCK_K/2`` packed bytes and looks both nibbles up in the 16-entry NF4 code book (high nibble = even
  column, torchao's layout). Exact scaling (``scale_after=False``) multiplies each code by its 64-weight block's
  scaler and rounds once to bf16 -- the value ``NF4Tensor.get_original_weight()`` gives, because a product of two
  bf16 numbers is exact in fp32 -- so the product equals dequantise + matmul up to the order of the fp32 sums;
  ``scale_after=True`` multiplies each block's fp32 partial product by the scaler instead (less arithmetic per
  weight; differs by about the bf16 rounding of the weights). The weight tile is the *first* operand of
  ``tl.dot`` against ``x.T``: the weight is the large side of a decode product, so it takes the MMA's row
  dimension and ``M`` the narrow column dimension. ``SPLIT_K > 1`` gives small-``M`` products enough programs; the
  fp32 partial sums are added by ``sum(0)``, never by atomics, so the result is the same run to run. The tile is
  chosen by timing the :func:`candidates` once per (row bucket, N, K) on CUDA.
- ``gemv`` (``auto`` only, up to :data:`GEMV_MAX_ROWS` bf16 rows where NVRTC works): kd's CUDA tensor-core GEMV
  (:mod:`kd.teacher.nf4_cuda`), kept because it reads the weights ~3x faster than ``fused`` at one row.
- ``dequant``: dequantise to bf16 (bit-identical to torchao; kd's CUDA kernel where NVRTC works) + cuBLAS: the
  reference, and ``auto``'s route for more rows than ``max_fused_rows`` (prefill, scoring passes, large batches),
  where the product is compute-bound and cuBLAS's GEMM is worth its 4 B per weight of extra traffic.
- ``torch``: the same dequantise + matmul in eager PyTorch: ``auto``'s route on CPU.

Public API:
- ``nf4_matmul(x [..., K], w: NF4Tensor [N, K], *, impl="auto"|"fused"|"dequant", bias=None,
  max_fused_rows=FUSED_MAX_ROWS) -> [..., N]``; ``route(x, w, impl, max_fused_rows) -> str``
- ``DecodeRoute(impl, max_fused_rows)``: that product as a ``fn(x, w, bias)`` for
  :func:`kd.teacher.nf4.set_decode_`
- ``nf4_matmul_fused(x, w, bias=None, cfg=None)``, ``TileConfig``, ``candidates``, ``tune(M, N, K, ...)``
- ``packed(w) -> PackedNF4`` (the kernel's view of a weight: bytes, bf16 scalers, code book)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from kd.core.kernels import can_time, fastest

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - environments without triton
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = ["nf4_matmul", "route", "DecodeRoute", "nf4_matmul_fused", "PackedNF4", "packed", "TileConfig",
           "candidates", "tune", "fused_available", "FUSED_MAX_ROWS", "GEMV_MAX_ROWS", "IMPLS"]

#: the kernels a user may name (``nf4_decode_kernel``); ``torch`` (the CPU reference) is what any of them runs on CPU
IMPLS = ("auto", "fused", "dequant")
#: ``auto`` sends more rows than this to dequantise + cuBLAS (compute-bound there; docs/offline.md)
FUSED_MAX_ROWS = 128
#: ``auto`` sends at most this many bf16 rows to kd's CUDA GEMV where NVRTC works
GEMV_MAX_ROWS = 8

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_available(device: torch.device) -> bool:
    """The fused kernel can run on tensors of ``device`` (CUDA with Triton, or the Triton interpreter on CPU)."""
    return _HAS_TRITON and (device.type == "cuda" or _INTERPRET)


# ------------------------------------------------------------------------------------------------ packed weights
@dataclass(frozen=True)
class PackedNF4:
    """What the kernel reads of an NF4 weight ``[N, K]``: ``data`` uint8 ``[N, K/2]`` (two nibbles per byte, high =
    even column), ``scalers`` ``[N, K/block]`` in the code book's dtype (one per ``block`` weights), ``code`` the
    16-entry code book."""

    data: torch.Tensor
    scalers: torch.Tensor
    code: torch.Tensor
    block: int

    @property
    def shape(self) -> Tuple[int, int]:
        return self.data.shape[0], self.data.shape[1] * 2

    @property
    def nbytes(self) -> int:
        """Bytes one product reads of this weight (packed nibbles + scalers)."""
        return self.data.numel() * self.data.element_size() + self.scalers.numel() * self.scalers.element_size()

    @staticmethod
    def cat(parts: Sequence["PackedNF4"]) -> "PackedNF4":
        """Weights that multiply the same input, stacked along ``N`` (one product instead of several)."""
        p0 = parts[0]
        if any(p.block != p0.block or p.shape[1] != p0.shape[1] or not torch.equal(p.code, p0.code) for p in parts):
            raise ValueError("kd: only NF4 weights with the same K, block size and code book can be stacked")
        return PackedNF4(torch.cat([p.data for p in parts]), torch.cat([p.scalers for p in parts]), p0.code, p0.block)


def packed(w) -> PackedNF4:
    """The kernel's view of torchao ``NF4Tensor`` ``w`` (views of its bytes; scalers decoded once per weight,
    bit-identical to torchao's ``dequantize_scalers``)."""
    from kd.teacher.nf4 import cached_scalers

    n, k = w.shape
    if k % w.block_size or w.block_size % 2:
        raise ValueError(f"kd: NF4 weight {tuple(w.shape)} with block {w.block_size}: K must be a multiple of it")
    return PackedNF4(w.quantized_data.view(n, k // 2), cached_scalers(w).view(n, k // w.block_size), w.nf4,
                     w.block_size)


# ------------------------------------------------------------------------------------------------ the kernel
if _HAS_TRITON:

    @triton.jit
    def _round(v, dtype: tl.constexpr, BY_HAND: tl.constexpr):
        """fp32 ``v`` rounded to nearest-even in ``dtype``. The interpreter truncates fp32 -> bf16 casts, so there
        the bf16 rounding is done on the bits (same result as the GPU's ``cvt.rn.bf16.f32`` for finite values)."""
        if BY_HAND and dtype == tl.bfloat16:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact now: the low 16 bits are zero
        return v.to(dtype)

    # one kernel body for both scaling orders and both nibble layouts: the variants share the tile walk, the masks
    # and the epilogue, and the tuner picks among them per shape, so splitting them would copy all of that
    @triton.jit
    def _nf4_mm_tile(x_ptr, q_ptr, s_ptr, code_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_os,
                       K_ITERS, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                       INTERPRET: tl.constexpr, SCALE_AFTER: tl.constexpr, TWO_DOT: tl.constexpr):
        """One program's tile (the kernels below differ only in whether the K trip count is a compile-time constant)."""
        HALF: tl.constexpr = BLOCK_K // 2
        NG: tl.constexpr = BLOCK_K // QBLOCK  # scaler blocks per row and step
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_h = tl.arange(0, HALF)
        offs_k = tl.arange(0, BLOCK_K)
        offs_g = tl.arange(0, NG)
        rows = (offs_n % N).to(tl.int64)  # rows past N re-read row 0..: no mask on the weight loads, never stored
        m_ok = offs_m < M
        q_tile = q_ptr + rows[:, None] * (K // 2) + offs_h[None, :]  # [BLOCK_N, HALF] bytes
        s_tile = s_ptr + rows[:, None] * (K // QBLOCK) + offs_g[None, :]  # [BLOCK_N, NG] scalers
        x_tile = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None]  # [BLOCK_K, BLOCK_M] = x.T
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_lo = pid_k * (K_ITERS * BLOCK_K)
        QB2: tl.constexpr = QBLOCK // 2
        offs_j = tl.arange(0, QB2)
        offs_q = tl.arange(0, QBLOCK)
        for it in range(0, K_ITERS):
            k0 = k_lo + it * BLOCK_K
            if SCALE_AFTER:
                # codes straight from the book into the MMA, one product per scaler block, scaled in fp32 after:
                # ~half the arithmetic per weight; the weight is not rounded to bf16 after scaling, so the result
                # differs from dequantise + matmul by about the bf16 rounding of the weights (and is closer to exact)
                for g in tl.static_range(NG):
                    kg = k0 + g * QBLOCK
                    g_ok = kg < K
                    bg = tl.load(q_ptr + rows[:, None] * (K // 2) + kg // 2 + offs_j[None, :], mask=g_ok,
                                 other=0).to(tl.int32)
                    sg = tl.load(s_ptr + rows * (K // QBLOCK) + kg // QBLOCK, mask=g_ok, other=0.0).to(tl.float32)
                    if TWO_DOT:  # no interleave: high nibbles times the even columns of x, low times the odd
                        xe = tl.load(x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + (kg + 2 * offs_j)[:, None],
                                     mask=m_ok[None, :] & g_ok, other=0.0)
                        xo = tl.load(x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + (kg + 2 * offs_j + 1)[:, None],
                                     mask=m_ok[None, :] & g_ok, other=0.0)
                        c_hi = tl.load(code_ptr + (bg >> 4))
                        c_lo = tl.load(code_ptr + (bg & 15))
                        if IEEE:
                            part = tl.dot(c_hi.to(tl.float32), xe.to(tl.float32), input_precision="ieee")
                            part = tl.dot(c_lo.to(tl.float32), xo.to(tl.float32), part, input_precision="ieee")
                        else:
                            part = tl.dot(c_hi, xe.to(c_hi.dtype))
                            part = tl.dot(c_lo, xo.to(c_lo.dtype), part)
                    else:
                        xg = tl.load(x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + (kg + offs_q)[:, None],
                                     mask=m_ok[None, :] & g_ok, other=0.0)
                        c = tl.reshape(tl.join(tl.load(code_ptr + (bg >> 4)), tl.load(code_ptr + (bg & 15))),
                                       (BLOCK_N, QBLOCK))
                        if IEEE:
                            part = tl.dot(c.to(tl.float32), xg.to(tl.float32), input_precision="ieee")
                        else:
                            part = tl.dot(c, xg.to(c.dtype))
                    acc += part * sg[:, None]
            else:
                if EVEN_K:
                    b = tl.load(q_tile + k0 // 2).to(tl.int32)
                    s = tl.load(s_tile + k0 // QBLOCK)
                    xt = tl.load(x_tile + k0, mask=m_ok[None, :], other=0.0)
                else:
                    k_ok = (k0 + offs_k) < K
                    b = tl.load(q_tile + k0 // 2, mask=((k0 + 2 * offs_h) < K)[None, :], other=0).to(tl.int32)
                    s = tl.load(s_tile + k0 // QBLOCK, mask=((k0 + offs_g * QBLOCK) < K)[None, :], other=0.0)
                    xt = tl.load(x_tile + k0, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
                # the scaler of each byte's block, broadcast in registers: [BLOCK_N, NG] -> [BLOCK_N, HALF]
                sb = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NG, QBLOCK // 2)), (BLOCK_N, HALF)).to(tl.float32)
                # bf16 code * bf16 scaler is exact in fp32; one rounding to the weight dtype = torchao's dequantisation
                w_hi = _round(tl.load(code_ptr + (b >> 4)).to(tl.float32) * sb, code_ptr.dtype.element_ty, INTERPRET)
                w_lo = _round(tl.load(code_ptr + (b & 15)).to(tl.float32) * sb, code_ptr.dtype.element_ty, INTERPRET)
                w = tl.reshape(tl.join(w_hi, w_lo), (BLOCK_N, BLOCK_K))  # columns 2j (high nibble), 2j+1 (low)
                if IEEE:  # fp32 math, no TF32 rounding: fp32 code books, and the interpreter (whose bf16 dot is wrong);
                    # bf16 x bf16 products are exact in fp32, so only the order of the sums differs from the MMA
                    acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(w, xt.to(w.dtype), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        o = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        tl.store(o, _round(acc, out_ptr.dtype.element_ty, INTERPRET), mask=(offs_n < N)[:, None] & m_ok[None, :])


    @triton.jit
    def _nf4_mm_kernel(x_ptr, q_ptr, s_ptr, code_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_os,
                       K_ITERS, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                       INTERPRET: tl.constexpr, SCALE_AFTER: tl.constexpr, TWO_DOT: tl.constexpr):
        """The GPU kernel: the K trip count is a runtime argument (one compile serves every K and split)."""
        _nf4_mm_tile(x_ptr, q_ptr, s_ptr, code_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_os,
                     K_ITERS, QBLOCK, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, EVEN_K, IEEE, INTERPRET, SCALE_AFTER, TWO_DOT)


    @triton.jit
    def _nf4_mm_kernel_interp(x_ptr, q_ptr, s_ptr, code_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_os,
                              K_ITERS: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                       INTERPRET: tl.constexpr, SCALE_AFTER: tl.constexpr, TWO_DOT: tl.constexpr):
        """The same for the Triton interpreter, which cannot loop over a runtime trip count."""
        _nf4_mm_tile(x_ptr, q_ptr, s_ptr, code_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_os,
                     K_ITERS, QBLOCK, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, EVEN_K, IEEE, INTERPRET, SCALE_AFTER, TWO_DOT)


@dataclass(frozen=True)
class TileConfig:
    """One launch shape of the fused kernel: ``block_m`` rows of ``x`` (>= 16: the tensor cores' narrow side),
    ``block_n`` weight rows, ``block_k`` columns per step, ``split_k`` programs along ``K``."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    scale_after: bool = False  # scale each 64-weight block's product instead of each weight
    two_dot: bool = False  # (with scale_after) high and low nibbles as two products, no interleave in registers


def row_bucket(M: int) -> int:
    """The power-of-two row count (>= 16) a tile is tuned for; every ``M`` up to it shares the choice."""
    b = 16
    while b < M:
        b *= 2
    return b


def candidates(M: int, N: int, K: int, sm_count: int = 132) -> List[TileConfig]:
    """The tiles timed for an ``M x K @ K x N`` product (each shape of tile is one Triton compile). Up to 64 rows:
    one ``block_m`` covering the row bucket, and ``split_k`` bringing the grid to about one or two waves of
    ``sm_count`` programs (the product is bound by reading the weight: every SM must stream). From 128 rows the
    product turns compute-bound: larger tiles, 8 warps."""
    bucket = row_bucket(M)
    if bucket <= 64:
        shapes = [(bucket, bn, bk, 4, 3) for bn in (64, 128) for bk in (128, 256)]
    else:
        shapes = [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (64, 128, 128, 4, 3),
                  (128, 64, 128, 4, 3)]
        if bucket >= 256:
            shapes += [(256, 128, 64, 8, 3)]
    out = []
    for bm, bn, bk, warps, stages in shapes:
        tiles = -(-N // bn) * -(-M // bm)
        for waves in (1, 2):
            sk = 1
            while tiles * sk * 2 <= waves * sm_count and K % (bk * sk * 2) == 0:
                sk *= 2
            for after, two in (((False, False), (True, False), (True, True)) if bm <= 128 else ((False, False),)):
                cfg = TileConfig(bm, bn, bk, sk, warps, stages, after, two)
                if cfg not in out:
                    out.append(cfg)
    return out


def default_config(M: int, N: int, K: int, sm_count: int = 132) -> TileConfig:
    """The first candidate: the tile used where nothing is timed (CPU interpreter, ``KD_NF4_TUNE=0``)."""
    return candidates(M, N, K, sm_count)[0]


_TUNED: Dict[Tuple[int, int, int, torch.dtype, str], TileConfig] = {}


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def tune(M: int, N: int, K: int, p: Optional[PackedNF4] = None, x2: Optional[torch.Tensor] = None) -> TileConfig:
    """The tile for an ``M x K @ K x N`` product: timed once per (row bucket, N, K, dtype, device) on CUDA (outside
    graph capture: a graph's warm-up runs eagerly first), the default elsewhere."""
    dev = x2.device if x2 is not None else torch.device("cpu")
    key = (row_bucket(M), N, K, x2.dtype if x2 is not None else None, str(dev))
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    sms = _sm_count(dev)
    if p is None or x2 is None or not can_time(x2):
        return default_config(M, N, K, sms)
    xb = torch.randn(row_bucket(M), K, device=dev, dtype=x2.dtype)  # time the bucket's largest M
    best = fastest(candidates(M, N, K, sms), lambda c: _launch(xb, p, None, c), iters=10)
    _TUNED[key] = best or default_config(M, N, K, sms)
    return _TUNED[key]


def _launch(x2: torch.Tensor, p: PackedNF4, bias: Optional[torch.Tensor], cfg: TileConfig) -> torch.Tensor:
    M, K = x2.shape
    N = p.shape[0]
    sk = cfg.split_k
    k_iters = triton.cdiv(K, sk * cfg.block_k)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), sk)
    if sk == 1:
        out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    else:
        out = torch.empty((sk, M, N), dtype=torch.float32, device=x2.device)
    in_kernel_bias = bias is not None and sk == 1
    kernel = _nf4_mm_kernel_interp if _INTERPRET else _nf4_mm_kernel
    kernel[grid](x2, p.data, p.scalers, p.code, bias if in_kernel_bias else x2, out, M, N, K, x2.stride(0),
                 N, M * N, K_ITERS=k_iters, QBLOCK=p.block, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                         BLOCK_K=cfg.block_k, HAS_BIAS=in_kernel_bias, EVEN_K=K % (sk * cfg.block_k) == 0,
                         IEEE=p.code.dtype == torch.float32 or _INTERPRET,
                         INTERPRET=_INTERPRET, SCALE_AFTER=cfg.scale_after,
                 TWO_DOT=cfg.two_dot, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if sk > 1:
        out = out.sum(0)
        if bias is not None:
            out += bias
        out = out.to(x2.dtype)
    return out


def nf4_matmul_fused(x: torch.Tensor, w, bias: Optional[torch.Tensor] = None,
                     cfg: Optional[TileConfig] = None) -> torch.Tensor:
    """``x [..., K] @ dequant(w).T (+ bias) -> [..., N]`` with the read-once kernel; ``w`` an ``NF4Tensor`` or a
    :class:`PackedNF4`. The product is in ``x``'s dtype, which must be the code book's."""
    if not _HAS_TRITON:
        raise RuntimeError("kd: the fused NF4 kernel needs triton")
    p = w if isinstance(w, PackedNF4) else packed(w)
    N, Kw = p.shape
    K = x.shape[-1]
    if Kw != K:
        raise ValueError(f"kd: shape mismatch: x [..., {K}] against an NF4 weight [{N}, {Kw}]")
    if x.dtype != p.code.dtype:
        raise ValueError(f"kd: the fused NF4 kernel multiplies {p.code.dtype} activations, got {x.dtype}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    cfg = cfg or tune(x2.shape[0], N, K, p, x2)
    return _launch(x2, p, bias, cfg).reshape(*x.shape[:-1], N)


def _gemv_ok(x: torch.Tensor, w) -> bool:
    if not x.is_cuda or x.dtype != torch.bfloat16 or w.block_size != 64 or w.nf4.dtype != torch.bfloat16:
        return False
    from kd.teacher import nf4_cuda

    return nf4_cuda.available(x.device)


def route(x: torch.Tensor, w, impl: str = "auto", max_fused_rows: int = FUSED_MAX_ROWS) -> str:
    """The route :func:`nf4_matmul` takes for ``x`` and ``w``: ``gemv``, ``fused``, ``dequant`` or ``torch``."""
    if impl not in IMPLS:
        raise ValueError(f"kd: unknown NF4 decode kernel {impl!r} (choose from {', '.join(IMPLS)})")
    if not x.is_cuda:
        return "fused" if impl == "fused" and fused_available(x.device) else "torch"
    rows = x.numel() // x.shape[-1]
    if impl == "dequant" or rows > max_fused_rows:
        return "dequant"
    if impl == "auto" and rows <= GEMV_MAX_ROWS and _gemv_ok(x, w):
        return "gemv"
    return "fused" if fused_available(x.device) and x.dtype == w.nf4.dtype else "dequant"


def dequantized(w) -> torch.Tensor:
    """``w`` as a bf16 (its dtype) tensor, bit-identical to torchao: kd's CUDA kernel where NVRTC works, else the
    Triton / eager dequantisation of :mod:`kd.teacher.nf4`."""
    if w.quantized_data.is_cuda and w.block_size == 64 and w.nf4.dtype == torch.bfloat16:
        from kd.teacher import nf4_cuda
        from kd.teacher.nf4 import cached_scalers

        if nf4_cuda.available(w.quantized_data.device):
            return nf4_cuda.dequant(w, cached_scalers(w))
    from kd.teacher.nf4 import dequantize_nf4

    return dequantize_nf4(w)


def nf4_matmul(x: torch.Tensor, w, *, impl: str = "auto", bias: Optional[torch.Tensor] = None,
               max_fused_rows: int = FUSED_MAX_ROWS) -> torch.Tensor:
    """``F.linear(x, dequant(w), bias)`` for decode-sized ``x`` (``w`` an ``NF4Tensor``), by :func:`route`: ``auto``
    on CUDA is kd's CUDA GEMV up to :data:`GEMV_MAX_ROWS` bf16 rows, the fused kernel up to ``max_fused_rows``,
    dequantise + cuBLAS above; ``fused`` skips the GEMV; ``dequant`` is the reference; CPU runs the eager math."""
    r = route(x, w, impl, max_fused_rows)
    if r == "fused":
        return nf4_matmul_fused(x, w, bias)
    if r == "gemv":
        from kd.teacher import nf4_cuda
        from kd.teacher.nf4 import cached_scalers

        K, N = x.shape[-1], w.shape[0]
        x2 = x.reshape(-1, K)
        cfg = nf4_cuda.tune(N, K, x2.shape[0], w, x2)
        return nf4_cuda.gemv(x2, w, cached_scalers(w), cfg, bias).reshape(*x.shape[:-1], N)
    if r == "dequant":
        return F.linear(x, dequantized(w).to(x.dtype), bias)
    from kd.teacher.nf4 import dequantize_nf4

    return F.linear(x, dequantize_nf4(w, impl="torch").to(x.dtype), bias)


@dataclass(frozen=True)
class DecodeRoute:
    """:func:`nf4_matmul` with its choice fixed, as the ``fn(x, w, bias)`` :func:`kd.teacher.nf4.set_decode_` takes."""

    impl: str = "auto"
    max_fused_rows: int = FUSED_MAX_ROWS

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"kd: unknown NF4 decode kernel {self.impl!r} (choose from {', '.join(IMPLS)})")

    def __call__(self, x: torch.Tensor, w, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return nf4_matmul(x, w, impl=self.impl, bias=bias, max_fused_rows=self.max_fused_rows)

    def route(self, x: torch.Tensor, w) -> str:
        return route(x, w, self.impl, self.max_fused_rows)
