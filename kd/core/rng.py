"""Seeds and counter-based random numbers: the same draws on every device, batch composition and resume.

Used by generation (sampling answers) and the teacher cache (sampling teacher rows).
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ["sample_seed", "counter_uniform", "signed64"]

_M64 = (1 << 64) - 1


def signed64(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >= (1 << 63) else x


def sample_seed(seed: int, sample_id: int) -> int:
    """Deterministic 63-bit seed of one sample: sha256 of ``"seed:sample_id"``."""
    h = hashlib.sha256(f"{int(seed)}:{int(sample_id)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


_C_GOLDEN = signed64(0x9E3779B97F4A7C15)
_C_MIX1 = signed64(0xBF58476D1CE4E5B9)
_C_MIX2 = signed64(0x94D049BB133111EB)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def counter_uniform(seeds: torch.Tensor, step) -> torch.Tensor:
    """U(0, 1) float64 per row from splitmix64(seed + (step + 1) * golden): exact integer math, so the same
    on every device and batch composition. ``step`` is an int or an int64 tensor (shape [] or [1], on the
    seeds' device: the CUDA-graph decode step keeps it on the GPU); int64 products wrap like the int path."""
    if isinstance(step, torch.Tensor):
        z = seeds.to(torch.int64) + (step.to(torch.int64) + 1) * _C_GOLDEN
    else:
        z = seeds.to(torch.int64) + signed64((step + 1) * (_C_GOLDEN & _M64))
    z = (z ^ _srl(z, 30)) * _C_MIX1
    z = (z ^ _srl(z, 27)) * _C_MIX2
    z = z ^ _srl(z, 31)
    return (_srl(z, 11).to(torch.float64) + 0.5) / float(1 << 53)
