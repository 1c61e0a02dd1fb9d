"""Hand-derived divergence gradient vs autograd on the same per-chunk value (issue 14).

For each kd.losses.distillation KIND, on one [rows, V] chunk of student/teacher logits:

- ``hand``: ``DistillationLoss._rows_and_grad`` (no graph; the analytic d div / d logits the fused loss uses);
- ``autograd``: ``DistillationLoss._rows`` under autograd, then ``torch.autograd.grad`` of its sum (what a
  Liger-style "autograd on the per-chunk function" would do).

Prints the median time of each, their ratio, the max abs difference of the gradients and, on CUDA, the
peak extra memory of each. Usage::

    python bench/divergence_grad.py [--device cpu|cuda] [--rows 256] [--vocab 32768] [--repeats 5]

(H200 / Qwen2.5 vocabulary: ``--device cuda --rows 1024 --vocab 152064``.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kd.losses.distillation import KINDS, DistillationLoss


def _time(fn, device, repeats: int):
    ts, peak = [], 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
        ts.append(time.perf_counter() - t0)
        del out
    return statistics.median(ts), peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(a.rows, a.vocab, generator=g) * 3).to(dev)
    t = (torch.randn(a.rows, a.vocab, generator=g) * 3).to(dev)
    print(f"device {dev}, chunk [{a.rows}, {a.vocab}] float32, median of {a.repeats}")
    print(f"{'kind':18s} {'hand ms':>9s} {'autograd ms':>12s} {'ratio':>6s} {'max|dg|':>9s}"
          + (f" {'hand MiB':>9s} {'autograd MiB':>12s}" if dev.type == "cuda" else ""))
    for kind in KINDS:
        loss = DistillationLoss(kind, temperature=2.0)

        def hand():
            return loss._rows_and_grad(s, t)[2]

        def auto():
            z = s.detach().requires_grad_(True)
            div, _ = loss._rows(z, t)
            return torch.autograd.grad(div.sum(), z)[0]

        hand(), auto()  # warm-up
        th, mh = _time(hand, dev, a.repeats)
        ta, ma = _time(auto, dev, a.repeats)
        diff = float((hand() - auto()).abs().max())
        line = f"{kind:18s} {th * 1e3:9.1f} {ta * 1e3:12.1f} {ta / th:6.2f} {diff:9.2e}"
        if dev.type == "cuda":
            line += f" {mh / 2**20:9.0f} {ma / 2**20:12.0f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
