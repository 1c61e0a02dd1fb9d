"""The evaluation pictures (kd.train.report) show the data they claim to, and log lines print above the bar."""

from __future__ import annotations

import io
import json
import logging

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png_with_content(path) -> bool:
    import matplotlib.image as mpimg

    if path.read_bytes()[:8] != PNG_MAGIC:
        return False
    img = mpimg.imread(str(path))
    return img.shape[0] > 100 and img.shape[1] > 100 and float(img[..., :3].std()) > 0.01


def test_metrics_jsonl_reader_and_training_curves(tmp_path):
    from kd.train.report import plot_training_curves, read_metrics_jsonl

    rows = [{"step": s, "kind": "train", "loss": 3 - 0.1 * s, "ce_loss": 2.0, "kd_loss": 1.0 + 1 / s,
             "kl": 1.0 + 1 / s, "top1_agreement": 0.05 * s} for s in range(1, 11)]
    rows += [{"step": s, "kind": "val", "loss": 3.0 - 0.05 * s, "ce_loss": 2.1, "kd_loss": 1.2, "kl": 1.2,
              "top1_agreement": 0.3} for s in (0, 5, 10)]
    # a resumed run appends steps 9-10 again (newest wins); a kill -9 left a torn last line
    rows += [{"step": 9, "kind": "train", "loss": 9.0, "kl": 1.0}, {"step": 10, "kind": "train", "loss": 10.0}]
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 11, "ki')
    got = read_metrics_jsonl(p)
    train = [r for r in got if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11)) and train[-1]["loss"] == 10.0
    assert [r["step"] for r in got if r["kind"] == "val"] == [0, 5, 10]

    fig = plot_training_curves({"distilled": got, "other": got[:4]}, tmp_path / "curves.png")
    assert set(fig.panels) == {"loss", "ce_loss", "kd_loss", "kl", "top1_agreement"}
    assert fig.panels["loss"] == {"distilled train": 10, "distilled val": 3, "other train": 4}
    assert fig.panels["ce_loss"]["distilled train"] == 8  # the re-logged steps 9, 10 carry no CE
    assert _is_png_with_content(tmp_path / "curves.png")
    with pytest.raises(ValueError, match="no training metrics"):
        plot_training_curves({"x": [{"step": 1, "kind": "train", "lr": 1.0}]}, tmp_path / "none.png")


def test_heldout_bars_and_length_histogram(tmp_path):
    from kd.train.report import plot_heldout_bars, plot_length_histogram

    metrics = {"base": {"kl": 2.5, "ce_teacher": 3.1, "top1": 0.2},
               "distilled": {"kl": 1.1, "ce_teacher": 2.0, "top1": 0.6},
               "teacher": {"kl": 0.0, "ce_teacher": 1.2, "top1": 1.0},
               "no_teacher_run": {"ce_teacher": 2.2}}
    fig = plot_heldout_bars(metrics, tmp_path / "bars.png")
    assert fig.panels["kl"] == {"base": 1, "distilled": 1, "teacher": 1}
    assert set(fig.panels["ce_teacher"]) == set(metrics)
    assert _is_png_with_content(tmp_path / "bars.png")

    fig = plot_length_histogram({"teacher": [40, 48, 48, 30], "distilled": [10, 12, 48], "empty": []},
                                tmp_path / "len.png", max_new_tokens=48)
    assert fig.panels["lengths"] == {"teacher": 4, "distilled": 3}
    assert _is_png_with_content(tmp_path / "len.png")


def test_log_lines_print_above_the_bar(monkeypatch):
    """A log record during a bar clears the bar, prints on its own line, and the bar is redrawn after it."""
    from tqdm import tqdm

    from kd.core.progress import TqdmLoggingHandler

    buf = io.StringIO()
    bar = tqdm(total=10, desc="epoch 1", file=buf, ncols=60, mininterval=0)
    bar.update(3)
    logger = logging.getLogger("kd.test_progress")
    logger.propagate = False
    h = TqdmLoggingHandler(buf)
    h.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(h)
    try:
        logger.warning("[train] step 3: loss=1.0")
    finally:
        logger.removeHandler(h)
    bar.close()
    text = buf.getvalue()
    i = text.index("[train] step 3")
    line = text[text.rfind("\r", 0, i) + 1: text.index("\n", i)]
    assert line == "[train] step 3: loss=1.0"  # the bar did not tear the log line
    assert "epoch 1" in text[i:]  # the bar comes back below it


def test_bars_only_on_rank_zero(monkeypatch):
    from kd.core.progress import bars_enabled, progress

    monkeypatch.setenv("RANK", "1")
    assert not bars_enabled() and progress(range(3)).disable
    monkeypatch.setenv("RANK", "0")
    assert bars_enabled() and not bars_enabled(False)
    monkeypatch.setenv("KD_PROGRESS", "0")
    assert not bars_enabled()


def test_run_summary_three_lines(tmp_path):
    """`kd summary` (the end of launch/demo.sh): KL before -> after from the validation points, the latest
    checkpoint's adapter, and runnable next commands."""
    from kd.ops.cli import main as kd_main
    from kd.ops.summary import summarize_run, summary_lines
    from kd.train.step_checkpoint import CheckpointManager

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "kind": "val", "kl": 4.8}, {"step": 5, "kind": "train", "kl": 4.0},
            {"step": 27, "kind": "val", "kl": 3.1}, {"step": 54, "kind": "val", "kl": 2.5}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = summarize_run(run)
    assert (s.kind, s.kl_before, s.kl_after, s.step_before, s.step_after, s.checkpoint) == (
        "validation", 4.8, 2.5, 0, 54, None)
    import torch

    CheckpointManager(run / "checkpoints").save(
        54, 2, adapter_sd={"layers.0.attn.q_proj.lora_a.weight": torch.zeros(2, 4),
                           "layers.0.attn.q_proj.lora_b.weight": torch.zeros(4, 2)},
        adapter_meta={"rank": 2, "alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": "x"},
        recipe_state={})
    lines = summary_lines(summarize_run(run), evaluate_config="E.yaml", export_config="X.yaml", eval_data="d.json")
    adapter = run / "checkpoints" / "step_0000054" / "adapter"
    assert lines == [
        "validation KL(teacher||student): 4.800 -> 2.500 per token (step 0 -> step 54)",
        f"adapter: {adapter}",
        f"next: tune run recipes/evaluate.py --config E.yaml adapters.distilled={adapter} dataset.source=d.json"
        f"   |   tune run recipes/export.py --config X.yaml adapter_dir={adapter}",
    ]
    assert kd_main(["summary", str(tmp_path / "missing")]) == 2  # one-line user error, no traceback
