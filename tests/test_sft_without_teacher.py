"""Issue 31 item 10: "LoRA SFT without a teacher" as the README gives it -- teacher_model null + kd_ratio 0 --
runs from the command line (teacher_model=null used to end in "Cannot build None on the meta device"), and so
does ~teacher_model."""

from __future__ import annotations

import pytest
from recipe_utils import REPO, metrics, tune_run

from kd.train.cli_util import load_yaml_file, merge_overrides


def test_section_null_override_nulls_the_section():
    y = load_yaml_file(str(REPO / "configs/tiny/kd_lora.yaml"))
    for null in ("null", "None", "~"):
        cfg = merge_overrides(y.copy(), [f"teacher_model={null}", "kd_ratio=0"])
        assert cfg.teacher_model is None and cfg.kd_ratio == 0
    # a plain value stays torchtune's component shorthand, and a null leaf stays a null leaf
    cfg = merge_overrides(y.copy(), ["teacher_model=torchtune.models.qwen2.qwen2", "max_steps_per_epoch=null"])
    assert cfg.teacher_model._component_ == "torchtune.models.qwen2.qwen2" and cfg.max_steps_per_epoch is None


@pytest.mark.parametrize("form", [["teacher_model=null"], ["~teacher_model"]])
def test_lora_sft_without_teacher_runs_as_the_readme_says(testbed, tmp_path, form):
    out = tmp_path / "sft"
    tune_run(testbed, [*form, "kd_ratio=0", f"output_dir={out}", "epochs=1", "max_steps_per_epoch=1",
                       "~eval_every_n_steps", "progress_bar=False", "log_every_n_steps=1"])
    rows = metrics(out)
    assert rows and all(r["kd_loss"] == 0 for r in rows)
    assert (out / "checkpoints" / "latest").is_file()
