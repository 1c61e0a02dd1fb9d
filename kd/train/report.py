"""Pictures for the evaluation report (matplotlib PNGs written next to ``eval_report.md``).

Three figures, each a function that takes plain data and returns a small :class:`Figure` record naming
what was drawn (so tests can check the picture shows the data it claims to):

- :func:`plot_training_curves`: ``metrics.jsonl`` of one or more training runs; one panel per metric
  (total loss, CE, KD, true KL, top-1 agreement) against the optimizer step; train lines, validation dots.
- :func:`plot_heldout_bars`: held-out KL / CE / top-1 agreement per model (base, adapters, teacher).
- :func:`plot_length_histogram`: answer lengths in tokens, teacher vs student(s).

matplotlib runs headless (the Agg backend); labels are ASCII so no CJK font is needed on the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from kd.core.atomic import atomic_write_bytes
from kd.core.layout import METRICS

# (metrics.jsonl key, panel title)
CURVE_METRICS = (
    ("loss", "total loss"),
    ("ce_loss", "CE"),
    ("kd_loss", "KD loss"),
    ("kl", "KL(teacher||student) / token"),
    ("top1_agreement", "top-1 agreement"),
)
BAR_METRICS = (
    ("kl", "held-out KL(teacher||model) / token"),
    ("ce_teacher", "held-out CE on teacher answers"),
    ("top1", "held-out top-1 agreement"),
)


@dataclass
class Figure:
    """What a plot function wrote: the PNG path and, per panel, the series drawn (name -> n points)."""

    path: Path
    panels: Dict[str, Dict[str, int]] = field(default_factory=dict)


def _plt():
    try:
        import matplotlib
    except ImportError as e:  # matplotlib is a core dependency; say how to get it back
        from kd.core.config import ConfigError

        raise ConfigError("the evaluation pictures need matplotlib: pip install matplotlib "
                          "(or pip install -e . again), or set plots=False.") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_metrics_jsonl(path: str | Path) -> List[dict]:
    """Rows of a recipe's ``metrics.jsonl`` (``{"step", "kind": train|val, ...}``). A torn last line (the run
    was killed mid-write) is skipped; a later run appended to the same file (resume) keeps the newest value
    of each (kind, step)."""
    rows: Dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "step" in r and "kind" in r:
            rows[(r["kind"], int(r["step"]))] = r
    return sorted(rows.values(), key=lambda r: (r["kind"], r["step"]))


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_training_curves(runs: Mapping[str, Sequence[dict]], path: str | Path) -> Figure:
    """One panel per metric of :data:`CURVE_METRICS` present in the rows; a line per run for the training
    steps, dots for the validation points. ``runs``: name -> rows of :func:`read_metrics_jsonl`."""
    plt = _plt()
    path = Path(path)
    present = [(k, t) for k, t in CURVE_METRICS if any(k in r for rows in runs.values() for r in rows)]
    if not present:
        raise ValueError("no training metrics to plot (metrics.jsonl has none of "
                         + ", ".join(k for k, _ in CURVE_METRICS) + ")")
    n = len(present)
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.3 * nrows), squeeze=False)
    out = Figure(path)
    for ax, (key, title) in zip(axes.flat, present):
        drawn: Dict[str, int] = {}
        for ci, (name, rows) in enumerate(runs.items()):
            color = f"C{ci}"
            for kind, style in (("train", dict(lw=1.2)), ("val", dict(marker="o", ms=5, lw=1.0, ls="--"))):
                pts = [(r["step"], r[key]) for r in rows if r["kind"] == kind and key in r]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=color, label=f"{name} {kind}", **style)
                drawn[f"{name} {kind}"] = len(pts)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        out.panels[key] = drawn
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return out


def plot_heldout_bars(metrics: Mapping[str, Mapping[str, float]], path: str | Path) -> Figure:
    """Bars per model for each metric of :data:`BAR_METRICS` that some model has (value printed on top)."""
    plt = _plt()
    path = Path(path)
    present = [(k, t) for k, t in BAR_METRICS if any(k in m for m in metrics.values())]
    if not present:
        raise ValueError("no held-out metrics to plot")
    fig, axes = plt.subplots(1, len(present), figsize=(4.4 * len(present), 3.4), squeeze=False)
    out = Figure(path)
    names = list(metrics)
    for ax, (key, title) in zip(axes.flat, present):
        xs = [n for n in names if key in metrics[n]]
        ys = [float(metrics[n][key]) for n in xs]
        bars = ax.bar(range(len(xs)), ys, color=[f"C{names.index(n)}" for n in xs])
        ax.set_xticks(range(len(xs)), xs, rotation=20, ha="right")
        for b, y in zip(bars, ys):
            ax.annotate(f"{y:.1%}" if key == "top1" else f"{y:.3f}", (b.get_x() + b.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        out.panels[key] = {n: 1 for n in xs}
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return out


def plot_length_histogram(lengths: Mapping[str, Sequence[int]], path: str | Path, *,
                          max_new_tokens: Optional[int] = None) -> Figure:
    """Overlaid histograms of answer lengths (tokens), one per source (teacher, each student); a dashed line
    at ``max_new_tokens`` marks where generation was cut."""
    plt = _plt()
    path = Path(path)
    series = {k: list(map(int, v)) for k, v in lengths.items() if len(v)}
    if not series:
        raise ValueError("no answer lengths to plot")
    hi = max(max(v) for v in series.values())
    nbins = min(30, max(5, hi))
    edges = [hi * i / nbins for i in range(nbins + 1)] if hi > 0 else [0, 1]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    out = Figure(path, panels={"lengths": {}})
    for i, (name, v) in enumerate(series.items()):
        mean = sum(v) / len(v)
        ax.hist(v, bins=edges, alpha=0.45, color=f"C{i}", label=f"{name} (n={len(v)}, mean {mean:.0f})")
        out.panels["lengths"][name] = len(v)
    if max_new_tokens is not None:
        ax.axvline(max_new_tokens, color="k", ls="--", lw=1, label=f"max_new_tokens={max_new_tokens}")
    ax.set_xlabel("answer length (tokens)")
    ax.set_ylabel("answers")
    ax.set_title("answer lengths: teacher vs student")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return out


def find_run_metrics(adapter_dir: str | Path) -> Optional[Path]:
    """``<run>/metrics.jsonl`` of an adapter saved by the recipe (``<run>/checkpoints/step_X/adapter``)."""
    p = Path(adapter_dir).resolve()
    for up in (p.parent.parent.parent, p.parent.parent, p.parent):
        if (up / METRICS).is_file():
            return up / METRICS
    return None
