"""Offline distillation, step 1: the teacher answers every prompt once (batched, resumable, data-parallel).

    tune run recipes/generate_teacher.py --config configs/qwen2_5/72B_generate.yaml key=value ...
    tune run --nnodes 2 --nproc_per_node 8 ... recipes/generate_teacher.py --config ...   (one shard per rank)

Loads the teacher exactly as the KD recipe does (``kd.train.models.load_frozen_model``,
``teacher_quantization: bf16 | nf4 | fp8 | nf4_fp8`` as in ``kd.teacher.precision``), generates left-padded batches of
length-sorted prompts with a KV cache (``kd.generate.generation.generate_batch``), appends one JSON line per sample to
``<output_dir>/parts/rank-XXXXX.jsonl`` (fsync per batch), and finally (rank 0) merges everything into
``<output_dir>/<dataset_name>.json`` + ``dataset_info.json`` + ``summary.json``. Re-running the same command
resumes: done ids are skipped; a torn last line from a ``kill -9`` is dropped. See docs/offline.md.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Dict

import torch
from omegaconf import DictConfig

from kd.core.atomic import atomic_write_text
from kd.core.config import ConfigError, DataError, check_keys, require_component
from kd.core.progress import configure_logging
from kd.data.alpaca import load_alpaca_records
from kd.data.special_text import report_special_text
from kd.generate.generation import (
    ResultStore,
    SamplingParams,
    generate_batch,
    install_last_token_head,
    merge_results,
    plan_batches,
    prompt_hash,
    prompt_tokens,
    sample_seed,
    stop_token_ids,
    summarize,
)
from kd.ops import schema
from kd.teacher.precision import parse_precision, resolve_precision
from kd.train import dist as kdist
from kd.train import run_checks as checks
from kd.train.models import load_frozen_model

log = logging.getLogger("kd.generate")

KEYS = schema.GENERATE_TEACHER.names  # the one table of this recipe's keys (kd/ops/schema.py, docs/config_keys.md)
CHECKPOINTER_KEYS = {"_component_", "checkpoint_dir", "checkpoint_files", "output_dir", "model_type"}
META_KEYS = ("teacher_quantization", "dtype", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "system_prompt")


def _settings(cfg: DictConfig) -> Dict:
    if "quantization" in cfg:
        raise ConfigError("generate_teacher: the key 'quantization' is now 'teacher_quantization' (as in the KD "
                          "recipe and evaluate): rename it in the config / command line.")
    check_keys(cfg, KEYS, where="the generate_teacher config", required=("output_dir", "model", "tokenizer", "source"))
    require_component(cfg, "model")
    require_component(cfg, "tokenizer")
    ck_key = "checkpointer" if cfg.get("checkpointer") is not None else "teacher_checkpointer"
    if cfg.get(ck_key) is None:
        raise ConfigError("Missing 'checkpointer' section (checkpoint_dir of the teacher's HF checkpoint).")
    check_keys(cfg[ck_key], CHECKPOINTER_KEYS, where=f"'{ck_key}'", required=("checkpoint_dir",))
    # every value through the recipe's one key table (kd.ops.schema.GENERATE_TEACHER): defaults and ranges as documented
    names = [k for k in schema.GENERATE_TEACHER.keys
             if k not in ("output_dir", "model", "checkpointer", "teacher_checkpointer", "tokenizer", "source",
                          "device", "log_level")]
    s = {"ck": cfg[ck_key], **{k: schema.GENERATE_TEACHER.get(cfg, k) for k in names}}
    s["dtype"] = str(s["dtype"])
    s["dataset_name"] = str(s["dataset_name"])

    parse_precision(s["teacher_quantization"])  # bf16 (= null) | nf4 | fp8 | nf4_fp8
    return s


def _check_run_meta(out: Path, meta: Dict, is_rank_zero: bool) -> None:
    p = out / "run.json"
    if p.is_file():
        old = json.loads(p.read_text())
        if "quantization" in old:  # run.json written before the key was renamed
            old.setdefault("teacher_quantization", old.pop("quantization"))
        diff = [f"{k}: {old.get(k)!r} -> {meta.get(k)!r}" for k in META_KEYS if old.get(k) != meta.get(k)]
        if diff:
            raise ConfigError(
                f"{out} holds results generated with different settings:\n  - " + "\n  - ".join(diff)
                + "\nUse a new output_dir (or restore the settings) so answers are not mixed."
            )
    elif is_rank_zero:
        from kd.core.atomic import atomic_write_text

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps(meta, ensure_ascii=False, indent=1, sort_keys=True) + "\n")


def load_teacher(cfg: DictConfig, s: Dict, device: torch.device, dtype: torch.dtype):
    """``(model, precision)``: the teacher and the precision it runs (after any fall-back)."""
    prec = resolve_precision(s["teacher_quantization"], device, dtype)
    model = load_frozen_model(cfg.model, s["ck"], device=device, dtype=dtype, precision=prec)
    return install_last_token_head(model), prec


def _generate_mine(cfg: DictConfig, s: Dict, mine, n_mine: int, prompts, hashes, tokenizer, store, *, device, dtype,
                   info, stop_ids, pad_id) -> None:
    """Generate this rank's batches ``mine`` (lists of sample ids), appending each batch's rows to ``store``."""
    from tqdm import tqdm

    model, prec = load_teacher(cfg, s, device, dtype)
    params = SamplingParams(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"])
    decoder = None
    if s["decode_engine"] == "static":
        from kd.generate.static_decode import StaticDecoder

        decoder = StaticDecoder(
            model, device=device, cache_dtype=dtype, cuda_graphs=s["cuda_graphs"] and device.type == "cuda",
            nf4_kernel=s["nf4_decode_kernel"] if prec.name == "nf4" else None,  # the precision that runs
            nf4_fused_max_batch=s["nf4_fused_max_batch"])
    store.open_for_append(info.rank)
    kill_after = int(os.environ.get("KD_GEN_KILL_AFTER_BATCHES", "0"))  # crash test hook
    pbar = tqdm(total=n_mine, disable=not (info.is_rank_zero and s["progress_bar"]), desc="teacher",
                unit="sample", dynamic_ncols=True)
    t0, n_tok, n_trunc, n_empty = time.perf_counter(), 0, 0, 0
    try:
        for bi, ids in enumerate(mine):
            kw = dict(max_new_tokens=s["max_new_tokens"], stop_ids=stop_ids, pad_id=pad_id, params=params,
                      seeds=[sample_seed(s["seed"], i) for i in ids])
            if decoder is not None:
                gens = decoder.generate([prompts[i] for i in ids], **kw)
            else:
                gens = generate_batch(model, [prompts[i] for i in ids], device=device, cache_dtype=dtype, **kw)
            rows = []
            for i, g in zip(ids, gens):
                text = tokenizer.decode(g.tokens, skip_special_tokens=True) if g.tokens else ""
                n_tok += len(g.tokens)
                n_trunc += g.finish == "length"
                n_empty += not text.strip()
                rows.append({"id": i, "prompt_hash": hashes[i], "output": text, "n_tokens": len(g.tokens),
                             "finish": g.finish})
            store.append(rows)
            pbar.update(len(ids))
            dt = time.perf_counter() - t0
            pbar.set_postfix(tok_s=f"{n_tok * info.world_size / max(dt, 1e-9):.0f}", trunc=n_trunc,
                             empty=n_empty)
            if kill_after and bi + 1 >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        pbar.close()
        store.close()
        if decoder is not None:
            decoder.close()
    dt = time.perf_counter() - t0
    log.info(f"rank {info.rank}: {n_mine} samples, {n_tok} tokens in {dt:.1f}s "
             f"({n_tok / max(dt, 1e-9):.1f} generated tokens/s on this rank); truncated {n_trunc}, empty {n_empty}")


def _merge(s: Dict, store, records, hashes, out: Path) -> None:
    """Rank 0: every rank's answers -> ``<dataset_name>.json`` + ``dataset_info.json`` + ``summary.json``."""

    results, _ = store.scan(hashes)
    results = {i: r for i, r in results.items() if i in records}
    path = merge_results(records, results, out, dataset_name=s["dataset_name"], hashes=hashes,
                         system_prompt=s["system_prompt"],
                         allow_missing=s["allow_missing"])
    summ = summarize({i: r for i, r in results.items() if r.get("prompt_hash") == hashes[i]})
    atomic_write_text(out / "summary.json", json.dumps(summ, indent=1) + "\n")
    log.info(f"merged {summ['samples']} answers into {path} (+ dataset_info.json); "
             f"{summ['generated_tokens']} tokens, mean {summ['mean_answer_tokens']:.1f}/answer; "
             f"truncated at max_new_tokens: {summ['truncated']}, empty: {summ['empty']}"
             + (f" (ids {summ['truncated_ids'][:10]})" if summ["truncated"] else ""))


def recipe_main(cfg: DictConfig) -> None:
    from torchtune import training

    configure_logging(schema.GENERATE_TEACHER.get(cfg, "log_level"))
    s = _settings(cfg)
    device = checks.check_device(cfg, "auto")
    info = kdist.init_distributed(device)
    dtype = training.get_dtype(checks.check_dtype(cfg, default=s["dtype"]), device=device)
    out = Path(cfg.output_dir)
    if info.rank == 0:
        checks.writable_dir(out)

    # ---- data, prompts, hashes -----------------------------------------------------------------
    tokenizer = checks.build_tokenizer(cfg)
    try:
        records, n_bad = load_alpaca_records(cfg.source, on_bad_record=s["on_bad_record"])
    except (ValueError, FileNotFoundError) as e:
        raise DataError(f"source: {e}") from e
    if s["max_samples"]:
        records = {i: records[i] for i in sorted(records)[: s["max_samples"]]}
    if info.rank == 0:
        report_special_text(records, tokenizer, where=f"source {cfg.source}", fields=("instruction", "input"))
    prompts = {i: prompt_tokens(tokenizer, r, s["system_prompt"]) for i, r in records.items()}
    hashes = {i: prompt_hash(t) for i, t in prompts.items()}
    stop_ids = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else stop_ids[0]

    meta = {k: s[k] for k in META_KEYS}
    meta["source"] = str(Path(cfg.source).resolve())
    meta["checkpoint_dir"] = str(s["ck"].checkpoint_dir)
    _check_run_meta(out, meta, info.is_rank_zero)
    kdist.barrier()

    # ---- what is left --------------------------------------------------------------------------
    store = ResultStore(out)
    done, n_ignored = store.scan(hashes)
    changed = sorted(i for i, r in done.items() if i in hashes and r.get("prompt_hash") != hashes[i])
    if changed and s["on_source_change"] == "error":
        raise DataError(
            f"{len(changed)} finished sample(s) in {out} were generated from a different prompt than the "
            f"current source (ids {changed[:10]}...): the source file, system_prompt or tokenizer changed. "
            "Use a new output_dir, or on_source_change=regenerate to redo those samples."
        )
    todo = {i for i in records if i not in done or i in changed}
    kdist.barrier()  # every rank has read the files before anyone appends
    plan = plan_batches({i: len(t) for i, t in prompts.items()}, batch_size=s["batch_size"],
                        max_new_tokens=s["max_new_tokens"], max_batch_tokens=s["max_batch_tokens"])
    mine = [[i for i in b if i in todo] for k, b in enumerate(plan) if k % info.world_size == info.rank]
    mine = [b for b in mine if b]
    n_mine = sum(len(b) for b in mine)
    if info.is_rank_zero:
        log.info(f"{len(records)} prompts ({n_bad} bad records skipped), {len(records) - len(todo)} already done"
                 f"{f', {n_ignored} torn/bad line(s) ignored' if n_ignored else ''}; {len(todo)} to generate "
                 f"on {info.world_size} rank(s) in {len(plan)} planned batches")

    # ---- generate, then merge (rank 0) ----------------------------------------------------------
    if n_mine:
        _generate_mine(cfg, s, mine, n_mine, prompts, hashes, tokenizer, store, device=device, dtype=dtype,
                       info=info, stop_ids=stop_ids, pad_id=pad_id)
    kdist.barrier()
    if info.is_rank_zero and s["merge"]:
        _merge(s, store, records, hashes, out)
    kdist.barrier()
    kdist.destroy()


if __name__ == "__main__":  # `tune run` runs this file as __main__
    from kd.train.cli_util import run_recipe

    sys.exit(run_recipe(recipe_main))
