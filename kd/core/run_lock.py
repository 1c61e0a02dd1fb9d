"""One live run per ``output_dir``: a lock file held for the run's lifetime.

The used-directory rail of :func:`kd.train.run_checks.check_run_dir` only looks at the directory when a run
starts, so two runs started a second apart both pass it and then write the same ``checkpoints/step_*``. The
lock closes that gap: rank 0 (of a training run, or the export process) holds ``<output_dir>/.kd-run.lock``,
which names the holder (host, pid, start time, what), and removes it when the process ends. Another training run, a resume of a live run, or an export into the same
directory is refused with one :class:`~kd.core.config.ConfigError` line naming the holder.

The file carries an exclusive ``flock`` while it is held, which the kernel drops when the process ends however it
ends (``kill -9`` included), so a lock file left behind by a killed run is *stale* without guessing from pids: it is
taken over with a warning naming the run that left it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional

from kd.core.config import ConfigError

log = logging.getLogger("kd.lock")

LOCK_NAME = ".kd-run.lock"

__all__ = ["LOCK_NAME", "RunLock", "acquire", "describe"]


def _pid_alive(pid: Any) -> bool:
    try:
        if int(pid) <= 0:
            return False
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def describe(info: Dict[str, Any]) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"{info.get('what', 'a kd process')} (host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
            f"started {when})")


def _read(path: Path) -> Optional[Dict[str, Any]]:
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable / half-written: treated as a lock whose holder cannot be named
    return info if isinstance(info, dict) else {}


class RunLock:
    """A held lock; :meth:`release` (also run at interpreter exit) removes the file and drops the ``flock``."""

    def __init__(self, path: Path, fd: int, info: Dict[str, Any]) -> None:
        self.path, self.info, self._fd = path, info, fd
        atexit.register(self.release)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _same_holder(a: Dict[str, Any], b: Optional[Dict[str, Any]]) -> bool:
    return bool(b) and all(a.get(k) == b.get(k) for k in ("host", "pid", "started"))


def acquire(directory: Any, what: str, key: str = "output_dir",
            shared_with: Optional[Dict[str, Any]] = None) -> RunLock:
    """Take ``<directory>/.kd-run.lock`` for this process (the directory is created if needed).

    The file carries an exclusive ``flock`` for as long as the process holds it, so the kernel drops it when the
    process dies however it dies; what the file says (host, pid, start time) names the holder. Raises
    :class:`ConfigError` (one line naming the holder) when a live process holds it; a lock file whose holder is
    gone (a killed run) is taken over with a warning. ``shared_with``: the ``info`` of a lock this run already holds
    (rank 0's, seen by another node): finding that one here means a shared file system, and nothing more is taken."""
    d = Path(str(directory))
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "what": what}
    for _attempt in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            info = _read(path)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock on this file system
                if info and info.get("host") == me["host"] and _pid_alive(info.get("pid")):
                    raise ConfigError(f"{key}={str(d)!r} is in use by {describe(info)}: wait for it to finish or "
                                      "stop it, or use another output_dir.") from None
                log.warning(f"{key}={str(d)!r}: the file system does not support flock ({e.strerror}); "
                            "this run is not protected against a second run in the same directory")
                return RunLock(path, None, me)
            if info is None:
                continue  # released between our open and read: try again
            if info and _same_holder(info, shared_with):
                return RunLock(path, None, dict(info))  # this run's own lock (rank 0's, on a shared file system)
            if not info:
                raise ConfigError(f"{key}={str(d)!r} is in use by another kd process (its lock {path} names no "
                                  "holder yet); wait for it to finish or stop it, or use another output_dir.")
            raise ConfigError(f"{key}={str(d)!r} is in use by {describe(info)}: wait for it to finish or stop it, "
                              "or use another output_dir.")
        if not _same_file(fd, path):  # the holder released (unlinked) it between our open and flock
            os.close(fd)
            continue
        old = os.read(fd, 65536)
        if old.strip():
            try:
                prev = json.loads(old)
            except ValueError:
                prev = {}
            log.warning(f"{key}={str(d)!r}: taking over the stale lock of "
                        f"{describe(prev) if isinstance(prev, dict) and prev else 'an earlier kd process'}, which "
                        f"is no longer running ({path})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return RunLock(path, fd, me)
    raise ConfigError(f"{key}={str(d)!r}: could not take the lock {path} (it keeps changing); retry.")
