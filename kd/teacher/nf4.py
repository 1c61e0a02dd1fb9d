"""Fast NF4 linear for the FROZEN teacher.

The teacher's linear weights stay torchao ``NF4Tensor`` parameters (so FSDP2 can still shard and all-gather them
through NF4Tensor's ``fsdp_pre_all_gather``/``fsdp_post_all_gather`` hooks, and state-dict keys are unchanged), but
the forward no longer goes through ``NF4Tensor.get_original_weight()`` (torchao's eager dequantisation, ~26x slower
than memory-bound on an H200: 3.66 ms for one 8192x29568 weight). Instead:

1. the double-quantised block scalers are expanded with torchao's own formula (``int8 / factor -> bf16 + mean``):
   n/64 values, a ~1% side of the traffic, and bit-identical to torchao by construction;
2. one Triton kernel reads the packed nibbles (0.5 B/weight), looks the 16-entry NF4 code book up, multiplies by the
   block scaler and writes the bf16 weight (2 B/weight) -- a single memory-bound pass, bit-identical to
   ``get_original_weight()`` because the product of two bf16 numbers is exact in fp32 and rounded once, as in eager;
3. a plain cuBLAS bf16 ``F.linear``; the transient bf16 weight is freed right after.

Without CUDA/Triton (CPU tests, CPU fallback) step 2 runs as the same math in eager PyTorch.

Public API:
- ``dequantize_nf4(w: NF4Tensor, *, impl="auto"|"triton"|"torch") -> Tensor``  (bf16/whatever ``w.dtype`` is)
- ``linear_nf4_fast(x, w, bias=None)``  autograd-aware (grad w.r.t. x only; weight frozen; saves only the NF4 weight)
- ``FastNF4Linear(weight: NF4Tensor, bias=None, fast=True)`` module with ``weight`` (frozen NF4 Parameter) and ``bias``
  (the teacher gets them from ``kd.train.models.load_hf_into_model(nf4=True)`` + ``kd.teacher.nf4.use_fast_nf4``; a module
  already in memory from ``kd.train.models.nf4_linears_``)
- ``set_fast_(model, fast: bool)`` toggles all ``FastNF4Linear`` modules of a model.
- ``set_decode_(model, fn, max_tokens=1)``: inputs of at most ``max_tokens`` rows (generation decode steps) go to
  ``fn(x, weight, bias)`` without autograd (the generation engine passes its read-once kernel,
  :class:`kd.generate.nf4_matmul.DecodeRoute`); ``fn=None`` switches it off.
- ``cached_scalers(w)``: the per-block scalers, computed once per weight (the decode kernels read them every step).
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4, to_nf4

__all__ = [
    "NF4Tensor",
    "to_nf4",
    "dequantize_nf4",
    "dequantize_scalers",
    "linear_nf4_fast",
    "FastNF4Linear",
    "use_fast_nf4",
    "set_fast_",
    "set_decode_",
    "cached_scalers",
    "triton_available",
]

try:  # Triton only matters on CUDA
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - CPU-only environments
    triton = None
    tl = None
    _HAS_TRITON = False


def triton_available() -> bool:
    return _HAS_TRITON and torch.cuda.is_available()


def dequantize_scalers(w: NF4Tensor) -> torch.Tensor:
    """Per-block (``block_size`` elements) scalers in ``w.dtype``, exactly torchao's ``dequantize_scalers``."""
    qs = w.quantized_scalers
    n_sb = qs.numel() // w.scaler_block_size
    s = (qs.view(n_sb, w.scaler_block_size) / w.quantization_factor.unsqueeze(-1)).flatten().to(w.dtype)
    return s + w.scaler_mean


_SCALERS: Dict[int, Tuple["weakref.ref", torch.Tensor]] = {}


def cached_scalers(w: NF4Tensor) -> torch.Tensor:
    """:func:`dequantize_scalers` of ``w`` computed once per weight object and kept while it lives (keyed by id:
    ``NF4Tensor`` supports no ``==`` for a WeakKeyDictionary; the entry goes when the weight is collected). The
    decode kernels read them every step."""
    hit = _SCALERS.get(id(w))
    if hit is not None and hit[0]() is w:
        return hit[1]
    val = dequantize_scalers(w).contiguous()
    key = id(w)
    _SCALERS[key] = (weakref.ref(w, lambda _r, k=key: _SCALERS.pop(k, None)), val)
    return val


def _dequant_torch(w: NF4Tensor, scalers: torch.Tensor) -> torch.Tensor:
    """Eager reference of the Triton kernel's math (also the CPU fallback)."""
    q = w.quantized_data.view(-1, w.block_size // 2)  # one row per block, block_size/2 bytes
    hi = w.nf4[(q >> 4).long()]
    lo = w.nf4[(q & 0x0F).long()]
    s = scalers.view(-1, 1)
    return torch.stack([hi * s, lo * s], dim=-1).reshape(w.shape)


if _HAS_TRITON:

    @triton.jit
    def nf4_block_values(q_ptr, s_ptr, nf4_ptr, pid, n_bytes, HALF_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
        """The shared prologue of kd's NF4 kernels (this module's and :mod:`kd.teacher.precision`'s NF4->FP8):
        program ``pid``'s ``BLOCK`` packed bytes -> (byte offsets, their mask, high-nibble values, low-nibble
        values), the values being code * block scaler in fp32 (bf16*bf16 is exact in fp32)."""
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        b = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
        hi = tl.load(nf4_ptr + (b >> 4)).to(tl.float32)
        lo = tl.load(nf4_ptr + (b & 15)).to(tl.float32)
        s = tl.load(s_ptr + offs // HALF_BLOCK, mask=mask, other=0.0).to(tl.float32)
        return offs, mask, hi * s, lo * s

    @triton.jit
    def _nf4_dequant_kernel(q_ptr, s_ptr, nf4_ptr, out_ptr, n_bytes,
                            HALF_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        _, _, vh, vl = nf4_block_values(q_ptr, s_ptr, nf4_ptr, pid, n_bytes, HALF_BLOCK, BLOCK)
        # a single rounding of the exact fp32 products to the output dtype matches eager torch bit for bit
        out = tl.join(vh, vl).to(out_ptr.dtype.element_ty)  # [BLOCK, 2]
        out = tl.reshape(out, [2 * BLOCK])
        o_offs = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + o_offs, out, mask=o_offs < 2 * n_bytes)


_TRITON_CFG = {"block": 4096, "num_warps": 16}  # best of a sweep on an H200 (0.207 ms for 29568x8192)


def _dequant_triton(w: NF4Tensor, scalers: torch.Tensor, block: Optional[int] = None,
                    num_warps: Optional[int] = None) -> torch.Tensor:
    block = block or _TRITON_CFG["block"]
    num_warps = num_warps or _TRITON_CFG["num_warps"]
    q = w.quantized_data
    n_bytes = q.numel()
    out = torch.empty(w.shape, dtype=w.dtype, device=q.device)
    grid = (triton.cdiv(n_bytes, block),)
    _nf4_dequant_kernel[grid](q, scalers, w.nf4, out, n_bytes,
                              HALF_BLOCK=w.block_size // 2, BLOCK=block, num_warps=num_warps)
    return out


def uses_triton(w: NF4Tensor) -> bool:
    return _HAS_TRITON and w.quantized_data.is_cuda


def dequantize_nf4(w: NF4Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Dense weight of ``w`` in ``w.dtype``; bit-identical to ``w.get_original_weight()``."""
    if not isinstance(w, NF4Tensor):
        raise TypeError(f"expected NF4Tensor, got {type(w)}")
    if impl == "auto":
        from kd.core import kernels

        scalers = dequantize_scalers(w)
        if uses_triton(w) and not kernels.broken("nf4 dequant (triton)"):
            # a kernel that fails to compile on this GPU falls back to the eager math once, with one warning
            return kernels.with_fallback("nf4 dequant (triton)", lambda: _dequant_triton(w, scalers),
                                         lambda: _dequant_torch(w, scalers))
        return _dequant_torch(w, scalers)
    if impl == "torchao":
        return w.get_original_weight()
    scalers = dequantize_scalers(w)
    if impl == "triton":
        return _dequant_triton(w, scalers)
    if impl == "torch":
        return _dequant_torch(w, scalers)
    raise ValueError(f"unknown impl {impl!r}")


class _FastLinearNF4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor, impl: str):
        ctx.save_for_backward(weight)  # only the 4-bit weight is kept for backward
        ctx.impl = impl
        wd = dequantize_nf4(weight, impl=impl)
        return F.linear(x, wd.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        wd = dequantize_nf4(weight, impl=ctx.impl)
        return grad_out @ wd.to(grad_out.dtype), None, None


def linear_nf4_fast(x: torch.Tensor, weight: NF4Tensor, bias: Optional[torch.Tensor] = None,
                    *, impl: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight.dequantized, bias)`` with the fast dequantisation; frozen weight."""
    if torch.is_grad_enabled() and x.requires_grad:
        y = _FastLinearNF4.apply(x, weight, impl)
    else:  # teacher path: no autograd bookkeeping
        y = F.linear(x, dequantize_nf4(weight, impl=impl).to(x.dtype))
    return y + bias if bias is not None else y


def frozen_nf4_params_(module: nn.Module, weight, bias: Optional[torch.Tensor], error: str) -> None:
    """Give an NF4 linear (:class:`FastNF4Linear`, :class:`kd.teacher.precision.NF4FP8Linear`) its frozen
    ``weight`` (an ``NF4Tensor``, else ``TypeError(error)``) and ``bias`` (``None``: registered as absent)."""
    if not isinstance(weight, NF4Tensor):
        raise TypeError(error)
    module.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.detach(), requires_grad=False)
    else:
        module.register_parameter("bias", None)


class FastNF4Linear(nn.Module):
    """Frozen linear whose ``weight`` is an ``NF4Tensor`` parameter (FSDP2-shardable), fast forward."""

    def __init__(self, weight: NF4Tensor, bias: Optional[torch.Tensor] = None, *, fast: bool = True):
        super().__init__()
        frozen_nf4_params_(self, weight, bias, "FastNF4Linear needs an NF4Tensor weight (use FastNF4Linear.from_linear)")
        self.fast = fast
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, *, fast: bool = True, block_size: int = 64,
                    scaler_block_size: int = 256) -> "FastNF4Linear":
        w = to_nf4(lin.weight.detach().contiguous(), block_size, scaler_block_size)
        return cls(w, lin.bias, fast=fast)

    #: decode path: set by :func:`set_decode_` (a callable ``fn(x, weight, bias)``); used without autograd for inputs
    #: of at most ``decode_max_tokens`` rows (the generation batch), so the 4-bit weight is never dequantised
    decode_fn: Optional[Callable] = None
    decode_max_tokens: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_fn is not None and not torch.is_grad_enabled() and isinstance(self.weight, NF4Tensor) \
                and x.numel() <= self.decode_max_tokens * x.shape[-1]:
            return self.decode_fn(x, self.weight, self.bias)
        if self.fast:
            return linear_nf4_fast(x, self.weight, self.bias)
        y = linear_nf4(x, self.weight)  # stock torchao path
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fast={self.fast}")


def set_fast_(model: nn.Module, fast: bool) -> nn.Module:
    for m in model.modules():
        if isinstance(m, FastNF4Linear):
            m.fast = fast
    return model


def set_decode_(model: nn.Module, fn: Optional[Callable] = None, max_tokens: int = 1) -> int:
    """Route every ``FastNF4Linear`` of ``model`` through ``fn(x, weight, bias)`` for inputs of at most ``max_tokens``
    rows without autograd (``None`` switches it off). Prefill (many rows) keeps the dequantise + GEMM path. Returns
    the number of modules set."""
    n = 0
    for m in model.modules():
        if isinstance(m, FastNF4Linear):
            m.decode_fn = fn
            m.decode_max_tokens = int(max_tokens) if fn is not None else 0
            n += 1
    return n


def use_fast_nf4(model: nn.Module, fast: bool = True) -> int:
    """Swap every ``nn.Linear`` holding an ``NF4Tensor`` weight for :class:`FastNF4Linear`.

    The weight stays the same torchao ``NF4Tensor`` parameter under the same name (FSDP2 can still shard
    it); only the forward changes: one fast dequantisation kernel + a bf16 matmul instead of torchao's
    ``linear_nf4`` (26x slower dequantisation, see docs/benchmarks.md). Call before ``fully_shard``.
    Returns the number of modules swapped.
    """
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and isinstance(child.weight.data, NF4Tensor):
                bias = child.bias.data if child.bias is not None else None
                setattr(parent, name, FastNF4Linear(child.weight.data, bias, fast=fast))
                n += 1
    return n
