"""Issue 31 item 2: a NaN teacher is named as the culprit whatever the save/log schedule. The teacher's NaN makes
the KD term NaN at step N, the update makes the student NaN at step N+1, and a check at a later step saw both and
blamed the student; the culprit is now the one of the first bad step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from recipe_utils import tune_run

from kd.train.guard import NonFiniteError, NonFiniteGuard

NAN, FIN = torch.tensor(float("nan")), torch.tensor(1.0)


def test_first_bad_steps_culprit_is_named_not_the_later_one():
    g = NonFiniteGuard(torch.device("cpu"))
    g.observe(ce=FIN, kd_terms=torch.tensor([1.0, 1.0]), grad_norm=FIN, step=1)
    g.observe(ce=FIN, kd_terms=torch.tensor([float("nan"), 1.0]), grad_norm=NAN, step=2)  # the teacher goes bad
    g.observe(ce=NAN, kd_terms=torch.tensor([float("nan")] * 2), grad_norm=NAN, step=3)  # then the student
    with pytest.raises(NonFiniteError) as e:
        g.check(g.flags().clone(), 3)
    msg = str(e.value)
    assert "at step 2 (detected at step 3)" in msg and "the teacher's output (logits) is non-finite" in msg, msg
    assert "diverged run" not in msg
    # and a student that diverges first is still the student, even if the KD term follows
    g = NonFiniteGuard(torch.device("cpu"))
    g.observe(ce=NAN, kd_terms=torch.tensor([float("nan")] * 2), grad_norm=NAN, step=4)
    g.observe(ce=NAN, kd_terms=torch.tensor([float("nan")] * 2), grad_norm=NAN, step=5)
    with pytest.raises(NonFiniteError, match="at step 4 .*the student's loss"):
        g.check(g.flags().clone(), 5)


def test_nan_teacher_named_without_a_checkpoint_at_the_bad_step(testbed, tmp_path):
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "nan_teacher"
    shutil.copytree(testbed.teacher_dir, teacher)
    idx = json.loads((teacher / "model.safetensors.index.json").read_text())["weight_map"]
    shard = teacher / idx["model.norm.weight"]
    sd = load_file(str(shard))
    sd["model.norm.weight"] = torch.full_like(sd["model.norm.weight"], float("nan"))
    save_file(sd, str(shard), metadata={"format": "pt"})
    steps = 3
    p = tune_run(testbed, [f"output_dir={tmp_path / 'run'}", f"teacher_checkpointer.checkpoint_dir={teacher}",
                           "epochs=1", f"max_steps_per_epoch={steps}", "~eval_every_n_steps", "progress_bar=False",
                           f"log_every_n_steps={steps}", f"save_every_n_steps={steps * 10}"], check=False)
    last = [l for l in p.stderr.splitlines() if l.strip()][-1]
    assert p.returncode == 2 and "teacher's output (logits) is non-finite" in last and "at step 1" in last, last
