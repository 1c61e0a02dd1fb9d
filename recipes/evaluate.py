"""Evaluate base vs distilled students (and the teacher) on a held-out split; write a Markdown report.

    tune run recipes/evaluate.py --config configs/qwen2_5/7B_evaluate.yaml adapters.distilled=<run>/checkpoints/step_XXXXXXX/adapter

Metrics per model, on the held-out split of ``dataset.source`` (same ``split``/``val_size``/``seed`` as training):
  - ``ce_teacher`` / ``ppl_teacher``: mean token cross-entropy / perplexity on the TEACHER's answers (``output``)
  - ``ce_original`` / ``ppl_original``: the same on the ORIGINAL labels (``original_output``, when the file has it)
  - ``kl``: mean per-token KL(teacher || model) on the teacher-answer tokens (teacher logits computed live)
  - ``top1``: fraction of those tokens where the model's argmax equals the teacher's
Models: ``base`` (the student with its LoRA disabled), one per entry of ``adapters`` (name -> PEFT adapter dir,
e.g. the ``adapter`` folder of a checkpoint), and ``teacher`` (``evaluate_teacher: true``; needs memory for it).
Then every model answers ``questions`` (default: five Buddhist questions) side by side.
Outputs ``<output_dir>/eval_report.md`` and ``<output_dir>/eval_metrics.json``, and (``plots: true``, the
default) three pictures next to the report, embedded in it (kd.train.report):
  - ``eval_curves.png``: training/validation curves of each adapter's run (its ``metrics.jsonl``, found next to
    ``<run>/checkpoints/step_X/adapter`` or given as ``training_metrics.<name>=<path>``);
  - ``eval_heldout.png``: held-out KL / CE / top-1 agreement per model;
  - ``eval_lengths.png``: answer lengths of the teacher vs each student on ``length_samples`` held-out prompts.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig

from kd.core.atomic import atomic_write_text
from kd.core.config import ConfigError, DataError, check_keys, require_component, to_container
from kd.core.layout import RunLayout
from kd.core.progress import configure_logging, progress
from kd.data.alpaca import DEFAULT_SYSTEM_PROMPT, AlpacaKDDataset
from kd.generate.generation import (
    SamplingParams,
    generate_batch,
    install_last_token_head,
    prompt_tokens,
    remove_last_token_head,
    sample_seed,
    stop_token_ids,
)
from kd.losses.distillation import DistillationLoss, cross_entropy_sum
from kd.ops import schema
from kd.teacher.precision import parse_precision, resolve_precision
from kd.train import report
from kd.train import run_checks as checks
from kd.train.models import load_adapter_dir, load_frozen_model, shift_labels

log = logging.getLogger("kd.evaluate")

DEFAULT_QUESTIONS = [
    "《心经》中“色即是空，空即是色”的含义是什么？",
    "什么是四圣谛？",
    "什么是明心见性？",
    "《金刚经》的核心思想是什么？",
    "佛教所说的“无我”是什么意思？",
]
KEYS = schema.EVALUATE.names  # the one table of this recipe's keys (kd/ops/schema.py, docs/config_keys.md)
DATASET_KEYS = {"source", "system_prompt", "split", "val_size", "seed", "max_seq_len", "on_bad_record", "_component_"}


def _batches(ds, batch_size: int, pad_id: int):
    from torchtune.data import padded_collate_sft

    for i in range(0, len(ds), batch_size):
        items = [ds[j] for j in range(i, min(len(ds), i + batch_size))]
        yield padded_collate_sft(items, padding_idx=pad_id, ignore_idx=-100)


@torch.no_grad()
def _metrics(models: Dict[str, Any], teacher, ds_teacher, ds_orig, batch_size, pad_id, device) -> Dict[str, Dict[str, float]]:
    """models: name -> callable(tokens) -> logits [B, S, V] (fp32)."""

    kl_fn = DistillationLoss(kind="forward_kl", scale_by_t2=False)
    sums = {n: {"ce_t": 0.0, "n_t": 0.0, "kl": 0.0, "agree": 0.0, "ce_o": 0.0, "n_o": 0.0} for n in models}
    names = ",".join(models)
    n_batches = lambda ds: (len(ds) + batch_size - 1) // batch_size  # noqa: E731
    for b in progress(_batches(ds_teacher, batch_size, pad_id), total=n_batches(ds_teacher),
                      desc=f"eval {names}: teacher answers", unit="batch"):
        tok, lab = b["tokens"].to(device), shift_labels(b["labels"]).to(device)
        flat = lab.reshape(-1)
        t_logits = teacher(tok).float().reshape(-1, teacher_vocab(teacher)) if teacher is not None else None
        valid = flat != -100
        for n, fn in models.items():
            s = fn(tok).float()
            s = s.reshape(-1, s.shape[-1])
            ce = cross_entropy_sum(s, flat)
            sums[n]["ce_t"] += float(ce.loss_sum)
            sums[n]["n_t"] += float(ce.n_valid)
            if t_logits is not None:
                sums[n]["kl"] += float(kl_fn(s, t_logits, flat).loss_sum)
                sums[n]["agree"] += float(((s.argmax(-1) == t_logits.argmax(-1)) & valid).sum())
    if ds_orig is not None:
        for b in progress(_batches(ds_orig, batch_size, pad_id), total=n_batches(ds_orig),
                          desc=f"eval {names}: original labels", unit="batch"):
            tok, lab = b["tokens"].to(device), shift_labels(b["labels"]).to(device)
            for n, fn in models.items():
                s = fn(tok).float()
                ce = cross_entropy_sum(s.reshape(-1, s.shape[-1]), lab.reshape(-1))
                sums[n]["ce_o"] += float(ce.loss_sum)
                sums[n]["n_o"] += float(ce.n_valid)
    out = {}
    for n, v in sums.items():
        r = {"ce_teacher": v["ce_t"] / max(v["n_t"], 1), "tokens_teacher": v["n_t"]}
        r["ppl_teacher"] = math.exp(min(r["ce_teacher"], 50))
        if teacher is not None:
            r["kl"] = v["kl"] / max(v["n_t"], 1)
            r["top1"] = v["agree"] / max(v["n_t"], 1)
        if ds_orig is not None:
            r["ce_original"] = v["ce_o"] / max(v["n_o"], 1)
            r["ppl_original"] = math.exp(min(r["ce_original"], 50))
        out[n] = r
    return out


def teacher_vocab(model) -> int:
    return model.tok_embeddings.num_embeddings


def _generate(model, tokenizer, records, system_prompt, *, max_new_tokens, params, seed, device, dtype,
              batch_size: int = 8, desc: str = "generate"):
    """Answers (kd.generate.generation.Generation) of ``model`` to alpaca ``records``, in batches of ``batch_size``."""

    prompts = [prompt_tokens(tokenizer, r, system_prompt) for r in records]
    gens = []
    install_last_token_head(model)
    try:
        for i in progress(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            chunk = prompts[i:i + batch_size]
            gens += generate_batch(model, chunk, max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tokenizer),
                                   pad_id=tokenizer.pad_id, params=params,
                                   seeds=[sample_seed(seed, i + j) for j in range(len(chunk))],
                                   device=device, cache_dtype=dtype)
    finally:
        remove_last_token_head(model)
    return gens


def _answers(model, tokenizer, questions, system_prompt, *, max_new_tokens, params, seed, device, dtype,
             name: str = "model") -> List[str]:
    gens = _generate(model, tokenizer, [{"instruction": q, "input": ""} for q in questions], system_prompt,
                     max_new_tokens=max_new_tokens, params=params, seed=seed, device=device, dtype=dtype,
                     batch_size=len(questions) or 1, desc=f"{name}: answer the questions")
    return [tokenizer.decode(g.tokens, skip_special_tokens=True) + (" …[truncated]" if g.finish == "length" else "")
            for g in gens]


def _report(path: Path, metrics, answers, questions, meta, figures=None) -> None:
    cols = [("ce_teacher", "CE on teacher answers"), ("ppl_teacher", "PPL (teacher ans.)"),
            ("ce_original", "CE on original labels"), ("ppl_original", "PPL (orig.)"),
            ("kl", "KL(teacher‖model)/token"), ("top1", "top-1 agreement")]
    cols = [c for c in cols if any(c[0] in m for m in metrics.values())]
    lines = ["# Offline distillation: evaluation report", "",
             f"- data: `{meta['source']}` split `{meta['split']}` ({meta['n_samples']} samples, "
             f"{int(next(iter(metrics.values()))['tokens_teacher'])} teacher-answer tokens)",
             "- models: " + ", ".join(f"`{k}` ({v})" for k, v in meta["models"].items()),
             f"- generation: max_new_tokens={meta['max_new_tokens']}, temperature={meta['temperature']}", "",
             "## Metrics", "", "| model | " + " | ".join(c[1] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, m in metrics.items():
        cells = [("—" if c not in m else (f"{m[c]:.2%}" if c == "top1" else f"{m[c]:.4f}")) for c, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Lower CE/PPL/KL and higher top-1 agreement = closer to the teacher.", ""]
    for title, fname, caption in (figures or []):
        lines += [f"## {title}", "", f"![{title}]({fname})", "", caption, ""]
    lines += ["## Answers", ""]
    for qi, q in enumerate(questions):
        lines += [f"### {qi + 1}. {q}", ""]
        for name, ans in answers.items():
            lines += [f"**{name}**:", "", "> " + ans[qi].replace("\n", "\n> "), ""]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _metrics_path(p) -> Path:
    p = Path(p)
    return RunLayout(p).metrics if p.is_dir() else p


def _figures(out: Path, cfg, metrics, lengths, adapters, max_new: int):
    """Write the report's PNGs; returns (title, file name, caption) per picture written."""

    given = dict(to_container(cfg.get("training_metrics", None)) or {})
    paths = {name: _metrics_path(given[name]) if name in given else report.find_run_metrics(adir)
             for name, adir in adapters.items()}
    paths.update({name: _metrics_path(p) for name, p in given.items() if name not in adapters})
    runs = {}
    for name, p in paths.items():
        if p is None:
            continue
        if not p.is_file():
            raise ConfigError(f"training_metrics.{name}={str(p)!r} does not exist (give a run's metrics.jsonl "
                              "or its output_dir).")
        rows = report.read_metrics_jsonl(p)
        if rows:
            runs[name] = rows
    figs = []
    if runs:
        report.plot_training_curves(runs, out / "eval_curves.png")
        figs.append(("Training and validation curves", "eval_curves.png",
                     "Lines: training steps (logged every `log_every_n_steps`); dashed with dots: validation. "
                     "From the `metrics.jsonl` of " + ", ".join(f"`{k}`" for k in runs) + "."))
    report.plot_heldout_bars(metrics, out / "eval_heldout.png")
    figs.append(("Held-out metrics per model", "eval_heldout.png",
                 "KL(teacher‖model) and CE per answer token (lower = closer to the teacher), top-1 agreement "
                 "(higher = closer)."))
    if lengths:
        report.plot_length_histogram(lengths, out / "eval_lengths.png", max_new_tokens=max_new)
        n = max(len(v) for v in lengths.values())
        figs.append(("Answer lengths", "eval_lengths.png",
                     f"Tokens per answer on the first {n} held-out prompts (generation stops at "
                     f"max_new_tokens={max_new})."))
    return figs


def _datasets(cfg: DictConfig, tokenizer):
    """The same held-out split twice: with the teacher's answers and (when the file has them) the original labels.
    Returns (ds_teacher, ds_original or None, dataset settings)."""

    d = cfg.dataset
    dkw = dict(system_prompt=d.get("system_prompt", DEFAULT_SYSTEM_PROMPT), split=d.get("split", "val"),
               val_size=d.get("val_size", 0.05), seed=d.get("seed", 0), max_seq_len=d.get("max_seq_len", None),
               on_bad_record=d.get("on_bad_record", "error"))
    try:
        ds_t = AlpacaKDDataset(tokenizer, d.source, output_field="output", **dkw)
        has_orig = all(isinstance(r.get("original_output"), str) and r["original_output"].strip()
                       for r in ds_t.records.values())
        ds_o = AlpacaKDDataset(tokenizer, d.source, output_field="original_output", **dkw) if has_orig else None
    except (ValueError, FileNotFoundError) as e:
        raise DataError(f"dataset: {e}") from e
    n_max = schema.EVALUATE.get(cfg, "max_samples")
    for ds in (ds_t, ds_o):
        if ds is not None and n_max:
            ds.ids = ds.ids[:n_max]
    if len(ds_t) == 0:
        raise ConfigError("the evaluation split is empty: set dataset.val_size > 0 (same as in training).")
    return ds_t, ds_o, dkw


def _load_models(cfg: DictConfig, device, dtype):
    """(student, teacher or None, adapters {name: dir}); the student is frozen, its LoRA loaded later per adapter."""

    t0 = time.perf_counter()
    student = load_frozen_model(cfg.model, cfg.checkpointer, device=device, dtype=dtype, which="student")
    adapters = dict(to_container(cfg.get("adapters", None)) or {})
    if adapters and "lora_rank" not in cfg.model:
        raise ConfigError("adapters are given but model is not a LoRA builder (use e.g. lora_qwen2_5_7b_instruct "
                          "with the adapter's lora_rank/lora_alpha/lora_attn_modules).")
    teacher = None
    if schema.EVALUATE.get(cfg, "evaluate_teacher") and cfg.get("teacher_model") is not None:
        require_component(cfg, "teacher_model")
        teacher = load_frozen_model(cfg.teacher_model, cfg.get("teacher_checkpointer"), device=device, dtype=dtype,
                                    precision=resolve_precision(cfg.get("teacher_quantization", None), device, dtype))
    log.info(f"models loaded in {time.perf_counter() - t0:.1f}s")
    return student, teacher, adapters


def _evaluate_all(cfg, student, teacher, adapters, ds_t, ds_o, tokenizer, *, questions, system_prompt, batch_size,
                  n_len, gen_kw):
    """Held-out metrics, answers to ``questions`` and answer lengths (first ``n_len`` held-out prompts) of the base
    student (adapter disabled), each adapter and the teacher. Returns (metrics, answers, lengths, models_meta)."""
    from torchtune.modules.peft import disable_adapter

    sp, pad, dev = system_prompt, tokenizer.pad_id, gen_kw["device"]
    is_lora = "lora_rank" in cfg.model

    def base_fn(tok):
        if not is_lora:
            return student(tok)
        with disable_adapter(student):
            return student(tok)

    # metrics: base (adapter disabled), then each adapter, then the teacher itself
    metrics: Dict[str, Dict[str, float]] = {}
    answers: Dict[str, List[str]] = {}
    lengths: Dict[str, List[int]] = {}  # answer lengths (tokens) on the first length_samples held-out prompts
    len_records = [ds_t.record(i) for i in range(min(n_len, len(ds_t)))]

    def answer_all(name, model):
        answers[name] = _answers(model, tokenizer, questions, sp, name=name, **gen_kw)
        if len_records:
            gens = _generate(model, tokenizer, len_records, sp, batch_size=batch_size, desc=f"{name}: answer lengths",
                             **gen_kw)
            lengths[name] = [len(g.tokens) for g in gens]

    metrics.update(_metrics({"base": base_fn}, teacher, ds_t, ds_o, batch_size, pad, dev))
    if is_lora:
        with disable_adapter(student):
            answer_all("base", student)
    else:
        answer_all("base", student)
    models_meta = {"base": str(cfg.checkpointer.checkpoint_dir)}
    for name, adir in adapters.items():
        load_adapter_dir(student, adir, cfg.model)
        metrics.update(_metrics({name: student}, teacher, ds_t, ds_o, batch_size, pad, dev))
        answer_all(name, student)
        models_meta[name] = f"base + adapter {adir}"
    if teacher is not None:
        metrics.update(_metrics({"teacher": teacher}, teacher, ds_t, ds_o, batch_size, pad, dev))
        answer_all("teacher", teacher)
        models_meta["teacher"] = str(cfg.teacher_checkpointer.checkpoint_dir)
    elif len_records:
        # No live teacher: the teacher's lengths are those of the data's answers (the teacher's own answers
        # when the file comes from recipes/generate_teacher.py), cut at max_new_tokens like the students'.
        cap = gen_kw["max_new_tokens"]
        lengths["teacher (data)"] = [
            min(cap, len(tokenizer.encode(str(r["output"]), add_bos=False, add_eos=False))) for r in len_records
        ]
    return metrics, answers, lengths, models_meta


def recipe_main(cfg: DictConfig) -> None:
    from torchtune import training

    configure_logging()
    check_keys(cfg, KEYS, where="the evaluate config", required=("output_dir", "model", "checkpointer", "tokenizer", "dataset"))
    require_component(cfg, "model")
    require_component(cfg, "tokenizer")
    check_keys(cfg.dataset, DATASET_KEYS, where="'dataset'", required=("source",))

    parse_precision(cfg.get("teacher_quantization", None))  # bad value: one clear line before any loading
    device = checks.check_device(cfg, "auto")
    dtype = training.get_dtype(checks.check_dtype(cfg), device=device)
    out = checks.writable_dir(cfg.output_dir)
    tokenizer = checks.build_tokenizer(cfg)
    get = partial(schema.EVALUATE.get, cfg)  # every value with the default and range of the one key table
    bs = get("batch_size")
    max_new = get("max_new_tokens")
    params = SamplingParams(temperature=get("temperature"), top_p=get("top_p"))
    seed = get("seed")
    questions = list(to_container(get("questions")) or DEFAULT_QUESTIONS)
    plots = get("plots")
    if not get("progress_bar"):
        import os

        os.environ["KD_PROGRESS"] = "0"
    ds_t, ds_o, dkw = _datasets(cfg, tokenizer)
    sp = dkw["system_prompt"]
    student, teacher, adapters = _load_models(cfg, device, dtype)
    gen_kw = dict(max_new_tokens=max_new, params=params, seed=seed, device=device, dtype=dtype)
    n_len = get("length_samples") if plots else 0
    metrics, answers, lengths, models_meta = _evaluate_all(
        cfg, student, teacher, adapters, ds_t, ds_o, tokenizer, questions=questions, system_prompt=sp,
        batch_size=bs, n_len=n_len, gen_kw=gen_kw)
    meta = {"source": str(cfg.dataset.source), "split": dkw["split"], "n_samples": len(ds_t), "models": models_meta,
            "max_new_tokens": max_new, "temperature": params.temperature}

    figures = _figures(out, cfg, metrics, lengths, adapters, max_new) if plots else []
    atomic_write_text(out / "eval_metrics.json",
                      json.dumps({"metrics": metrics, "answers": answers, "questions": questions,
                                  "answer_lengths": lengths, "figures": [f[1] for f in figures], **meta},
                                 ensure_ascii=False, indent=1) + "\n")
    _report(out / "eval_report.md", metrics, answers, questions, meta, figures)
    for n, m in metrics.items():
        log.info(f"{n}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items() if not k.startswith("tokens")))
    log.info(f"report: {out / 'eval_report.md'}")


if __name__ == "__main__":  # `tune run` runs this file as __main__
    from kd.train.cli_util import run_recipe

    sys.exit(run_recipe(recipe_main))
