"""Quantization-aware distillation (QAD): the student's decoder linears run in their deployment format's numerics.

    qad: nvfp4            # or fp8_dynamic | w4a16 | null (off, the default); recipes/kd_lora.py

Every ``nn.Linear`` / torchtune ``LoRALinear`` inside the student's decoder layers (what ``recipes/export.py``
quantizes; the output projection stays bf16 there and here) computes its forward with

- **the weight fake-quantised** by compressed-tensors' own ``fake_quantize`` at the round-to-nearest scales
  :func:`kd.train.quantize.weight_qparams` computes (the very function the export calls), so the forward sees the
  values the exported checkpoint decompresses to;
- **the input fake-quantised** as the format quantizes activations: ``fp8_dynamic`` per token (FP8 E4M3, dynamic),
  ``nvfp4`` per group of 16 (FP4 E2M1 with FP8 E4M3 group scales; the global scale is the batch's absmax here,
  the calibration prompts' absmax at export), ``w4a16`` not at all;
- gradients by the straight-through estimator: ``w + (fq(w) - w).detach()``, identity backward.

LoRA: the *merged* weight ``W0 + (alpha / r) B A`` is fake-quantised every step, and A, B get their gradients
through it. The export merges the adapter and then quantizes the merged weight, so this is the weight that is
deployed; fake-quantising only the base and adding a bf16 adapter would train a model that is never served (the
adapter's delta is rounded together with the base in the deployed copy, and rounding is not additive). The
cost is one [out, in] merge per linear per forward (r/tokens of the layer's GEMM flops). Full fine-tune: the
weight itself.

Export (``recipes/export.py``) reads the format from the adapter's ``kd_qad.json`` (or the full checkpoint's) and
writes that format: ``fp8_dynamic`` -> ``quantized-fp8_dynamic``, ``w4a16`` -> ``quantized-w4a16_rtn`` (the
round-to-nearest int4 the student trained with; GPTQ would re-round it), ``nvfp4`` -> ``quantized-nvfp4``.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.config import ConfigError

# qad format -> (compressed-tensors preset, the export scheme of kd.train.quantize.SCHEMES that writes it)
FORMATS: Dict[str, tuple] = {
    "fp8_dynamic": ("FP8_DYNAMIC", "fp8_dynamic"),
    "w4a16": ("W4A16", "w4a16_rtn"),
    "nvfp4": ("NVFP4", "nvfp4"),
}
META_FILE = "kd_qad.json"  # written next to a QAD run's adapter / full checkpoint: the format it trained for


def check_format(value) -> Optional[str]:
    """The ``qad`` key: null (off) or one of :data:`FORMATS`; one-line ConfigError otherwise."""
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
        return None
    if isinstance(value, str) and value.lower() in FORMATS:
        return value.lower()
    import difflib

    near = difflib.get_close_matches(str(value).lower(), list(FORMATS), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(f"qad={value!r}: use one of {', '.join(FORMATS)} or null{hint}.")


def export_scheme(fmt: str) -> str:
    return FORMATS[fmt][1]


def scheme_of(fmt: str):
    """compressed-tensors' QuantizationScheme of the format (weights + input activations args)."""
    try:
        from compressed_tensors.quantization import preset_name_to_scheme
    except ImportError as e:
        raise ConfigError(f"qad={fmt} needs compressed-tensors: pip install -e \".[deploy]\"") from e
    return preset_name_to_scheme(FORMATS[fmt][0], ["Linear"])


def fake_quantize_input(x: torch.Tensor, args, global_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` fake-quantised as the format quantizes a linear's input, by compressed-tensors' own dynamic-scale and
    ``fake_quantize`` code (no gradient: the caller adds the STE). NVFP4's per-tensor global scale: ``global_scale``
    (the deployed model's calibrated ``input_global_scale``) or, in training, the batch's absmax."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, generate_gparam

    x = x.detach()
    gs = None
    if str(getattr(args.strategy, "value", args.strategy)) == "tensor_group":
        gs = global_scale if global_scale is not None else generate_gparam(x.amin().float(), x.amax().float())
    s, z = compute_dynamic_scales_and_zp(value=x, args=args, module=None, global_scale=gs)
    return fake_quantize(x, s, z, args, global_scale=gs)


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    return x + (xq.to(x.dtype) - x).detach()


def effective_weight(mod: nn.Module) -> torch.Tensor:
    """The weight the deployed model holds for this module: the base (+ the merged LoRA delta), not quantized."""
    w = mod.weight
    if hasattr(mod, "lora_a") and not getattr(mod, "disabled", False):
        w = w + (mod.alpha / mod.rank) * (mod.lora_b.weight @ mod.lora_a.weight).to(w.dtype)
    return w


def _qad_forward(self, x: torch.Tensor) -> torch.Tensor:
    from kd.train.quantize import fake_quantize_weight

    sch = self._kd_qad_scheme
    w = effective_weight(self)
    wq = _ste(w, fake_quantize_weight(w, sch.weights))
    if sch.input_activations is not None:
        x = _ste(x, fake_quantize_input(x, sch.input_activations, getattr(self, "_kd_qad_input_gs", None)))
    return F.linear(x, wq, getattr(self, "bias", None))


def apply_qad_(model: nn.Module, fmt: str, layers=None) -> int:
    """Make every linear of ``model.layers`` (torchtune decoder; or of ``layers``, e.g. an HF model's
    ``model.model.layers``) run in ``fmt``'s fake-quantised numerics (module docstring). Parameters and their names
    are unchanged. Returns the number of linears."""
    sch = scheme_of(fmt)
    n = 0
    for layer in (model.layers if layers is None else layers):
        for name, m in layer.named_modules():
            is_lora = hasattr(m, "lora_a") and hasattr(m, "lora_b") and hasattr(m, "weight")
            if not (is_lora or isinstance(m, nn.Linear)) or name.endswith(("lora_a", "lora_b")):
                continue
            if getattr(m, "_quantize_base", False):
                raise ConfigError("qad cannot fake-quantise an NF4 student base (student_quantization=nf4): "
                                  "remove one of the two.")
            if is_lora and hasattr(m, "magnitude"):
                raise ConfigError("qad does not support DoRA (model.use_dora): its merged weight is not W0 + s B A.")
            if is_lora and float(getattr(m.dropout, "p", 0.0)) > 0.0:
                raise ConfigError("qad needs model.lora_dropout=0.0 (the merged weight is what is quantized).")
            w = m.weight
            gsz = getattr(sch.weights, "group_size", None)
            if gsz and w.shape[-1] % int(gsz):
                raise ConfigError(f"qad={fmt}: {name} has {w.shape[-1]} input features, not a multiple of the "
                                  f"format's group of {gsz}.")
            m._kd_qad_scheme = sch
            m.forward = types.MethodType(_qad_forward, m)
            n += 1
    if n == 0:
        raise ConfigError("qad: the student has no linear in model.layers to fake-quantise.")
    return n


def write_meta(directory: Path, fmt: str) -> None:
    """Record next to a checkpoint the format its student was trained for (read by recipes/export.py)."""
    (Path(directory) / META_FILE).write_text(json.dumps({"qad": fmt, "export_scheme": export_scheme(fmt)}) + "\n")


def read_meta(directory: Path) -> Optional[str]:
    p = Path(directory) / META_FILE
    if not p.is_file():
        return None
    return check_format(json.loads(p.read_text()).get("qad"))
