"""Teacher precision: one implementation for the KD recipe, teacher generation and evaluation.

    teacher_quantization: bf16 | nf4 | fp8 | nf4_fp8        (null = bf16; generate_teacher.py: ``quantization``)

=========  ======================  ==========================================  =========================
name       storage of the linears  GEMM                                        fallback (with a warning)
=========  ======================  ==========================================  =========================
bf16       dense, in ``dtype``     dense (cuBLAS)                              --
nf4        torchao ``NF4Tensor``   ``kd.teacher.nf4`` fast dequant -> dense GEMM       --
fp8        e4m3 + fp32 row scale   FP8 rowwise (``torch._scaled_mm``)          bf16
nf4_fp8    torchao ``NF4Tensor``   NF4 -> e4m3 per call + FP8 rowwise GEMM     nf4
=========  ======================  ==========================================  =========================

FP8 maths (both FP8 options; ``q(v) = e4m3fn_round_to_nearest_even(clamp(v, -448, 448))``):

- activations, per token (dynamic): ``s_x[m] = fp32(amax_k |x[m, k]| / 448)`` (the division in x's dtype, as
  torchao does), ``x8 = q(fp32(x) / s_x)``;
- ``fp8`` weights, per output row, once at load: the same formula on the bf16 weight (torchao's
  ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` on CUDA, ``kd`` code elsewhere);
- ``nf4_fp8`` weights, per output row: the row absmax follows from the NF4 block scalers,
  ``amax[n] = max_b |scaler[n, b]| * max|nf4 code|`` (exact: every NF4 block holds a +-1 code), so
  ``s_w[n] = amax[n] / 448`` and ``inv[n] = 1 / s_w[n]`` are precomputed at load; each call dequantises straight
  to FP8: ``w8 = q((code * scaler) * inv[n])`` in fp32 (one Triton pass on CUDA: 0.5 B read + 1 B written per
  weight; never a bf16 copy);
- ``y[m, n] = (sum_k x8[m, k] * w8[n, k]) * s_x[m] * s_w[n] (+ bias)``: ``torch._scaled_mm`` (fp32 accumulate,
  fast accumulation, bf16 output) on CUDA >= sm_89; on CPU the *emulation* computes the same sum with the fp8
  values upcast to fp32 (each product is exact in fp32), so the rounding of activations and weights is bit for
  bit the GPU path's and only the accumulation order differs.

Availability: the FP8 GEMM needs CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell incl. GB10 sm_121) or runs
emulated on CPU (exact, slow: for tests and fidelity measurement). On a GPU without FP8, or when a one-off probe of
the kernels fails, the precision falls back along ``fallback`` with one warning. ``kd preflight`` prints the path
each node will run.

Adding a precision (e.g. ``nvfp4`` where torchao supports it on Blackwell): ``register(PrecisionSpec(...))`` with
its storage/GEMM, fallback and a ``probe`` that says whether this device can run it, and handle its storage in
:func:`layer_hook` / :func:`apply_precision`.

Public API:
- ``resolve_precision(value, device, dtype, *, key=..., warn=True) -> TeacherPrecision`` (``ConfigError`` on a
  bad value; applies the fallback chain)
- ``parse_precision(value, key=...) -> str``
- ``check_sharding(prec, sharding, fsdp)``: ``ConfigError`` for a teacher FSDP2 cannot shard
- ``prec.load_kwargs()`` -> kwargs for :func:`kd.train.models.load_hf_into_model`; ``apply_precision(model, prec)``
- ``quantize_rowwise(x) -> (x8, scale)``, ``fp8_linear(x, w8, w_scale, bias, impl)``, ``nf4_to_fp8(w, inv)``,
  ``RowwiseFP8Linear``, ``NF4FP8Linear``, ``nf4_row_absmax(w)``
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.core.config import ConfigError, suggest
from kd.teacher.nf4 import FastNF4Linear, dequantize_scalers, frozen_nf4_params_

log = logging.getLogger("kd.teacher.precision")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_MIN_CAPABILITY = (8, 9)
# Fewest rows sent to torch._scaled_mm. On the H200 (torch 2.11, CUDA 13) batch-1 decode failed inside the FP8 GEMM
# with CUBLAS_STATUS_NOT_SUPPORTED even with the rows padded to 16; the smallest M verified to work there is 256
# (bench/fp8_bench.py check), then 512 (decode), 4,096 and 8,192. Fewer rows (decode at small batch, tiny prompts)
# multiply the FP8 weight dequantised to bf16: the same weights, no FP8 activations, and no crash.
FP8_GEMM_MIN_ROWS = 256

__all__ = [
    "PrecisionSpec", "TeacherPrecision", "REGISTRY", "register", "parse_precision", "resolve_precision",
    "check_sharding", "apply_precision", "layer_hook", "quantize_rowwise", "fp8_linear", "emulated_scaled_mm",
    "nf4_row_absmax", "nf4_to_fp8", "RowwiseFP8Linear", "NF4FP8Linear", "linear_bytes", "FP8_MAX",
    "quantize_layer_", "fp8_layer_",
]


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionSpec:
    """One teacher precision. ``probe(device, dtype) -> (impl, problem)``: the implementation this device runs
    (e.g. ``"fp8:torchao"``) or ``None`` with the reason it cannot."""

    name: str
    storage: str  # dense | nf4 | fp8
    gemm: str  # dense | fp8
    fallback: Optional[str]
    fsdp_shard: bool  # FSDP2 (teacher_sharding=shard) can shard its stored weights
    summary: str
    probe: Callable[[torch.device, torch.dtype], Tuple[Optional[str], str]] = field(compare=False, repr=False)
    # bytes moved per linear weight and forward by a per-call dequantisation (read the stored weight, write a copy,
    # the GEMM reads it back); 0 where the GEMM reads the stored weight itself. The planner costs the teacher with it.
    dequant_bytes_per_weight: float = 0.0


REGISTRY: Dict[str, PrecisionSpec] = {}


def register(spec: PrecisionSpec) -> PrecisionSpec:
    if spec.fallback is not None and spec.fallback not in REGISTRY:
        raise ValueError(f"fallback {spec.fallback!r} of {spec.name!r} is not registered")
    REGISTRY[spec.name] = spec
    return spec


@dataclass(frozen=True)
class TeacherPrecision:
    """What a teacher runs: the requested precision, the one that runs (after any fallback) and how."""

    requested: str
    name: str
    impl: str  # e.g. dense, nf4:triton, fp8:torchao, fp8:kd-scaled_mm, fp8:emulated, nf4_fp8:triton+scaled_mm
    fallback_reason: str = ""

    @property
    def spec(self) -> PrecisionSpec:
        return REGISTRY[self.name]

    @property
    def nf4_storage(self) -> bool:
        return self.spec.storage == "nf4"

    def load_kwargs(self) -> Dict:
        """Arguments for :func:`kd.train.models.load_hf_into_model` (NF4 quantisation while loading; a per-layer hook
        that converts an fp8 teacher layer by layer, so a bf16 72B teacher is never resident)."""
        return {"nf4": self.nf4_storage, "on_layer_loaded": layer_hook(self)}

    def describe(self) -> str:
        s = f"{self.name} [{self.impl}]: {self.spec.summary}"
        if self.name != self.requested:
            s += f" (requested {self.requested}; fell back: {self.fallback_reason})"
        return s


def parse_precision(value, key: str = "teacher_quantization") -> str:
    """Canonical precision name; ``ConfigError`` (one line) for anything else."""
    if value is None:
        return "bf16"
    if isinstance(value, str) and value.strip().lower() in REGISTRY:
        return value.strip().lower()
    names = list(REGISTRY)
    hint = suggest(str(value).lower(), names) if isinstance(value, str) else ""
    raise ConfigError(f"'{key}' must be one of {' | '.join(names)} (or null = bf16), got {value!r}{hint}.")


_WARNED: set = set()


def resolve_precision(value, device, dtype: torch.dtype = torch.bfloat16, *, key: str = "teacher_quantization",
                      warn: bool = True) -> TeacherPrecision:
    """Parse ``value`` and walk the fallback chain until this device can run it (one warning per fallback)."""
    requested = parse_precision(value, key)
    device = torch.device(device)
    name, reasons = requested, []
    while True:
        spec = REGISTRY[name]
        impl, problem = spec.probe(device, dtype)
        if impl is not None:
            break
        reasons.append(f"{name}: {problem}")
        if spec.fallback is None:
            raise ConfigError(f"'{key}={requested}' cannot run on {device}: {'; '.join(reasons)}.")
        name = spec.fallback
    prec = TeacherPrecision(requested, name, impl, "; ".join(reasons))
    if warn and reasons and (requested, name) not in _WARNED:
        _WARNED.add((requested, name))
        log.warning(f"{key}={requested} is not available here ({prec.fallback_reason}); "
                    f"the teacher runs {name} [{impl}] instead.")
    return prec


def check_sharding(prec: TeacherPrecision, sharding: str, fsdp: bool, key: str = "teacher_quantization") -> None:
    """``teacher_sharding=shard`` needs weights FSDP2 can split; fp8's e4m3 tensors are not FSDP2 parameters."""
    if fsdp and sharding == "shard" and not prec.spec.fsdp_shard:
        raise ConfigError(
            f"{key}={prec.name} with teacher_sharding=shard is not supported: FSDP2 cannot shard its FP8 weights; "
            f"use teacher_sharding=replicate (~1 B/weight per rank) or {key}=nf4_fp8 (NF4 storage shards like nf4)."
        )


# --------------------------------------------------------------------------------------------------
# Probes (cached per device): capability + a one-off run of the kernels on tiny tensors
# --------------------------------------------------------------------------------------------------
_PROBE_CACHE: Dict[Tuple, Tuple[Optional[str], str]] = {}


def _cached(fn):
    def wrapper(device: torch.device, dtype: torch.dtype):
        k = (fn.__name__, device.type, device.index, dtype)
        if k not in _PROBE_CACHE:
            _PROBE_CACHE[k] = fn(device, dtype)
        return _PROBE_CACHE[k]

    wrapper.__name__ = fn.__name__
    return wrapper


def _probe_dense(device, dtype):
    return "dense", ""


def _probe_nf4(device, dtype):
    return ("nf4:triton" if device.type == "cuda" and _HAS_TRITON else "nf4:torch"), ""


def _fp8_gpu_problem(device) -> str:
    if device.type == "cpu":
        return ""
    if device.type != "cuda":
        return f"no FP8 path for device type {device.type!r}"
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]}; FP8 tensor cores need "
                f"sm_{FP8_MIN_CAPABILITY[0]}{FP8_MIN_CAPABILITY[1]}+")
    return ""


def _try(fn) -> str:
    try:
        fn()
        return ""
    except Exception as e:  # a missing kernel must not crash the run: report and fall back
        return f"kernel probe failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"


def _try_module(make, in_features: int, device) -> str:
    """:func:`_try` on one forward of the module ``make()`` builds, on a bf16 batch of 5 rows, synchronised."""

    def run():
        make()(torch.randn(5, in_features, device=device, dtype=torch.bfloat16))
        torch.cuda.synchronize(device)

    return _try(run)


def _fp8_device_verdict(device, emulated: str):
    """(impl, problem) decided by the device alone: a GPU without FP8 tensor cores, or the CPU's emulation; else None."""
    problem = _fp8_gpu_problem(device)
    if problem:
        return None, problem
    return (emulated, "") if device.type == "cpu" else None


@_cached
def _probe_fp8(device, dtype):
    verdict = _fp8_device_verdict(device, "fp8:emulated")
    if verdict is not None:
        return verdict

    def linear():
        return nn.Linear(64, 32, bias=True, device=device, dtype=torch.bfloat16)

    problem = _try_module(lambda: RowwiseFP8Linear.from_linear(linear()), 64, device)
    if problem:
        return None, problem
    if dtype == torch.bfloat16:
        def torchao_linear():
            lin = nn.Sequential(linear())
            _torchao_fp8_(lin)
            return lin

        p2 = _try_module(torchao_linear, 64, device)
        if not p2:
            return "fp8:torchao", ""
        log.warning(f"torchao FP8 path unavailable ({p2}); fp8 uses kd's torch._scaled_mm linear")
    return "fp8:kd-scaled_mm", ""


@_cached
def _probe_nf4_fp8(device, dtype):
    verdict = _fp8_device_verdict(device, "nf4_fp8:emulated")
    if verdict is not None:
        return verdict
    from torchao.dtypes.nf4tensor import to_nf4

    problem = _try_module(
        lambda: NF4FP8Linear(to_nf4(torch.randn(64, 256, device=device, dtype=torch.bfloat16) * 0.02), None),
        256, device)
    if problem:
        return None, problem
    return ("nf4_fp8:triton+scaled_mm" if _HAS_TRITON else "nf4_fp8:torch-dequant+scaled_mm"), ""


register(PrecisionSpec("bf16", "dense", "dense", None, True,
                       "dense linears in the run's dtype (bf16; fp32 if dtype=fp32), dense GEMM", _probe_dense))
register(PrecisionSpec("nf4", "nf4", "dense", None, True,
                       "NF4 linears (~0.53 B/weight), fast dequant to the run's dtype + dense GEMM", _probe_nf4,
                       dequant_bytes_per_weight=4.5))  # read 0.5 B, write a 2 B bf16 copy, the GEMM reads it
register(PrecisionSpec("fp8", "fp8", "fp8", "bf16", False,
                       "e4m3 linears with fp32 row scales (~1 B/weight), per-token FP8 activations, FP8 GEMM",
                       _probe_fp8))
register(PrecisionSpec("nf4_fp8", "nf4", "fp8", "nf4", True,
                       "NF4 linears (~0.53 B/weight) dequantised straight to e4m3 per call, per-token FP8 "
                       "activations, FP8 GEMM", _probe_nf4_fp8,
                       dequant_bytes_per_weight=2.5))  # read 0.5 B, write a 1 B e4m3 copy, the FP8 GEMM reads it


# --------------------------------------------------------------------------------------------------
# FP8 maths
# --------------------------------------------------------------------------------------------------
def quantize_rowwise(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp32) -> (x8 [M, K] float8_e4m3fn, scale [M, 1] fp32) with ``x ~= x8 * scale``.

    ``scale = fp32(amax_row / 448)`` with the division in x's dtype, ``x8 = e4m3(clamp(fp32(x) / scale))``:
    torchao's ``_choose_scale_float8`` + ``_quantize_affine_float8`` (kernel 'torch') bit for bit, except that an
    all-zero row gets scale 1 (torchao: 0, hence NaN) so padding rows stay 0.
    """
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = (amax / FP8_MAX).to(torch.float32)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    x8 = (x.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, scale


_compiled_quant = None
# Inductor computes bf16 pointwise maths in fp32 and skips the intermediate bf16 rounding unless told otherwise:
# ``amax / 448`` (bf16, as torchao rounds it) then differs from eager in ~80% of the scales and ~2% of the FP8
# codes (measured on CPU inductor and on the H200). With the casts emulated, compiled == eager bit for bit.
_EXACT_CASTS = {"emulate_precision_casts": True}


def exact_casts_under_compile() -> None:
    """Make ``torch.compile`` keep eager's bf16 roundings (process-wide inductor setting), so a compiled FP8
    teacher (``compile: True``) quantises exactly as the eager path and its CPU emulation do."""
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True


def _act_quant(x: torch.Tensor):
    """``quantize_rowwise`` for activations: compiled once (dynamic shapes) on CUDA, shared by every linear, so
    an 80-layer teacher compiles it once per distinct input width, not once per layer."""
    global _compiled_quant
    if x.is_cuda and not torch.compiler.is_compiling():
        if _compiled_quant is None:
            _compiled_quant = torch.compile(quantize_rowwise, dynamic=True, options=_EXACT_CASTS)
        return _compiled_quant(x)
    return quantize_rowwise(x)


def emulated_scaled_mm(x8: torch.Tensor, sx: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor,
                       bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """CPU emulation of ``torch._scaled_mm(x8, w8.t(), scale_a=sx [M,1], scale_b=sw [1,N])``: fp8 values upcast to
    fp32 (exact), fp32 products (exact: 4-bit mantissas) and fp32 sums, scales applied to the fp32 accumulator,
    bias added in fp32, one rounding to ``out_dtype``."""
    acc = x8.to(torch.float32) @ w8.to(torch.float32).t()
    y = acc * sx * sw.reshape(1, -1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def pad_rows16(x8: torch.Tensor, sx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pad the FP8 activations [M, K] (zero rows, scale 1) to a multiple of 16 rows: cuBLASLt has no FP8 kernel
    for other M (``CUBLAS_STATUS_NOT_SUPPORTED`` at batch-1 decode on the H200, and any unpacked batch whose
    token count is not a multiple of 16). M is a shape, so this costs no host sync; the caller slices ``[:M]``."""
    pad = (-x8.shape[0]) % 16
    if not pad:
        return x8, sx
    x8 = torch.cat([x8, x8.new_zeros(pad, x8.shape[1])])
    sx = torch.cat([sx, sx.new_ones(pad, sx.shape[1])])
    return x8, sx


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               *, impl: str = "auto") -> torch.Tensor:
    """``F.linear`` with FP8 rowwise operands. x [..., K] (bf16/fp32), w8 [N, K] e4m3, w_scale [N] fp32.

    impl: ``scaled_mm`` (CUDA sm_89+: ``torch._scaled_mm``, bf16 output, fast accumulation), ``emulate`` (exact
    emulation of the rounding, any device), ``auto`` (scaled_mm on CUDA, emulate elsewhere). Output in x's dtype.
    """
    shp = x.shape
    x2 = x.reshape(-1, shp[-1])
    x8, sx = _act_quant(x2)
    if impl == "auto":
        impl = "scaled_mm" if x.is_cuda else "emulate"
    if impl == "scaled_mm":
        b = None if bias is None else bias.to(torch.bfloat16)
        M = x8.shape[0]
        if M < FP8_GEMM_MIN_ROWS:  # a shape, not a value: no host sync, CUDA-graph safe
            w = (w8.to(torch.float32) * w_scale.reshape(-1, 1)).to(torch.bfloat16)
            return F.linear(x2.to(torch.bfloat16), w, b).to(x.dtype).reshape(*shp[:-1], w8.shape[0])
        x8p, sxp = pad_rows16(x8, sx)
        y = torch._scaled_mm(x8p.contiguous(), w8.t(), scale_a=sxp.contiguous(), scale_b=w_scale.reshape(1, -1),
                             bias=b, out_dtype=torch.bfloat16, use_fast_accum=True)
        y = y[:M].to(x.dtype)
    elif impl == "emulate":
        y = emulated_scaled_mm(x8, sx, w8, w_scale, bias, x.dtype)
    else:
        raise ValueError(f"unknown fp8 impl {impl!r}")
    return y.reshape(*shp[:-1], w8.shape[0])


def fp8_compatible(out_features: int, in_features: int) -> bool:
    """``torch._scaled_mm`` needs both GEMM dimensions divisible by 16."""
    return out_features % 16 == 0 and in_features % 16 == 0


class RowwiseFP8Linear(nn.Module):
    """Frozen linear with an e4m3 weight [N, K] and an fp32 scale per output row (buffers: not trainable, not
    FSDP2-sharded); per-token dynamic activation scales; FP8 GEMM (or its exact emulation)."""

    def __init__(self, w8: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 impl: str = "auto"):
        super().__init__()
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", w_scale.reshape(-1).to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.impl = impl
        self.out_features, self.in_features = w8.shape

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, impl: str = "auto") -> "RowwiseFP8Linear":
        w8, s = quantize_rowwise(lin.weight.detach())
        return cls(w8, s, lin.bias, impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"impl={self.impl}")


# --------------------------------------------------------------------------------------------------
# NF4 -> FP8
# --------------------------------------------------------------------------------------------------
def nf4_to_device(w, device) -> "torch.Tensor":
    """The same NF4 codes and scalers on ``device``. (torchao's ``NF4Tensor.to(device)`` dequantises and quantises
    again, which changes the block scalers: a GPU-vs-CPU comparison through it compares different weights.)"""
    from torchao.dtypes.nf4tensor import NF4Tensor, construct_nf4_args

    names = ("quantized_scalers", "quantization_factor", "scaler_mean", "quantized_data", "nf4")
    return NF4Tensor(*construct_nf4_args(w, {"device": torch.device(device),
                                             **{n: getattr(w, n).to(device) for n in names}}))


def nf4_row_absmax(w) -> torch.Tensor:
    """Per-output-row absmax [N] fp32 of the NF4 weight's dequantised values, from its block scalers alone:
    ``max_b |scaler[n, b]| * max|code|`` (needs in_features % block_size == 0, so each block lies in one row)."""

    n, k = w.shape
    if k % w.block_size:
        raise ValueError(f"NF4 weight {tuple(w.shape)}: in_features must be a multiple of block_size {w.block_size}")
    s = dequantize_scalers(w).to(torch.float32).abs().view(n, k // w.block_size)
    return s.amax(dim=1) * w.nf4.to(torch.float32).abs().max()


def nf4_fp8_scales(w) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row scale s_w [N] fp32, its reciprocal inv [N] fp32) for :func:`nf4_to_fp8`; all-zero rows get 1."""
    # times the fp32 reciprocal, not "/ 448": CUDA divides a tensor by a Python scalar as a multiply by its
    # reciprocal and the CPU divides exactly, so "/" gave 48% of the row scales 1 ulp apart on the H200
    s = nf4_row_absmax(w) * (1.0 / FP8_MAX)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s, 1.0 / s


def _nf4_to_fp8_torch(qdata, scalers, code, inv, block_size: int) -> torch.Tensor:
    """Eager reference of the kernel: ``e4m3(clamp((code * scaler) * inv[row]))`` in fp32, [N, K] row-major."""
    n = inv.numel()
    q = qdata.reshape(-1, block_size // 2)
    hi = code[(q >> 4).long()].to(torch.float32)
    lo = code[(q & 0x0F).long()].to(torch.float32)
    s = scalers.to(torch.float32).reshape(-1, 1)
    v = torch.stack([hi * s, lo * s], dim=-1).reshape(n, -1)
    return (v * inv.reshape(n, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - CPU-only environments
    triton = tl = None
    _HAS_TRITON = False

if _HAS_TRITON:
    from kd.teacher.nf4 import nf4_block_values  # the nibble/scaler prologue shared with kd.teacher.nf4's kernel

    @triton.jit
    def _nf4_fp8_kernel(q_ptr, s_ptr, nf4_ptr, inv_ptr, out_ptr, n_bytes, half_k,
                        HALF_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs, mask, hs, ls = nf4_block_values(q_ptr, s_ptr, nf4_ptr, pid, n_bytes, HALF_BLOCK, BLOCK)
        inv = tl.load(inv_ptr + offs // half_k, mask=mask, other=0.0)
        vh = tl.minimum(tl.maximum(hs * inv, -448.0), 448.0)
        vl = tl.minimum(tl.maximum(ls * inv, -448.0), 448.0)
        out = tl.join(vh, vl).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # [BLOCK, 2]
        out = tl.reshape(out, [2 * BLOCK])
        o_offs = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + o_offs, out, mask=o_offs < 2 * n_bytes)


_TRITON_CFG = {"block": 4096, "num_warps": 16}  # kd.teacher.nf4's H200 sweep for the bf16 variant (same access pattern)


def _nf4_to_fp8_triton(qdata, scalers, code, inv, block_size: int) -> torch.Tensor:
    n = inv.numel()
    n_bytes = qdata.numel()
    out = torch.empty((n, 2 * n_bytes // n), dtype=FP8_DTYPE, device=qdata.device)
    grid = (triton.cdiv(n_bytes, _TRITON_CFG["block"]),)
    _nf4_fp8_kernel[grid](qdata, scalers, code, inv, out, n_bytes, n_bytes // n, HALF_BLOCK=block_size // 2,
                          BLOCK=_TRITON_CFG["block"], num_warps=_TRITON_CFG["num_warps"])
    return out


@torch.library.custom_op("kd::nf4_to_fp8", mutates_args=())
def _nf4_to_fp8_op(qdata: torch.Tensor, scalers: torch.Tensor, code: torch.Tensor, inv: torch.Tensor,
                   block_size: int, impl: str) -> torch.Tensor:
    if impl == "auto":
        impl = "cuda" if _cuda_fp8_ok(qdata, block_size) else ("triton" if (qdata.is_cuda and _HAS_TRITON) else "torch")
    if impl == "cuda":
        from kd.teacher import nf4_cuda

        return nf4_cuda.fp8_from_packed(qdata, scalers, code, inv, (inv.numel(), 2 * qdata.numel() // inv.numel()))
    if impl == "triton":
        return _nf4_to_fp8_triton(qdata, scalers, code, inv, block_size)
    return _nf4_to_fp8_torch(qdata, scalers, code, inv, block_size)


@_nf4_to_fp8_op.register_fake
def _(qdata, scalers, code, inv, block_size, impl):
    n = inv.shape[0]
    return qdata.new_empty((n, 2 * qdata.numel() // n), dtype=FP8_DTYPE)


def _cuda_fp8_ok(qdata: torch.Tensor, block_size: int) -> bool:
    if not qdata.is_cuda or block_size != 64:
        return False
    from kd.teacher import nf4_cuda

    return nf4_cuda.fp8_available(qdata.device)


def nf4_to_fp8(w, inv: torch.Tensor, *, impl: str = "auto", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """NF4Tensor [N, K] -> e4m3 [N, K] with row reciprocals ``inv`` [N] (from :func:`nf4_fp8_scales`), one pass;
    impl: auto | cuda | triton | torch (bit-identical). ``auto`` on CUDA: kd's NVRTC kernel
    (:func:`kd.teacher.nf4_cuda.dequant_fp8`, 0.5 B read + 1 B written per weight, measured ~1.8x the Triton kernel's
    bandwidth: docs/offline.md) where NVRTC works, else Triton.
    Outside ``torch.compile`` the CUDA kernel reads the scalers cached per weight
    (:func:`kd.teacher.nf4.cached_scalers`) and writes into ``out`` when given (contiguous e4m3 [N, K]);
    under compile it runs inside the ``kd::nf4_to_fp8`` custom op."""
    if impl in ("auto", "cuda") and not torch.compiler.is_compiling() and _cuda_fp8_ok(w.quantized_data,
                                                                                        w.block_size):
        from kd.teacher import nf4_cuda
        from kd.teacher.nf4 import cached_scalers

        return nf4_cuda.dequant_fp8(w, cached_scalers(w), inv.to(torch.float32).contiguous(), out)
    if out is not None:
        raise ValueError("kd: nf4_to_fp8(out=...) needs the CUDA kernel")
    return _nf4_to_fp8_op(w.quantized_data, dequantize_scalers(w), w.nf4, inv.to(torch.float32),
                          w.block_size, impl)


class NF4FP8Linear(nn.Module):
    """Frozen linear whose ``weight`` stays a torchao ``NF4Tensor`` parameter (same memory and state-dict name as
    nf4; FSDP2 shards and all-gathers it through NF4Tensor's hooks); each call dequantises it straight to e4m3 with
    the row scales precomputed at load, then FP8 GEMM."""

    def __init__(self, weight, bias: Optional[torch.Tensor] = None, *, impl: str = "auto",
                 dequant_impl: str = "auto"):
        super().__init__()

        frozen_nf4_params_(self, weight, bias, "NF4FP8Linear needs an NF4Tensor weight")
        s, inv = nf4_fp8_scales(weight)
        self.register_buffer("weight_scale", s)
        self.register_buffer("weight_inv_scale", inv)
        self.impl, self.dequant_impl = impl, dequant_impl
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w8 = nf4_to_fp8(self.weight, self.weight_inv_scale, impl=self.dequant_impl)
        return fp8_linear(x, w8, self.weight_scale, self.bias, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"impl={self.impl}")


# --------------------------------------------------------------------------------------------------
# Applying a precision to a torchtune teacher
# --------------------------------------------------------------------------------------------------
def _torchao_fp8_(module: nn.Module) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fp8_compatible(*m.weight.shape))


def fp8_layer_(layer: nn.Module, backend: str = "kd", impl: str = "auto") -> int:
    """Convert every ``nn.Linear`` of one (loaded) decoder layer to FP8 in place; returns the number converted.
    backend: ``torchao`` (quantize_ with Float8DynamicActivationFloat8WeightConfig(PerRow), CUDA sm_89+, bf16)
    or ``kd`` (:class:`RowwiseFP8Linear`, any device; ``impl`` as in :func:`fp8_linear`)."""
    lins = [m for m in layer.modules() if type(m) is nn.Linear and fp8_compatible(*m.weight.shape)]
    if backend == "torchao":
        _torchao_fp8_(layer)
    else:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and fp8_compatible(*child.weight.shape):
                    setattr(parent, name, RowwiseFP8Linear.from_linear(child, impl=impl))
    for p in layer.parameters():
        p.requires_grad_(False)
    return len(lins)


@torch.no_grad()
def quantize_layer_(layer: nn.Module, precision: str, *, fp8_backend: str = "kd", impl: str = "auto") -> int:
    """Convert the dense linears of one decoder layer to ``precision`` in place (benchmarks, tests; the recipes
    go through ``load_kwargs`` + :func:`apply_precision`, which end in the same modules). Returns the count."""
    from torchao.dtypes.nf4tensor import to_nf4

    precision = parse_precision(precision)
    if precision == "bf16":
        return 0
    if precision == "fp8":
        return fp8_layer_(layer, backend=fp8_backend, impl=impl)
    n = 0
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                w4 = to_nf4(child.weight.detach().contiguous(), 64, 256)
                b = child.bias
                if precision == "nf4_fp8" and fp8_compatible(*w4.shape):
                    setattr(parent, name, NF4FP8Linear(w4, b, impl=impl))
                else:
                    setattr(parent, name, FastNF4Linear(w4, b))
                n += 1
    for p in layer.parameters():
        p.requires_grad_(False)
    return n


def layer_hook(prec: TeacherPrecision) -> Optional[Callable[[int, nn.Module], None]]:
    """Per-layer conversion run by ``load_hf_into_model`` right after each layer is filled (fp8 only)."""
    if prec.spec.storage != "fp8":
        return None
    backend = "torchao" if prec.impl == "fp8:torchao" else "kd"
    return lambda i, layer: fp8_layer_(layer, backend=backend)


def apply_precision(model: nn.Module, prec: TeacherPrecision) -> int:
    """Finish a loaded teacher (``load_hf_into_model(**prec.load_kwargs())``): swap NF4 linears for the fast
    forward of the precision. Call before ``fully_shard``. Returns the number of quantized linears."""
    if prec.name == "bf16":
        return 0
    if prec.name in ("fp8", "nf4_fp8"):
        exact_casts_under_compile()
    if prec.name == "nf4":
        from kd.teacher.nf4 import use_fast_nf4

        return use_fast_nf4(model)
    if prec.name == "fp8":
        return sum(1 for m in model.modules() if isinstance(m, RowwiseFP8Linear)
                   or (type(m) is nn.Linear and type(m.weight).__name__ == "Float8Tensor"))
    if prec.name == "nf4_fp8":
        from torchao.dtypes.nf4tensor import NF4Tensor

        from kd.teacher.nf4 import FastNF4Linear

        n = 0
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and isinstance(child.weight.data, NF4Tensor):
                    w, b = child.weight.data, (child.bias.data if child.bias is not None else None)
                    if fp8_compatible(*w.shape) and w.shape[1] % w.block_size == 0:
                        setattr(parent, name, NF4FP8Linear(w, b))
                    else:  # shape the FP8 GEMM cannot take: keep the NF4 fast path for this one
                        setattr(parent, name, FastNF4Linear(w, b))
                    n += 1
        return n
    raise ValueError(f"apply_precision: no implementation for {prec.name!r}")


def linear_bytes(module: nn.Module) -> int:
    """Bytes held by the linears of ``module`` (parameters + buffers, NF4/FP8 subclasses included)."""

    kinds = (nn.Linear, RowwiseFP8Linear, NF4FP8Linear, FastNF4Linear)
    total = 0
    for m in module.modules():
        if not isinstance(m, kinds):
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            total += _tensor_bytes(t)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    t = t.data if isinstance(t, nn.Parameter) else t
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
