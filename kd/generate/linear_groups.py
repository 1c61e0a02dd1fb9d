"""Projections that read the same input, run as one GEMM in large-batch decode steps: q/k/v of every attention,
w1/w3 of every SiLU feed-forward.

Why: past the read-once kernels' rows (``nf4_fused_max_batch``) a 72B layer's NF4 projections are dequantised to
bf16 (or e4m3) and multiplied by cuBLAS, which is compute-bound there. Separately, k and v (N = 1024) fill a
quarter of a Hopper GPU's SMs and w1/w3 pay two GEMM tails; over the concatenated weight one GEMM does all of them
(~8% less GEMM time per layer, docs/offline.md), and the nf4_fp8 teacher quantises the shared activations once
instead of per projection.

:class:`LinearGroup` dequantises every member straight into its rows of one buffer (kd's CUDA kernels,
:func:`kd.teacher.nf4_cuda.dequant` / :func:`~kd.teacher.nf4_cuda.dequant_fp8`, bit-identical per weight) and
splits the product back into the members' outputs (column views). Only where that route is the one a member would
take anyway -- CUDA, every member's decode route (:class:`kd.generate.nf4_matmul.DecodeRoute`) on ``dequant`` for
these rows, NVRTC working; anything else (CPU, batches the read-once kernels take, other weights) runs the members
as before, so CPU decoding stays bit-identical. On the GPU the sums are cuBLAS's over a wider matrix: equal to the
separate GEMMs up to accumulation order.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearGroup", "LinearGroups"]


def _kind(mods: Sequence[nn.Module]) -> Optional[str]:
    from torchao.dtypes.nf4tensor import NF4Tensor

    from kd.teacher.nf4 import FastNF4Linear
    from kd.teacher.precision import NF4FP8Linear

    if len({m.in_features for m in mods}) != 1:
        return None
    if all(type(m) is FastNF4Linear and isinstance(m.weight, NF4Tensor) for m in mods):
        return "nf4"
    if all(type(m) is NF4FP8Linear for m in mods):
        return "nf4_fp8"
    return None


class LinearGroup:
    """``mods`` (same ``in_features``; all ``FastNF4Linear`` or all ``NF4FP8Linear``) as one GEMM: ``group(x)``
    returns the members' outputs, ``[..., N_i]`` each, in order."""

    def __init__(self, mods: Sequence[nn.Module]):
        self.mods = list(mods)
        self.kind = _kind(self.mods)
        self.sizes = [m.out_features for m in self.mods]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._bias: Dict[torch.device, Optional[torch.Tensor]] = {}
        self._scale: Dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"LinearGroup({self.kind}, sizes={self.sizes})"

    # ---- when ---------------------------------------------------------------------------------------------
    def fused_here(self, x: torch.Tensor) -> bool:
        """Whether ``x`` takes the one-GEMM route (else the members run one by one)."""
        if self.kind is None or not x.is_cuda or torch.is_grad_enabled():
            return False
        rows = x.numel() // x.shape[-1]
        from kd.teacher import nf4_cuda

        if self.kind == "nf4":
            return x.dtype == torch.bfloat16 and nf4_cuda.available(x.device) and all(
                m.decode_fn is not None and rows <= m.decode_max_tokens and m.weight.block_size == 64
                and m.decode_fn.route(x, m.weight) == "dequant" for m in self.mods)
        from kd.teacher.precision import FP8_GEMM_MIN_ROWS

        return rows >= FP8_GEMM_MIN_ROWS and all(m.impl in ("auto", "scaled_mm") and m.dequant_impl in ("auto", "cuda")
                                                 and m.weight.block_size == 64 for m in self.mods) \
            and nf4_cuda.fp8_available(x.device)

    # ---- cached concatenations (per device) ----------------------------------------------------------------
    def bias(self, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The members' biases end to end (zeros for a member without one); None if no member has one."""
        if device not in self._bias:
            if all(m.bias is None for m in self.mods):
                self._bias[device] = None
            else:
                self._bias[device] = torch.cat([
                    m.bias.detach().to(device, dtype) if m.bias is not None
                    else torch.zeros(n, device=device, dtype=dtype) for m, n in zip(self.mods, self.sizes)])
        return self._bias[device]

    def row_scale(self, device: torch.device) -> torch.Tensor:
        if device not in self._scale:
            self._scale[device] = torch.cat([m.weight_scale.to(device, torch.float32) for m in self.mods])
        return self._scale[device]

    # ---- run ----------------------------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the GEMM reads the stacked weight in (bf16 for NF4, e4m3 for nf4_fp8)."""
        if self.kind == "nf4":
            return torch.bfloat16
        from kd.teacher.precision import FP8_DTYPE

        return FP8_DTYPE

    @property
    def weight_bytes(self) -> int:
        """Bytes of the stacked weight ``[sum N_i, K]`` in :attr:`weight_dtype`."""
        return sum(self.sizes) * self.mods[0].in_features * torch.empty((), dtype=self.weight_dtype).element_size()

    def dequant_into(self, buf: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Every member's weight dequantised into its rows of one ``[sum N_i, K]`` matrix (on the current stream):
        a view of the flat uint8 ``buf`` (at least :attr:`weight_bytes`), or a new tensor when ``buf`` is None."""
        if buf is None:
            w = torch.empty(sum(self.sizes), self.mods[0].in_features, dtype=self.weight_dtype, device=device)
        else:
            w = self.weight_in(buf)
        if self.kind == "nf4":
            from kd.teacher import nf4_cuda
            from kd.teacher.nf4 import cached_scalers

            for m, off, n in zip(self.mods, self.offsets, self.sizes):
                nf4_cuda.dequant(m.weight, cached_scalers(m.weight), out=w[off:off + n])
        else:
            from kd.teacher.precision import nf4_to_fp8

            for m, off, n in zip(self.mods, self.offsets, self.sizes):
                nf4_to_fp8(m.weight, m.weight_inv_scale, out=w[off:off + n])
        return w

    def weight_in(self, buf: torch.Tensor) -> torch.Tensor:
        """The stacked ``[sum N_i, K]`` weight as a view of the flat uint8 ``buf`` (at least :attr:`weight_bytes`)."""
        return buf[: self.weight_bytes].view(self.weight_dtype).view(sum(self.sizes), self.mods[0].in_features)

    def gemm(self, x: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``x [..., K]`` times the stacked weight ``w`` (from :meth:`dequant_into`), split into the members'
        outputs (column views)."""
        if self.kind == "nf4":
            y = F.linear(x, w, self.bias(x.device, x.dtype))
        else:
            from kd.teacher.precision import fp8_linear

            y = fp8_linear(x, w, self.row_scale(x.device), self.bias(x.device, torch.bfloat16))
        return tuple(y[..., off:off + n] for off, n in zip(self.offsets, self.sizes))

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if not self.fused_here(x):
            return tuple(m(x) for m in self.mods)
        return self.gemm(x, self.dequant_into(None, x.device))


class LinearGroups:
    """The groups of a torchtune decoder: ``attn[id(attention)]`` (q, k, v) and ``ffn[id(feed_forward)]`` (w1, w3),
    for the members that can be grouped (see :class:`LinearGroup`)."""

    def __init__(self, model: nn.Module):
        from torchtune.modules import FeedForward, MultiHeadAttention

        self.attn: Dict[int, LinearGroup] = {}
        self.ffn: Dict[int, LinearGroup] = {}
        for m in model.modules():
            if isinstance(m, MultiHeadAttention) and m.q_proj is not None and m.k_proj is not None:
                g = LinearGroup([m.q_proj, m.k_proj, m.v_proj])
                if g.kind is not None:
                    self.attn[id(m)] = g
            elif type(m) is FeedForward and m.w3 is not None:
                g = LinearGroup([m.w1, m.w3])
                if g.kind is not None:
                    self.ffn[id(m)] = g

    def __len__(self) -> int:
        return len(self.attn) + len(self.ffn)

    def members(self) -> List[LinearGroup]:
        return list(self.attn.values()) + list(self.ffn.values())
