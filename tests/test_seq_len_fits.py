"""Issue 31 item 4: ``tokenizer.max_seq_len`` above a model's ``max_seq_len`` is one ConfigError line at setup
naming both values (it used to pass silently and end in torchtune's traceback at the first long sample)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from recipe_utils import REPO, tune_run

from kd.core.config import ConfigError
from kd.train import run_checks as checks


def test_recipe_refuses_tokenizer_longer_than_model_naming_both(testbed, tmp_path):
    cfg = OmegaConf.load(REPO / "configs/tiny/kd_lora.yaml")
    limit = min(int(cfg.model.max_seq_len), int(cfg.teacher_model.max_seq_len))
    too_long = limit * 2
    p = tune_run(testbed, [f"output_dir={tmp_path / 'run'}", f"tokenizer.max_seq_len={too_long}", "epochs=1",
                           "max_steps_per_epoch=1", "~eval_every_n_steps", "progress_bar=False"], check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    last = [l for l in p.stderr.splitlines() if l.strip()][-1]
    assert last.startswith("kd: error") and f"tokenizer.max_seq_len={too_long}" in last and f"={limit}" in last, last
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_builder_without_max_seq_len_is_read_from_the_model():
    """The 72B -> 7B configs name builders that fix max_seq_len inside: it is read from a meta-device build."""
    cfg = OmegaConf.load(REPO / "configs/qwen2_5/72B_to_7B_kd_lora_1node.yaml")
    models = (("model", cfg.model), ("teacher_model", cfg.teacher_model))
    lims = {k: checks.model_max_seq_len(s) for k, s in models}
    assert all(isinstance(v, int) and v > 0 for v in lims.values()), lims
    key, lim = min(lims.items(), key=lambda kv: kv[1])
    checks.check_seq_len_fits(OmegaConf.create({"tokenizer": {"max_seq_len": lim}}), models)
    with pytest.raises(ConfigError, match=f"dataset.max_seq_len={lim + 1} is above {key}'s max_seq_len={lim}"):
        checks.check_seq_len_fits(OmegaConf.create({"dataset": {"max_seq_len": lim + 1}}), models)
