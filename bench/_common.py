"""Helpers shared by the GPU benchmarks (run as ``python bench/<script>.py``, so this module is on ``sys.path``)."""

from __future__ import annotations

import time
from typing import Callable, List

import torch


def call_times_ms(fn: Callable[[], object], dev: torch.device, n: int, warm: int) -> List[float]:
    """Milliseconds of each of ``n`` calls of ``fn`` after ``warm`` untimed ones: CUDA events on cuda (the GPU's
    own time of the call), ``perf_counter`` elsewhere."""
    for _ in range(warm):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    ts = []
    for _ in range(n):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t))
    return ts


def random_init_(mod: torch.nn.Module, dev: torch.device, gen: torch.Generator, dtype: torch.dtype) -> None:
    """Materialise a meta-device torchtune module on ``dev`` with seeded random weights (std 0.02; norm weights 1,
    biases random) and its RoPE caches, in ``dtype``."""
    mod.to_empty(device=dev)
    with torch.no_grad():
        for n, p in mod.named_parameters():
            if p.dim() == 1 and not n.endswith("bias"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    with torch.device(dev):  # rope caches are created on the default device
        for sub in mod.modules():
            if hasattr(sub, "rope_init"):
                sub.rope_init()
    mod.to(dtype)
