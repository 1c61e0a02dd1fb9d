"""Generated tokens/s of kd.generate.generation.generate_batch for a Qwen2.5-72B-shaped NF4 teacher on one GPU.

Random weights built directly on the GPU (80 layers, quantised layer by layer with kd.teacher.nf4, fast NF4 linear),
no checkpoint. Prompts are random ids with lengths prompt_len +- 25% (so batches are really left-padded),
sampling as in production (temperature 0.7, top-p 0.9, per-sample seeds); stop tokens are ignored so every row
generates exactly --new-tokens tokens. For each batch size: the timed call (one
warm-up call of 2 rows x 4 new tokens first);
also the prefill alone (1 new token) to split prefill and decode time.

    python bench/generate_bench.py --batches 1,64,128,256 --new-tokens 256 --out $OUT
(device command: see docs/offline.md)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,128,256,512")
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--new-tokens-b1", type=int, default=64, help="new tokens for batch 1 (slow)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import kd_step  # bench/kd_step.py: torchtune import guard, random init, 72B NF4 teacher builder

    kd_step.import_torchtune()
    from kd.generate.generation import SamplingParams, generate_batch, install_last_token_head, sample_seed

    props = torch.cuda.get_device_properties(0)
    res = {"gpu": props.name, "torch": torch.__version__, "prompt_len": args.prompt_len, "runs": []}
    teacher = install_last_token_head(kd_step.build_teacher(fast=True))
    res["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.7, top_p=0.9)

    warm = []

    def run(B, n_new):
        lens = torch.randint(int(args.prompt_len * 0.75), int(args.prompt_len * 1.25) + 1, (B,), generator=g)
        prompts = [torch.randint(0, 150000, (int(l),), generator=g).tolist() for l in lens]
        seeds = [sample_seed(0, i) for i in range(B)]
        kw = dict(stop_ids=[], pad_id=151643, params=params, seeds=seeds, device=torch.device("cuda"),
                  cache_dtype=torch.bfloat16)
        if not warm:
            generate_batch(teacher, prompts[:2], max_new_tokens=4, **dict(kw, seeds=seeds[:2]))  # warm-up (JIT)
            warm.append(1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        generate_batch(teacher, prompts, max_new_tokens=1, **kw)
        torch.cuda.synchronize()
        t_prefill = time.perf_counter() - t
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        gens = generate_batch(teacher, prompts, max_new_tokens=n_new, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        n = sum(len(x.tokens) for x in gens)
        return {"batch": B, "new_tokens": n_new, "generated": n, "seconds": dt, "tokens_per_s": n / dt,
                "prefill_s": t_prefill, "decode_ms_per_step": 1000 * (dt - t_prefill) / max(1, n_new - 1),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}

    for B in [int(b) for b in args.batches.split(",")]:
        try:
            r = run(B, args.new_tokens_b1 if B == 1 else args.new_tokens)
        except torch.OutOfMemoryError as e:
            r = {"batch": B, "error": f"OOM: {str(e)[:200]}"}
            torch.cuda.empty_cache()
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            with open(os.path.join(args.out, "generate_bench.json"), "w") as f:
                json.dump(res, f, indent=1)
    b1 = next((r for r in res["runs"] if r["batch"] == 1 and "tokens_per_s" in r), None)
    for r in res["runs"]:
        if b1 and "tokens_per_s" in r:
            r["speedup_vs_b1"] = r["tokens_per_s"] / b1["tokens_per_s"]
    print("\n| batch | new tokens | generated tok/s | x batch 1 | prefill s | decode ms/step | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        if "tokens_per_s" in r:
            print(f"| {r['batch']} | {r['new_tokens']} | {r['tokens_per_s']:,.0f} | {r.get('speedup_vs_b1', 1):.1f} | "
                  f"{r['prefill_s']:.2f} | {r['decode_ms_per_step']:.1f} | {r['peak_gib']:.1f} |")
        else:
            print(f"| {r['batch']} | - | {r['error'][:60]} | | | | |")
    if args.out:
        with open(os.path.join(args.out, "generate_bench.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
