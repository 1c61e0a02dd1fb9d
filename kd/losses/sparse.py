"""Sparse teacher targets: what the fused loss head draws from teacher logits (Random-Sampling KD) and what the
teacher cache stores and returns. The cache (kd.cache) and the losses share these types; they live with the losses,
which need nothing else from the cache.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kd.core.rng import counter_uniform

__all__ = ["SAMPLINGS", "TeacherSampler", "TeacherSamples", "SparseTargets", "sample_teacher_rows"]

SAMPLINGS = ("random", "topk")


class TeacherSampler(NamedTuple):
    """What to draw from the teacher inside the fused head.

    k: draws per position (random) or kept tokens (topk); temperature: the loss temperature T;
    sampling: "random" | "topk"; row_seeds: [N] int64 per-row seeds (:func:`kd.cache.store.row_seeds`)."""

    k: int
    temperature: float
    sampling: str
    row_seeds: torch.Tensor


class TeacherSamples(NamedTuple):
    """Per-row teacher samples for N rows (all rows, invalid ones hold garbage):
    ids [N, k] int32 (random: the k draws, with repeats; topk: the k most likely ids),
    probs [N, k] float32 (topk: renormalised probabilities; random: empty [0]),
    entropy [N] float32 (H(p_T) in nats), top1 [N] int32 (argmax of the teacher logits)."""

    ids: torch.Tensor
    probs: torch.Tensor
    entropy: torch.Tensor
    top1: torch.Tensor


class SparseTargets(NamedTuple):
    """Sparse teacher targets for N flattened rows, gathered from the cache:
    ids [N, K] int64 (unused slots: id 0), weights [N, K] float32 (p_hat = counts / K, or renormalised top-k
    probabilities; 0 in unused slots and on rows without an entry), top1 [N] int64, entropy [N] float32."""

    ids: torch.Tensor
    weights: torch.Tensor
    top1: torch.Tensor
    entropy: torch.Tensor

    def to(self, device) -> "SparseTargets":
        return SparseTargets(*(x.to(device, non_blocking=True) for x in self))



@torch.no_grad()
def sample_teacher_rows(t: torch.Tensor, seeds: torch.Tensor, k: int, temperature: float, sampling: str):
    """Draw from teacher logits ``t`` [n, V] (any float dtype) at temperature T.

    random: ``k`` i.i.d. draws from ``p = softmax(t / T)`` by inverse CDF: one uniform per (row, draw) from
    :func:`kd.core.rng.counter_uniform` (``seeds`` [n] int64, draw j = step j), CDF accumulated in float64
    (a float32 cumsum over 152k entries perturbs tail intervals by ~1e-7 each, ~1e-2 in total variation).
    topk: the ``k`` largest probabilities renormalised to sum 1 (biased; comparison only).
    Returns ``(ids [n, k] int32, probs [n, k] float32 or empty, entropy [n] float32, top1 [n] int32)``.
    """

    x = t.float()
    if temperature != 1.0:
        x = x / temperature
    lp = F.log_softmax(x, dim=-1)
    p = lp.exp()
    ent = -(p * torch.where(p > 0, lp, torch.zeros((), device=p.device))).sum(-1)
    top1 = x.argmax(-1).to(torch.int32)
    V = x.shape[-1]
    if sampling == "random":
        cdf = p.to(torch.float64).cumsum_(-1)
        u = torch.stack([counter_uniform(seeds, j) for j in range(k)], dim=1).to(cdf.device)  # [n, k] in (0, 1)
        target = u * cdf[:, -1:]
        ids = torch.searchsorted(cdf, target, right=True).clamp_max_(V - 1).to(torch.int32)
        probs = torch.empty(0, device=x.device)
    elif sampling == "topk":
        pv, ids = torch.topk(p, k, dim=-1)
        probs = pv / pv.sum(-1, keepdim=True)
        ids = ids.to(torch.int32)
    else:  # pragma: no cover - validated by the caller
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    return ids, probs, ent, top1
