"""Progress bars and logging that do not fight each other.

Every long wait in ``kd`` (loading a checkpoint layer by layer, evaluation, validation, export/merge, the
training epoch) shows one tqdm bar on rank 0 only. Log records go through :class:`TqdmLoggingHandler`,
which prints with ``tqdm.write``: the active bar is cleared, the line is printed, the bar is redrawn below
it, so a log line never tears a bar in half (tqdm's documented way, see ``tqdm.contrib.logging``).

    from kd.core.progress import configure_logging, progress
    configure_logging()                       # once, in recipe_main
    for layer in progress(layers, desc="student: load", unit="layer"):
        ...
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterable, Optional, Union

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def rank() -> int:
    """Global rank from the launcher environment (0 without one)."""
    return int(os.environ.get("RANK", 0))


def bars_enabled(enabled: bool = True) -> bool:
    """Bars on rank 0 only, and not when ``KD_PROGRESS=0`` (CI logs)."""
    return bool(enabled) and rank() == 0 and os.environ.get("KD_PROGRESS", "1") != "0"


class TqdmLoggingHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write`` so log lines appear above any active bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def configure_logging(level: Union[int, str, None] = None, stream=None) -> None:
    """Root logging for a recipe, the one place every recipe sets it up: ``level`` (a ``logging`` level or its
    name, default INFO) on rank 0, WARNING elsewhere, through :class:`TqdmLoggingHandler`.

    Replaces handlers installed by an earlier ``logging.basicConfig`` (torchtune's ``tune run`` may have
    installed one) so there is exactly one writer."""
    if rank() != 0:
        level = logging.WARNING
    elif level is None:
        level = logging.INFO
    elif isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            root.removeHandler(h)
    h = TqdmLoggingHandler(stream or sys.stdout)
    h.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(h)
    root.setLevel(level)


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             unit: str = "it", enabled: bool = True, leave: bool = False, **kw: Any):
    """A tqdm bar (stderr) on rank 0; a silent pass-through elsewhere or when ``enabled`` is False."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not bars_enabled(enabled),
                dynamic_ncols=True, leave=leave, **kw)
