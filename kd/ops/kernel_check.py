"""``kd preflight``'s kernel check: compile each custom kernel on this node's GPU and compare it with its eager math.

Owns :func:`kernel_report` (and ``python -m kd.ops.kernel_check [cpu|cuda]``). A kernel that fails or disagrees is
marked broken in :mod:`kd.core.kernels`, so the run that follows takes the eager path.
"""

from __future__ import annotations

import os
from typing import List, Tuple

from kd.core import kernels

__all__ = ["kernel_report"]


def _failed(out: List[Tuple[str, str]], name: str, e: Exception) -> None:
    """Record kernel ``name`` as broken after exception ``e`` and add its one-line verdict to ``out``."""
    kernels._BROKEN[name] = f"{type(e).__name__}: {e}"
    out.append((name, f"FAILED ({type(e).__name__}: {str(e).splitlines()[0][:200]}): eager"))


def _checked(out: List[Tuple[str, str]], name: str, ok: bool, good: str) -> None:
    """Add the verdict of kernel ``name`` (``good`` when it matched eager) and mark it broken when it did not."""
    out.append((name, good if ok else "MISMATCH: falls back to eager"))
    if not ok:
        kernels._BROKEN[name] = "mismatch vs eager"


def kernel_report(device) -> List[Tuple[str, str]]:
    """[(kernel, verdict)] after compiling each kernel on ``device`` and comparing it with the eager math."""
    import torch

    if kernels.forced_eager():
        return [("all kernels", "eager (KD_TRITON=0)")]
    if getattr(device, "type", str(device)) != "cuda":
        return [("all kernels", "eager (no CUDA device: nothing to compile)")]
    out = []
    # NF4 dequantisation (Triton): must be bit-identical to torchao's get_original_weight
    try:
        from kd.teacher import nf4

        if not nf4.triton_available():
            out.append(("nf4 dequant (triton)", "eager (Triton not installed)"))
        else:
            w = nf4.to_nf4(torch.randn(256, 512, device=device, dtype=torch.bfloat16))
            ref = nf4.dequantize_nf4(w, impl="torch")
            got = nf4.dequantize_nf4(w, impl="triton")
            torch.cuda.synchronize(device)
            _checked(out, "nf4 dequant (triton)", torch.equal(ref, got), "OK (bit-identical)")
    except Exception as e:
        _failed(out, "nf4 dequant (triton)", e)
    # fused-loss chunk math (torch.compile / Inductor)
    try:
        from kd.losses.distillation import DistillationLoss, chunk_math_eager

        if os.environ.get("KD_FUSED_COMPILE", "1") == "0":
            out.append(("fused loss (torch.compile)", "eager (KD_FUSED_COMPILE=0)"))
        else:
            loss = DistillationLoss()
            z = torch.randn(64, 1000, device=device)
            t = torch.randn(64, 1000, device=device)
            lab = torch.randint(0, 1000, (64,), device=device)
            valid = torch.ones(64, dtype=torch.bool, device=device)
            fn = torch.compile(chunk_math_eager, dynamic=False)
            a = fn(loss, z, t, lab, valid, 0.5, True, True)
            b = chunk_math_eager(loss, z, t, lab, valid, 0.5, True, True)
            ok = all(torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-4) for x, y in zip(a, b) if x is not None)
            _checked(out, "fused loss (torch.compile)", ok, "OK (matches eager)")
    except Exception as e:
        _failed(out, "fused loss (torch.compile)", e)
    return out


if __name__ == "__main__":  # python -m kd.ops.kernel_check [cpu|cuda]: compile + check each kernel here, print verdicts
    import sys

    import torch

    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
    for name, verdict in kernel_report(dev):
        print(f"kernel {name}: {verdict}")
