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
    assert len(msgs) == 1, msgs  # one line per node that differs, naming what differs
    assert msgs[0].startswith("[spark-2 rank 1] differs from")
    assert "software differs: torchao 0.15.0 vs 0.16.0" in msgs[0] and "code differs" in msgs[0], msgs
    assert "resolved config differs: kd_ratio: 0.5 vs 0.7" in msgs[0], msgs
    # output_dir may differ (each node its own disk): not a problem
    other = copy.deepcopy(rep)
    other.rank, other.hostname = 1, "spark-2"
    other.config = "2" * 64
    other.config_text = rep.config_text.replace(str(cfg.output_dir), "/elsewhere/out")
    assert other.config_text != rep.config_text and compare_reports([rep, other]) == []


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


def test_bw_payload_is_clamped():
    from kd.core.config import ConfigError
    from kd.ops.preflight import MAX_BW_MB, bw_payload_mb

    assert bw_payload_mb(None, "cuda") == (256.0, None) and bw_payload_mb(None, "cpu") == (16.0, None)
    size, notice = bw_payload_mb(16384, "cuda")  # the 16 GB test that froze a Spark
    assert size == MAX_BW_MB <= 512 and "clamped to" in notice and "--bw-mb 16384" in notice
    assert "\n" not in notice
    assert bw_payload_mb(MAX_BW_MB, "cuda") == (MAX_BW_MB, None)
    with pytest.raises(ConfigError):
        bw_payload_mb(0, "cuda")


def _hand_lora_params(r, d, q, kv, ff, vocab, layers, output=True):
    """LoRA parameters of the tiny student by hand: r x (in + out) per adapted linear."""
    attn = r * (d + q) + 2 * r * (d + kv) + r * (q + d)  # q, k, v, output_proj
    mlp = 2 * r * (d + ff) + r * (ff + d)  # w1, w3 (d -> ff) and w2 (ff -> d)
    return layers * (attn + mlp) + (r * (d + vocab) if output else 0)


def test_cross_node_bytes_per_step_by_hand(testbed, tmp_path, monkeypatch):
    """kd.ops.planner.cross_node_bytes_per_step on the tiny config vs the formula worked out by hand."""
    monkeypatch.setenv("KD_TESTBED_DIR", str(testbed.root))
    from kd.ops.planner import build_and_count, cross_node_bytes_per_step
    from kd.ops.preflight import load_config

    # tiny student: d=128, 4 heads x 32 (q 128), 4 kv heads x 32 (kv 128), ff 256, vocab 1024, 2 layers, r=16
    P = _hand_lora_params(16, 128, 128, 128, 256, 1024, 2)
    assert P == 88_064
    g = 4  # the tiny config trains in fp32
    base = ["fsdp_strategy=hybrid", "teacher_sharding=replicate", "gradient_accumulation_steps=3"]
    cfg = load_config(str(CFG), base)
    tr = cross_node_bytes_per_step(cfg, 2, local_world_size=1)  # two nodes, one process each
    assert [n for n, _, _ in tr.rows] == ["gradient all-reduce"]
    assert tr.total == 3 * 2 * (2 - 1) / 2 * P * g == 1_056_768  # G x 2(N-1)/N x P x g
    assert cross_node_bytes_per_step(cfg, 2, local_world_size=2).total == 0  # one node: nothing crosses
    # student and teacher sharded over both nodes: + weight gathers (forward + backward) and a reduce-scatter
    cfg = load_config(str(CFG), ["fsdp_strategy=shard", "teacher_sharding=shard", "gradient_accumulation_steps=1"])
    tr = cross_node_bytes_per_step(cfg, 2, local_world_size=1)
    s, t = build_and_count(cfg.model), build_and_count(cfg.teacher_model)
    W_s = s.total * g
    W_t = (t.total - t.output) * g  # fp32 teacher, its output head stays replicated beside the fused loss
    rows = dict((n, b) for n, b, _ in tr.rows)
    assert rows["student weight all-gather"] == 2 * 0.5 * W_s
    assert rows["gradient reduce-scatter"] == 0.5 * P * g
    assert rows["teacher weight all-gather"] == 0.5 * W_t
    # a full fine-tune (plain builder) reduces every student weight's gradient
    cfg = load_config(str(CFG), ["fsdp_strategy=hybrid", "teacher_sharding=replicate",
                                 "model._component_=torchtune.models.qwen2.qwen2", "~model.lora_attn_modules",
                                 "~model.apply_lora_to_mlp", "~model.apply_lora_to_output", "~model.lora_rank",
                                 "~model.lora_alpha", "~model.lora_dropout"])
    full = build_and_count(cfg.model)
    assert cross_node_bytes_per_step(cfg, 2, local_world_size=1).total == full.total * g


def test_link_report_and_slowdown_warning():
    from kd.ops.planner import CrossNodeTraffic
    from kd.ops.preflight import link_report

    tr = CrossNodeTraffic([("gradient all-reduce", 0.9e9, "LoRA")], nodes=2, micro_batches=3)
    line, warn = link_report(24.0, tr, 24.0, slow=False)
    assert line.startswith("link: 24.00 GB/s measured; this config moves 0.9 GB per optimizer step across nodes = "
                           "0.04 s per step at this rate (0.04 s at the nominal 24 GB/s)"), line
    assert warn is None
    line, warn = link_report(3.0, tr, 24.0, step_s=6.0, step_src="kd plan --time, gb10 profile", slow=True)
    assert "= 0.30 s per step at this rate (0.04 s at the nominal 24 GB/s)" in line
    assert "expected slowdown +0.26 s per step = +4% of the planner's 6.00 s step (kd plan --time, gb10 profile)" \
        in warn, warn
    assert "NCCL_IB_HCA naming both halves" in warn and "\n" not in warn
    _, warn = link_report(3.0, tr, 24.0, slow=True)  # no step-time estimate: seconds only
    assert "+0.26 s per step" in warn and "planner" not in warn
    line, warn = link_report(3.0, CrossNodeTraffic([], nodes=1, micro_batches=1), 24.0, slow=True)
    assert "moves nothing across nodes" in line and warn is None
    line, _ = link_report(0.8, CrossNodeTraffic([("gradient all-reduce", 352_256, "LoRA")], 2, 1), 24.0)
    assert "= 0.00044 s per step at this rate (1.5e-05 s at the nominal 24 GB/s)" in line, line


def test_planner_step_time_for_the_slowdown(testbed, monkeypatch):
    monkeypatch.setenv("KD_TESTBED_DIR", str(testbed.root))
    from kd.ops.preflight import load_config, planner_step_s

    cfg = load_config(str(CFG), [])
    step, src = planner_step_s(cfg, 2, "gb10")
    assert step is not None and step > 0 and src == "kd plan --time, gb10 profile", (step, src)
    step, src = planner_step_s(cfg, 2, "no_such_profile.yaml")
    assert step is None and src.startswith("no step-time estimate")


def test_local_checks_report_the_nccl_environment(cfg, tmp_path, monkeypatch):
    """kd preflight on one node with RDMA devices (a fake DGX Spark sysfs tree): the NCCL environment is in the
    report, with the MTU warning and its fix."""
    import torch
    from test_netcheck import fake_sys

    from kd.ops.preflight import local_checks

    monkeypatch.setenv("KD_SYSFS_ROOT", str(fake_sys(tmp_path / "sys", mtu=1500)))
    monkeypatch.setenv("KD_PROCFS_ROOT", str(tmp_path / "proc"))
    monkeypatch.setenv("NCCL_IB_HCA", "rocep1s0f0")
    rep = local_checks(cfg, world_size=1, rank=0, local_rank=0, device=torch.device("cpu"))
    assert any(i.startswith("net: RDMA roceP2p1s0f0: ACTIVE Ethernet") for i in rep.info), rep.info
    assert any(w.startswith("net: MTU of enp1s0f0np0 (rocep1s0f0) is 1500") for w in rep.warnings), rep.warnings
    assert any("export NCCL_IB_HCA=rocep1s0f0,roceP2p1s0f0" in w for w in rep.warnings), rep.warnings
    assert rep.problems == []  # advice, not a refusal
