"""Issue 31 item 8: every command ``kd summary`` prints runs as printed. Its evaluate command used to carry no
dataset.source and fell back on the evaluate config's default (the offline path's file, absent after a KD run);
it now names the run's own data set (source, val_size, seed from the run's torchtune_config.yaml).

The printed commands run in a scratch directory that links configs/ and recipes/, so their relative default
output_dirs (outputs/tiny_evaluate, outputs/tiny_export) land there, not in the checkout."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from recipe_utils import REPO, env_for, tune_run


# a 2-step run, then the printed evaluate (5 questions, held-out split, pictures) and export: ~30 s on 2 cores
def test_summary_next_commands_run_as_printed(testbed, tmp_path):
    out = tmp_path / "run"
    tune_run(testbed, [f"output_dir={out}", "epochs=1", "max_steps_per_epoch=2", "eval_every_n_steps=2",
                       "progress_bar=False"])
    env = env_for(testbed)
    p = subprocess.run(["kd", "summary", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    nxt = [l for l in p.stdout.splitlines() if l.startswith("next: ")]
    assert nxt, p.stdout
    cmds = [c.strip() for c in nxt[0][len("next: "):].split("   |   ")]
    assert [c.split()[2] for c in cmds] == ["recipes/evaluate.py", "recipes/export.py"], cmds
    assert "dataset.source=" in cmds[0]
    work = tmp_path / "work"
    work.mkdir()
    for d in ("configs", "recipes"):
        (work / d).symlink_to(REPO / d)
    for c in cmds:
        r = subprocess.run(shlex.split(c), cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{c}\n{r.stderr[-3000:]}"
    assert (work / "outputs" / "tiny_export" / "merged" / "config.json").is_file()


def test_printed_evaluate_command_names_the_runs_data(testbed, tmp_path):
    out = tmp_path / "run"
    tune_run(testbed, [f"output_dir={out}", "epochs=1", "max_steps_per_epoch=1", "~eval_every_n_steps",
                       "progress_bar=False", "dataset.val_size=0.2", "dataset.seed=3"])
    p = subprocess.run(["kd", "summary", str(out)], cwd=REPO, env=env_for(testbed), capture_output=True, text=True,
                       timeout=300)
    ev = [l for l in p.stdout.splitlines() if l.startswith("next: ")][0].split("   |   ")[0]
    args = dict(a.split("=", 1) for a in shlex.split(ev) if "=" in a)
    assert args["dataset.source"] == str(Path(testbed.data_json).absolute())
    assert args["dataset.val_size"] == "0.2" and args["dataset.seed"] == "3"
