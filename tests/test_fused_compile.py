"""The per-chunk math of the fused loss is torch.compile'd on CUDA (kd.losses.distillation._chunk_math). CI has no GPU, so
check here that the very same function traces and compiles (inductor, CPU) and gives the eager results —
a compile break would otherwise only show up on the GPU (where the recipe falls back to eager, loudly)."""

import pytest
import torch

from kd.losses import distillation as L


@pytest.mark.parametrize("kind,T", [("forward_kl", 1.0), ("jsd", 2.0)])
def test_compiled_chunk_math_equals_eager(kind, T):
    torch.manual_seed(0)
    n, V = 48, 257
    loss = L.DistillationLoss(kind=kind, temperature=T, beta=0.3, ignore_index=-1)
    z, t = torch.randn(n, V) * 3, torch.randn(n, V) * 3
    lab = torch.randint(0, V, (n,))
    lab[:7] = -1
    valid = lab != -1
    args = (z, t, lab, valid, 0.4, True, True)
    eager = L.chunk_math_eager(loss, *args)
    compiled = torch.compile(L.chunk_math_eager, dynamic=False)(loss, *args)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert eager[-1].abs().sum() > 0 and int(eager[3]) >= 0
