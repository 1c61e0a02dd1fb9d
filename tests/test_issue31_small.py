"""Issue 31 item 6, the one-line fixes: an empty config file is called empty; a read-only output_dir is called
that by kd preflight (not "0.0 GiB free"); lr_scheduler.num_warmup_steps < 0 is refused; a URL as
dataset.source is named as given (not mangled to https:/...). (The cache of another data set: tests/test_recipe_cache.py
::test_cache_of_another_data_set_is_named_as_such.)"""

from __future__ import annotations

import errno
import subprocess
import tempfile

import pytest
from omegaconf import OmegaConf
from recipe_utils import REPO, env_for, tune_run

from kd.core.config import ConfigError
from kd.data.alpaca import load_alpaca_records
from kd.train import run_checks as checks
from kd.train.cli_util import load_yaml_file


def _last(p: subprocess.CompletedProcess) -> str:
    return [l for l in (p.stdout + p.stderr).splitlines() if l.strip()][-1]


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "\n\n"])
def test_empty_config_file_is_called_empty(tmp_path, text):
    f = tmp_path / "empty.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="is empty"):
        load_yaml_file(str(f))


def test_read_only_output_dir_is_named_not_free_space(testbed, tmp_path, monkeypatch):
    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", ro)
    assert checks.unwritable_reason(tmp_path / "new" / "run") == f"{tmp_path} is read-only"
    monkeypatch.undo()
    assert checks.unwritable_reason(tmp_path / "new") is None
    # through kd preflight: /proc takes no files (for root neither) and reports 0 bytes free
    p = subprocess.run(["kd", "preflight", "--config", "configs/tiny/kd_lora.yaml", "output_dir=/proc/kd_x"],
                       cwd=REPO, env=env_for(testbed), capture_output=True, text=True, timeout=300)
    fail = [l for l in p.stdout.splitlines() + p.stderr.splitlines() if "FAIL [" in l]
    assert fail and "output_dir /proc/kd_x is not writable" in fail[0] and "GiB free" not in fail[0], p.stdout[-2000:]


def test_negative_warmup_is_refused(testbed, tmp_path):
    with pytest.raises(ConfigError, match=r"'lr_scheduler.num_warmup_steps' must be >= 0, got -5"):
        checks.check_lr_scheduler(OmegaConf.create({"lr_scheduler": {
            "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup", "num_warmup_steps": -5}}))
    p = tune_run(testbed, [f"output_dir={tmp_path}", "lr_scheduler.num_warmup_steps=-5"], check=False)
    assert p.returncode == 2 and "lr_scheduler.num_warmup_steps" in _last(p), _last(p)


def test_url_source_is_named_as_given(testbed, tmp_path):
    url = "https://example.com/data/train.json"
    with pytest.raises(FileNotFoundError, match="'https://example.com/data/train.json' is a URL"):
        load_alpaca_records(url)
    p = tune_run(testbed, [f"output_dir={tmp_path}", f"dataset.source={url}"], check=False)
    assert p.returncode == 2 and f"'{url}' is a URL" in _last(p), _last(p)
