"""Two simulated DGX Spark nodes on one host, each with its OWN output_dir (no shared file system), through the
real launcher (launch/run_node.sh: static rendezvous on NODE_RANK, gloo on CPU, tiny models):

- rank 0 is node 0 even when node 1 starts first (it alone writes checkpoints and metrics, to node 0's disk);
- kill -9 of both nodes mid-run, then the same command with resume_from_checkpoint=True on both: node 1's
  output_dir holds no checkpoint (rank 0 reads node 0's and broadcasts it) and the resumed losses are
  bit-equal to an uninterrupted two-node run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from recipe_utils import REPO, free_port

LAUNCH = REPO / "launch" / "run_node.sh"
COMMON = ["epochs=1", "max_steps_per_epoch=8", "save_every_n_steps=3", "batch_size=2", "teacher_sharding=replicate",
          "~eval_every_n_steps", "progress_bar=False", "log_every_n_steps=1", "keep_last_n_checkpoints=2"]
KEYS = ("loss", "ce_loss", "kd_loss", "kl", "top1_agreement", "grad_norm", "lr", "valid_tokens")


def _start(testbed, tmp_path, node_rank, out, port, extra=()):
    env = dict(os.environ, NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NNODES="2",
               NPROC_PER_NODE="1", KD_LOG_DIR=str(tmp_path / "logs"), KD_TESTBED_DIR=str(testbed.root),
               OMP_NUM_THREADS="1", KD_RDZV_TIMEOUT="120", KD_PREFLIGHT="0", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "KD_RDZV_BACKEND"):
        env.pop(k, None)
    # a bare config path (no --config), as the README writes it; own session so kill -9 reaches every process
    cmd = ["bash", str(LAUNCH), "configs/tiny/kd_lora.yaml", *COMMON, f"output_dir={out}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _pair(testbed, tmp_path, outs, extra=(), node1_first=False):
    port = free_port()
    order = (1, 0) if node1_first else (0, 1)
    procs = {}
    for r in order:
        procs[r] = _start(testbed, tmp_path, r, outs[r], port, extra)
        time.sleep(1.5 if node1_first else 0)
    return procs[0], procs[1]


def _wait(procs, timeout=400):
    outs = []
    for p in procs:
        o, _ = p.communicate(timeout=timeout)
        outs.append(o)
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-6000:]
    return outs


def _train_rows(out: Path):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in l]


def test_two_nodes_no_shared_fs_rank0_is_node0_and_kill9_resume_is_bit_equal(testbed, tmp_path):
    # reference: uninterrupted, node 1 joins first (with c10d it would become rank 0)
    ref = {r: tmp_path / f"ref_node{r}" for r in (0, 1)}
    o0, o1 = _wait(_pair(testbed, tmp_path, ref, node1_first=True))
    assert (ref[0] / "checkpoints" / "latest").is_file(), o0[-3000:]
    assert not (ref[1] / "checkpoints").exists() and not (ref[1] / "metrics.jsonl").exists()
    ref_rows = _train_rows(ref[0])
    assert [r["step"] for r in ref_rows] == list(range(1, 9))

    # killed: kill -9 every process of both "nodes" once step 3 is checkpointed
    run = {r: tmp_path / f"node{r}" for r in (0, 1)}
    p0, p1 = _pair(testbed, tmp_path, run)
    ptr = run[0] / "checkpoints" / "latest"
    deadline = time.time() + 400
    while time.time() < deadline and p0.poll() is None:
        if ptr.is_file() and ptr.read_text().strip() == "step_0000003":
            break
        time.sleep(0.05)
    assert p0.poll() is None and p1.poll() is None, "the run ended before the kill"
    for p in (p0, p1):
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    done = [r["step"] for r in _train_rows(run[0])]
    assert 3 <= max(done) < 8, done
    assert not (run[1] / "checkpoints").exists()  # node 1 never had a checkpoint on its disk

    # resume on both nodes: node 1 gets the state from rank 0 over the process group
    _wait(_pair(testbed, tmp_path, run, extra=("resume_from_checkpoint=True",)))
    rows = _train_rows(run[0])
    resumed = [r for r in rows if r["step"] > 3][-5:]
    assert [r["step"] for r in resumed] == [4, 5, 6, 7, 8]
    for a, b in zip(resumed, ref_rows[3:]):
        for k in KEYS:
            assert a[k] == b[k], (k, a["step"], a[k], b[k])  # bit-equal (JSON floats round-trip exactly)
    assert not (run[1] / "checkpoints").exists()
