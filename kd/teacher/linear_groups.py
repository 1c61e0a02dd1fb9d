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

:class:`DequantAhead` (``StaticDecoder(dequant_ahead=SMs)``; the generate recipe's default 24) runs every projection
of a decode step from a double buffer that a low-priority side stream fills one layer ahead, on SMs the GEMMs leave
free.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearGroup", "LinearGroups", "DequantAhead", "sm_carveout"]


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
        if buf is None:
            w = torch.empty(sum(self.sizes), self.mods[0].in_features, dtype=self.weight_dtype, device=device)
        else:
            w = self.weight_in(buf)
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
    for the members that can be grouped (see :class:`LinearGroup`). With ``ahead_carveout`` (an SM count, see
    :class:`DequantAhead`) also ``ahead``, which then runs every projection of a decode step; call sites go through
    :meth:`call`."""

    def __init__(self, model: nn.Module, ahead_carveout: Optional[int] = None,
                 device: Optional[torch.device] = None, ahead_blas: str = "cublaslt"):
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
        self.ahead: Optional[DequantAhead] = None
        if ahead_carveout is not None:
            ahead = DequantAhead(model, self, int(ahead_carveout), torch.device(device or "cuda"), ahead_blas)
            self.ahead = ahead if ahead.layers else None

    def __len__(self) -> int:
        return len(self.attn) + len(self.ffn)

    def members(self) -> List[LinearGroup]:
        return list(self.attn.values()) + list(self.ffn.values())

    def call(self, grp: LinearGroup, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``grp(x)``, through :attr:`ahead` when there is one."""
        return self.ahead.run(grp, x) if self.ahead is not None else grp(x)


_SET_SM_TARGET: Dict[str, object] = {}


def _check_blas(blas: str) -> None:
    if blas not in ("cublaslt", "cublas"):
        raise ValueError(f"kd: blas is 'cublaslt' or 'cublas' (got {blas!r})")


def _cublas_sm_count_target():
    """``cublasSetSmCountTarget`` of the libcublas this process has loaded (PyTorch's), or None.

    Why not PyTorch's carve-out alone: ``torch._C._set_sm_carveout_experimental`` only reaches cuBLASLt
    (``CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET``), and on the H100 cuBLASLt ran a 72B layer's batch-512 GEMMs in
    1.367 ms against cuBLAS's 1.249 (bench/logs/overlap_probe_h100_s9_call1.log). cuBLAS has the same target
    per handle; the library is found in ``/proc/self/maps`` so that the handle and the function are the same
    library's (a second copy would not know the handle). Timed in the decoder in session 10 (docs/offline.md) it
    gained nothing: batch 512, H100 2,982 against 2,974 tokens/s at 16 SMs, H200 3,030 against 3,033 at 24; hence
    opt-in (``dequant_ahead_blas="cublas"``)."""
    if "fn" not in _SET_SM_TARGET:
        if not torch.cuda.is_available():
            return None
        torch.cuda.current_blas_handle()  # creating PyTorch's handle loads libcublas: it is in the maps from here on
        fn = None
        try:
            import ctypes

            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "/libcublas.so" in line}
            if paths:
                lib = ctypes.CDLL(sorted(paths)[0])
                fn = lib.cublasSetSmCountTarget
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _SET_SM_TARGET["fn"] = fn
    return _SET_SM_TARGET["fn"]


@contextmanager
def sm_carveout(c: int, blas: str = "cublaslt"):
    """GEMMs issued inside leave ``c`` SMs of the current device free. ``blas="cublaslt"`` (measured, the
    default): cuBLASLt is the preferred library inside and reads PyTorch's experimental carve-out. ``"cublas"``
    (opt-in; no faster in session 10's decoder runs): the GEMMs stay on cuBLAS and its handle gets ``cublasSetSmCountTarget(SMs - c)``; the
    calls that go to cuBLASLt anyway (``_scaled_mm``, a linear with a bias epilogue) keep PyTorch's carve-out
    (cuBLASLt everywhere if the cuBLAS function cannot be found). Every setting is restored on exit."""
    _check_blas(blas)
    prev_c = torch._C._get_sm_carveout_experimental()
    prev_lib = torch.backends.cuda.preferred_blas_library()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "temporary experimental mitigation": known, measured (see DequantAhead)
        torch._C._set_sm_carveout_experimental(int(c))
    target = _cublas_sm_count_target() if blas == "cublas" else None
    handle = None
    if target is None:
        torch.backends.cuda.preferred_blas_library("cublaslt")
    else:
        handle = torch.cuda.current_blas_handle()
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        if target(handle, sms - int(c)) != 0:
            raise RuntimeError(f"kd: cublasSetSmCountTarget({sms - int(c)}) failed")
    try:
        yield
    finally:
        if handle is not None:
            target(handle, 0)  # 0: cuBLAS's own choice again
        torch._C._set_sm_carveout_experimental(prev_c)
        torch.backends.cuda.preferred_blas_library(prev_lib)


def carveout_supported() -> bool:
    return hasattr(torch._C, "_set_sm_carveout_experimental") and hasattr(torch.backends.cuda,
                                                                           "preferred_blas_library")


def check_dequant_ahead(sms_free: Optional[int], device) -> None:
    """``dequant_ahead`` (SMs left to the side stream) against ``device``: one-line ValueError unless None or in
    [0, the GPU's SM count). The one check for ``StaticDecoder`` and the generate recipe (which runs it before the
    teacher loads)."""
    if sms_free is None:
        return
    if int(sms_free) < 0:
        raise ValueError(f"dequant_ahead: {sms_free} SMs: give 0 or more, or null to turn it off")
    device = torch.device(device)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if int(sms_free) >= sms:
            raise ValueError(f"dequant_ahead: {sms_free} SMs, but {torch.cuda.get_device_name(device)} has {sms}: "
                             "give fewer, or null to turn it off")


class DequantAhead:
    """Large-batch CUDA decode steps: layer ``l + 1``'s projection weights are dequantised on a low-priority side
    stream, on the ``carveout`` SMs that layer ``l``'s GEMMs leave free, into the spare half of a double buffer.

    Why: at batch 512 a 72B layer's GEMMs are compute-bound (1.14 ms, bf16 at the chip's ceiling) and its NF4
    dequantisation is memory-bound (~0.57 ms); run one after the other they add up. Dequantising the *next
    projection* on a side stream without a carve-out overlapped nothing (cuBLAS's persistent Hopper GEMM takes every
    SM's register file; 1.784 vs 1.783 ms per layer, session 7). Measured on one H100 (session 9,
    bench/logs/decode_bench_h100_s9_call1.log, same call): the 72B-shaped NF4 step at batch 512 took 171.1 ms with a
    16-SM cuBLASLt carve-out against 181.8 without the pass (24 SMs: 173.8, 32: 187.4); nf4_fp8 120.6 against
    122.9. On one H200 (session 10, bench/logs/decode_bench_h200_s10_call{3,4}.log) 24 SMs was best: 168.8 and
    168.2 ms against 172.7 and 174.7 without the pass (16: 172.1 / 173.0). The generate recipe turns it on
    (``dequant_ahead: 24``); ``StaticDecoder`` leaves it to the caller.

    Every decoder layer must have its four projection groups (q/k/v, output, w1/w3, w2) of one kind, else
    :attr:`layers` is empty and nothing changes. A pass is a decode step calling the groups in layer order through
    :meth:`run`: at layer ``l``'s q/k/v the side stream dequantises layer ``l + 1`` into half ``(l + 1) % 2`` (after
    layer ``l - 1``'s GEMMs, the last readers of that half, are done), and the current stream waits for layer
    ``l``'s weights; the last layer's w2 joins the side stream (so a CUDA-graph capture closes). A call out of that
    order, or one that does not take the one-GEMM route, abandons the pass (joins the side stream) and runs as
    :class:`LinearGroup` would. Memory: two layers' weights in the GEMM's dtype (2 x 1.75 GB bf16 for the 72B
    teacher), allocated at the first pass (an eager warm-up step; never inside a capture).
    """

    def __init__(self, model: nn.Module, groups: LinearGroups, carveout: int, device: torch.device,
                 blas: str = "cublaslt"):
        from torchtune.modules import FeedForward, MultiHeadAttention

        _check_blas(blas)
        self.carveout, self.device, self.blas = int(carveout), torch.device(device), blas
        self.cuda = self.device.type == "cuda"
        self.layers: List[List[LinearGroup]] = []
        self.singles: List[Tuple[nn.Module, LinearGroup]] = []  # (output_proj / w2 module, its group of one)
        for layer in getattr(model, "layers", []):
            attn = next((m for m in layer.modules() if isinstance(m, MultiHeadAttention)), None)
            ffn = next((m for m in layer.modules() if type(m) is FeedForward), None)
            qkv = groups.attn.get(id(attn)) if attn is not None else None
            up = groups.ffn.get(id(ffn)) if ffn is not None else None
            if qkv is None or up is None:
                self.layers = []
                break
            out, down = LinearGroup([attn.output_proj]), LinearGroup([ffn.w2])
            if not (qkv.kind == out.kind == up.kind == down.kind):
                self.layers = []
                break
            self.layers.append([qkv, out, up, down])
            self.singles += [(attn.output_proj, out), (ffn.w2, down)]
        if not self.layers:
            self.singles = []
        self.where = {id(g): (i, k) for i, grps in enumerate(self.layers) for k, g in enumerate(grps)}
        self.halves: List[List[torch.Tensor]] = []  # [2][4] flat uint8 buffers
        self.side = None
        self.n_passes = 0  # passes that ran every layer ahead (tests, logs)
        self._idle()

    def _idle(self) -> None:
        self._next: Optional[Tuple[int, int]] = (0, 0)
        self._ready: Dict[int, object] = {}
        self._free: Dict[int, object] = {}
        self._forked = False

    # ---- streams (no-ops off CUDA, where everything runs in issue order) -------------------------------------
    def _main(self):
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def _record(self, stream):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def _alloc(self) -> bool:
        if self.halves:
            return True
        if self.cuda and torch.cuda.is_current_stream_capturing():
            return False  # buffers come from an eager pass, never from a graph's pool
        need = [max(grps[k].weight_bytes for grps in self.layers) for k in range(4)]
        self.halves = [[torch.empty(n, dtype=torch.uint8, device=self.device) for n in need] for _ in range(2)]
        if self.cuda:
            # CUDA's lowest priority (0); the decoder runs its steps on a high-priority stream, so that when both
            # have blocks waiting, the GEMM's are placed first
            self.side = torch.cuda.Stream(self.device, priority=0)
        return True

    def _issue(self, layer: int) -> None:
        half = self.halves[layer % 2]
        if self.cuda and layer - 2 in self._free:
            self.side.wait_event(self._free.pop(layer - 2))  # layer l-1's GEMMs, the last readers of this half
        with torch.cuda.stream(self.side) if self.cuda else nullcontext():
            for k, g in enumerate(self.layers[layer]):
                g.dequant_into(half[k], self.device)
        self._ready[layer] = self._record(self.side)

    def _join(self) -> None:
        if self.cuda and self._forked:
            self._main().wait_stream(self.side)
        self._idle()

    def abandon(self) -> None:
        """End a pass early (joins the side stream); the next q/k/v of layer 0 starts a new one."""
        self._join()

    # ---- run ----------------------------------------------------------------------------------------------
    def run(self, grp: LinearGroup, x: torch.Tensor, fallback=None) -> Tuple[torch.Tensor, ...]:
        """``grp``'s outputs for ``x`` (a tuple, one per member). ``fallback()`` computes them where the pass does
        not apply (default ``grp(x)``; the output / w2 modules pass their class forward, since their own forward
        is patched to come here)."""
        pos = self.where.get(id(grp))
        if pos is None or not grp.fused_here(x):
            if self._next != (0, 0):
                self.abandon()
            return fallback() if fallback is not None else grp(x)
        if pos == (0, 0) and self._next != (0, 0):
            self.abandon()  # a new step began before the last one finished (e.g. an exception): start over
        if pos != self._next or (pos == (0, 0) and not self._alloc()):
            self.abandon()
            self._next = None  # nothing ahead until the next layer-0 q/k/v
            return grp(x) if fallback is None else fallback()
        layer, k = pos
        if pos == (0, 0):
            if self.cuda:
                self.side.wait_stream(self._main())  # fork (the side stream joins a capture here)
            self._forked = True
            self._issue(0)
        if k == 0:
            if layer + 1 < len(self.layers):
                self._issue(layer + 1)
            ev = self._ready.pop(layer)
            if self.cuda:
                self._main().wait_event(ev)
        with sm_carveout(self.carveout, self.blas) if self.cuda else nullcontext():
            y = grp.gemm(x, grp.weight_in(self.halves[layer % 2][k]))
        if k < 3:
            self._next = (layer, k + 1)
        else:
            self._free[layer] = self._record(self._main())
            self._next = (layer + 1, 0)
            if layer + 1 == len(self.layers):
                self._join()
                self.n_passes += 1
        return y

    def close(self) -> None:
        """Free the buffers (a pass in flight is abandoned)."""
        self.abandon()
        self.halves = []
