"""Merge a LoRA adapter into the base student and write a Hugging Face checkpoint (+ keep the PEFT adapter).

    tune run recipes/export.py --config configs/tiny/export.yaml adapter_dir=<run>/checkpoints/step_XXXXXXX/adapter
    python -m recipes.export --config configs/tiny/export.yaml ...          (same thing)

Writes ``<output_dir>/merged/`` (safetensors shards + index, config.json, tokenizer and generation config
copied from the base checkpoint; ``transformers.AutoModelForCausalLM.from_pretrained`` loads it) and
``<output_dir>/adapter/`` (the PEFT adapter, loadable with ``peft.PeftModel.from_pretrained``). Runs on CPU
by default (7B in bf16 needs ~16 GB of host memory); the merge itself is done in fp32 (kd.checkpoint.save_merged_hf).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig

from kd.config import ConfigError, check_keys, number, require_component

log = logging.getLogger("kd.export")
KEYS = {"output_dir", "model", "checkpointer", "adapter_dir", "device", "dtype", "max_shard_size_gb", "tokenizer"}


def recipe_main(cfg: DictConfig) -> None:
    from torchtune import training

    from kd import dist as kdist
    from kd.checkpoint import atomic_write_dir, save_merged_hf
    from kd.models import build_on_meta, load_hf_into_model

    from kd.progress import configure_logging

    configure_logging()
    check_keys(cfg, KEYS, where="the export config", required=("output_dir", "model", "checkpointer", "adapter_dir"))
    require_component(cfg, "model")
    if "lora_rank" not in cfg.model:
        raise ConfigError("model must be the LoRA builder the adapter was trained with (lora_rank/lora_alpha/...).")
    ck = cfg.checkpointer
    check_keys(ck, {"_component_", "checkpoint_dir", "checkpoint_files", "model_type", "output_dir"},
               where="'checkpointer'", required=("checkpoint_dir",))
    adapter_dir = Path(cfg.adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"adapter_dir {str(adapter_dir)!r} has no adapter_config.json (pass a PEFT adapter folder, "
                          "e.g. <run>/checkpoints/step_XXXXXXX/adapter).")
    try:
        device = kdist.resolve_device(cfg.get("device", "cpu"))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    dtype = training.get_dtype(cfg.get("dtype", "bf16"), device=device)
    model = build_on_meta(cfg.model, dtype)
    load_hf_into_model(model, ck.checkpoint_dir, ck.get("checkpoint_files", None), device=device, dtype=dtype,
                       which="student", progress=True)
    from recipes.evaluate import _load_adapter

    _load_adapter(model, str(adapter_dir), cfg.model)
    out = Path(cfg.output_dir)
    shard = number(cfg, "max_shard_size_gb", 5.0, min_value=0.001)
    path = save_merged_hf(model, ck.checkpoint_dir, out / "merged", rank=int(cfg.model.lora_rank),
                          alpha=float(cfg.model.lora_alpha), max_shard_size_bytes=shard * 1e9, dtype=dtype)
    if (out / "adapter").resolve() != adapter_dir.resolve():
        with atomic_write_dir(out / "adapter") as tmp:
            for f in adapter_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    log.info(f"merged HF checkpoint: {path}; PEFT adapter: {out / 'adapter'}")


def main() -> int:
    from kd.cli_util import run_recipe

    return run_recipe(recipe_main)


if __name__ == "__main__":
    sys.exit(main())
