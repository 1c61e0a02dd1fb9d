"""PEFT adapter I/O for torchtune Qwen2 LoRA/DoRA models: gather the adapter (:func:`lora_state_dict`), map names
torchtune <-> peft, write (:func:`write_peft_adapter_files`) and read (:func:`load_peft_adapter`) the
``adapter_config.json`` + ``adapter_model.safetensors`` pair that ``peft.PeftModel.from_pretrained`` loads.
Imports :mod:`kd.core.errors` and :mod:`kd.core.state_dict` only.

Why this module exists: torchtune 0.6.1 exports LoRA adapters with
``torchtune.models.convert_weights.tune_to_peft_adapter_weights``, which permutes the rows of the
``q_proj``/``k_proj`` ``lora_B`` matrices the Llama way (HF Llama checkpoints use a different RoPE row layout than
torchtune's). Qwen2 HF checkpoints use the *same* layout as torchtune (``qwen2_tune_to_hf`` does not permute), so
torchtune's adapters for Qwen2 are wrong when loaded with peft on transformers' Qwen2. This module maps names only.

:func:`lora_state_dict` calls ``DTensor.full_tensor()`` on sharded parameters, a *collective*: every rank must call it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import torch

from kd.core.errors import CheckpointError, NoCheckpointFoundError
from kd.core.state_dict import full_cpu, strip_wrappers

__all__ = [
    "TUNE_TO_HF_MODULE",
    "lora_state_dict",
    "tune_to_peft_key",
    "peft_to_tune_key",
    "tune_to_peft_adapter_sd",
    "peft_to_tune_adapter_sd",
    "peft_adapter_config",
    "write_peft_adapter_files",
    "load_peft_adapter",
]

PathLike = Union[str, os.PathLike]


def lora_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Trainable adapter params (``lora_a``/``lora_b``/``magnitude``) of a torchtune LoRA model,
    in torchtune names (e.g. ``layers.0.attn.q_proj.lora_a.weight``), as full fp tensors on CPU
    (detached copies, safe to keep while training continues).

    DTensor params (FSDP2) are gathered with ``full_tensor()``, a collective: EVERY rank must
    call this function, even if only rank 0 uses the result.
    """
    from torchtune.modules.peft import get_adapter_params

    params = get_adapter_params(model)
    if not params:
        raise CheckpointError("model has no adapter params (is it a torchtune LoRA model?)")
    return {strip_wrappers(k): full_cpu(v) for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# name mapping torchtune <-> HF/peft (Qwen2). No q/k permutation: Qwen2's HF layout == torchtune's.
# ----------------------------------------------------------------------------------------------

TUNE_TO_HF_MODULE: Dict[str, str] = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "output_proj": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "output": "lm_head",
}
_HF_TO_TUNE_MODULE = {v: k for k, v in TUNE_TO_HF_MODULE.items()}
_ATTN = {"q_proj", "k_proj", "v_proj", "output_proj"}
_MLP = {"w1", "w2", "w3"}
_PARAM_TO_PEFT = {"lora_a.weight": "lora_A.weight", "lora_b.weight": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_PARAM_TO_TUNE = {v: k for k, v in _PARAM_TO_PEFT.items()}
_PEFT_PREFIX = "base_model.model."

_TUNE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(\w+)\.(lora_a\.weight|lora_b\.weight|magnitude)$")
_TUNE_OUT_RE = re.compile(r"^output\.(lora_a\.weight|lora_b\.weight|magnitude)$")
_PEFT_LAYER_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)
_PEFT_OUT_RE = re.compile(r"^base_model\.model\.lm_head\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


def _map_key(key: str, k: str, layer_re, out_re, on_layer, on_out, direction: str) -> str:
    """Match ``k`` against the per-layer then the output-projection pattern of one naming scheme and rename it."""
    m = layer_re.match(k)
    if m:
        return on_layer(*m.groups())
    m = out_re.match(k)
    if m:
        return on_out(m.group(1))
    raise KeyError(f"cannot map {direction} adapter key {key!r}")


def tune_to_peft_key(key: str) -> str:
    """``layers.3.attn.q_proj.lora_a.weight`` -> ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``."""

    def layer(i, block, mod, param):
        if (block == "attn" and mod not in _ATTN) or (block == "mlp" and mod not in _MLP):
            raise KeyError(f"unknown torchtune LoRA module in key {key!r}")
        hf_block = "self_attn" if block == "attn" else "mlp"
        return f"{_PEFT_PREFIX}model.layers.{i}.{hf_block}.{TUNE_TO_HF_MODULE[mod]}.{_PARAM_TO_PEFT[param]}"

    return _map_key(key, strip_wrappers(key), _TUNE_LAYER_RE, _TUNE_OUT_RE, layer,
                    lambda param: f"{_PEFT_PREFIX}lm_head.{_PARAM_TO_PEFT[param]}", "torchtune -> peft")


def peft_to_tune_key(key: str) -> str:
    """Inverse of :func:`tune_to_peft_key` (also accepts peft's in-memory ``.default`` adapter names)."""
    k = key.replace(".default.", ".").replace("lora_magnitude_vector.default", "lora_magnitude_vector")
    if k.endswith("lora_magnitude_vector.weight"):
        k = k[: -len(".weight")]

    def layer(i, hf_block, hf_mod, param):
        mod = _HF_TO_TUNE_MODULE.get(hf_mod)
        if mod is None or mod == "output":
            raise KeyError(f"unknown peft module in key {key!r}")
        block = "attn" if hf_block == "self_attn" else "mlp"
        return f"layers.{i}.{block}.{mod}.{_PARAM_TO_TUNE[param]}"

    return _map_key(key, k, _PEFT_LAYER_RE, _PEFT_OUT_RE, layer, lambda param: f"output.{_PARAM_TO_TUNE[param]}",
                    "peft -> torchtune")


def tune_to_peft_adapter_sd(adapter_sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a torchtune adapter state dict to peft's saved names. Values are NOT permuted."""
    out = {}
    for k, v in adapter_sd.items():
        out[tune_to_peft_key(k)] = full_cpu(v).contiguous()
    return out


def peft_to_tune_adapter_sd(peft_sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {peft_to_tune_key(k): v for k, v in peft_sd.items()}


def _modules_in_adapter_sd(adapter_sd: Mapping[str, Any]) -> set:
    mods = set()
    for k in adapter_sd:
        k = strip_wrappers(k)
        m = _TUNE_LAYER_RE.match(k)
        if m:
            mods.add(m.group(3))
        elif _TUNE_OUT_RE.match(k):
            mods.add("output")
        else:
            raise KeyError(f"not a torchtune LoRA adapter key: {k!r}")
    return mods


def peft_adapter_config(
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    base_model_name_or_path: str,
    use_dora: bool = False,
) -> Dict[str, Any]:
    """adapter_config.json content (peft LoraConfig) for torchtune target module names."""
    unknown = [m for m in target_modules if m not in TUNE_TO_HF_MODULE]
    if unknown:
        raise ValueError(f"unknown torchtune target modules {unknown}; known: {sorted(TUNE_TO_HF_MODULE)}")
    hf_targets = sorted({TUNE_TO_HF_MODULE[m] for m in target_modules})
    # Plain dict (no peft import needed to write it); peft fills any other field with its default.
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": alpha,
        "target_modules": hf_targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": bool(use_dora),
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "base_model_name_or_path": str(base_model_name_or_path),
        "revision": None,
    }


def write_peft_adapter_files(
    d: Path,
    adapter_sd: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    base_model_name_or_path: str,
    use_dora: bool,
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into the existing dir ``d`` (the caller makes it
    atomic, e.g. inside :func:`kd.core.atomic.atomic_write_dir`) so that ``peft.PeftModel.from_pretrained(Qwen2ForCausalLM,
    d)`` reproduces the torchtune LoRA model. ``adapter_sd`` and ``target_modules`` use torchtune names; the rank,
    targets and DoRA flag are checked against the tensors. No q/k permutation."""
    from safetensors.torch import save_file

    present = _modules_in_adapter_sd(adapter_sd)
    missing_targets = sorted(present - set(target_modules))
    if missing_targets:
        raise ValueError(
            f"adapter_sd has LoRA weights for modules {missing_targets} that are not in target_modules={list(target_modules)}"
        )
    has_mag = any(strip_wrappers(k).endswith("magnitude") for k in adapter_sd)
    if has_mag != bool(use_dora):
        raise ValueError(f"use_dora={use_dora} but adapter_sd {'has' if has_mag else 'has no'} DoRA magnitudes")
    for k, v in adapter_sd.items():
        if k.endswith("lora_a.weight") and v.shape[0] != rank:
            raise ValueError(f"rank={rank} but {k} has shape {tuple(v.shape)}")
    cfg = peft_adapter_config(rank=rank, alpha=alpha, target_modules=target_modules,
                              base_model_name_or_path=base_model_name_or_path, use_dora=use_dora)
    save_file(tune_to_peft_adapter_sd(adapter_sd), str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))




def load_peft_adapter(adapter_dir: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a PEFT adapter dir -> (adapter state dict in torchtune names, adapter_config dict)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        sd = load_file(str(st))
    elif (adapter_dir / "adapter_model.bin").exists():
        sd = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise NoCheckpointFoundError(f"no adapter_model.safetensors in {adapter_dir}")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return peft_to_tune_adapter_sd(sd), cfg

