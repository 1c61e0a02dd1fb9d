"""launch/run_node.sh end to end: two "nodes" on one host (two launcher invocations, NODE_RANK 0 and 1,
localhost c10d rendezvous on a free port, gloo on CPU) on the tiny models.

- a clean run: preflight passes on both nodes, then the recipe trains a few steps (two processes);
- preflight refuses to start when a teacher shard is removed, when the two nodes get different configs,
  and when the teacher and student vocab sizes differ; the message names the node and the problem.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "run_node.sh"
CFG = "configs/tiny/kd_lora.yaml"
HOST = socket.gethostname()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(testbed, tmp_path, args0, args1=None, *, env_extra=None, env_per_node=None, timeout=300):
    """Run the launcher twice (NODE_RANK 0 and 1) in the background; return [(rc, output), ...]."""
    port = _free_port()
    args1 = args0 if args1 is None else args1
    procs = []
    for rank, args in ((0, args0), (1, args1)):
        env = dict(os.environ, NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   KD_LOG_DIR=str(tmp_path / "logs"), KD_TESTBED_DIR=str(testbed.root),
                   OMP_NUM_THREADS="1", KD_RDZV_TIMEOUT="120", KD_RUN_ID=f"kdtest-{port}",
                   **(env_extra or {}), **((env_per_node or {}).get(rank, {})))
        env.pop("RANK", None)
        env.pop("WORLD_SIZE", None)
        procs.append(subprocess.Popen(
            ["bash", str(LAUNCH), "--config", CFG, *args], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    out = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            o, _ = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, o))
    return out


def _common(tmp_path):
    return [f"output_dir={tmp_path / 'out'}", "max_steps_per_epoch=2", "epochs=1", "batch_size=2",
            "eval_every_n_steps=null", "save_every_n_steps=null", "progress_bar=False", "log_every_n_steps=1"]


def test_two_node_launch_trains(testbed, tmp_path):
    res = launch_pair(testbed, tmp_path, _common(tmp_path))
    (rc0, o0), (rc1, o1) = res
    for rc, o in res:
        assert "preflight OK" in o, o[-4000:]
        assert "NCCL_DEBUG" in o or "network environment" in o
        assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in o
    assert "world size 2" in o0 and "all-reduce" in o0, o0[-4000:]
    assert rc0 == 0 and rc1 == 0, f"node0 rc={rc0}\n{o0[-6000:]}\nnode1 rc={rc1}\n{o1[-6000:]}"
    logs = sorted((tmp_path / "logs").glob("node*.log"))
    assert {p.name.split("-")[0] for p in logs} == {"node0", "node1"}
    metrics = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2]


def test_preflight_refuses_missing_shard(testbed, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(testbed.teacher_dir, teacher)
    index = json.loads((teacher / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (teacher / shard).unlink()
    args = _common(tmp_path) + [f"teacher_checkpointer.checkpoint_dir={teacher}"]
    res = launch_pair(testbed, tmp_path, args)
    for rc, o in res:
        assert rc != 0
        assert "not starting training" in o
        assert "Traceback" not in o, o[-3000:]
    o0 = res[0][1]
    for r in (0, 1):
        assert f"FAIL [{HOST} rank {r}] teacher checkpoint: 1 shard(s)" in o0, o0[-4000:]
    assert shard in o0 and "rsync" in o0


def _fake_version_dir(tmp_path) -> Path:
    """PYTHONPATH entry whose sitecustomize makes this "node" report another torchtune version."""
    d = tmp_path / "fake_version"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text("import torchtune\ntorchtune.__version__ = '0.6.2-fake'\n")
    return d


def _torchtune_version() -> str:
    import torchtune

    return torchtune.__version__


def _fail_lines(o: str):
    return [l for l in o.splitlines() if "FAIL" in l and "kd preflight" in l and "FAILED" not in l]


def test_preflight_refuses_different_configs_and_versions_on_both_nodes(testbed, tmp_path):
    """Node 1 gets another override and another (faked) torchtune: each launcher prints ONE 'kd preflight: FAIL'
    line naming the key and the package, exits non-zero, in bounded time, without a traceback."""
    t0 = time.time()
    fake = str(_fake_version_dir(tmp_path))
    res = launch_pair(testbed, tmp_path, _common(tmp_path) + ["kd_ratio=0.5"], _common(tmp_path) + ["kd_ratio=0.7"],
                      env_per_node={1: {"PYTHONPATH": fake}}, timeout=240)
    assert time.time() - t0 < 240
    for rc, o in res:
        assert rc != 0 and "not starting training" in o, o[-3000:]
        fails = _fail_lines(o)
        assert len(fails) == 1, fails
        assert "resolved config differs: kd_ratio: 0.5 vs 0.7" in fails[0], fails
        assert f"torchtune {_torchtune_version()} vs 0.6.2-fake" in fails[0], fails
        assert "Traceback" not in o, o[-3000:]


def test_bad_override_on_one_node_fails_both_nodes_at_once(testbed, tmp_path):
    """Node 1 alone gets an invalid value: its preflight stops on it before any check, yet joins the report
    exchange, so node 0 prints the same FAIL line and stops too, instead of waiting for node 1 until a timeout."""
    t0 = time.time()
    res = launch_pair(testbed, tmp_path, _common(tmp_path), _common(tmp_path) + ["kd_ratio=7"], timeout=240)
    assert time.time() - t0 < 240
    for rc, o in res:
        assert rc != 0 and "not starting training" in o, o[-3000:]
        fails = _fail_lines(o)
        assert len(fails) == 1 and fails[0].startswith(f"kd preflight: FAIL [{HOST} rank 1]"), fails
        assert "kd_ratio" in fails[0] and "Traceback" not in o, o[-3000:]
    assert "rank 1 (NODE_RANK 1) on" in res[0][1] and "stopped before its checks" in res[0][1]


@pytest.mark.slow  # two tune runs (~20 s); the preflight's mismatch test above covers what the launcher does by default
def test_recipe_refuses_different_configs_without_preflight(testbed, tmp_path):
    """KD_PREFLIGHT=0: the recipe itself compares config + versions right after init; every rank prints one
    'kd: error' line naming the first differing key and the launchers exit non-zero (no hang, no traceback)."""
    fake = str(_fake_version_dir(tmp_path))
    t0 = time.time()
    res = launch_pair(testbed, tmp_path, _common(tmp_path) + ["kd_ratio=0.5"], _common(tmp_path) + ["kd_ratio=0.7"],
                      env_extra={"KD_PREFLIGHT": "0"}, env_per_node={1: {"PYTHONPATH": fake}}, timeout=240)
    assert time.time() - t0 < 240
    for rank, (rc, o) in enumerate(res):
        assert rc != 0, o[-3000:]
        errs = [l for l in o.splitlines() if l.startswith("kd: error")]
        assert len(errs) == 1, o[-3000:]
        assert f"kd: error (rank {rank}): the nodes do not run the same config: kd_ratio is 0.7 on rank 1" in errs[0]
        assert "but 0.5 on rank 0" in errs[0] and "version torchtune" in errs[0], errs
        assert "Traceback" not in o and "ChildFailedError" not in o, o[-3000:]


def test_unreachable_rendezvous_fails_within_the_timeout(tmp_path):
    """Node 1 with a MASTER_ADDR:port nobody listens on: one line naming the address and port, within
    KD_RDZV_TIMEOUT + slack (torchrun's static rendezvous alone waits 600 s, then prints a traceback)."""
    port = _free_port()
    env = dict(os.environ, NODE_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), KD_RDZV_TIMEOUT="6",
               KD_LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    t0 = time.time()
    r = subprocess.run(["bash", str(LAUNCH), "--config", CFG], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    took = time.time() - t0
    assert r.returncode != 0
    assert 5 <= took < 6 + 30, took
    line = (f"[kd launch] node 1: cannot reach the rendezvous at 127.0.0.1:{port} within 6 s (last error: "
            "Connection refused; is node 0 started? is the port open? check MASTER_ADDR)")
    out = r.stdout + r.stderr  # the launcher tees everything to stdout and the log
    assert line in out, out[-2000:]
    assert "Traceback" not in out


def test_node0_checks_its_address_and_port(tmp_path):
    port = _free_port()
    env = dict(os.environ, NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               KD_LOG_DIR=str(tmp_path / "logs"), KD_PREFLIGHT_ONLY="1")
    with socket.socket() as s:  # somebody already listens on MASTER_PORT
        s.bind(("127.0.0.1", port))
        s.listen()
        r = subprocess.run(["bash", str(LAUNCH), "--config", CFG], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 2 and f"MASTER_PORT={port} is already in use on this host" in r.stdout + r.stderr, r.stdout
    r = subprocess.run([sys.executable, str(REPO / "launch" / "rdzv_check.py"), "host", "192.0.2.77", str(port)],
                       capture_output=True, text=True, timeout=60)  # TEST-NET address: not this host's
    assert r.returncode == 0 and "MASTER_ADDR=192.0.2.77 is not an address of this host" in r.stderr, r.stderr


def test_preflight_refuses_vocab_mismatch(testbed, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(testbed.student_dir, student)
    cfg = json.loads((student / "config.json").read_text())
    cfg["vocab_size"] = 1040
    (student / "config.json").write_text(json.dumps(cfg))
    args = _common(tmp_path) + [f"checkpointer.checkpoint_dir={student}", "model.vocab_size=1040"]
    res = launch_pair(testbed, tmp_path, args)
    for rc, o in res:
        assert rc != 0 and "not starting training" in o
    o0 = res[0][1]
    assert "vocab size mismatch: teacher 1024 vs student 1040" in o0, o0[-4000:]


def test_launcher_usage_errors(tmp_path):
    env = dict(os.environ, KD_LOG_DIR=str(tmp_path))
    env.pop("NODE_RANK", None)
    r = subprocess.run(["bash", str(LAUNCH), "--config", CFG], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "NODE_RANK" in r.stderr
    env.update(NODE_RANK="0", MASTER_ADDR="127.0.0.1")
    r = subprocess.run(["bash", str(LAUNCH), "--config", "nope.yaml"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr


def test_wheelhouse_requirements_are_the_pins():
    r = subprocess.run(["bash", "launch/wheelhouse.sh", "requirements"], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, TORCH_SPEC="torch==2.11.0"))
    assert r.returncode == 0, r.stderr
    reqs = r.stdout.split()
    assert "torch==2.11.0" in reqs and "torchtune==0.6.1" in reqs and "torchao==0.15.0" in reqs
    assert all("==" in x for x in reqs)


def test_quiet_torchrun_filter():
    """launch/quiet_torchrun.py: torchrun's report after a 'kd: error' line is left out, everything else passes,
    and an unfinished line (a progress bar redrawn with \\r) comes through before its newline."""
    filt = [sys.executable, str(REPO / "launch" / "quiet_torchrun.py")]
    text = ("step 1\nkd: error (rank 1): the nodes do not run the same config\nTraceback (most recent call last):\n"
            "  File \"run.py\"\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n" + "=" * 20 +
            "\nrecipes.kd_lora FAILED\n" + "-" * 20 + "\n" + "=" * 20 + "\n[kd launch] node 1: training exited\n")
    r = subprocess.run(filt, input=text, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stdout and "ChildFailedError" not in r.stdout and "FAILED" not in r.stdout
    assert r.stdout.startswith("step 1\nkd: error (rank 1)") and r.stdout.endswith("[kd launch] node 1: training exited\n")
    assert "left out; KD_DEBUG=1 shows it" in r.stdout
    plain = "Traceback (most recent call last):\n  a real crash\n"  # no one-line error before it: kept
    assert subprocess.run(filt, input=plain, capture_output=True, text=True, timeout=60).stdout == plain
    p = subprocess.Popen(filt, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        p.stdin.write(b"progress 10%\r")
        p.stdin.flush()
        ready, _, _ = select.select([p.stdout], [], [], 20)
        assert ready, "the filter held an unfinished line back"
        assert os.read(p.stdout.fileno(), 100) == b"progress 10%\r"
    finally:
        p.stdin.close()
        p.wait(timeout=30)
