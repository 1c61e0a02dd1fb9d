"""Merge a LoRA adapter into the base student and write a Hugging Face checkpoint (+ keep the PEFT adapter).

    tune run recipes/export.py --config configs/tiny/export.yaml adapter_dir=<run>/checkpoints/step_XXXXXXX/adapter
    python -m recipes.export --config configs/tiny/export.yaml ...          (same thing)

Writes ``<output_dir>/merged/`` (safetensors shards + index, config.json, tokenizer and generation config
copied from the base checkpoint; ``transformers.AutoModelForCausalLM.from_pretrained`` loads it) and
``<output_dir>/adapter/`` (the PEFT adapter, loadable with ``peft.PeftModel.from_pretrained``). Runs on CPU
by default (7B in bf16 needs ~16 GB of host memory); the merge itself is done in fp32 (kd.train.hf_export.save_merged_hf).

Quantized deployment copy (optional extra: ``pip install -e ".[deploy]"``), see kd.train.quantize and docs/deploy.md:

    tune run recipes/export.py --config configs/tiny/export.yaml adapter_dir=... quantize=fp8_dynamic
    tune run recipes/export.py --config configs/tiny/export.yaml adapter_dir=... quantize=w4a16 \
        calibration.source=<training data json>

writes ``<output_dir>/quantized-<scheme>/`` (compressed-tensors format; ``vllm serve`` loads it) after the merged
checkpoint, then loads it back with transformers and logs its max logit difference and KL to the merged model on
``calibration.check_samples`` samples (kept in ``kd_quantize.json``). ``quantize`` may be a list of schemes.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from kd.core import run_lock
from kd.core.atomic import atomic_write_dir, atomic_write_text
from kd.core.config import ConfigError, check_keys, number, require_component, to_container
from kd.core.progress import configure_logging
from kd.ops import schema
from kd.train import qad as kqad
from kd.train import quantize as kq
from kd.train import run_checks as checks
from kd.train.full import SHARDS, assemble_full_state_dict
from kd.train.hf_export import save_merged_hf, write_hf_checkpoint
from kd.train.models import build_on_meta, load_adapter_dir, load_frozen_model, model_dims

log = logging.getLogger("kd.export")
KEYS = schema.EXPORT.names  # the one table of this recipe's keys (kd/ops/schema.py, docs/config_keys.md)
CALIBRATION_KEYS = {"source", "num_samples", "max_seq_len", "seed", "system_prompt", "val_size", "check_samples",
                    "dampening"}


PROVENANCE = "kd_export.json"  # next to merged/: what it was exported from (adapter files, base, dtype, builder)


def _provenance(cfg: DictConfig, adapter_dir: Path, dtype) -> dict:
    """What makes ``merged/`` what it is: the adapter's files (sha256), the base checkpoint, dtype and builder."""
    import hashlib

    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(adapter_dir.iterdir()) if f.is_file()}
    base = Path(str(cfg.checkpointer.checkpoint_dir)).resolve()
    base_files = {f.name: f.stat().st_size for f in sorted(base.iterdir()) if f.is_file()} if base.is_dir() else {}
    return {"adapter": files, "base": str(base), "base_files": base_files, "dtype": str(dtype),
            "model": to_container(cfg.model), "max_shard_size_gb": schema.EXPORT.get(cfg, "max_shard_size_gb")}


def _same_export(out: Path, prov: dict) -> bool:
    """``merged/`` (and ``adapter/``) already hold the export of this very adapter and base: reuse, don't refuse."""
    try:
        return (out / "merged").is_dir() and any((out / "merged").iterdir()) and \
            json.loads((out / PROVENANCE).read_text()) == json.loads(json.dumps(prov))
    except (OSError, ValueError):
        return False


def _check_targets(out: Path, adapter_dir: Path, overwrite: bool, quantized=(), reuse: bool = False) -> None:
    """Refuse to replace a non-empty ``merged/``, ``adapter/`` or ``quantized-<scheme>/`` (they may hold the user's
    files) unless ``overwrite=True``; checked before the model is loaded. ``reuse``: merged/ and adapter/ hold this
    adapter's export already (kd_export.json) and are kept as they are."""
    for sub in (*(() if reuse else ("merged", "adapter")), *(f"quantized-{q}" for q in quantized)):
        t = out / sub
        if sub == "adapter" and t.resolve() == adapter_dir.resolve():
            continue  # exporting next to the adapter itself: it is not rewritten
        if t.exists() and (not t.is_dir() or any(t.iterdir())) and not overwrite:
            raise ConfigError(f"{t} already exists and is not empty: the export would replace it. Pick another "
                              "output_dir, or pass overwrite=True to replace it.")


def recipe_main(cfg: DictConfig) -> None:
    from torchtune import training

    configure_logging()
    check_keys(cfg, KEYS, where="the export config", required=("output_dir", "model", "checkpointer"))
    require_component(cfg, "model")
    ck = cfg.checkpointer
    check_keys(ck, {"_component_", "checkpoint_dir", "checkpoint_files", "model_type", "output_dir"},
               where="'checkpointer'", required=("checkpoint_dir",))
    if cfg.get("full_checkpoint", None) is not None:
        return _export_full(cfg)
    if cfg.get("adapter_dir", None) is None:
        raise ConfigError("set adapter_dir (a LoRA run's <run>/checkpoints/step_X/adapter) or full_checkpoint (a "
                          "full fine-tune's <run>/checkpoints/step_X).")
    if "lora_rank" not in cfg.model:
        raise ConfigError("model must be the LoRA builder the adapter was trained with (lora_rank/lora_alpha/...).")
    adapter_dir = Path(cfg.adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"adapter_dir {str(adapter_dir)!r} has no adapter_config.json (pass a PEFT adapter folder, "
                          "e.g. <run>/checkpoints/step_XXXXXXX/adapter).")
    device = checks.check_device(cfg, "cpu")
    checks.check_lora(cfg.model)
    dtype = training.get_dtype(checks.check_dtype(cfg), device=device)
    checks.writable_dir(cfg.output_dir)
    shard = schema.EXPORT.get(cfg, "max_shard_size_gb")
    qplan = _quantize_plan(cfg, kqad.read_meta(adapter_dir))  # every key checked before anything is written
    run_lock.acquire(cfg.output_dir, "an export")  # no other run / export writes here until this one ends
    out = Path(cfg.output_dir)
    prov = _provenance(cfg, adapter_dir, dtype)
    overwrite = schema.EXPORT.get(cfg, "overwrite")
    reuse = not overwrite and _same_export(out, prov)
    _check_targets(out, adapter_dir, overwrite, qplan["schemes"], reuse=reuse)
    if reuse:  # e.g. the README's quantized export right after the plain one, into the same output_dir
        log.info(f"{out / 'merged'} already holds this adapter's merged export ({out / PROVENANCE}): kept as it is"
                 + ("; writing the quantized copies" if qplan["schemes"] else "; nothing to do"))
    else:
        model = load_frozen_model(cfg.model, ck, device=device, dtype=dtype, which="student")
        load_adapter_dir(model, adapter_dir, cfg.model)
        (out / PROVENANCE).unlink(missing_ok=True)  # stale while merged/ is being replaced
        path = save_merged_hf(model, ck.checkpoint_dir, out / "merged", rank=int(cfg.model.lora_rank),
                              alpha=float(cfg.model.lora_alpha), max_shard_size_bytes=shard * 1e9, dtype=dtype)
        if (out / "adapter").resolve() != adapter_dir.resolve():
            with atomic_write_dir(out / "adapter") as tmp:
                for f in adapter_dir.iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
        atomic_write_text(out / PROVENANCE, json.dumps(prov, indent=1, sort_keys=True) + "\n")
        log.info(f"merged HF checkpoint: {path}; PEFT adapter: {out / 'adapter'}")
    _quantize(cfg, out / "merged", out, device, qplan)


def _export_full(cfg: DictConfig) -> None:
    """A full fine-tune's sharded checkpoint (kd.train.full) -> full HF checkpoint in <output_dir>/merged, offline."""
    from torchtune import training

    if "lora_rank" in cfg.model:
        raise ConfigError("full_checkpoint is a full fine-tune's checkpoint: model must be the plain builder it was "
                          "trained with (e.g. torchtune.models.qwen2_5.qwen2_5_7b_instruct), not a LoRA builder.")
    src = Path(cfg.full_checkpoint)
    shard_dir = src
    if not list(src.glob("rank-*.json")):  # a step dir: its shards live in checkpoints/shards/step_X
        shard_dir = src.parent / SHARDS / src.name
    if not shard_dir.is_dir():
        raise ConfigError(f"full_checkpoint={str(src)!r}: no shards found (looked in {shard_dir}); pass "
                          "<run>/checkpoints/step_XXXXXXX or its shards folder.")
    device = checks.check_device(cfg, "cpu")
    dtype = training.get_dtype(cfg.get("dtype", "bf16"), device=device)
    dims = model_dims(build_on_meta(cfg.model, dtype))
    shard = schema.EXPORT.get(cfg, "max_shard_size_gb")
    qplan = _quantize_plan(cfg, kqad.read_meta(src) or kqad.read_meta(shard_dir))  # checked before any write
    run_lock.acquire(cfg.output_dir, "an export")
    _check_targets(Path(cfg.output_dir), Path(cfg.output_dir) / "adapter", schema.EXPORT.get(cfg, "overwrite"),
                   qplan["schemes"])
    sd = assemble_full_state_dict(shard_dir)
    out = Path(cfg.output_dir)
    path = write_hf_checkpoint(sd, cfg.checkpointer.checkpoint_dir, out / "merged",
                               dims=(dims["num_heads"], dims["num_kv_heads"], dims["embed_dim"], dims["head_dim"]),
                               dtype=dtype, max_shard_size_bytes=shard * 1e9)
    log.info(f"full HF checkpoint: {path} (from {shard_dir})")
    _quantize(cfg, out / "merged", out, device, qplan)


def _quantize_plan(cfg: DictConfig, trained_for: Optional[str] = None) -> dict:
    """Every quantize= / calibration.* value checked (and the calibration prompts read) *before* anything is
    written: a mistake there must not leave a merged/ that the corrected re-run's overwrite rail refuses.
    ``trained_for``: the qad format the student was trained in (kd.train.qad, from ``kd_qad.json``): that format's
    scheme is written (first) whether or not quantize= names it."""
    q = cfg.get("quantize", None)
    if q is not None and not isinstance(q, str) and not hasattr(q, "__iter__"):
        raise ConfigError(f"quantize={q!r}: use a scheme name or a list of them, e.g. quantize=[fp8_dynamic,w4a16].")
    schemes = [] if q is None else ([q] if isinstance(q, str) else list(to_container(q)))
    schemes = list(dict.fromkeys(kq.check_scheme(x) for x in schemes))
    if trained_for is not None:
        own = kqad.export_scheme(trained_for)
        log.info(f"the student was trained for {trained_for} (qad, kd_qad.json): writing quantized-{own}"
                 + (f"; the other schemes asked for ({', '.join(x for x in schemes if x != own)}) are post-training "
                    "quantizations of a student trained for another format" if any(x != own for x in schemes) else ""))
        schemes = [own, *(x for x in schemes if x != own)]
    cal = cfg.get("calibration", None) or {}
    if cal:
        check_keys(cal, CALIBRATION_KEYS, where="'calibration'")
    if not schemes:
        return {"schemes": []}
    kq.require_deploy_extra(schemes[0])
    samples = []
    if cal.get("source") is not None:
        from torchtune import config as tt_config

        if cfg.get("tokenizer") is None:
            raise ConfigError("calibration.source needs the tokenizer section (the student's tokenizer).")
        tok = tt_config.instantiate(cfg.tokenizer)
        try:
            samples = kq.calibration_prompts(
                tok, cal.source, num_samples=number(cal, "num_samples", 256, kind=int, min_value=1),
                max_seq_len=number(cal, "max_seq_len", 512, kind=int, min_value=8), seed=int(cal.get("seed", 0)),
                system_prompt=cal.get("system_prompt", None), val_size=cal.get("val_size", 0.0))
        except (ValueError, FileNotFoundError) as e:
            from kd.core.config import DataError

            raise DataError(f"calibration.source: {e}") from e
    for scheme in schemes:
        if kq.SCHEMES[scheme][1] and not samples:
            raise ConfigError(f"quantize={scheme} is calibrated on your training prompts: set calibration.source "
                              "(the training data json) and calibration.num_samples.")
    return {"schemes": schemes, "samples": samples, "n_check": number(cal, "check_samples", 8, kind=int, min_value=0),
            "dampening": number(cal, "dampening", 0.01, min_value=0.0)}


def _quantize(cfg: DictConfig, merged, out: Path, device, plan: dict) -> None:
    """The optional quantized deployment copies (kd.train.quantize), each checked against the merged model."""
    import json

    schemes, samples, n_check = plan["schemes"], plan.get("samples", []), plan.get("n_check", 0)
    for scheme in schemes:
        dest = out / f"quantized-{scheme}"
        res = kq.quantize_checkpoint(merged, dest, scheme, calibration=samples, device=device,
                                     dampening=plan["dampening"],
                                     max_shard_size_gb=schema.EXPORT.get(cfg, "max_shard_size_gb"))
        log.info(f"{scheme}: {res.modules} linear layers -> {res.format}; weights {res.weight_bytes_before / 1e9:.3f} GB "
                 f"-> {res.weight_bytes_after / 1e9:.3f} GB ({res.weight_bytes_before / max(res.weight_bytes_after, 1):.2f}x "
                 f"smaller) in {res.seconds:.1f}s; {dest}")
        if samples and n_check:
            chk = kq.compare_logits(merged, dest, samples[:n_check], device=device)
            log.info(f"{scheme} vs the merged model (both in bf16) on {chk.tokens} tokens: max |logit diff| {chk.max_abs_diff:.4g}, "
                     f"KL {chk.mean_kl:.3g} nats/token, top-1 agreement {chk.top1_agreement:.2%}")
            meta_p = dest / "kd_quantize.json"
            meta = json.loads(meta_p.read_text())
            meta["check"] = chk._asdict()
            from kd.core.atomic import atomic_write_text

            atomic_write_text(meta_p, json.dumps(meta, indent=1) + "\n")
        log.info(f"serve it (on a vLLM host; vLLM does not run here): {kq.vllm_serve_command(dest, scheme)}")


if __name__ == "__main__":  # `tune run` runs this file as __main__
    from kd.train.cli_util import run_recipe

    sys.exit(run_recipe(recipe_main))
