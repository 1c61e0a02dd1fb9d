"""Three-line summary of a finished training run (what ``bash launch/demo.sh`` prints last).

    kd summary <output_dir> [--evaluate-config CFG] [--export-config CFG] [--eval-data JSON]

    validation KL(teacher||student): 4.812 -> 2.493 per token (step 0 -> step 54, 4 batches)
    adapter: outputs/tiny_kd_lora/checkpoints/step_0000054/adapter
    next: tune run recipes/evaluate.py --config ... adapters.distilled=...  |  tune run recipes/export.py ...

Read from the run's ``metrics.jsonl`` (the first and the last validation point; the first and last logged
training steps when the run had no validation) and its latest complete checkpoint.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from kd.core.config import ConfigError
from kd.core.layout import RunLayout
from kd.train.report import read_metrics_jsonl
from kd.train.step_checkpoint import CheckpointManager


@dataclass
class RunSummary:
    kind: str  # "validation" | "training"
    kl_before: Optional[float]
    kl_after: Optional[float]
    step_before: Optional[int]
    step_after: Optional[int]
    checkpoint: Optional[Path]  # adapter dir (LoRA); merged HF dir or sharded step dir (full fine-tune)
    is_full: bool
    step_dir: Optional[Path] = None  # the latest complete checkpoint


def summarize_run(output_dir: str | Path) -> RunSummary:
    out = Path(output_dir)
    layout = RunLayout(out)
    mf = layout.metrics
    if not mf.is_file():
        raise ConfigError(f"{str(mf)!r} not found: is {str(out)!r} the output_dir of a training run?")
    rows = read_metrics_jsonl(mf)
    kind = "validation" if any(r["kind"] == "val" for r in rows) else "training"
    pts = [r for r in rows if r["kind"] == ("val" if kind == "validation" else "train") and "kl" in r]
    first, last = (pts[0], pts[-1]) if pts else (None, None)
    latest = CheckpointManager(layout.checkpoints).latest()
    ckpt, full = None, False
    if latest is not None:
        if (latest / "adapter").is_dir():
            ckpt = latest / "adapter"
        else:  # a full fine-tune (kd.train.full): the HF model written at the end, else the sharded step
            import json

            from kd.train.full import FORMAT

            if json.loads((latest / "meta.json").read_text()).get("format") == FORMAT:
                full = True
                ckpt = layout.merged if (layout.merged / "config.json").is_file() else latest
    return RunSummary(kind, first and first["kl"], last and last["kl"], first and first["step"],
                      last and last["step"], ckpt, full, latest)


def run_eval_data(output_dir: str | Path) -> str:
    """`` dataset.source=... dataset.val_size=... dataset.seed=...`` of the run's own data set (its
    ``torchtune_config.yaml``), so the printed evaluate command reads the training data's held-out split rather
    than the evaluate config's default file; "" when the run's config cannot be read."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(RunLayout(Path(output_dir)).config)
        ds = cfg.get("dataset", None)
        key = "dataset" if ds is not None and hasattr(ds, "keys") else "dataset[0]"
        if key != "dataset":
            if not ds:
                return ""
            ds = ds[0]
        src = OmegaConf.select(cfg, f"{key}.source", throw_on_resolution_failure=True)
        if not src:
            return ""
        parts = [f"dataset.source={shlex.quote(str(Path(str(src)).absolute()))}"]
        for k in ("val_size", "seed"):
            v = OmegaConf.select(cfg, f"{key}.{k}", throw_on_resolution_failure=True)
            if v is not None:
                parts.append(f"dataset.{k}={v}")
        return " " + " ".join(parts)
    except Exception:  # no config (an old run), an unresolvable interpolation: the evaluate config's default
        return ""


def summary_lines(s: RunSummary, *, evaluate_config: str, export_config: str,
                  eval_data: Optional[str] = None, run_data: str = "") -> List[str]:
    if s.kl_before is None:
        kl = f"{s.kind} KL: not logged"
    else:
        kl = (f"{s.kind} KL(teacher||student): {s.kl_before:.3f} -> {s.kl_after:.3f} per token "
              f"(step {s.step_before} -> step {s.step_after})")
    where = f"{'full model' if s.is_full else 'adapter'}: {s.checkpoint if s.checkpoint else 'no checkpoint saved yet'}"
    if s.checkpoint is None:
        nxt = "next: train longer (no checkpoint to evaluate or export)"
    elif s.is_full:
        nxt = (f"next: tune run recipes/export.py --config {export_config.replace('export.yaml', 'export_full.yaml')} "
               f"full_checkpoint={shlex.quote(str(s.step_dir))}   (HF + optional quantize=[fp8_dynamic,w4a16])")
    else:
        q = shlex.quote(str(s.checkpoint))
        data = f" dataset.source={shlex.quote(eval_data)}" if eval_data else run_data
        nxt = (f"next: tune run recipes/evaluate.py --config {evaluate_config} adapters.distilled={q}{data}"
               f"   |   tune run recipes/export.py --config {export_config} adapter_dir={q}")
    return [kl, where, nxt]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="kd summary", description="Three-line summary of a training run.")
    p.add_argument("output_dir")
    p.add_argument("--evaluate-config", default="configs/tiny/evaluate.yaml")
    p.add_argument("--export-config", default="configs/tiny/export.yaml")
    p.add_argument("--eval-data", default=None,
                   help="dataset.source for the evaluate command (default: the run's own data set)")
    a = p.parse_args(argv)
    for line in summary_lines(summarize_run(a.output_dir), evaluate_config=a.evaluate_config,
                              export_config=a.export_config, eval_data=a.eval_data,
                              run_data="" if a.eval_data else run_eval_data(a.output_dir)):
        print(line)
    return 0
