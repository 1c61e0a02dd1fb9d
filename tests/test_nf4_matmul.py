"""kd.generate.nf4_matmul: the read-once NF4 kernel's numerics under TRITON_INTERPRET=1 (odd shapes, split-K, bias,
both scaling orders), its routing, and greedy tokens on the trained tiny teacher equal to the reference path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

_NUMERICS = r"""
import json, torch
from torchao.dtypes.nf4tensor import to_nf4
from kd.generate import nf4_matmul as NM

torch.manual_seed(0)
out = {"exact_ulps": 0.0, "exact_fp32": 0.0, "after_rel": 0.0, "onehot_equal": True, "cases": 0}
for dt in (torch.float32, torch.bfloat16):
    for (M, N, K) in ((1, 96, 192), (3, 80, 320), (17, 72, 448)):  # N not a tile multiple, K not a BLOCK_K multiple
        w = to_nf4(torch.randn(N, K, dtype=dt), 64, 1 if (N * K // 64) % 2 else 2)
        wd = w.get_original_weight()
        x = torch.randn(M, K, dtype=dt)
        b = torch.randn(N, dtype=dt)
        ref = x.double() @ wd.double().T + b.double()
        for cfg in (NM.TileConfig(16, 64, 128, 1), NM.TileConfig(16, 32, 256, 2), NM.TileConfig(32, 64, 64, 4),
                    NM.TileConfig(16, 64, 128, 1, scale_after=True), NM.TileConfig(16, 32, 128, 2, scale_after=True),
                    NM.TileConfig(32, 64, 128, 1, scale_after=True, two_dot=True)):
            y = NM.nf4_matmul_fused(x, w, b, cfg).double()
            out["cases"] += 1
            if cfg.scale_after:
                out["after_rel"] = max(out["after_rel"], float((y - ref).norm() / ref.norm()))
            elif dt == torch.float32:
                out["exact_fp32"] = max(out["exact_fp32"], float(((y - ref).abs() / ref.abs().clamp_min(1)).max()))
            else:
                # the bf16 output is the exact sum rounded once: within one bf16 ulp of the float64 reference
                ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp_min(2.0 ** -126)
                out["exact_ulps"] = max(out["exact_ulps"], float(((y - ref).abs() / ulp).max()))
        if dt == torch.bfloat16:  # one-hot rows return the dequantised columns bit for bit (torchao's rounding)
            cols = torch.eye(K, dtype=dt)[:16]
            y = NM.nf4_matmul_fused(cols, w, None, NM.TileConfig(16, 64, 128, 1))
            out["onehot_equal"] &= bool(torch.equal(y, wd[:, :16].T.contiguous()))
x3 = torch.randn(2, 1, 192)
w = to_nf4(torch.randn(40, 192), 64, 1)
out["leading_dims"] = list(NM.nf4_matmul_fused(x3, w, cfg=NM.TileConfig(16, 64, 128, 1)).shape)
print("RESULT " + json.dumps(out))
"""

_GREEDY = r"""
import json, sys, torch
from omegaconf import OmegaConf
from kd.data.alpaca import load_alpaca_records
from kd.generate.generation import install_last_token_head, prompt_tokens, stop_token_ids
from kd.teacher.nf4 import use_fast_nf4
from kd.generate.static_decode import StaticDecoder
from kd.train.models import build_on_meta, load_hf_into_model
from kd.testing.testbed import build_testbed

tb = build_testbed(sys.argv[1])
tok = tb.tokenizer()
cfg = OmegaConf.create({"_component_": "torchtune.models.qwen2.qwen2", **tb.teacher_dims})
m = build_on_meta(cfg, torch.bfloat16)
load_hf_into_model(m, tb.teacher_dir, device=torch.device("cpu"), dtype=torch.bfloat16, nf4=True)
use_fast_nf4(m)
install_last_token_head(m.eval())
recs, _ = load_alpaca_records(tb.data_json)
ps = [prompt_tokens(tok, recs[i], "你是一位佛学老师。") for i in range(6)]
kw = dict(max_new_tokens=12, stop_ids=stop_token_ids(tok), pad_id=tok.pad_id)
got = {}
for kern in ("fused", "dequant"):  # on CPU dequant is the eager reference
    dec = StaticDecoder(m, device=torch.device("cpu"), cache_dtype=torch.bfloat16, attn_bucket=16, nf4_kernel=kern,
                        nf4_fused_max_batch=len(ps))
    got[kern] = [g.tokens for g in dec.generate(ps, **kw)]
print("RESULT " + json.dumps(got))
"""


def _interp(code: str, *args: str) -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])


def test_fused_kernel_numerics_in_interpreter():
    """Exact scaling: bf16 weights bit-identical to torchao's dequantisation (one-hot rows), bf16 products within one
    output ulp of the float64 reference, fp32 to 1e-4; scaling after each block's product within bf16 weight
    rounding (2^-8); split-K, ragged N and K, bias and leading dimensions included."""
    r = _interp(_NUMERICS)
    assert r["cases"] == 36
    assert r["onehot_equal"]
    assert r["exact_ulps"] <= 1.0, r
    assert r["exact_fp32"] < 1e-4, r  # fp32 accumulation over K <= 448
    assert r["after_rel"] < 2 ** -8, r
    assert r["leading_dims"] == [2, 1, 40]


def test_fused_greedy_tokens_equal_reference_on_testbed(testbed):
    """Greedy decoding of the trained tiny NF4 teacher through StaticDecoder: the fused kernel (interpreter) and the
    eager dequantise + matmul give the same tokens."""
    got = _interp(_GREEDY, str(testbed.root))
    assert got["fused"] == got["dequant"]
    assert sum(len(t) for t in got["dequant"]) >= 6 * 4  # real answers, not all stopped at once


def test_routing_and_errors():
    from torchao.dtypes.nf4tensor import to_nf4

    from kd.generate import nf4_matmul as NM

    w = to_nf4(torch.randn(64, 128, dtype=torch.bfloat16), 64, 2)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, w.get_original_weight())
    assert torch.equal(NM.nf4_matmul(x, w), ref)  # CPU auto: the eager reference
    with pytest.raises(ValueError, match="unknown NF4 decode kernel 'gemv'"):
        NM.nf4_matmul(x, w, impl="gemv")
    with pytest.raises(ValueError, match="shape mismatch"):
        NM.nf4_matmul_fused(torch.randn(3, 64, dtype=torch.bfloat16), w)
    # candidates: every tile covers the row bucket, split-K never leaves a ragged K chunk
    for M, N, K in ((1, 1024, 8192), (16, 59136, 8192), (128, 8192, 29568), (512, 10240, 8192)):
        for c in NM.candidates(M, N, K):
            assert c.block_m == NM.row_bucket(M) if M <= 64 else c.block_m >= 64
            assert c.split_k == 1 or K % (c.block_k * c.split_k) == 0
    p = NM.PackedNF4.cat([NM.packed(w), NM.packed(to_nf4(torch.randn(32, 128, dtype=torch.bfloat16), 64, 2))])
    assert p.shape == (96, 128)


@pytest.mark.gpu
def test_gpu_fused_kernel_tuned_and_exact():
    """On CUDA: the tuned kernel against float64 at every row bucket and ragged shapes; exact scaling bit-identical to
    torchao's weights (one-hot rows); auto's routes by rows."""
    from torchao.dtypes.nf4tensor import to_nf4

    from kd.generate import nf4_matmul as NM

    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    for N, K in ((1024, 8192), (64, 576), (3008, 1984)):  # ragged against 128-wide tiles and 128/256-deep steps
        w4 = to_nf4((torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16), 64, 64)
        wd = w4.get_original_weight()
        for M in (1, 5, 16, 100, 300):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x.double(), wd.double())
            y = NM.nf4_matmul_fused(x, w4)
            assert ((y.double() - ref).norm() / ref.norm()).item() < 5e-3, (N, K, M, NM.tune(M, N, K))
        cols = torch.eye(K, device="cuda", dtype=torch.bfloat16)[:16]
        assert torch.equal(NM.nf4_matmul_fused(cols, w4, cfg=NM.TileConfig(16, 64, 64, 1)), wd[:, :16].T.contiguous())
    x1 = torch.randn(1, 576, device="cuda", dtype=torch.bfloat16)
    w = to_nf4((torch.randn(64, 576, device="cuda") * 0.02).to(torch.bfloat16), 64, 64)
    assert NM.route(x1, w) in ("gemv", "fused") and NM.route(x1.expand(16, 576), w) == "fused"
    assert NM.route(x1.expand(200, 576), w) == "dequant" and NM.route(x1, w, "dequant") == "dequant"
