"""The layout of a run's ``output_dir``: every file and folder name a run writes, written once.

The recipe writes these, ``kd summary``, the teacher cache, ``kd plan`` and the evaluation read them; each takes
its paths from :class:`RunLayout` (or the names below), so renaming one is a one-line change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"  # step_XXXXXXX/ folders (kd.train.step_checkpoint.CheckpointManager)
METRICS = "metrics.jsonl"  # one JSON line per logged step / validation / checkpoint
CONFIG = "torchtune_config.yaml"  # the run's resolved config (written once setup succeeded)
TEACHER_CACHE = "teacher_cache"  # default teacher_cache.dir
MERGED = "merged"  # merged HF checkpoint (save_merged_model, export)


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def teacher_cache(self) -> Path:
        return self.root / TEACHER_CACHE

    @property
    def merged(self) -> Path:
        return self.root / MERGED
