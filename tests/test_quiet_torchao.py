"""Issue 31 item 12: torchao's harmless "Skipping import of cpp extensions ..." line (torchao 0.15 with torch
2.13, README "Versions") is not printed by any command; torchao's other messages still are."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from recipe_utils import REPO, TUNE

NOISE = "Skipping import of cpp extensions"


def test_installed_hook_is_the_repos():
    installed = Path(sysconfig.get_paths()["purelib"]) / "kd_recipes_hook.py"
    assert installed.read_text() == (REPO / "kd_recipes_hook.py").read_text(), \
        "the installed kd_recipes_hook.py is stale: run bash launch/setup.sh"


def test_commands_do_not_print_torchaos_cpp_extension_line(tmp_path):
    p = subprocess.run([TUNE, "run", "recipes/kd_lora.py", "--config", "configs/tiny/kd_lora.yaml", "kd_ration=0.5",
                        f"output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "kd_ratio" in p.stderr, p.stderr[-2000:]
    assert NOISE not in p.stdout + p.stderr
    code = ("import logging, torchao, torchtune; logging.getLogger('torchao').warning('torchao says something else'); "
            "import kd.ops.cli")
    q = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-2000:]
    assert NOISE not in q.stdout + q.stderr
    assert "torchao says something else" in q.stderr  # only that one line is filtered
