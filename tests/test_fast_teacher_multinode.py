"""The fast teacher (``teacher_quantization=nf4_fp8`` + ``compile: True``, the 1-node config's settings) in the
multi-process code path, in the three two-node layouts the shipped configs use, as two "nodes" of one process each
(torchrun static rendezvous, gloo on CPU; FP8 through kd's CPU emulation, which rounds as the GPU path does,
tests/test_precision.py):

- ``lora_hybrid``: configs/qwen2_5/72B_to_7B_kd_lora.yaml's layout (student HSDP: replicated across nodes,
  teacher replicated on every node);
- ``lora_shard``: the sharded-teacher layout of configs/qwen2_5/72B_to_7B_kd_lora_bf16_2node.yaml (student and
  teacher FSDP2-sharded over both nodes; nf4_fp8's NF4 storage shards like nf4);
- ``full``: configs/qwen2_5/72B_to_7B_kd_full_2node.yaml's layout (full fine-tune, student sharded, teacher
  replicated);
- ``bf16_shard_selective_ac``: the bf16 two-node config's own settings (bf16 teacher sharded, compile, selective
  activation checkpointing on every 2nd student layer).

Each: two nodes x batch N log the losses of one process x batch 2N (the tolerance of the one-process
equivalence tests, tests/test_recipe_kd.py) and save the same adapter; kill -9 of both nodes and a resume continue
bit-equal to an uninterrupted two-node run; the teacher cache (online_then_cache) runs in the layout.
Data are packed (fixed shapes: one compile per layer shape, as on the GPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from recipe_utils import REPO, TUNE, env_for, free_port, metrics, tune_run

FAST = ["teacher_quantization=nf4_fp8", "compile=True", "dataset.packed=True"]
BASE = ["epochs=1", "log_every_n_steps=1", "~eval_every_n_steps", "progress_bar=False", "~metric_logger", *FAST]
LAYOUTS = {
    "lora_hybrid": ("configs/tiny/kd_lora.yaml", ["fsdp_strategy=hybrid", "teacher_sharding=replicate"]),
    "lora_shard": ("configs/tiny/kd_lora.yaml", ["fsdp_strategy=shard", "teacher_sharding=shard"]),
    "full": ("configs/tiny/kd_full.yaml", ["fsdp_strategy=shard", "teacher_sharding=replicate"]),
    # the bf16 two-node config as shipped: bf16 teacher sharded, compile, selective AC on every 2nd student layer
    "bf16_shard_selective_ac": ("configs/tiny/kd_lora.yaml", [
        "fsdp_strategy=shard", "teacher_sharding=shard", "teacher_quantization=null",
        "enable_activation_checkpointing=False", "ac_mode=selective", "ac_option=2"]),
}
KEYS = ("loss", "ce_loss", "kd_loss", "kl", "top1_agreement", "grad_norm", "lr", "valid_tokens")
# torch.compile on 2 CPU cores costs ~40 s per process per run, so only the equivalence test of the shipped LoRA
# layout runs in the default suite (~1.5 min); the other layouts and the kill/resume and cache tests (4-6
# two-process runs each, ~2-3 min) are `slow`.
SLOW_LAYOUTS = [pytest.param(k, marks=pytest.mark.slow) if k != "lora_hybrid" else k for k in LAYOUTS]
ALL_SLOW = [pytest.param(k, marks=pytest.mark.slow) for k in LAYOUTS]


def _nodes(testbed, config, overrides, outs, port=None):
    """Start two 'nodes' (static rendezvous: NODE_RANK 0 is rank 0), each with its own output_dir."""
    port = port or free_port()
    procs = []
    for node in (0, 1):
        cmd = [TUNE, "run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
               "--rdzv_backend", "static", "--rdzv_endpoint", f"127.0.0.1:{port}", "recipes/kd_lora.py",
               "--config", config, *overrides, f"output_dir={outs[node]}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env_for(testbed), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs


def _wait(procs, timeout=600):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-6000:]
    return outs


def _adapter(out: Path):
    from safetensors.torch import load_file

    latest = (out / "checkpoints" / "latest").read_text().strip()
    return load_file(str(out / "checkpoints" / latest / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("layout", SLOW_LAYOUTS)
def test_two_nodes_batch_n_match_one_process_batch_2n(testbed, tmp_path, layout):
    config, lay = LAYOUTS[layout]
    common = [*BASE, *lay, "max_steps_per_epoch=3", "save_every_n_steps=null"]
    one = tmp_path / "one"
    p = tune_run(testbed, [*common, "batch_size=2", f"output_dir={one}"], config=config)
    prec = "bf16" if "teacher_quantization=null" in lay else "nf4_fp8"
    assert f"teacher precision: {prec}" in p.stdout + p.stderr
    outs = _wait(_nodes(testbed, config, [*common, "batch_size=1"], [tmp_path / "n0", tmp_path / "n1"]))
    assert f"teacher ready ({prec}" in outs[0] and "Compiling model layers" in outs[0], outs[0][-3000:]
    a, b = metrics(one), metrics(tmp_path / "n0")
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["valid_tokens"] == y["valid_tokens"]
        for k in ("loss", "ce_loss", "kl", "top1_agreement", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (layout, k, x[k], y[k])
    if layout != "full":  # the full fine-tune has no adapter: its weights are per-rank shards (kd.train.full)
        wa, wb = _adapter(one), _adapter(tmp_path / "n0")
        assert wa.keys() == wb.keys() and len(wa) > 0
        for k in wa:
            d = (wa[k].float() - wb[k].float()).abs().max().item()
            assert d <= 1e-4 * max(1.0, wa[k].float().abs().max().item()), (k, d)
    assert not (tmp_path / "n1" / "metrics.jsonl").exists()  # only rank 0 (node 0) logs


def _rows(out: Path):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in l]


@pytest.mark.parametrize("layout", ALL_SLOW)
def test_kill9_both_nodes_and_resume_is_bit_equal(testbed, tmp_path, layout):
    config, lay = LAYOUTS[layout]
    common = [*BASE, *lay, "max_steps_per_epoch=6", "save_every_n_steps=2", "batch_size=1",
              "keep_last_n_checkpoints=2"]
    ref = {n: tmp_path / f"ref{n}" for n in (0, 1)}
    _wait(_nodes(testbed, config, common, ref))
    ref_rows = _rows(ref[0])
    assert [r["step"] for r in ref_rows] == list(range(1, 7))

    run = {n: tmp_path / f"run{n}" for n in (0, 1)}
    procs = _nodes(testbed, config, common, run)
    ptr = run[0] / "checkpoints" / "latest"
    deadline = time.time() + 500
    while time.time() < deadline and procs[0].poll() is None:
        if ptr.is_file() and ptr.read_text().strip() == "step_0000002":
            break
        time.sleep(0.05)
    assert procs[0].poll() is None and procs[1].poll() is None, "the run ended before the kill"
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    assert 2 <= max(r["step"] for r in _rows(run[0])) < 6

    _wait(_nodes(testbed, config, [*common, "resume_from_checkpoint=True"], run))
    resumed = [r for r in _rows(run[0]) if r["step"] > 2][-4:]
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    for a, b in zip(resumed, ref_rows[2:]):
        for k in KEYS:
            assert a[k] == b[k], (layout, k, a["step"], a[k], b[k])  # bit-equal: JSON floats round-trip exactly


@pytest.mark.parametrize("layout", ALL_SLOW)
def test_teacher_cache_online_then_cache_in_the_layout(testbed, tmp_path, layout):
    """Epoch 1 online with the fast teacher writes each node's own cache; epoch 2 trains from it without the
    teacher. Every node ends with every record (no shared file system)."""
    config, lay = LAYOUTS[layout]
    outs = {n: tmp_path / f"n{n}" for n in (0, 1)}
    logs = _wait(_nodes(testbed, config, [*BASE, *lay, "epochs=2", "max_steps_per_epoch=3", "batch_size=1",
                                          "save_every_n_steps=null", "teacher_cache.mode=online_then_cache",
                                          "teacher_cache.k=4"], outs))
    rows = _rows(outs[0])
    assert [r["step"] for r in rows] == list(range(1, 7)), logs[0][-3000:]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e3 for r in rows)  # finite
    assert "teacher freed" in logs[0] or "without the teacher" in logs[0] or "teacher not loaded" in logs[0], \
        logs[0][-4000:]
    for n in (0, 1):
        shards = sorted(p.name for p in (outs[n] / "teacher_cache" / "shards").iterdir())
        assert shards, n
    from test_recipe_cache import _records

    assert _records(outs[0] / "teacher_cache") == _records(outs[1] / "teacher_cache")
