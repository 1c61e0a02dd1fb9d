"""The read-once NF4 product (kd.generate.nf4_matmul) against bf16 cuBLAS and dequantise + cuBLAS, one 72B layer's
projections at M = 1, 16, 128, 512; then greedy tokens of the fused path against the
reference path at real shapes.

  1. per product (q, k, v, o, gate, up, down; and q|k|v, gate|up stacked as one product): fused kernel (tuned), auto
     (what the decoder runs), dequantise + cuBLAS, bf16 cuBLAS; GPU ms per call as the
     decode step runs it (CUDA-graph replays), cycling through enough copies of the weight that none is read from
     L2 (a real step streams 80 layers), against the memory floor ``(packed bytes + scalers + x + y) / copy
     bandwidth`` and the compute floor ``2 M N K / bf16 GEMM rate``, both measured in this call. Per layer: the
     sum over the seven projections (``sep``) and over q|k|v, o, gate|up, down (``stacked``).
  2. ``--sweep``: every candidate tile of the fused kernel, timed (what ``kd.generate.nf4_matmul.tune`` chooses
     from).
  3. ``--greedy P,T``: greedy decoding of P prompts for T tokens through ``StaticDecoder`` with the fused kernel and
     with dequantise + cuBLAS, on the 72B-shaped teacher cut to ``--layers`` layers (random weights); each
     divergence with the reference's top-1/top-2 logit margin at that position.
  4. ``--ncu-configs FILE``: launch each tuned fused product once (for ``ncu --metrics dram__bytes_read.sum``).

GPU:  python bench/nf4_mm_bench.py --out $OUT [--sweep] [--greedy 64,32]
CPU smoke test (Triton interpreter, tiny shapes):  TRITON_INTERPRET=1 python bench/nf4_mm_bench.py --small --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import call_times_ms  # noqa: E402  (bench/ is on sys.path when run as a script)

RES: dict = {"products": [], "layers": [], "sweep": [], "greedy": None}


def log(*a):
    print(*a, flush=True)


def graph_ms(fns, dev, replays: int = 20) -> float:
    """GPU ms per call, launch overhead removed as in the decode step: one call of each of ``fns`` (the same
    product on different weight copies) captured in one CUDA graph, replayed ``replays`` times."""
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):
        for fn in fns:
            fn()
    torch.cuda.current_stream(dev).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    torch.cuda.synchronize(dev)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / (len(fns) * replays)


def shapes(small: bool):
    H, I, KV = (256, 512, 64) if small else (8192, 29568, 1024)
    sep = {"q": (H, H), "k": (KV, H), "v": (KV, H), "o": (H, H), "gate": (I, H), "up": (I, H), "down": (H, I)}
    stacked = {"qkv": (H + 2 * KV, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
    return sep, stacked


def ceilings(dev):
    if dev.type != "cuda":
        return {"copy_bytes_per_s": 20e9, "matmul_flops_per_s": 200e9}
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    mm = min(call_times_ms(lambda: a @ a, dev, 10, 3))
    x = torch.empty(2 ** 30, device=dev, dtype=torch.uint8)
    y = torch.empty_like(x)
    cp = min(call_times_ms(lambda: y.copy_(x), dev, 10, 3))
    a = x = y = None  # freed (the timed lambdas above hold these names)
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": 2 * 2 ** 30 / (cp / 1e3), "matmul_flops_per_s": 2 * n ** 3 / (mm / 1e3)}


def product_rows(args, dev, ceil, ms_of):
    from torchao.dtypes.nf4tensor import to_nf4

    from kd.generate import nf4_matmul as NM
    from kd.teacher.nf4 import dequantize_nf4

    sep, stacked = shapes(args.small)
    table = {}
    l2_bytes = 0 if dev.type != "cuda" else 4 * torch.cuda.get_device_properties(dev).L2_cache_size
    for (name, (N, K)) in list(sep.items()) + [(f"{k}*", v) for k, v in stacked.items() if k in ("qkv", "gate_up")]:
        W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        w4 = to_nf4(W, 64, 256)
        bf16_bytes = N * K * 2
        copies = max(1, -(-l2_bytes // (N * K // 2))) if l2_bytes else 1  # 4-bit copies to outrun L2
        w4s = [w4] + [to_nf4(W, 64, 256) for _ in range(min(copies, 8) - 1)]
        Ws = [W] + [W.clone() for _ in range(max(1, -(-l2_bytes // bf16_bytes)) - 1 if l2_bytes else 0)]
        for M in args.rows:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w4.get_original_weight().float())
            p = NM.packed(w4)
            row = {"name": name, "M": M, "N": N, "K": K, "copies": len(w4s),
                   "floor_mem_ms": 1e3 * (p.nbytes + 2 * M * (N + K)) / ceil["copy_bytes_per_s"],
                   "floor_flops_ms": 1e3 * 2 * M * N * K / ceil["matmul_flops_per_s"]}
            impls = {"bf16_cublas": [lambda W_=W_: F.linear(x, W_) for W_ in Ws],
                     "dequant_cublas": [lambda w_=w_: F.linear(x, dequantize_nf4(w_)) for w_ in w4s]}
            if NM.fused_available(dev):
                impls["fused"] = [lambda w_=w_: NM.nf4_matmul_fused(x, w_) for w_ in w4s]
            if dev.type == "cuda":  # what the decoder runs: kd's CUDA GEMV up to 8 rows, then the fused kernel
                impls["auto"] = [lambda w_=w_: NM.nf4_matmul(x, w_, impl="auto") for w_ in w4s]
                row["auto_route"] = NM.route(x, w4, "auto")
            for k, fns in impls.items():
                try:
                    y = fns[0]()
                    row[k + "_relerr"] = ((y.float() - ref).norm() / ref.norm()).item()
                    row[k + "_ms"] = ms_of(fns)
                except Exception as e:  # reported, not fatal
                    row[k + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if "fused" in impls:
                row["fused_config"] = NM.tune(M, N, K, p, x).__dict__
                if args.sweep:
                    for cfg in NM.candidates(M, N, K, NM._sm_count(dev)):
                        try:
                            t = ms_of([lambda w_=w_, c=cfg: NM.nf4_matmul_fused(x, w_, cfg=c) for w_ in w4s])
                        except Exception as e:
                            t = f"{type(e).__name__}"
                        RES["sweep"].append({"name": name, "M": M, "N": N, "K": K, **cfg.__dict__, "ms": t})
                        log(json.dumps(RES["sweep"][-1]))
            RES["products"].append(row)
            log(json.dumps(row))
            table[(name, M)] = row
        del W, w4, w4s, Ws
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    keys = ("bf16_cublas", "dequant_cublas", "fused", "auto", "floor_mem", "floor_flops")
    for M in args.rows:
        for layout, names in (("sep", list(sep)), ("stacked", ["qkv*", "o", "gate_up*", "down"])):
            lay = {"M": M, "layout": layout}
            for k in keys:
                vals = [table.get((n, M), {}).get(k + "_ms") for n in names]
                if all(isinstance(v, float) for v in vals):
                    lay[k + "_ms"] = sum(vals)
            lay["floor_ms"] = max(lay.get("floor_mem_ms", 0), lay.get("floor_flops_ms", 0))
            RES["layers"].append(lay)
            log(json.dumps({"layer": lay}))


def greedy_check(args, dev):
    """Greedy tokens, fused kernel vs dequantise + cuBLAS, on the 72B-shaped teacher cut to ``args.layers``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import decode_bench as DB

    from kd.generate.generation import SamplingParams
    from kd.generate.static_decode import StaticDecoder

    P, T = args.greedy
    S = DB.shape_of(args.small)
    model = DB.build_teacher(S, args.layers, dev)
    prompts = DB.prompts_for(P, 12 if args.small else 96, S["vocab_size"], seed=7)
    out = {}
    for route, kw in (("fused", dict(nf4_kernel="fused", nf4_fused_max_batch=P)), ("reference", dict(nf4_kernel=None))):
        dec = StaticDecoder(model, device=dev, cache_dtype=torch.bfloat16, cuda_graphs=dev.type == "cuda", **kw)
        gens = dec.generate(prompts, max_new_tokens=T, stop_ids=[], pad_id=S["vocab_size"] - 1,
                            params=SamplingParams(temperature=0.0), seeds=list(range(P)))
        out[route] = [g.tokens for g in gens]
        dec.close()
    diverged = []
    for i, (a, b) in enumerate(zip(out["fused"], out["reference"])):
        j = next((t for t in range(min(len(a), len(b))) if a[t] != b[t]), None)
        if j is None:
            continue
        ids = torch.tensor([prompts[i] + b[:j]], device=dev)  # the reference's own prefix, full forward
        with torch.no_grad():
            logits = model(ids)
        logits = logits[0, -1].float() if logits.dim() == 3 else logits[0].float()
        top = torch.topk(logits, 2)
        diverged.append({"prompt": i, "position": j, "reference": b[j], "fused": a[j],
                         "ref_margin_top1_top2": (top.values[0] - top.values[1]).item(),
                         "ref_logit_gap_to_fused_token": (logits[b[j]] - logits[a[j]]).item()})
    RES["greedy"] = {"prompts": P, "tokens": T, "layers": args.layers, "identical": P - len(diverged),
                     "diverged": diverged}
    log(json.dumps({"greedy": RES["greedy"]}))


def ncu_launches(args, dev):
    """Each tuned fused product of a previous run launched once with its tile (no timing, no tuning)."""
    from torchao.dtypes.nf4tensor import to_nf4

    from kd.generate import nf4_matmul as NM

    rows = json.load(open(args.ncu_configs))["products"]
    for r in rows:
        if "fused_config" not in r or (args.ncu_only and f"{r['name']}:{r['M']}" not in args.ncu_only.split(",")):
            continue
        w4 = to_nf4(torch.randn(r["N"], r["K"], device=dev, dtype=torch.bfloat16) * 0.02, 64, 256)
        x = torch.randn(r["M"], r["K"], device=dev, dtype=torch.bfloat16)
        cfg = NM.TileConfig(**r["fused_config"])
        NM.nf4_matmul_fused(x, w4, cfg=cfg)
        torch.cuda.synchronize()
        log(f"ncu launch {r['name']} M={r['M']} {cfg}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--rows", default="1,16,128,512")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-products", action="store_true")
    ap.add_argument("--greedy", default=None, help="P,T: P prompts, T tokens")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ncu-configs", default=None)
    ap.add_argument("--ncu-only", default=None, help="NAME:M,... products to launch (default all)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    args.rows = [int(v) for v in args.rows.split(",")]
    args.greedy = [int(v) for v in args.greedy.split(",")] if args.greedy else None
    dev = torch.device(args.device)
    if args.ncu_configs:
        return ncu_launches(args, dev)
    RES["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    try:
        import triton
        RES["triton"] = triton.__version__
    except ImportError:
        RES["triton"] = None
    RES["ceiling"] = ceil = ceilings(dev)
    log(json.dumps({"device": RES["device"], "ceiling": ceil}))

    def ms_of(fns):
        if dev.type == "cuda":
            return graph_ms(fns, dev)
        return min(call_times_ms(fns[0], dev, 2, 1))
    t0 = time.time()
    if not args.no_products:
        product_rows(args, dev, ceil, ms_of)
    if args.greedy:
        greedy_check(args, dev)
    RES["seconds"] = time.time() - t0
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "nf4_mm_bench.json"), "w") as f:
            json.dump(RES, f, indent=1, default=str)


if __name__ == "__main__":
    main()
