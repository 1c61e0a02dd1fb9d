"""Atomic file-system writes for checkpoints and exports: a whole directory (:func:`atomic_write_dir`), one file
(:func:`atomic_path`, :func:`atomic_write_text`, :func:`atomic_write_bytes`), a crash-safe delete
(:func:`delete_dir`), and the clean-up/repair of what a killed writer leaves (:func:`cleanup_stale_temps`,
:func:`recover_atomic_dir`). Imports nothing from ``kd``.

Every directory is written into a hidden sibling temp dir (``.NAME.tmp-HOST-PID-RAND``), every file in it is
fsynced, and only then is it renamed into place (an atomic ``renameat2(RENAME_EXCHANGE)`` swap if the destination
exists, with a recoverable two-rename fallback). Files are written to a temp file, fsynced and ``os.replace``-d.
Readers never look at hidden temp names, so a crash (exception or ``kill -9``) at any moment leaves either the old
complete version or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterator, List, Optional, Union

__all__ = [
    "atomic_write_dir",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "delete_dir",
    "recover_atomic_dir",
    "cleanup_stale_temps",
    "no_space_reason",
    "append_durably",
    "truncate_durably",
]

PathLike = Union[str, os.PathLike]

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG)


def _no_space_errno(e: BaseException) -> Optional[int]:
    """ENOSPC / EDQUOT / EFBIG of an OSError, or of safetensors' SafetensorError ("... (os error 28)")."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return e.errno
    m = re.search(r"os error (\d+)", str(e))
    if m and int(m.group(1)) in _NO_SPACE:
        return int(m.group(1))
    return None


def no_space_reason(e: BaseException) -> Optional[str]:
    """``os.strerror`` of a full-disk / quota error (OSError, or safetensors' "os error 28"), None for others."""
    n = _no_space_errno(e)
    return None if n is None else os.strerror(n)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
try:  # Linux >= 3.15, glibc >= 2.28
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
except Exception:  # pragma: no cover
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths. False if unsupported here (fallback needed)."""
    if _renameat2 is None:
        return False
    r = _renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if r == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(e, os.strerror(e), str(a))


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. platforms without dir fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _tmp_name(final: Path, kind: str) -> Path:
    # .NAME.KIND-HOST-PID-RAND: hidden (readers ignore it) and attributable to a writer process
    return final.parent / f".{final.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer_alive(p: Path) -> bool:
    """True unless ``p`` is a temp name of a dead process on this host."""
    try:
        host, pid = p.name.rsplit("-", 3)[-3:-1]
        pid = int(pid)
    except ValueError:
        return True
    if host != _HOST:
        return True  # another host: cannot tell, leave it
    return pid == os.getpid() or _pid_alive(pid)


def recover_atomic_dir(final_dir: PathLike) -> bool:
    """Repair the (only) non-atomic window of the rename fallback used where
    ``RENAME_EXCHANGE`` is unavailable: if ``final_dir`` is missing but an old version was
    moved aside (``.NAME.old-*``), move it back. Returns True if something was restored."""
    final = Path(final_dir)
    if final.exists():
        return False
    asides = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for a in asides:
        host = a.name.rsplit("-", 3)[-3] if a.name.count("-") >= 3 else ""
        if host == _HOST and _writer_alive(a):
            continue  # a live local writer is between its two renames: not a crash
        try:
            os.rename(a, final)
            _fsync_dir(final.parent)
            return True
        except OSError:
            if final.exists():  # someone else restored it concurrently
                return False
    return False


def _cleanup_stale(final: Path) -> None:
    """Remove leftover temp/aside dirs of ``final`` from crashed writers (only if final exists)."""
    if not final.exists():
        return
    for pat in (f".{final.name}.tmp-*", f".{final.name}.old-*", f".{final.name}.del-*"):
        for p in final.parent.glob(pat):
            if not _writer_alive(p):
                _rm(p)


def cleanup_stale_temps(parent: PathLike) -> List[Path]:
    """Delete hidden temp dirs/files (``.X.tmp-*``, ``.X.del-*``) left in ``parent`` by crashed
    writers on this host. ``.X.old-*`` asides are only removed once X exists again."""
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = re.match(r"^\.(.+)\.(tmp|del|old)-[0-9a-f]+-\d+-[0-9a-f]+$", p.name)
        if not m or _writer_alive(p):
            continue
        if m.group(2) == "old" and not (parent / m.group(1)).exists():
            continue  # needed by recover_atomic_dir
        _rm(p)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rm(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def delete_dir(p: PathLike) -> None:
    """Delete ``p``, renaming it to a hidden name first so a crash mid-delete never leaves a half dir that readers
    would take for a complete one. Missing ``p``: nothing to do."""
    p = Path(p)
    doomed = _tmp_name(p, "del")
    try:
        os.rename(p, doomed)
    except FileNotFoundError:
        return
    _rm(doomed)


@contextlib.contextmanager
def atomic_write_dir(final_dir: PathLike) -> Iterator[Path]:
    """Context manager yielding a fresh temp dir (hidden sibling of ``final_dir``). On clean exit
    all files are fsynced and the dir is moved to ``final_dir``, atomically replacing an existing
    one (``renameat2(RENAME_EXCHANGE)``; fallback: rename old aside, move new in, delete old, with
    :func:`recover_atomic_dir` fixing a crash in between). On exception the temp dir is removed
    and ``final_dir`` is untouched. After ``kill -9`` only a hidden ``.NAME.tmp-*`` dir can remain,
    which readers ignore and later writers clean up."""
    final = Path(final_dir).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_atomic_dir(final)
    tmp = _tmp_name(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists() or final.is_symlink():
            if _exchange(tmp, final):
                _fsync_dir(final.parent)
                _rm(tmp)  # now holds the old version
            else:
                aside = _tmp_name(final, "old")
                os.rename(final, aside)
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(aside, final)  # put the old version back
                    raise
                _fsync_dir(final.parent)
                _rm(aside)
        else:
            os.rename(tmp, final)
            _fsync_dir(final.parent)
    except BaseException:
        _rm(tmp)
        raise
    _cleanup_stale(final)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a hidden temp path beside ``path`` for a writer that takes a file name (``safetensors.save_file``,
    ``open``); on clean exit the file is fsynced and ``os.replace``-d onto ``path``; on exception it is removed."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, "tmp")
    try:
        yield tmp
        fd = os.open(str(tmp), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write a text file atomically (temp file + fsync + ``os.replace``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write a binary file atomically (temp file + fsync + ``os.replace``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# append-only record logs (a crash loses at most the record being written; its torn tail is cut on reopen)
def append_durably(f, blob: bytes) -> None:
    """Append ``blob`` to the binary file ``f`` with one write, then flush + fsync."""
    f.write(blob)
    f.flush()
    os.fsync(f.fileno())


def truncate_durably(path: PathLike, keep: int) -> None:
    """Cut ``path`` to its first ``keep`` bytes (a torn last record) and fsync."""
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
