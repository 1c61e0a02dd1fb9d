"""Quantized deployment checkpoints in the compressed-tensors format (what vLLM loads natively).

    tune run recipes/export.py --config configs/tiny/export.yaml adapter_dir=... quantize=fp8_dynamic
    tune run recipes/export.py --config configs/tiny/export.yaml adapter_dir=... quantize=w4a16 \
        calibration.source=<the training data json>

Schemes (``SCHEMES``; names are ours, the formats compressed-tensors' presets):

- ``fp8_dynamic``: FP8 E4M3 weights with one scale per output channel, FP8 activations quantized per token
  at run time (``FP8_DYNAMIC``; no calibration). Half the bytes of bf16; GB10/Hopper FP8 tensor cores.
- ``w4a16``: int4 symmetric weights, one scale per group of 128 input columns, bf16 activations
  (``W4A16``, the ``pack-quantized`` format, vLLM's Marlin kernels). The int4 values are chosen by GPTQ
  (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers", Alg. 1) on a sample of the user's own training prompts. A quarter of the bytes of bf16,
  which is what decode speed tracks on the memory-bound GB10 (~273 GB/s).
- ``w4a16_rtn``: the same format with round-to-nearest weights (no calibration); the baseline GPTQ must beat.

Why not llmcompressor: every release pins transformers <= 5.17 (0.14.0.1: ``transformers<=5.17.0,>=5.15``,
``compressed-tensors==0.19.0``) and kd pins transformers 5.24, so llmcompressor cannot be installed next to
kd. compressed-tensors itself (0.20.1: ``torch>=2.10``, ``transformers>=4.45``) installs cleanly; it defines
the schemes, computes the scales (``calculate_qparams``), packs the weights (``ModelCompressor``) and is what
transformers' ``CompressedTensorsHfQuantizer`` and vLLM read. Only the GPTQ solver is ours (below).

GPTQ, per decoder layer, sequentially (the layer's inputs are the outputs of the already-quantized layers
before it, as in llmcompressor's sequential pipeline): accumulate ``H = 2/N sum_t x_t x_t^T`` (fp32) of every
Linear's input over the N calibration tokens, then quantize the weight ``W [out, in]`` column by column::

    H <- H + lambda * mean(diag H) * I            (dampening, lambda = 0.01)
    U = chol(H^-1)^T  (upper)                     (the inverse Hessian, Cholesky form)
    for column j: q_j = Q(w_j);  e_j = (w_j - q_j) / U_jj;  W[:, j:] -= e_j U[j, j:]

with the group's scale fixed when its first column is reached (from the error-updated weights).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from kd.core.atomic import atomic_write_dir
from kd.core.config import ConfigError
from kd.core.progress import progress as bar
from kd.data.alpaca import DEFAULT_SYSTEM_PROMPT, AlpacaKDDataset
from kd.train.hf_export import HF_SIDE_FILES

log = logging.getLogger(__name__)

SCHEMES = {
    # our name -> (compressed-tensors preset, needs calibration, solver)
    "fp8_dynamic": ("FP8_DYNAMIC", False, "minmax"),
    "w4a16": ("W4A16", True, "gptq"),
    "w4a16_rtn": ("W4A16", False, "minmax"),
    # NVFP4 (W4A4): FP4 E2M1 weights and activations in groups of 16, each group's scale in FP8 E4M3, one fp32
    # global scale per tensor (weights: from the weight; activations: from the calibration prompts' absmax, the
    # 16-groups' scales dynamic). The GB10's (Blackwell) FP4 tensor cores run it; "calibrated" here means only the
    # activation global scales (no GPTQ).
    "nvfp4": ("NVFP4", True, "minmax"),
}
IGNORE = ["lm_head"]  # the output projection stays bf16, as in llmcompressor's recipes
DEPLOY_EXTRA_HINT = 'pip install -e ".[deploy]"  (installs compressed-tensors)'


def require_deploy_extra(scheme: str):
    """Import compressed-tensors or fail with one line naming the extra."""

    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"quantize={scheme} needs the optional 'deploy' extra: {DEPLOY_EXTRA_HINT}") from e
    return compressed_tensors


def check_scheme(scheme: str) -> str:
    s = str(scheme).lower()
    if s not in SCHEMES:
        raise ConfigError(f"quantize={scheme!r}: use one of {sorted(SCHEMES)} (or null for no quantized copy).")
    return s


class GPTQResult(NamedTuple):
    weight: torch.Tensor  # [out, in] dequantized (fake-quantized) weight, fp32
    scale: torch.Tensor  # [out, in // group_size] fp32
    zero_point: torch.Tensor  # [out, in // group_size] (zeros: symmetric)


def _column_args(args):
    """The per-channel form of group-wise args: quantizes one column [out, 1] with scales [out, 1]."""
    return args.model_copy(update={"strategy": "channel", "group_size": None})


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, args, *, blocksize: int = 128,
                  dampening: float = 0.01) -> GPTQResult:
    """GPTQ (Alg. 1, lazy batch updates, Cholesky inverse) of ``W [out, in]`` with input Hessian
    ``H [in, in]`` for compressed-tensors group-wise ``args`` (e.g. W4A16: int4, symmetric, group 128).
    Computed in fp32. Returns the dequantized weight and the per-group scale / zero point."""
    from compressed_tensors.quantization.utils import calculate_qparams, calculate_range

    gs = int(args.group_size)
    qmin, qmax = (float(v) for v in calculate_range(args, W.device))
    out_f, in_f = W.shape
    if in_f % gs or blocksize % gs:
        raise ValueError(f"in_features={in_f} and blocksize={blocksize} must be multiples of group_size={gs}")
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += dampening * torch.mean(torch.diag(H)) * torch.eye(in_f, device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    col_args = _column_args(args)
    Q = torch.zeros_like(W)
    scales = torch.zeros(out_f, in_f // gs, dtype=torch.float32, device=W.device)
    zps = torch.zeros_like(scales)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # the group's scale, from the error-updated weights of its columns
                g = W1[:, i:i + gs]
                s, z = calculate_qparams(g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True), col_args)
                scales[:, col // gs] = s[:, 0].float()
                zps[:, col // gs] = z[:, 0].float()
                cur_s, cur_z = s[:, 0].float(), z[:, 0].float()
            w = W1[:, i]
            # compressed-tensors' integer quantize/dequantize (round half to even, clamp to the int range),
            # inlined: its generic fake_quantize costs ~10 ms a call, and a 7B model has ~1.1M columns
            q = (torch.clamp(torch.round(w / cur_s) + cur_z, qmin, qmax) - cur_z) * cur_s
            Q[:, col] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return GPTQResult(Q, scales, zps)


def weight_qparams(W: torch.Tensor, args, store_dtype: torch.dtype = torch.bfloat16):
    """(scale, zero_point, global_scale or None) of ``W [out, in]`` for compressed-tensors weight ``args``,
    round-to-nearest (min-max): per channel (FP8), per group of ``group_size`` input columns (int4), or per group of
    16 with an fp32 per-tensor global scale (NVFP4, ``tensor_group``: compressed-tensors' ``generate_gparam`` over the
    whole weight, then each group's FP8 E4M3 scale). The one place the export (:func:`quantize_checkpoint`) and
    quantization-aware distillation (kd.train.qad) compute a weight's quantization parameters. Scales without a
    format dtype of their own (FP8 per channel, int4 per group) are rounded to ``store_dtype``: the checkpoint stores
    them in the model's dtype (bf16), and the deployed model quantizes and dequantizes with the stored values."""
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    W = W.detach().float()
    if str(getattr(args.strategy, "value", args.strategy)) == "tensor_group":
        gs = generate_gparam(W.amin(), W.amax())
        g = W.reshape(W.shape[0], -1, int(args.group_size))
        s, z = calculate_qparams(g.amin(dim=2), g.amax(dim=2), args, global_scale=gs)
        return s, z, gs
    s, z = minmax_qparams(W, args)
    if args.scale_dtype is None and store_dtype is not None:
        s = s.to(store_dtype).to(torch.float32)
    return s, z, None


def fake_quantize_weight(W: torch.Tensor, args, store_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``W`` as the exported checkpoint decompresses it: cast to ``store_dtype`` (the export writes and quantizes the
    merged model in bf16), quantized and dequantized by compressed-tensors' own ``fake_quantize`` at
    :func:`weight_qparams`, with the scale in the dtype the checkpoint stores it in (compressed-tensors' compressor
    divides in that dtype too); returned in ``store_dtype``, no gradient (kd.train.qad adds the STE)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    W = W.detach().to(store_dtype)
    s, z, gs = weight_qparams(W, args, store_dtype)
    if args.scale_dtype is None:
        s = s.to(store_dtype)
    return fake_quantize(W, s, z, args, global_scale=gs).to(store_dtype)


def minmax_qparams(W: torch.Tensor, args):
    """Round-to-nearest scales (absmax per channel / group) as compressed-tensors' memoryless min-max
    observer computes them; returns (scale, zero_point) in the shapes the scheme stores."""
    from compressed_tensors.quantization.utils import calculate_qparams

    W = W.detach().float()
    if args.group_size:
        g = W.reshape(W.shape[0], -1, int(args.group_size))
        s, z = calculate_qparams(g.amin(dim=2), g.amax(dim=2), _column_args(args))
    else:
        s, z = calculate_qparams(W.amin(dim=1, keepdim=True), W.amax(dim=1, keepdim=True), args)
    return s, z


# --------------------------------------------------------------------------------------------------
# Calibration: the inputs of every Linear of every decoder layer, sequentially
# --------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _capture_layer0_inputs(model, samples: Sequence[torch.Tensor], device):
    """Run the embedding (and the rotary/mask preparation) once per sample and keep the first decoder
    layer's (args, kwargs); the rest of the model does not run."""
    layer0 = _decoder_layers(model)[0]
    captured: List[tuple] = []

    def hook(mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    h = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model(input_ids=ids.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return captured


def _layer_out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _next_inputs(args, kwargs, hidden):
    """The next decoder layer's (args, kwargs): the same call with this layer's output as hidden_states."""
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden,) + tuple(args[1:]), kwargs


@torch.no_grad()
def gptq_model(model: nn.Module, samples: Sequence[torch.Tensor], args, *, dampening: float = 0.01,
               progress: bool = True) -> Dict[str, GPTQResult]:
    """GPTQ every ``nn.Linear`` of every decoder layer of an HF causal LM in place (weights replaced by
    their dequantized values); returns module name -> :class:`GPTQResult`."""

    device = next(model.parameters()).device
    inputs = _capture_layer0_inputs(model, samples, device)
    results: Dict[str, GPTQResult] = {}
    layers = _decoder_layers(model)
    for li, layer in enumerate(bar(layers, desc="GPTQ", unit="layer", enabled=progress)):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=device)
             for n, m in linears.items()}
        count = {n: 0 for n in linears}

        def make_hook(n):
            def hook(mod, inp, out):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).to(torch.float32)
                t = x.shape[0]
                H[n].mul_(count[n] / (count[n] + t)).add_(x.T @ x, alpha=2.0 / (count[n] + t))
                count[n] += t
            return hook

        hooks = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
        try:
            for a, kw in inputs:
                layer(*a, **kw)
        finally:
            for h in hooks:
                h.remove()
        for n, m in linears.items():
            r = gptq_quantize(m.weight.data, H[n], args, dampening=dampening)
            m.weight.data.copy_(r.weight.to(m.weight.dtype))
            results[f"model.layers.{li}.{n}"] = r
        H = None  # freed (the timed lambdas above hold these names)
        # the next layer sees what this (now quantized) layer produces
        inputs = [_next_inputs(a, kw, _layer_out(layer(*a, **kw))) for a, kw in inputs]
    return results


@torch.no_grad()
def linear_input_absmax(model: nn.Module, samples: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Module name -> absmax of its input over ``samples`` (one forward each), for every ``nn.Linear`` of the
    decoder layers (what NVFP4's static activation global scale is computed from)."""
    device = next(model.parameters()).device
    amax: Dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in f".{name}":
            def hook(mod, inp, out, name=name):
                a = inp[0].detach().abs().amax().float()
                amax[name] = torch.maximum(amax[name], a) if name in amax else a
            hooks.append(m.register_forward_hook(hook))
    try:
        for ids in samples:
            model(input_ids=ids.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return amax


# --------------------------------------------------------------------------------------------------
# End to end: merged HF checkpoint -> compressed-tensors checkpoint
# --------------------------------------------------------------------------------------------------
@dataclass
class QuantizeResult:
    path: Path
    scheme: str
    preset: str
    format: str
    modules: int
    calibration_samples: int
    calibration_tokens: int
    weight_bytes_before: int
    weight_bytes_after: int
    seconds: float
    extra: Dict[str, float] = field(default_factory=dict)


def _weight_bytes(d: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                n = 1
                for s in sl.get_shape():
                    n *= s
                total += n * {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I32": 4, "I8": 1, "U8": 1,
                              "I64": 8}.get(sl.get_dtype(), 4)
    return total


def _set_qparams(model, gptq: Dict[str, "GPTQResult"], args, solver: str,
                 input_amax: Optional[Dict[str, torch.Tensor]] = None) -> int:
    """Write each quantized module's ``weight_scale`` / ``weight_zero_point`` (and NVFP4's ``weight_global_scale``):
    GPTQ's where it ran, min-max otherwise (:func:`weight_qparams`); NVFP4's static ``input_global_scale`` from
    ``input_amax`` (module name -> absmax of its input over the calibration prompts). Returns the number of modules
    set."""
    from compressed_tensors.quantization.utils import generate_gparam

    n_mod = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if getattr(mod, "quantization_scheme", None) is None or not hasattr(mod, "weight_scale"):
                continue
            if name in gptq:
                s, z = gptq[name].scale, gptq[name].zero_point
            else:
                if solver == "gptq":
                    raise RuntimeError(f"{name} is quantized but GPTQ did not see it")
                s, z, gs = weight_qparams(mod.weight.data, args)
                if gs is not None:
                    mod.weight_global_scale.data.copy_(gs.reshape(mod.weight_global_scale.shape))
            if hasattr(mod, "input_global_scale"):
                if not input_amax or name not in input_amax:
                    raise RuntimeError(f"{name}: its activations' global scale needs calibration inputs")
                a = input_amax[name]
                mod.input_global_scale.data.copy_(generate_gparam(-a, a).reshape(mod.input_global_scale.shape))
            mod.weight_scale.data.copy_(s.reshape(mod.weight_scale.shape).to(mod.weight_scale.dtype))
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.data.copy_(z.reshape(mod.weight_zero_point.shape).to(mod.weight_zero_point.dtype))
            n_mod += 1
    return n_mod


def quantize_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    scheme: str,
    *,
    calibration: Optional[Sequence[Sequence[int]]] = None,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.bfloat16,
    dampening: float = 0.01,
    max_shard_size_gb: float = 5.0,
) -> QuantizeResult:
    """Read the merged HF checkpoint ``src_dir`` with transformers, quantize its decoder Linears with
    ``scheme`` (see :data:`SCHEMES`; ``lm_head`` stays in ``dtype``) and write a compressed-tensors checkpoint
    to ``out_dir`` (atomically): safetensors + ``config.json`` with ``quantization_config`` + tokenizer files.
    ``calibration``: token id lists (the user's training prompts), required by ``w4a16``."""
    from transformers import AutoModelForCausalLM

    scheme = check_scheme(scheme)
    require_deploy_extra(scheme)
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    preset, needs_calib, solver = SCHEMES[scheme]
    if needs_calib and not calibration:
        raise ConfigError(f"quantize={scheme} is calibrated on your training prompts: set calibration.source "
                          "(the training data json) and calibration.num_samples.")
    t0 = time.perf_counter()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=dtype).to(device).eval()
    qscheme = preset_name_to_scheme(preset, ["Linear"])
    args = qscheme.weights
    n_tok = 0
    gptq: Dict[str, GPTQResult] = {}
    if solver == "gptq":
        samples = [torch.as_tensor(list(s), dtype=torch.long) for s in calibration]
        n_tok = sum(int(s.numel()) for s in samples)
        log.info(f"GPTQ {preset} on {len(samples)} calibration samples ({n_tok} tokens)")
        gptq = gptq_model(model, samples, args, dampening=dampening)
    input_amax = None
    if qscheme.input_activations is not None and qscheme.input_activations.dynamic is not True:
        samples = [torch.as_tensor(list(s), dtype=torch.long) for s in calibration]
        n_tok = sum(int(s.numel()) for s in samples)
        input_amax = linear_input_absmax(model, samples)
        log.info(f"{preset}: activation global scales from {len(samples)} calibration samples ({n_tok} tokens)")
    qc = QuantizationConfig(config_groups={"group_0": qscheme}, ignore=list(IGNORE),
                            quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, qc)
    n_mod = _set_qparams(model, gptq, args, solver, input_amax)
    if n_mod == 0:
        raise RuntimeError("no module was quantized (no nn.Linear outside lm_head?)")
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    with atomic_write_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=f"{int(max_shard_size_gb * 1000)}MB")
        compressor.update_config(str(tmp))
        for f in HF_SIDE_FILES:
            if (src_dir / f).is_file() and not (tmp / f).exists():
                shutil.copy2(src_dir / f, tmp / f)
        fmt = json.loads((tmp / "config.json").read_text())["quantization_config"].get("format")
        res = QuantizeResult(
            path=out_dir, scheme=scheme, preset=preset, format=str(fmt), modules=n_mod,
            calibration_samples=len(calibration or []) if n_tok else 0, calibration_tokens=n_tok,
            weight_bytes_before=_weight_bytes(src_dir), weight_bytes_after=_weight_bytes(tmp),
            seconds=time.perf_counter() - t0,
        )
        (tmp / "kd_quantize.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                           for k, v in res.__dict__.items()}, indent=1))
    return res


def calibration_prompts(tokenizer, source: str | Path, *, num_samples: int, max_seq_len: int, seed: int = 0,
                        system_prompt: Optional[str] = None, val_size=0.0) -> List[List[int]]:
    """``num_samples`` training samples of the user's data (the ``train`` split, same split rule as the
    recipes), each the full chat-formatted conversation (system + question + answer) cut at
    ``max_seq_len`` tokens: what the deployed model will see. A seeded random subset, not the first rows."""
    import random

    ds = AlpacaKDDataset(tokenizer, source, split="train", val_size=val_size, seed=seed,
                         system_prompt=DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt,
                         max_seq_len=max_seq_len)
    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    return [ds[i]["tokens"] for i in idx[:num_samples]]


class LogitsCheck(NamedTuple):
    max_abs_diff: float  # max |logit_q - logit_ref| over the checked tokens
    mean_kl: float  # mean per-token KL(ref || quantized), nats
    top1_agreement: float
    tokens: int


@torch.no_grad()
def compare_logits(ref_dir: str | Path, quant_dir: str | Path, samples: Sequence[Sequence[int]], *,
                   device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.bfloat16) -> LogitsCheck:
    """Load both checkpoints with transformers (the quantized one through its compressed-tensors
    integration) and compare their logits on ``samples`` (token id lists, one forward each)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=dtype).to(device).eval()
    q = AutoModelForCausalLM.from_pretrained(str(quant_dir), dtype=dtype).to(device).eval()
    mx, kl, agree, n = 0.0, 0.0, 0.0, 0
    for s in samples:
        ids = torch.as_tensor(list(s), dtype=torch.long, device=device).unsqueeze(0)
        a = ref(input_ids=ids).logits.float()[0]
        b = q(input_ids=ids).logits.float()[0]
        mx = max(mx, float((a - b).abs().max()))
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        kl += float((la.exp() * (la - lb)).sum())
        agree += float((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    del ref, q
    return LogitsCheck(mx, kl / max(n, 1), agree / max(n, 1), n)


def vllm_serve_command(path: str | Path, scheme: str) -> str:
    """The command that serves the checkpoint with vLLM (which reads compressed-tensors natively). vLLM does
    not run on the machines this library is developed on (CPU only / no vLLM wheel): run it on the
    deployment host."""
    return (f"vllm serve {path} --served-model-name kd-student --max-model-len 4096"
            + (" --kv-cache-dtype fp8" if scheme == "fp8_dynamic" else ""))
