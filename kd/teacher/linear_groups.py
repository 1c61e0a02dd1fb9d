"""Projections that read the same input, run as one GEMM in large-batch decode steps: q/k/v of every attention,
w1/w3 of every SiLU feed-forward.

Why: at batch 512 a 72B layer's NF4 projections are dequantised to bf16 (or e4m3) and multiplied by cuBLAS, which
is compute-bound there. Separately, k and v (N = 1024) fill a quarter of the H200's SMs and w1/w3 pay two GEMM tails;
over the concatenated weight one GEMM does all of them (bf16: q/k/v 0.113 ms against 0.125, w1/w3 0.711 against
0.769 per layer, bench/logs/decode_b512_probe_h200_s6.log), and the nf4_fp8 teacher quantises the shared
activations once instead of per projection.

:class:`LinearGroup` dequantises every member straight into its rows of one buffer (kd's CUDA kernels,
:func:`kd.teacher.nf4_cuda.dequant` / :func:`~kd.teacher.nf4_cuda.dequant_fp8`, bit-identical per weight) and
splits the product back into the members' outputs (column views). Only where that route is the one a member would
take anyway -- CUDA, more rows than ``kd.teacher.nf4_decode``'s GEMV/tiled kernels cover, NVRTC working; anything
else (CPU, small batches, other weights) runs the members as before, so CPU decoding stays bit-identical. On the GPU
the sums are cuBLAS's over a wider matrix: equal to the separate GEMMs up to accumulation order.
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
        if self.kind == "nf4":
            from kd.teacher.nf4_decode import _TILED_MAX_ROWS, _cuda_ok

            return all(m.decode_impl in ("auto", "cuda") and rows <= m.decode_max_tokens for m in self.mods) \
                and rows > _TILED_MAX_ROWS and x.dtype == torch.bfloat16 \
                and all(_cuda_ok(x, m.weight) for m in self.mods)
        from kd.teacher import nf4_cuda
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
        K, N = self.mods[0].in_features, sum(self.sizes)
        if buf is None:
            w = torch.empty(N, K, dtype=self.weight_dtype, device=device)
        else:
            w = buf[: self.weight_bytes].view(self.weight_dtype).view(N, K)
        if self.kind == "nf4":
            from kd.teacher import nf4_cuda
            from kd.teacher.nf4_decode import decode_scalers

            for m, off, n in zip(self.mods, self.offsets, self.sizes):
                nf4_cuda.dequant(m.weight, decode_scalers(m.weight), out=w[off:off + n])
        else:
            from kd.teacher.precision import nf4_to_fp8

            for m, off, n in zip(self.mods, self.offsets, self.sizes):
                nf4_to_fp8(m.weight, m.weight_inv_scale, out=w[off:off + n])
        return w

    def gemm(self, x: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``x [..., K]`` times the stacked weight ``w`` from :meth:`dequant_into`, split into the members' outputs."""
        if self.kind == "nf4":
            y = F.linear(x, w, self.bias(x.device, x.dtype))
        else:
            from kd.teacher.precision import fp8_linear

            y = fp8_linear(x, w, self.row_scale(x.device), self.bias(x.device, torch.bfloat16))
        return tuple(y[..., off:off + n] for off, n in zip(self.offsets, self.sizes))

    def __call__(self, x: torch.Tensor, prefetch: Optional["WeightPrefetch"] = None) -> Tuple[torch.Tensor, ...]:
        if not self.fused_here(x):
            return tuple(m(x) for m in self.mods)
        if prefetch is not None:
            return prefetch.run(self, x)
        return self.gemm(x, self.dequant_into(None, x.device))


class WeightPrefetch:
    """Dequantise the next projection's weight on a side stream while the current one's GEMM runs (CUDA decode
    steps at large batches), into two reused buffers.

    Why: at batch 512 a 72B layer's GEMMs are compute-bound (1.14 ms) and its NF4 -> bf16 dequantisation is
    memory-bound (0.62 ms, ~49 ms of a 156 ms step, bench/logs/decode_profile_h200_s6_call2_b512_nf4.log); run one
    after the other they add up. Here unit ``i + 1``'s dequantisation is issued on ``side`` before unit ``i``'s
    GEMM, so it fills the SMs the GEMM's last wave leaves idle and overlaps the attention and the pointwise glue.

    Protocol, per forward pass (the decoder calls it; CUDA-graph capture records the stream fork and join):
    ``begin(key)``, then every grouped projection call goes through :meth:`run`, then ``end()``. The first pass
    for a ``key`` (the batch bucket) runs everything directly and records the order in which the units ran; later
    passes with that key follow it: unit 0 is dequantised at ``begin``, unit ``i + 1`` into buffer ``(i + 1) % 2``
    once unit ``i - 1``'s GEMM (the last reader of that buffer) is done. A unit that arrives out of the recorded
    order switches the pass back to the direct route (never a wrong weight). Off CUDA the stream operations are
    no-ops and everything runs in issue order, which is the order a stream would keep: the CPU tests check that
    no dequantisation overwrites a buffer a later GEMM still reads."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.orders: Dict[object, List[LinearGroup]] = {}
        self.bufs: List[torch.Tensor] = []
        self.n_overlapped = 0  # units whose weight came from a prefetch (tests, logs)
        self._order: Optional[List[LinearGroup]] = None
        self._recording: Optional[List[LinearGroup]] = None
        self._key = None
        self._i, self._forked = 0, False
        self._ready: Dict[int, Tuple[object, torch.Tensor]] = {}
        self._free: List[object] = [None, None]

    # ---- stream helpers (no-ops off CUDA) ------------------------------------------------------------------
    def _main(self):
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def _event(self, stream):
        if not self.cuda:
            return None
        e = torch.cuda.Event()
        e.record(stream)
        return e

    # ---- protocol -----------------------------------------------------------------------------------------
    def begin(self, key) -> None:
        """Start a forward pass for batch bucket ``key`` (outside or inside CUDA-graph capture)."""
        self._key, self._i, self._forked = key, 0, False
        self._ready, self._free = {}, [None, None]
        order = self.orders.get(key)
        need = max((g.weight_bytes for g in order), default=0) if order else 0
        if not order or len(self.bufs) < 2 or self.bufs[0].numel() < need:
            self._order, self._recording = None, (None if order else [])
            return
        self._order, self._recording = order, None
        if self.cuda:
            self.side.wait_stream(self._main())  # fork: the side stream joins this pass (and its capture)
        self._forked = True
        self._issue(0)

    def _issue(self, i: int) -> None:
        j = i % 2
        if self.cuda:
            if self._free[j] is not None:
                self.side.wait_event(self._free[j])  # the GEMM that last read buffer j is done
            with torch.cuda.stream(self.side):
                w = self._order[i].dequant_into(self.bufs[j], self.device)
        else:
            w = self._order[i].dequant_into(self.bufs[j], self.device)
        self._ready[i] = (self._event(self.side), w)

    def run(self, grp: LinearGroup, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``grp``'s outputs for ``x`` (``grp.fused_here(x)`` holds): from the prefetched weight when the pass
        follows the recorded order, else dequantised here."""
        if self._recording is not None:
            self._recording.append(grp)
        order, i = self._order, self._i
        if order is None or i >= len(order) or order[i] is not grp:
            self._order = None  # out of order (or not prefetching): direct from here on
            return grp.gemm(x, grp.dequant_into(None, x.device))
        ev, w = self._ready.pop(i)
        main = self._main()
        if self.cuda:
            main.wait_event(ev)
        if i + 1 < len(order):
            self._issue(i + 1)  # overlaps the GEMM below
        y = grp.gemm(x, w)
        self._free[i % 2] = self._event(main)
        self._i += 1
        self.n_overlapped += 1
        return y

    def end(self) -> None:
        """Finish the pass: join the side stream; after a recording pass, size the two buffers (outside capture:
        the recording pass is the bucket's eager warm-up step)."""
        if self.cuda and self._forked:
            self._main().wait_stream(self.side)  # join (a capture must end with every stream joined)
        self._ready, self._forked = {}, False
        if self._recording:
            self.orders[self._key] = self._recording
            need = max(g.weight_bytes for g in self._recording)
            if len(self.bufs) < 2 or self.bufs[0].numel() < need:
                self.bufs = [torch.empty(need, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self._order = self._recording = None

    def close(self) -> None:
        """Free the buffers and forget the recorded orders."""
        self.bufs, self.orders = [], {}


class LinearGroups:
    """The groups of a torchtune decoder: ``attn[id(attention)]`` (q, k, v) and ``ffn[id(feed_forward)]`` (w1, w3),
    for the members that can be grouped (see :class:`LinearGroup`). With ``prefetch`` (a CUDA device, or any device
    in tests) also ``out[id(attention)]`` (output_proj) and ``down[id(feed_forward)]`` (w2) as groups of one, so
    that every projection of a layer goes through one :class:`WeightPrefetch` (``self.prefetch``)."""

    def __init__(self, model: nn.Module, prefetch: Optional[torch.device] = None):
        from torchtune.modules import FeedForward, MultiHeadAttention

        self.attn: Dict[int, LinearGroup] = {}
        self.ffn: Dict[int, LinearGroup] = {}
        self.out: Dict[int, LinearGroup] = {}
        self.down: Dict[int, LinearGroup] = {}
        self.prefetch = WeightPrefetch(prefetch) if prefetch is not None else None

        def add(table, key, mods):
            g = LinearGroup(mods)
            if g.kind is not None:
                table[key] = g

        for m in model.modules():
            if isinstance(m, MultiHeadAttention) and m.q_proj is not None and m.k_proj is not None:
                add(self.attn, id(m), [m.q_proj, m.k_proj, m.v_proj])
                if prefetch is not None:
                    add(self.out, id(m), [m.output_proj])
            elif type(m) is FeedForward and m.w3 is not None:
                add(self.ffn, id(m), [m.w1, m.w3])
                if prefetch is not None:
                    add(self.down, id(m), [m.w2])

    def __len__(self) -> int:
        return len(self.attn) + len(self.ffn)

    def members(self) -> List[LinearGroup]:
        """The groups of several projections (q/k/v, w1/w3)."""
        return list(self.attn.values()) + list(self.ffn.values())

    def run(self, table: Dict[int, LinearGroup], key: nn.Module, fallback, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``table``'s group for module ``key`` on ``x`` (through the prefetcher when there is one), or
        ``fallback(x)`` (a tuple) when ``key`` has no group."""
        g = table.get(id(key))
        return fallback(x) if g is None else g(x, self.prefetch)
