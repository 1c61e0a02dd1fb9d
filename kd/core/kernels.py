"""Custom GPU kernels must never crash a run: one switch, one fallback rule, one report.

kd has two compiled paths on CUDA: the Triton NF4 dequantisation kernel of the teacher (:mod:`kd.teacher.nf4`) and the
``torch.compile``d per-chunk math of the fused KD+CE loss (:mod:`kd.losses.distillation`, Inductor emits Triton). If either fails
to compile on a node's GPU (e.g. a Triton too old for GB10's sm_121), kd logs ONE warning and uses the eager
PyTorch path (same math, slower). ``KD_TRITON=0`` forces the eager paths everywhere. ``kd preflight`` runs
:func:`kd.ops.kernel_check.kernel_report` on every node: each kernel is compiled and checked against its eager reference.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Tuple, TypeVar

log = logging.getLogger("kd.core.kernels")
T = TypeVar("T")
_BROKEN: Dict[str, str] = {}

__all__ = ["forced_eager", "broken", "with_fallback"]


def forced_eager() -> bool:
    """``KD_TRITON=0``: never use a custom/compiled kernel."""
    return os.environ.get("KD_TRITON", "1").strip().lower() in ("0", "false", "off", "no")


def broken(name: str) -> bool:
    return forced_eager() or name in _BROKEN


def with_fallback(name: str, fast: Callable[[], T], eager: Callable[[], T]) -> T:
    """``fast()`` unless kernel ``name`` is switched off or failed before; on its first failure warn once,
    remember it and return ``eager()``."""
    if broken(name):
        return eager()
    try:
        return fast()
    except Exception as e:  # compile errors of Triton/Inductor surface at the first launch
        _BROKEN[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning(f"kd: the {name} kernel failed on this GPU ({_BROKEN[name]}); using the eager PyTorch path "
                    "from now on (same results, slower). Set KD_TRITON=0 to skip the kernels.")
        return eager()
