"""Merged HF export: fold LoRA into the base weights (:func:`save_merged_hf`) and write a full torchtune Qwen2 state
dict as an HF checkpoint dir (:func:`write_hf_checkpoint`: safetensors shards + index + config/tokenizer files copied
from the base, atomically). Imports :mod:`kd.core.atomic`, :mod:`kd.core.errors`, :mod:`kd.core.progress` and :mod:`kd.core.state_dict`.

:func:`save_merged_hf` calls ``DTensor.full_tensor()`` on sharded parameters, a *collective*: every rank must call
it (in the same order), even though only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from kd.core.atomic import atomic_write_dir
from kd.core.errors import CheckpointError
from kd.core.progress import progress
from kd.core.state_dict import full_cpu, strip_wrappers

__all__ = ["HF_SIDE_FILES", "save_merged_hf", "write_hf_checkpoint"]

PathLike = Union[str, os.PathLike]

# files besides config.json and the weights that an HF model dir carries over from its base (tokenizer, generation)
HF_SIDE_FILES = (
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def _is_rank0() -> bool:
    return (
        not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
        or torch.distributed.get_rank() == 0
    )


def _decoder_dims(model: torch.nn.Module) -> Tuple[int, int, int, int]:
    for mod in model.modules():
        if all(hasattr(mod, a) for a in ("num_heads", "num_kv_heads", "embed_dim", "head_dim")):
            return int(mod.num_heads), int(mod.num_kv_heads), int(mod.embed_dim), int(mod.head_dim)
    raise CheckpointError("could not find attention dims (num_heads/num_kv_heads/embed_dim) on the model")


def _shard(sd: Mapping[str, torch.Tensor], max_bytes: int) -> List[Dict[str, torch.Tensor]]:
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


def save_merged_hf(
    model: torch.nn.Module,
    base_checkpoint_dir: PathLike,
    out_dir: PathLike,
    *,
    rank: int,
    alpha: float,
    max_shard_size_bytes: float = 5e9,
    dtype: Optional[torch.dtype] = None,
) -> Optional[Path]:
    """Merge LoRA into the base weights and write an HF Qwen2 checkpoint dir (safetensors
    shards + ``model.safetensors.index.json`` + config/tokenizer/generation files copied from
    ``base_checkpoint_dir``), atomically. ``dtype`` defaults to the dtype of the model's base
    weights; the merge itself is done in fp32. Tied-embedding models get no ``lm_head``.

    Collective under FSDP2 (``full_tensor``): every rank must call it; rank 0 writes and
    returns ``out_dir``, other ranks return None."""
    from torchtune.modules.peft import get_merged_lora_ckpt

    num_heads, num_kv_heads, dim, head_dim = _decoder_dims(model)
    rank0 = _is_rank0()
    sd: Dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        # every rank iterates and gathers (full_tensor is collective); only rank 0 keeps a CPU copy
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        if rank0:
            sd[strip_wrappers(k)] = full_cpu(v)
        del v
    if not rank0:
        return None

    base_dir = Path(base_checkpoint_dir)
    if dtype is None:
        ref = sd.get("tok_embeddings.weight")
        dtype = ref.dtype if ref is not None else torch.float32

    # merge module by module (fp32 math, torchtune's get_merged_lora_ckpt) to keep peak memory low
    lora_modules = sorted({k[: -len(".lora_a.weight")] for k in sd if k.endswith(".lora_a.weight")})
    for mod in progress(lora_modules, desc="export: merge LoRA", unit="module", enabled=bool(lora_modules)):
        sub = {
            f"{mod}.{n}": sd.pop(f"{mod}.{n}").float()
            for n in ("weight", "lora_a.weight", "lora_b.weight", "magnitude")
            if f"{mod}.{n}" in sd
        }
        if f"{mod}.weight" not in sub:
            raise CheckpointError(f"LoRA module {mod} has no base weight in the state dict (quantized base?)")
        merged = get_merged_lora_ckpt(sub, rank=rank, alpha=alpha)
        sd[f"{mod}.weight"] = merged[f"{mod}.weight"].to(dtype)
    leftover = [k for k in sd if "lora" in k or k.endswith("magnitude")]
    if leftover:
        raise CheckpointError(f"unmerged adapter keys remain: {leftover[:5]}")
    return write_hf_checkpoint(sd, base_dir, out_dir, dims=(num_heads, num_kv_heads, dim, head_dim), dtype=dtype,
                               max_shard_size_bytes=max_shard_size_bytes)


def write_hf_checkpoint(
    sd: Dict[str, torch.Tensor],
    base_checkpoint_dir: PathLike,
    out_dir: PathLike,
    *,
    dims: Tuple[int, int, int, int],
    dtype: Optional[torch.dtype] = None,
    max_shard_size_bytes: float = 5e9,
) -> Path:
    """Write a full torchtune Qwen2 state dict (``sd``, no adapter keys; consumed) as an HF checkpoint dir
    (safetensors shards + index + config/tokenizer files copied from ``base_checkpoint_dir``), atomically.
    ``dims`` = (num_heads, num_kv_heads, embed_dim, head_dim)."""
    from safetensors.torch import save_file
    from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

    num_heads, num_kv_heads, dim, head_dim = dims
    base_dir = Path(base_checkpoint_dir)
    cfg = json.loads((base_dir / "config.json").read_text())
    tied = bool(cfg.get("tie_word_embeddings", False))
    if dtype is None:
        ref = sd.get("tok_embeddings.weight")
        dtype = ref.dtype if ref is not None else torch.float32
    for k in list(sd):
        if sd[k].is_floating_point() and sd[k].dtype != dtype:
            sd[k] = sd[k].to(dtype)
    hf = qwen2_tune_to_hf(
        sd, num_heads=num_heads, num_kv_heads=num_kv_heads, dim=dim, head_dim=head_dim, tie_word_embeddings=tied
    )
    if tied:
        hf.pop("lm_head.weight", None)
    elif "lm_head.weight" not in hf:
        raise CheckpointError("config has tie_word_embeddings=false but the model has no output.weight")
    hf = {k: v.contiguous() for k, v in hf.items()}

    out_dir = Path(out_dir)
    with atomic_write_dir(out_dir) as tmp:
        shards = _shard(hf, int(max_shard_size_bytes))
        n = len(shards)
        weight_map = {}
        total = 0
        for i, shard in enumerate(progress(shards, desc="export: write shards", unit="shard"), 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        dtype_name = str(dtype).replace("torch.", "")
        if "dtype" in cfg or "torch_dtype" not in cfg:
            cfg["dtype"] = dtype_name
        cfg["torch_dtype"] = dtype_name
        cfg["tie_word_embeddings"] = tied
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        for f in HF_SIDE_FILES:
            if (base_dir / f).is_file():
                shutil.copy2(base_dir / f, tmp / f)
    return out_dir
