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
from typing import Callable, Dict, TypeVar

log = logging.getLogger("kd.core.kernels")
T = TypeVar("T")
_BROKEN: Dict[str, str] = {}

__all__ = ["forced_eager", "broken", "with_fallback", "can_time", "fastest"]


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


def can_time(x) -> bool:
    """Whether a kernel choice may be timed now: ``x`` on CUDA, no CUDA graph being captured, ``KD_NF4_TUNE`` not 0."""
    import torch

    return (x is not None and x.is_cuda and not torch.cuda.is_current_stream_capturing()
            and os.environ.get("KD_NF4_TUNE", "1") != "0")


def fastest(options, run: Callable[[object], object], iters: int = 10, graph: bool = False):
    """The option whose ``run(option)`` takes the least GPU time (2 eager warm-up calls, then ``iters`` calls between
    CUDA events); options that fail to compile or launch (shared memory, registers) are skipped; None if all fail.
    ``graph=True`` times the ``iters`` calls captured in one CUDA graph (replayed 3 times), as a decode step runs
    them: for kernels launched from Python (NVRTC) eager timing would measure the launch, not the kernel."""
    import torch

    best, best_t = None, float("inf")
    for opt in options:
        try:
            for _ in range(2):
                run(opt)
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if graph:
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(iters):
                        run(opt)
                g.replay()
                st.record()
                for _ in range(3):
                    g.replay()
                en.record()
                en.synchronize()
                t = st.elapsed_time(en) / (3 * iters)
                del g
            else:
                st.record()
                for _ in range(iters):
                    run(opt)
                en.record()
                en.synchronize()
                t = st.elapsed_time(en) / iters
        except Exception:  # an option that does not compile or fit is skipped
            continue
        if t < best_t:
            best, best_t = opt, t
    return best
