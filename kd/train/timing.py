"""Per-phase step timing without host syncs in the hot path.

The recipe marks phase boundaries (data, teacher forward, student forward + loss, backward, optimizer) as the
step runs. On CUDA each mark records an event on the current stream, so the times are those of the GPU
timeline: host work that overlaps GPU work (loading the next batch) costs nothing, and host work that stalls the
GPU shows up in the phase it delays. The events are read only in :meth:`PhaseTimer.collect`, which the recipe
calls at a logging step, right after the metrics all-reduce has synchronised anyway. On CPU the marks are plain
``time.perf_counter`` readings (CPU work is synchronous).

Usage (one optimizer step)::

    timer.start()                       # anchor: nothing before it is attributed
    ... load batch ...; timer.mark("data")
    ... teacher ...;    timer.mark("teacher_fwd")
    ...
    secs = timer.collect()              # {"data": s, "teacher_fwd": s, ...} summed since the last collect
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

PHASES = ("data", "teacher_fwd", "student_fwd", "backward", "optimizer")


class PhaseTimer:
    """Accumulates the time between consecutive marks, per phase name, since the last :meth:`collect`."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self._cuda = device.type == "cuda"
        self._enabled = enabled
        # segments: each is a list of (phase or None for the anchor, event or float time)
        self._segments: List[List[Tuple[Optional[str], object]]] = []

    def _now(self):
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        """Open a new segment (an optimizer step); time before it is not attributed to any phase."""
        if self._enabled:
            self._segments.append([(None, self._now())])

    def mark(self, phase: str) -> None:
        """Attribute the time since the previous mark (or :meth:`start`) to ``phase``."""
        if self._enabled and self._segments:
            self._segments[-1].append((phase, self._now()))

    def collect(self) -> Dict[str, float]:
        """Seconds per phase summed over the segments since the last call (synchronises on CUDA)."""
        out: Dict[str, float] = defaultdict(float)
        if not self._segments:
            return {}
        if self._cuda:
            self._segments[-1][-1][1].synchronize()
        for seg in self._segments:
            for (_, a), (phase, b) in zip(seg, seg[1:]):
                out[phase] += (a.elapsed_time(b) / 1e3) if self._cuda else (b - a)
        self._segments = []
        return dict(out)
