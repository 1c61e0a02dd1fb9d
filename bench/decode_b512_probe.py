"""Batch-512 decode pieces of the 72B-shaped teacher, each graph-timed on its own (issue 12's batch-512 target).

- attention: the eager grouped path (kd.teacher.generation.grouped_decode_attend's maths) against the fused
  Triton kernel (kd.teacher.decode_attention), at several cache lengths, with the kernel's error against float64;
- projections per layer: separate q/k/v and w1/w3 GEMMs against one GEMM over the concatenated weights, the CUDA
  NF4 dequantisation (GB/s), and the FP8 pieces of the nf4_fp8 teacher (NF4 -> e4m3, activation quantisation,
  ``torch._scaled_mm``).

    python3 bench/decode_b512_probe.py [--batch 512] [--out $OUT]
    python3 bench/decode_b512_probe.py --device cpu --small      # smoke test (eager pieces only)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_bench as db  # noqa: E402

RES = {}


def emit(name, **kv):
    RES[name] = kv
    print(json.dumps({"name": name, **kv}), flush=True)


def timer(dev):
    if dev.type == "cuda":
        return lambda fn: db.graph_ms(fn, dev)

    def cpu_ms(fn, n=3):
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) * 1e3 / n
    return cpu_ms


def eager_attn(q, kc, vc, mask, nkv, scale):
    B, H, d = q.shape
    qg = q.reshape(B, nkv, H // nkv, d)
    s = torch.matmul(qg, kc.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).to(vc.dtype)
    return torch.matmul(p, vc).reshape(B, H * d)


def attention(S, dev, B, ms, small):
    from kd.teacher import decode_attention as DA

    H, nkv, d = S["num_heads"], S["num_kv_heads"], S["head_dim"]
    scale = d ** -0.5
    Lmax = 64 if small else 2048
    for Lc in ((32, 64) if small else (128, 512, 1024, 2048)):
        g = torch.Generator(device=dev).manual_seed(Lc)
        q = torch.randn(B, H, d, device=dev, dtype=torch.bfloat16, generator=g)
        kc = torch.randn(B, nkv, Lmax, d, device=dev, dtype=torch.bfloat16, generator=g)
        vc = torch.randn(B, nkv, Lmax, d, device=dev, dtype=torch.bfloat16, generator=g)
        mask = torch.ones(B, Lc, device=dev, dtype=torch.bool)
        pad = torch.randint(0, Lc // 2, (B,), device=dev, generator=g)  # left padding
        mask &= torch.arange(Lc, device=dev)[None, :] >= pad[:, None]
        k, v = kc[:, :, :Lc], vc[:, :, :Lc]
        row = {"batch": B, "context": Lc, "eager_ms": ms(lambda: eager_attn(q, k, v, mask, nkv, scale)),
               "kv_bytes": 2 * k.numel() * 2}
        if DA.available(dev):
            for bl, nw in ((32, 4), (64, 4), (64, 8), (128, 8)):
                row[f"triton_l{bl}_w{nw}_ms"] = ms(lambda: DA.decode_attention(q, k, v, mask, scale=scale,
                                                                                block_l=bl, num_warps=nw))
            ref = DA.decode_attention_reference(q, k, v, mask, scale)
            out = DA.decode_attention(q, k, v, mask, scale=scale)
            row["triton_max_abs_err"] = (out.double() - ref).abs().max().item()
            row["eager_max_abs_err"] = (eager_attn(q, k, v, mask, nkv, scale).double() - ref).abs().max().item()
        emit(f"attention B={B} L={Lc}", **row)
        del q, kc, vc


def projections(S, dev, B, ms, small):
    from torchao.dtypes.nf4tensor import to_nf4

    from kd.teacher import precision as P

    E, I = S["embed_dim"], S["intermediate_dim"]
    qkv = S["num_heads"] * S["head_dim"], S["num_kv_heads"] * S["head_dim"], S["num_kv_heads"] * S["head_dim"]
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, E, device=dev, dtype=torch.bfloat16, generator=g)
    xi = torch.randn(B, I, device=dev, dtype=torch.bfloat16, generator=g)

    def W(n, k):
        return torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.02

    wq, wk, wv = (W(n, E) for n in qkv)
    wqkv = torch.cat([wq, wk, wv])
    w1, w3 = W(I, E), W(I, E)
    w13 = torch.cat([w1, w3])
    w2 = W(E, I)
    row = {"batch": B}
    row["qkv_separate_ms"] = ms(lambda: (F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)))
    row["qkv_fused_ms"] = ms(lambda: F.linear(x, wqkv))
    row["o_ms"] = ms(lambda: F.linear(x, wq))
    row["w13_separate_ms"] = ms(lambda: (F.linear(x, w1), F.linear(x, w3)))
    row["w13_fused_ms"] = ms(lambda: F.linear(x, w13))
    row["w2_ms"] = ms(lambda: F.linear(xi, w2))
    emit(f"bf16 GEMMs B={B}", **row)
    if dev.type != "cuda":
        return
    from kd.teacher import nf4_cuda
    from kd.teacher.nf4_decode import decode_scalers

    row = {}
    if nf4_cuda.available(dev):
        for name, w in (("q", wq), ("w1", w1), ("w2", w2)):
            w4 = to_nf4(w, 64, 256)
            s = decode_scalers(w4)
            t = ms(lambda: nf4_cuda.dequant(w4, s))
            nbytes = w.numel() * (0.5 + 2) + s.numel() * s.element_size()
            row[f"dequant_{name}_ms"] = t
            row[f"dequant_{name}_GBps"] = nbytes / t / 1e6
    # nf4_fp8 pieces
    w4 = to_nf4(w1, 64, 256)
    s_w, inv = P.nf4_fp8_scales(w4)
    w8 = P.nf4_to_fp8(w4, inv)
    row["nf4_to_fp8_w1_ms"] = ms(lambda: P.nf4_to_fp8(w4, inv))
    row["act_quant_E_ms"] = ms(lambda: P._act_quant(x))
    x8, sx = P._act_quant(x)
    row["scaled_mm_w1_ms"] = ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=s_w.reshape(1, -1),
                                                         out_dtype=torch.bfloat16, use_fast_accum=True))
    row["bf16_w1_ms"] = ms(lambda: F.linear(x, w1))
    row["fp8_linear_w1_ms"] = ms(lambda: P.fp8_linear(x, w8, s_w))
    emit(f"NF4 pieces B={B}", **row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("kd: error: --device cuda but no CUDA device (use --device cpu --small)")
    S = db.shape_of(args.small)
    B = args.batch or (4 if args.small else 512)
    ms = timer(dev)
    with torch.no_grad():
        attention(S, dev, B, ms, args.small)
        projections(S, dev, B, ms, args.small)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_b512_probe.json"), "w") as f:
            json.dump(RES, f, indent=1)
    print("B512 PROBE DONE")


if __name__ == "__main__":
    main()
