"""Issue 31 item 1: one live run per output_dir (kd.core.run_lock), through the lock itself and the public
commands: a second run, a resume of a live run and an export into a live run's directory are refused with one
line naming the holder; a lock left by a killed process is taken over with a warning."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_utils import REPO, tune_run

from kd.core import run_lock
from kd.core.config import ConfigError

HOLD = ("import sys, time; from kd.core import run_lock; run_lock.acquire(sys.argv[1], 'a kd_lora run'); "
        "print('held', flush=True); time.sleep(600)")


def _holder(d: Path) -> subprocess.Popen:
    """A live process holding the lock of ``d`` (what a running kd_lora run does)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_refused_naming_host_pid_and_start(tmp_path):
    with run_lock.acquire(tmp_path, "a kd_lora run"):
        lock = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
        with pytest.raises(ConfigError) as e:
            run_lock.acquire(tmp_path, "an export")
        msg = str(e.value)
        assert "\n" not in msg
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "started 20" in msg
        assert "a kd_lora run" in msg
    assert not (tmp_path / run_lock.LOCK_NAME).exists()  # released: the next one takes it
    run_lock.acquire(tmp_path, "again").release()


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    p = _holder(tmp_path)
    with pytest.raises(ConfigError, match=f"pid {p.pid}"):
        run_lock.acquire(tmp_path, "x")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / run_lock.LOCK_NAME).exists()  # kill -9: nothing removed it
    with caplog.at_level(logging.WARNING, logger="kd.lock"):
        lk = run_lock.acquire(tmp_path, "the next run")
    assert any("stale lock" in r.getMessage() and f"pid {p.pid}" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    lk.release()


def _last_line(p: subprocess.CompletedProcess) -> str:
    return [l for l in p.stderr.splitlines() if l.strip()][-1]


def test_run_resume_and_export_into_a_live_runs_dir_are_refused(testbed, tmp_path):
    out = tmp_path / "run"
    short = ["epochs=1", "max_steps_per_epoch=1", "~eval_every_n_steps", "progress_bar=False"]
    holder = _holder(out)
    try:
        for extra in ([], ["resume_from_checkpoint=True"]):
            p = tune_run(testbed, [f"output_dir={out}", *short, *extra], check=False, timeout=300)
            assert p.returncode == 2, p.stderr[-3000:]
            line = _last_line(p)
            assert line.startswith("kd: error") and f"pid {holder.pid}" in line and "in use by" in line, line
            assert "Traceback" not in p.stderr
        assert not (out / "checkpoints").exists()  # the refused runs wrote nothing
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        p = tune_run(testbed, [f"adapter_dir={adapter}", f"output_dir={out}"], recipe="recipes/export.py",
                     config="configs/tiny/export.yaml", check=False, timeout=300)
        assert p.returncode == 2, p.stderr[-3000:]
        assert f"pid {holder.pid}" in _last_line(p), _last_line(p)
        assert not (out / "merged").exists()
    finally:
        holder.kill()
        holder.wait()


def _two_nodes(testbed, dirs, *extra):
    from recipe_utils import TUNE, env_for, free_port

    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [TUNE, "run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--rdzv_backend",
               "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "recipes/kd_lora.py", "--config",
               "configs/tiny/kd_lora.yaml", f"output_dir={dirs[node]}", "epochs=1", "max_steps_per_epoch=1",
               "~eval_every_n_steps", "progress_bar=False", *extra]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env_for(testbed), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return [(p, p.communicate(timeout=600)[0]) for p in procs]


@pytest.mark.slow  # two two-process launches (~25 s); the one-node lock tests run in the default suite
def test_two_nodes_each_nodes_own_dir_is_locked_and_a_shared_dir_runs(testbed, tmp_path):
    """Without a shared file system node 1 writes to its own disk: a live run there refuses the whole job (every
    rank, one line naming the holder); on a shared directory node 1 finds rank 0's own lock and runs."""
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    holder = _holder(dirs[1])
    try:
        for p, out in _two_nodes(testbed, dirs):
            err = [l for l in out.splitlines() if l.startswith("kd: error")]
            assert p.returncode != 0 and err and f"pid {holder.pid}" in err[0] and "in use by" in err[0], out[-3000:]
    finally:
        holder.kill()
        holder.wait()
    shared = tmp_path / "shared"
    for p, out in _two_nodes(testbed, [shared, shared]):
        assert p.returncode == 0, out[-3000:]
    assert (shared / "checkpoints" / "latest").is_file() and not (shared / run_lock.LOCK_NAME).exists()
