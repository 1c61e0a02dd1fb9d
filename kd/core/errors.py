"""The checkpoint error family: one base class, :class:`CheckpointError`, for everything that reads or writes
weights on disk (HF checkpoints read by :mod:`kd.train.models`, step checkpoints of :mod:`kd.train.step_checkpoint`, the
exports of :mod:`kd.train.hf_export`).

``CheckpointError`` is a ``ValueError``: a bad checkpoint directory is a user mistake, which the recipes and
``kd.train.cli_util.run_recipe`` report as one ``kd: error ...`` line. Imports nothing from ``kd``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "NoCheckpointFoundError",
    "IncompatibleCheckpointError",
    "CorruptCheckpointError",
    "NonFiniteCheckpointError",
]


class CheckpointError(ValueError):
    """Base class for checkpoint errors (missing/unreadable files, wrong shapes, full disk, ...)."""


class NoCheckpointFoundError(CheckpointError, FileNotFoundError):
    """Resume requested but no complete checkpoint exists."""


class IncompatibleCheckpointError(CheckpointError):
    """Checkpoint was written with an incompatible config (e.g. other LoRA rank / targets)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file exists but cannot be read safely (truncated, not tensors + JSON, ...)."""


class NonFiniteCheckpointError(CheckpointError):
    """Refused to save adapter weights holding NaN/Inf."""
