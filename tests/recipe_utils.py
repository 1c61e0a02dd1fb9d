"""Helpers to run the real recipes with ``tune run`` / ``torchrun`` in subprocesses and read their metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TUNE = str(BIN / "tune")


def env_for(testbed, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["KD_TESTBED_DIR"] = str(testbed.root)
    env["OMP_NUM_THREADS"] = "1"
    env["WANDB_MODE"] = "offline"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tune_run(
    testbed,
    overrides: Sequence[str],
    *,
    recipe: str = "recipes/kd_lora.py",
    config: str = "configs/tiny/kd_lora.yaml",
    launcher: Sequence[str] = (),
    check: bool = True,
    timeout: int = 600,
    extra_env: Optional[Dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    cmd = [TUNE, "run", *launcher, recipe, "--config", config, *overrides]
    p = subprocess.run(
        cmd, cwd=REPO, env=env_for(testbed, extra_env), capture_output=True, text=True, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"command failed ({p.returncode}): {' '.join(cmd)}\n--- stdout ---\n{p.stdout[-4000:]}"
            f"\n--- stderr ---\n{p.stderr[-6000:]}"
        )
    return p


def metrics(output_dir: Path, kind: str = "train") -> List[dict]:
    rows = [json.loads(l) for l in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in rows if r["kind"] == kind]


def losses(output_dir: Path, key: str = "loss") -> List[float]:
    return [r[key] for r in metrics(output_dir)]
