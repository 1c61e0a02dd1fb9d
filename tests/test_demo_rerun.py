"""Issue 31 item 7: the README's first command, ``bash launch/demo.sh``, runs twice in a row: the second run
writes a fresh run directory next to the first (which is kept) and says so."""

from __future__ import annotations

import os
import subprocess

import pytest
from recipe_utils import REPO, env_for

SHORT = ["epochs=1", "max_steps_per_epoch=2", "progress_bar=False"]


def _demo(testbed, base):
    env = env_for(testbed, {"KD_DEMO_OUTPUT_DIR": str(base)})
    return subprocess.run(["bash", "launch/demo.sh", *SHORT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow  # two demo runs (set-up check, test bed, 2 steps each, summaries): ~1 min of CPU
def test_demo_runs_twice_in_a_row_keeping_the_first_run(testbed, tmp_path):
    base = tmp_path / "tiny_kd_lora"
    first = _demo(testbed, base)
    assert first.returncode == 0, first.stderr[-3000:]
    latest = (base / "checkpoints" / "latest").read_text()
    second = _demo(testbed, base)
    assert second.returncode == 0, second.stderr[-3000:]
    fresh = f"{base}-2"
    assert f"[demo] {base} holds an earlier demo run (kept); this run writes to {fresh}" in second.stdout
    assert (base / "checkpoints" / "latest").read_text() == latest  # the first run is untouched
    assert os.path.isfile(os.path.join(fresh, "checkpoints", "latest"))
    assert f"adapter: {fresh}/checkpoints/" in second.stdout  # the summary names the new run
