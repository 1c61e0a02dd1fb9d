"""Batches of prompts by length (generation and the teacher cache's build pass)."""
from __future__ import annotations

from typing import Dict, List, Optional

__all__ = ["plan_batches"]


def plan_batches(
    lengths: Dict[int, int], *, batch_size: int, max_new_tokens: int, max_batch_tokens: Optional[int] = None
) -> List[List[int]]:
    """Sample ids grouped into batches: longest prompts first, ties by id; each batch has at most
    ``batch_size`` rows and (if given) ``rows * (longest prompt + max_new_tokens) <= max_batch_tokens``."""
    order = sorted(lengths, key=lambda i: (-lengths[i], i))
    batches: List[List[int]] = []
    cur: List[int] = []
    for sid in order:
        if cur:
            width = lengths[cur[0]] + max_new_tokens
            if len(cur) >= batch_size or (max_batch_tokens and (len(cur) + 1) * width > max_batch_tokens):
                batches.append(cur)
                cur = []
        cur.append(sid)
    if cur:
        batches.append(cur)
    return batches
