"""Where one static decode step's GPU time goes, kernel by kernel (torch.profiler), for the 72B-shaped NF4 teacher.

The step runs eagerly (``cuda_graphs=False``: the same kernels a captured graph replays, fused glue included, so
device times are the graph's minus the gaps between kernels). Two answers of N and N + D tokens are profiled; the per-kernel device-time difference
divided by D is one decode step, free of prefill and warm-up. Kernels are grouped (NF4 linears, head, attention,
sampling, norms/RoPE/elementwise) and the per-layer cost comes from two depths, like bench/decode_bench.py.

    python3 bench/decode_profile.py --layers 2,4 --batches 1,512 [--kernel-b1 cuda] [--precision nf4_fp8] [--out $OUT]
    python3 bench/decode_profile.py --device cpu --small            # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_bench as db  # noqa: E402

GROUPS = [  # first match wins
    ("nf4_gemv", r"nf4_gemv|gemv_4bit|kgemm_4bit|nf4_mm"),
    ("nf4_dequant", r"dequant"),
    ("gemm", r"gemm|xmma|cutlass|sm90|sm80|ampere|hopper|cublas|Kernel2"),
    ("attention/softmax", r"softmax|flash|fmha|attention|masked_fill|bmm"),
    ("sampling", r"topk|sort|cumsum|searchsorted|gather|scatter|radix|logsumexp|argmax"),
    ("reduce", r"reduce|norm|mean"),
    ("copy/index", r"copy|index|cat|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|Functor|pow|rsqrt|mul|add"),
]


def group_of(name: str) -> str:
    for g, pat in GROUPS:
        if re.search(pat, name, re.I):
            return g
    return "other"


def kernel_times(fn, dev):
    """{kernel name: (device us, calls)} of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if dev.type == "cuda":
            if not str(getattr(e, "device_type", "")).endswith("CUDA"):  # kernels only (ops would count twice)
                continue
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0.0)
        else:
            t = e.self_cpu_time_total if e.key.startswith("aten::") else 0.0
        if t and t > 0:
            out[e.key] = (float(t), int(e.count))
    return out


def step_profile(model, S, dev, B, n, d, kernel, plen):
    from kd.generate.generation import SamplingParams, sample_seed
    from kd.generate.static_decode import StaticDecoder

    V = S["vocab_size"]
    ps = db.prompts_for(B, plen, V, seed=B)
    kw = dict(stop_ids=[], pad_id=V - 1, params=SamplingParams(temperature=0.7, top_p=0.9),
              seeds=[sample_seed(0, i) for i in range(B)])
    dec = StaticDecoder(model, device=dev, cache_dtype=torch.bfloat16, cuda_graphs=False,
                        nf4_kernel=None if kernel == "dequant" else kernel,
                        nf4_fused_max_batch=0 if kernel == "dequant" else B)
    dec.generate(ps, max_new_tokens=n + d, **kw)  # warm-up: tuning, caches
    a = kernel_times(lambda: dec.generate(ps, max_new_tokens=n, **kw), dev)
    b = kernel_times(lambda: dec.generate(ps, max_new_tokens=n + d, **kw), dev)
    dec.close()
    per = {}
    for k in set(a) | set(b):
        ta, ca = a.get(k, (0.0, 0))
        tb, cb = b.get(k, (0.0, 0))
        per[k] = ((tb - ta) / d / 1e3, (cb - ca) / d)  # ms and calls per step
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--layers", default=None, help="two depths a,b (default 2,4; small 1,2)")
    ap.add_argument("--batches", default=None, help="default 1,512 (small 1,4)")
    ap.add_argument("--kernel-b1", default="auto", help="nf4 decode kernel at batch <= 8")
    ap.add_argument("--kernel", default="dequant", help="nf4 decode kernel at larger batches")
    ap.add_argument("--precision", default="nf4", choices=["nf4", "nf4_fp8"],
                    help="teacher linears (bench/decode_bench.build_teacher); nf4_fp8 ignores --kernel*")
    ap.add_argument("--steps", type=int, default=None, help="profiled extra steps D (default 16; small 3)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("kd: error: --device cuda but no CUDA device (use --device cpu --small)")
    small = args.small
    la, lb = [int(v) for v in (args.layers or ("1,2" if small else "2,4")).split(",")]
    batches = [int(v) for v in (args.batches or ("1,4" if small else "1,512")).split(",")]
    d = args.steps or (3 if small else 16)
    S = db.shape_of(small)
    plen = 12 if small else 96
    model = db.build_teacher(S, lb, dev, precision=args.precision)
    res = {}
    for B in batches:
        kern = args.kernel_b1 if B <= 8 else args.kernel
        if args.precision == "nf4_fp8":
            kern = "dequant"  # NF4FP8Linear does its own dequantisation (nf4_kernel=None)
        per_depth = {}
        for nl in (la, lb):
            per_depth[nl] = step_profile(db.cut(model, nl), S, dev, B, 4, d, kern, plen)
        groups = {nl: defaultdict(float) for nl in (la, lb)}
        for nl, per in per_depth.items():
            for k, (ms, _) in per.items():
                groups[nl][group_of(k)] += ms
        layer = {g: (groups[lb][g] - groups[la][g]) / (lb - la) for g in set(groups[la]) | set(groups[lb])}
        fixed = {g: groups[la][g] - la * layer[g] for g in layer}
        step80 = {g: fixed[g] + 80 * layer[g] for g in layer}
        top = sorted(per_depth[lb].items(), key=lambda kv: -kv[1][0])[:25]
        res[B] = {"kernel": kern, "per_layer_ms": layer, "fixed_ms": fixed, "step80_ms": step80,
                  "step80_total_ms": sum(step80.values()), "top_kernels_at_%d_layers" % lb: [
                      {"name": k[:160], "ms_per_step": v[0], "calls_per_step": v[1], "group": group_of(k)}
                      for k, v in top]}
        print(f"\n## batch {B} ({args.precision}, {kern}): device ms per decode step, 80 layers = fixed + 80 x per layer "
              f"(from {la} and {lb} layers): total {sum(step80.values()):.1f} ms")
        print("| group | per layer ms | fixed ms | 80 layers ms |")
        print("|---|---|---|---|")
        for g in sorted(layer, key=lambda g: -step80[g]):
            print(f"| {g} | {layer[g]:.4f} | {fixed[g]:.3f} | {step80[g]:.1f} |")
        print(f"top kernels at {lb} layers (ms per step, calls):")
        for k, v in top:
            print(f"  {v[0]:8.4f} ms {v[1]:6.1f}x [{group_of(k)}] {k[:110]}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_profile.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                       "layers": [la, lb], "results": {str(k): v for k, v in res.items()}}, f, indent=1)
    print("DECODE PROFILE DONE")


if __name__ == "__main__":
    main()
