"""Tests for kd.teacher.nf4 (CPU: eager fallback of the kernel's math; GPU-only tests marked `gpu`)."""
import pytest
import torch
import torch.nn as nn
from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4, to_nf4

from kd.teacher import nf4 as knf4

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _w(o, i, seed, dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(o, i, generator=g) * 0.02).to(dtype).to(device)


@pytest.mark.parametrize("shape", [(64, 256), (96, 512), (384, 128)])
def test_eager_dequant_bit_exact(shape):
    w4 = to_nf4(_w(*shape, seed=sum(shape)))
    ref = w4.get_original_weight()
    out = knf4.dequantize_nf4(w4, impl="torch")
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
    assert torch.equal(knf4.dequantize_nf4(w4), ref)  # auto -> torch on CPU


def test_scalers_match_torchao():
    w4 = to_nf4(_w(128, 256, seed=3))
    ref = w4.dequantize_scalers(w4.quantized_scalers, w4.quantization_factor, w4.scaler_block_size)
    assert torch.equal(knf4.dequantize_scalers(w4), ref)


def test_fast_linear_matches_linear_nf4_forward_and_backward():
    torch.manual_seed(0)
    w4 = to_nf4(_w(256, 128, seed=5))
    bias = torch.randn(256, dtype=torch.bfloat16)
    x = torch.randn(3, 7, 128, dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = knf4.linear_nf4_fast(x, w4, bias)
    y_ref = linear_nf4(x2, w4) + bias
    torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1e-3)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1.6e-2, atol=1e-3)


def test_fast_nf4_linear_module_keeps_nf4_param():
    lin = nn.Linear(128, 256, bias=True).to(torch.bfloat16)
    m = knf4.FastNF4Linear.from_linear(lin)
    assert isinstance(m.weight, NF4Tensor) and not m.weight.requires_grad
    assert set(dict(m.named_parameters())) == {"weight", "bias"}
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y_fast = m(x)
        m.fast = False
        y_stock = m(x)
    torch.testing.assert_close(y_fast, y_stock, rtol=1.6e-2, atol=1e-3)


def _tiny_decoder():
    from torchtune.models.qwen2._component_builders import qwen2

    torch.manual_seed(0)
    m = qwen2(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256,
              intermediate_dim=512, max_seq_len=64, rope_base=1e6)
    with torch.no_grad():  # biases are zero-initialised by default; make them visible
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    return m.to(torch.bfloat16).eval()


def test_nf4_linears_swaps_only_decoder_linears():
    from kd.train.models import nf4_linears_

    m = _tiny_decoder()
    keys_before = set(m.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    assert nf4_linears_(m.layers, fast=False) == 2 * 7
    with torch.no_grad():
        y_stock = m(tokens)
    knf4.set_fast_(m, True)
    with torch.no_grad():
        y_fast = m(tokens)
    assert set(m.state_dict()) == keys_before
    n_fast = sum(isinstance(x, knf4.FastNF4Linear) for x in m.modules())
    assert n_fast == 2 * 7  # q,k,v,o + w1,w2,w3 per layer
    assert not any(type(x) is nn.Linear for x in m.layers.modules())
    assert isinstance(m.output, nn.Linear) and m.output.weight.dtype == torch.bfloat16
    assert m.tok_embeddings.weight.dtype == torch.bfloat16
    assert all(not p.requires_grad for p in m.layers.parameters())
    torch.testing.assert_close(y_fast, y_stock, rtol=2e-2, atol=2e-2)


def test_fsdp2_two_ranks_cpu():
    """FastNF4Linear under FSDP2 (2 gloo ranks): weights are DTensor(NF4Tensor) shards, output == unsharded."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), str(root / "bench" / "fsdp2_check.py")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert "FSDP2 CHECK PASS" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


@gpu
@pytest.mark.gpu
def test_triton_dequant_bit_exact_cuda():
    if not knf4.triton_available():
        pytest.skip("triton not available")
    for shape in [(1024, 8192), (8192, 1024 + 512), (96, 512)]:
        w4 = to_nf4(_w(*shape, seed=shape[0], device="cuda"))
        ref = w4.get_original_weight()
        out = knf4.dequantize_nf4(w4, impl="triton")
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@gpu
@pytest.mark.gpu
def test_fast_linear_cuda_matches_linear_nf4():
    w4 = to_nf4(_w(4096, 1024, seed=1, device="cuda"))
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = knf4.linear_nf4_fast(x, w4)
        y_ref = linear_nf4(x, w4)
    rel = (y.float() - y_ref.float()).norm() / y_ref.float().norm()
    assert rel < 1e-2
