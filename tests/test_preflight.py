"""kd.ops.preflight checks in one process (the two-node path is covered by tests/test_launch.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "configs" / "tiny" / "kd_lora.yaml"


@pytest.fixture()
def cfg(testbed, tmp_path, monkeypatch):
    monkeypatch.setenv("KD_TESTBED_DIR", str(testbed.root))
    from kd.ops.preflight import load_config

    return load_config(str(CFG), [f"output_dir={tmp_path / 'out'}"])


def _teacher_copy(testbed, tmp_path) -> Path:
    d = tmp_path / "teacher"
    shutil.copytree(testbed.teacher_dir, d)
    return d


def test_complete_checkpoints_pass(cfg):
    import torch

    from kd.ops.preflight import check_checkpoint

    for which, ck, m in (("teacher", "teacher_checkpointer", "teacher_model"), ("student", "checkpointer", "model")):
        problems, facts = check_checkpoint(which, cfg[ck], cfg[m], torch.float32)
        assert problems == [], problems
        assert facts["vocab"] == 1024 and facts["bytes"] > 0


def test_truncated_shard_and_index_size(cfg, testbed, tmp_path):
    import torch

    from kd.ops.preflight import check_checkpoint

    d = _teacher_copy(testbed, tmp_path)
    shard = sorted(d.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    cfg.teacher_checkpointer.checkpoint_dir = str(d)
    problems, _ = check_checkpoint("teacher", cfg.teacher_checkpointer, cfg.teacher_model, torch.float32)
    assert any("truncated" in p and shard.name in p for p in problems), problems
    shard.write_bytes(data)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] = int(index["metadata"]["total_size"]) * 2
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    problems, _ = check_checkpoint("teacher", cfg.teacher_checkpointer, cfg.teacher_model, torch.float32)
    assert any("total_size" in p for p in problems), problems


def test_builder_mismatch_named(cfg):
    import torch

    from kd.ops.preflight import check_checkpoint

    cfg.teacher_model.num_layers = 3
    problems, _ = check_checkpoint("teacher", cfg.teacher_checkpointer, cfg.teacher_model, torch.float32)
    assert any("num_layers=3" in p and "num_hidden_layers=4" in p for p in problems), problems


def test_compare_reports_versions_code_config(cfg):
    import copy

    import torch

    from kd.ops.preflight import compare_reports, local_checks

    rep = local_checks(cfg, world_size=1, rank=0, local_rank=0, device=torch.device("cpu"))
    assert rep.problems == [], rep.problems
    other = copy.deepcopy(rep)
    other.rank, other.hostname = 1, "spark-2"
    assert compare_reports([rep, other]) == []
    other.versions["torchao"] = "0.16.0"
    other.code = "0" * 64
    other.config = "1" * 64
    other.config_text = rep.config_text.replace("kd_ratio: 0.5", "kd_ratio: 0.7")
    msgs = compare_reports([rep, other])
    assert any("[spark-2 rank 1] software differs" in m and "torchao 0.15.0 vs 0.16.0" in m for m in msgs), msgs
    assert any("code differs" in m for m in msgs)
    assert any("config differs" in m and "+kd_ratio: 0.7" in m for m in msgs), msgs


def test_kd_preflight_cli_single_process(testbed, tmp_path):
    """`kd preflight` without a launcher: one process, exit 0; a missing config is one clean line, exit 2."""
    env = {"KD_TESTBED_DIR": str(testbed.root), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    kd = str(Path(sys.executable).parent / "kd")
    r = subprocess.run([kd, "preflight", "--config", str(CFG), f"output_dir={tmp_path}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kd preflight: OK" in r.stdout and "memory: plan peak" in r.stdout
    r = subprocess.run([kd, "preflight", "--config", "missing.yaml"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([kd, "plan", "--config", str(CFG), "--batch-size", "2"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "PEAK (estimate)" in r.stdout, r.stderr
