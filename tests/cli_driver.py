"""Run many public-command invocations (``tune run ...``, ``kd plan ...``, ``kd preflight ...``) cheaply.

Each invocation is the real entry point (``torchtune._cli.tune.main`` / ``kd.ops.cli.main``) with its own
``sys.argv``, environment, working directory, stdout/stderr files and exit status, in a process forked from this
driver after torch / torchtune / kd are imported once (an import costs ~5 s per fresh interpreter on the CI
machine; a fork costs milliseconds). ``KD_CLI_SUBPROCESS=1`` runs every case as a fresh subprocess of the
installed ``tune`` / ``kd`` executables instead (the exact user path, ~5 s slower per case).

    python tests/cli_driver.py cases.json results.json

cases.json: [{"name", "argv": ["tune", "run", ...], "env": {...}, "cwd": str, "timeout": s,
              "fsize_limit": bytes | null}, ...]; results.json: {name: {"rc", "stdout", "stderr", "seconds"}}.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BIN = Path(sys.executable).parent


def _child(case, out_path, err_path) -> None:
    os.setsid()
    os.chdir(case.get("cwd") or os.getcwd())
    for k, v in (case.get("env") or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = str(v)
    lim = case.get("fsize_limit")
    if lim:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(lim), int(lim)))
    fo = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    fe = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fo, 1)
    os.dup2(fe, 2)
    argv = list(case["argv"])
    code = 1
    try:
        if argv[0] == "tune":
            from torchtune._cli.tune import main as tune_main

            sys.argv = ["tune", *argv[1:]]
            code = tune_main()
        elif argv[0] == "kd":
            from kd.ops.cli import main as kd_main

            code = kd_main(argv[1:])
        else:
            raise SystemExit(f"cli_driver: unknown command {argv[0]!r}")
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = 0 if e.code is None else int(e.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(int(code or 0))


def run_case_fork(case, tmp: Path) -> dict:
    out_path, err_path = tmp / f"{case['name']}.out", tmp / f"{case['name']}.err"
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
        _child(case, str(out_path), str(err_path))
    deadline = t0 + float(case.get("timeout", 300))
    rc = None
    while rc is None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.time() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            rc = "timeout"
            break
        time.sleep(0.02)
    return {"rc": rc, "stdout": out_path.read_text(errors="replace"), "stderr": err_path.read_text(errors="replace"),
            "seconds": round(time.time() - t0, 2)}


def run_case_subprocess(case) -> dict:
    env = dict(os.environ)
    for k, v in (case.get("env") or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    lim = case.get("fsize_limit")

    def pre():
        if lim:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(lim), int(lim)))

    t0 = time.time()
    argv = [str(BIN / case["argv"][0]), *case["argv"][1:]]
    try:
        p = subprocess.run(argv, cwd=case.get("cwd"), env=env, capture_output=True, text=True,
                           timeout=float(case.get("timeout", 300)), preexec_fn=pre)
        return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "seconds": round(time.time() - t0, 2)}
    except subprocess.TimeoutExpired as e:
        return {"rc": "timeout", "stdout": str(e.stdout), "stderr": str(e.stderr), "seconds": round(time.time() - t0, 2)}


def main() -> int:
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = {}
    if os.environ.get("KD_CLI_SUBPROCESS") == "1":
        for c in cases:
            results[c["name"]] = run_case_subprocess(c)
    else:
        import importlib

        import torch  # noqa: F401  (imported once, shared by every forked case)
        import torchtune._cli.tune  # noqa: F401

        for mod in ("kd.ops.cli", "kd.train.step_checkpoint", "kd.data.alpaca", "kd.losses.distillation", "kd.train.models", "kd.train.run_checks"):
            try:
                importlib.import_module(mod)
            except ImportError:  # an older kd (the driver also measures the code before a change)
                pass

        with tempfile.TemporaryDirectory() as d:
            for c in cases:
                results[c["name"]] = run_case_fork(c, Path(d))
    Path(sys.argv[2]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
