"""Custom GPU kernels must never crash a run: one switch, one fallback rule, one report.

kd has two compiled paths on CUDA: the Triton NF4 dequantisation kernel of the teacher (:mod:`kd.nf4`) and the
``torch.compile``d per-chunk math of the fused KD+CE loss (:mod:`kd.losses`, Inductor emits Triton). If either fails
to compile on a node's GPU (e.g. a Triton too old for GB10's sm_121), kd logs ONE warning and uses the eager
PyTorch path (same math, slower). ``KD_TRITON=0`` forces the eager paths everywhere. ``kd preflight`` runs
:func:`kernel_report` on every node: each kernel is compiled and checked against its eager reference.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Tuple, TypeVar

log = logging.getLogger("kd.kernels")
T = TypeVar("T")
_BROKEN: Dict[str, str] = {}

__all__ = ["forced_eager", "broken", "with_fallback", "kernel_report"]


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


def kernel_report(device) -> List[Tuple[str, str]]:
    """[(kernel, verdict)] after compiling each kernel on ``device`` and comparing it with the eager math."""
    import torch

    if forced_eager():
        return [("all kernels", "eager (KD_TRITON=0)")]
    if getattr(device, "type", str(device)) != "cuda":
        return [("all kernels", "eager (no CUDA device: nothing to compile)")]
    out = []
    # NF4 dequantisation (Triton): must be bit-identical to torchao's get_original_weight
    try:
        from kd import nf4

        if not nf4.triton_available():
            out.append(("nf4 dequant (triton)", "eager (Triton not installed)"))
        else:
            w = nf4.to_nf4(torch.randn(256, 512, device=device, dtype=torch.bfloat16))
            ref = nf4.dequantize_nf4(w, impl="torch")
            got = nf4.dequantize_nf4(w, impl="triton")
            torch.cuda.synchronize(device)
            ok = torch.equal(ref, got)
            out.append(("nf4 dequant (triton)", "OK (bit-identical)" if ok else "MISMATCH: falls back to eager"))
            if not ok:
                _BROKEN["nf4 dequant (triton)"] = "mismatch vs eager"
    except Exception as e:
        _BROKEN["nf4 dequant (triton)"] = f"{type(e).__name__}: {e}"
        out.append(("nf4 dequant (triton)", f"FAILED ({type(e).__name__}: {str(e).splitlines()[0][:200]}): eager"))
    # fused-loss chunk math (torch.compile / Inductor)
    try:
        from kd.losses import DistillationLoss, _chunk_math_eager  # lazy: kd.losses imports this module

        if os.environ.get("KD_FUSED_COMPILE", "1") == "0":
            out.append(("fused loss (torch.compile)", "eager (KD_FUSED_COMPILE=0)"))
        else:
            loss = DistillationLoss()
            z = torch.randn(64, 1000, device=device)
            t = torch.randn(64, 1000, device=device)
            lab = torch.randint(0, 1000, (64,), device=device)
            valid = torch.ones(64, dtype=torch.bool, device=device)
            fn = torch.compile(_chunk_math_eager, dynamic=False)
            a = fn(loss, z, t, lab, valid, 0.5, True, True)
            b = _chunk_math_eager(loss, z, t, lab, valid, 0.5, True, True)
            ok = all(torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-4) for x, y in zip(a, b) if x is not None)
            out.append(("fused loss (torch.compile)", "OK (matches eager)" if ok else "MISMATCH: falls back to eager"))
            if not ok:
                _BROKEN["fused loss (torch.compile)"] = "mismatch vs eager"
    except Exception as e:
        _BROKEN["fused loss (torch.compile)"] = f"{type(e).__name__}: {e}"
        out.append(("fused loss (torch.compile)", f"FAILED ({type(e).__name__}: {str(e).splitlines()[0][:200]}): eager"))
    return out


if __name__ == "__main__":  # python -m kd.kernels [cpu|cuda]: compile + check each kernel here, print verdicts
    import sys

    import torch

    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
    for name, verdict in kernel_report(dev):
        print(f"kernel {name}: {verdict}")
