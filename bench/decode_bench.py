"""Teacher decode speed, one process: kd.generate.static_decode by NF4 route vs the eager path vs transformers +
bitsandbytes NF4.

A Qwen2.5-72B-shaped NF4 teacher (real widths: hidden 8192, intermediate 29568, 64 heads, 8 KV heads, vocab
152064; random weights) cut to a few layers, measured at two layer counts (``--layers 1,4``) and extrapolated
linearly to 80 layers, the same way for every path: per-step time t(80) = t(a) + (80 - a) (t(b) - t(a)) / (b - a).

Paths, same prompts (lengths prompt_len +- 25%, left padded), temperature 0.7 / top-p 0.9, stop tokens ignored:
``today`` (eager ``generate_batch``, dequantise + cuBLAS), ``ours`` (``StaticDecoder``, static cache, CUDA graphs,
``nf4_kernel="auto"``: kd's CUDA GEMV up to 8 rows, the read-once kernel up to 128, dequantise + cuBLAS above),
``fused`` (the read-once kernel at every batch), ``dequant`` (dequantise + cuBLAS at every batch), ``ours_fp8`` (the
nf4_fp8 teacher), ``hf`` (``transformers`` ``generate`` with ``BitsAndBytesConfig`` NF4, double quant, bf16
compute, loaded from a random-weight HF checkpoint written here at real width). Each: prefill (1 new token) and
the full call; decode ms/step from CUDA events around the step loop (``StaticDecoder.last_timing``) or
(full - half) / (new - new/2) for the eager paths. Per-product kernel timings: bench/nf4_mm_bench.py.

GPU (one H200 or H100, ~4-5 min):   python bench/decode_bench.py --out $OUT
CPU smoke test (tiny shapes, no bitsandbytes kernels, no graphs):   python bench/decode_bench.py --device cpu --small
Prints one JSON line per measurement and a table at the end; writes $OUT/decode_bench.json when --out/$OUT is set.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import torch
from _common import call_times_ms, random_init_  # bench/ is on sys.path when run as a script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RES: dict = {"measurements": {}}
GiB = 2 ** 30


def log(*a):
    print(*a, flush=True)


def emit(name, **kv):
    RES["measurements"][name] = kv
    log(json.dumps({"name": name, **kv}, default=str))


class Timer:
    def __init__(self, dev):
        self.dev = dev
        self.cuda = dev.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, fn, n=10, warm=2):
        """Median ms per call."""
        return statistics.median(call_times_ms(fn, self.dev, n, warm))

    def wall(self, fn):
        self.sync()
        t = time.perf_counter()
        r = fn()
        self.sync()
        return time.perf_counter() - t, r


def shape_of(small: bool):
    if small:
        return dict(embed_dim=256, intermediate_dim=512, num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=1024)
    return dict(embed_dim=8192, intermediate_dim=29568, num_heads=64, num_kv_heads=8, head_dim=128, vocab_size=152064)


def build_teacher(S, n_layers, dev, precision="nf4"):
    """torchtune Qwen2 at shape S with n_layers random layers, decoder linears NF4 (kd.teacher.nf4.FastNF4Linear), or
    ``precision="nf4_fp8"``: NF4 storage with kd.teacher.precision's FP8 GEMM (same seeded weights)."""
    from torchtune.models.qwen2 import qwen2

    from kd.generate.generation import install_last_token_head
    from kd.teacher import precision as P

    with torch.device("meta"):
        m = qwen2(vocab_size=S["vocab_size"], num_layers=n_layers, num_heads=S["num_heads"],
                  num_kv_heads=S["num_kv_heads"], embed_dim=S["embed_dim"], intermediate_dim=S["intermediate_dim"],
                  max_seq_len=32768, norm_eps=1e-6)
    g = torch.Generator(device=dev).manual_seed(0)

    def init(mod):
        random_init_(mod, dev, g, torch.bfloat16)

    for mod in (m.tok_embeddings, m.norm, m.output):
        init(mod)
    for layer in m.layers:
        init(layer)
        P.quantize_layer_(layer, precision)  # the recipes' conversion (kd.teacher.precision), NF4 blocks 64 / scalers 256
    for p in m.parameters():
        p.requires_grad_(False)
    m.eval()
    return install_last_token_head(m)


def cut(model, n):
    """The same model with only its first n layers (shared modules)."""
    import copy

    m = copy.copy(model)
    m._modules = dict(model._modules)
    m._modules["layers"] = torch.nn.ModuleList(list(model.layers)[:n])
    if hasattr(m, "num_layers"):
        m.num_layers = n
    return m


def prompts_for(B, plen, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(2, int(plen * 0.75)), int(plen * 1.25) + 1, (B,), generator=g)
    return [torch.randint(0, vocab - 1, (int(l),), generator=g).tolist() for l in lens]


# ------------------------------------------------------------------------------------------------ 2. generation
def timed_pair(T, call, n):
    """Wall time of an answer of n tokens and of n // 2 (after a warm-up at n): their difference is pure decode,
    free of prefill and of any first-call cost."""
    th, _ = T.wall(lambda: call(max(1, n // 2)))
    tn, out = T.wall(lambda: call(n))
    return tn, th, out


def decode_split(tn, th, n):
    h = max(1, n // 2)
    d = (tn - th) / max(1, n - h)
    return {"decode_ms_per_step": 1e3 * d, "prefill_s": th - (h - 1) * d}


def run_ours(args, S, dev, T, model, B, n_new, engine):
    from kd.generate.generation import SamplingParams, generate_batch, sample_seed
    from kd.generate.static_decode import StaticDecoder

    ps = prompts_for(B, args.prompt_len, S["vocab_size"], seed=B)
    params = SamplingParams(temperature=0.7, top_p=0.9)
    seeds = [sample_seed(0, i) for i in range(B)]
    kw = dict(stop_ids=[], pad_id=S["vocab_size"] - 1, params=params, seeds=seeds)
    if engine == "today":
        def call(n):
            return generate_batch(model, ps, max_new_tokens=n, device=dev, cache_dtype=torch.bfloat16, **kw)
        dec = None
    else:
        if engine == "ours_fp8":  # NF4 storage, NF4 -> e4m3 per call + FP8 GEMM (kd.teacher.precision nf4_fp8)
            kw_dec = dict(nf4_kernel=None)
        elif engine in ("fused", "dequant"):  # one route at every batch
            kw_dec = dict(nf4_kernel=engine, nf4_fused_max_batch=B)
        else:  # "ours": the library's defaults (auto)
            kw_dec = {}
        dec = StaticDecoder(model, device=dev, cache_dtype=torch.bfloat16, cuda_graphs=dev.type == "cuda", **kw_dec)

        def call(n):
            return dec.generate(ps, max_new_tokens=n, **kw)
    call(n_new)  # warm-up: JIT, kernel tuning, graph capture (the timed calls reuse the bucket and its graphs)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tn, th, gens = timed_pair(T, call, n_new)
    n_tok = sum(len(g.tokens) for g in gens)
    r = {"batch": B, "new_tokens": n_new, "generated": n_tok, "seconds": tn, **decode_split(tn, th, n_new),
         "tokens_per_s": n_tok / tn}
    if dec is not None:
        # the decode phase itself, CUDA events around the step loop (StaticDecoder.last_timing), median of 3 calls:
        # the wall-clock split above subtracts two prefills and swings by +-10% at batch 512 (session 5 logs)
        r["decode_ms_per_step_wall"] = r["decode_ms_per_step"]
        ev = []
        for _ in range(3):
            call(n_new)
            ev.append(dec.last_timing.ms_per_step())
        r["decode_ms_per_step_events"] = ev
        r["decode_ms_per_step"] = sorted(ev)[1]
    if dev.type == "cuda":
        r["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    if dec is not None:
        r["graphs_captured"] = dec.n_captures
        dec.close()
    return r


def write_hf_checkpoint(S, n_layers, path, dev):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=S["vocab_size"], hidden_size=S["embed_dim"], intermediate_size=S["intermediate_dim"],
                      num_hidden_layers=n_layers, num_attention_heads=S["num_heads"],
                      num_key_value_heads=S["num_kv_heads"], max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly (half the memory and time)
    try:
        with torch.device(dev):
            m = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    m.save_pretrained(path, max_shard_size="4GB")
    del m
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def load_hf(path, n_layers, dev, quant):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(dtype=torch.bfloat16, num_hidden_layers=n_layers)
    if quant:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    kw["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    m = AutoModelForCausalLM.from_pretrained(path, **kw)
    m.eval()
    m.generation_config.eos_token_id = None
    return m


def run_hf(args, S, dev, T, m, B, n_new):
    ps = prompts_for(B, args.prompt_len, S["vocab_size"], seed=B)
    P = max(len(p) for p in ps)
    pad = S["vocab_size"] - 1
    ids = torch.full((B, P), pad, dtype=torch.long)
    att = torch.zeros((B, P), dtype=torch.long)
    for i, p in enumerate(ps):
        ids[i, P - len(p):] = torch.tensor(p)
        att[i, P - len(p):] = 1
    ids, att = ids.to(dev), att.to(dev)

    def call(n):
        with torch.no_grad():
            return m.generate(input_ids=ids, attention_mask=att, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                              temperature=0.7, top_p=0.9, pad_token_id=pad)
    call(n_new)  # warm-up at the timed lengths (a 2-token warm-up left later first calls slow: negative slopes)
    tn, th, out = timed_pair(T, call, n_new)
    n_tok = (out.shape[1] - P) * B
    return {"batch": B, "new_tokens": n_new, "generated": n_tok, "seconds": tn, **decode_split(tn, th, n_new),
            "tokens_per_s": n_tok / tn}


def extrapolate(ra, rb, a, b, L=80):
    """Per-step and prefill times at L layers, linear in the layer count; tokens/s for the bench's answer length
    and decode-only (long answers)."""
    def lin(key):
        return ra[key] + (L - a) * (rb[key] - ra[key]) / (b - a)
    d = lin("decode_ms_per_step") / 1e3
    pf = lin("prefill_s")
    B, n = ra["batch"], ra["new_tokens"]
    r = {"batch": B, "decode_ms_per_step": 1e3 * d, "prefill_s": pf, "decode_tokens_per_s": B / d,
         "tokens_per_s": B * n / (pf + (n - 1) * d), "new_tokens": n}
    if "decode_ms_per_step_wall" in ra and "decode_ms_per_step_wall" in rb:  # the wall-clock split, for comparison
        r["decode_ms_per_step_wall"] = lin("decode_ms_per_step_wall")
        r["decode_tokens_per_s_wall"] = B / (r["decode_ms_per_step_wall"] / 1e3)
    return r


def ceiling(dev, T, small):
    if dev.type != "cuda":
        RES["ceiling"] = {"copy_bytes_per_s": 20e9, "matmul_flops_per_s": 200e9, "note": "CPU: nominal"}
        return
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    mm = T.ms(lambda: a @ a, n=10)
    x = torch.empty(GiB, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    cp = T.ms(lambda: y.copy_(x), n=10)
    RES["ceiling"] = {"copy_bytes_per_s": 2 * x.numel() * 2 / (cp / 1e3), "matmul_flops_per_s": 2 * n ** 3 / (mm / 1e3)}
    emit("ceiling", **RES["ceiling"])
    a = x = y = None  # freed (the timed lambdas above hold these names)
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--layers", default=None, help="two layer counts a,b (default 1,4; small: 1,2)")
    ap.add_argument("--batches", default=None, help="default 1,512 (small: 1,4)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None, help="answer length at batch > 1 (default 64)")
    ap.add_argument("--new-tokens-b1", type=int, default=None, help="answer length at batch 1 (default 32)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma list of: today,ours,fused,dequant,ours_fp8,hf")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("kd: error: --device cuda but no CUDA device (use --device cpu --small)")
    small = args.small
    la, lb = [int(v) for v in (args.layers or ("1,2" if small else "1,4")).split(",")]
    batches = [int(v) for v in (args.batches or ("1,4" if small else "1,512")).split(",")]
    args.prompt_len = args.prompt_len or (12 if small else 96)
    n_new = args.new_tokens or (6 if small else 64)
    n_new1 = args.new_tokens_b1 or (6 if small else 32)
    skip = set(filter(None, args.skip.split(",")))
    S = shape_of(small)
    T = Timer(dev)
    RES.update({"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                "shape": S, "layers": [la, lb], "batches": batches, "prompt_len": args.prompt_len})
    try:
        import triton
        RES["triton"] = triton.__version__
    except Exception:
        RES["triton"] = None
    try:
        import bitsandbytes
        RES["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        RES["bitsandbytes"] = None
    t_start = time.perf_counter()
    ceiling(dev, T, small)

    def save():
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "decode_bench.json"), "w") as f:
                json.dump(RES, f, indent=1, default=str)

    runs = {}  # (path, B, layers) -> result
    model = build_teacher(S, lb, dev)
    log(f"[bench] teacher {lb} layers built ({time.perf_counter() - t_start:.0f}s)")
    def gen_runs(model, path):
        """Every batch size at both depths through one engine, failures recorded (the bench goes on)."""
        for B in batches:
            for nl in (la, lb):
                try:
                    r = run_ours(args, S, dev, T, cut(model, nl), B, n_new1 if B == 1 else n_new, path)
                except Exception as e:
                    traceback.print_exc()
                    r = {"batch": B, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                runs[(path, B, nl)] = r
                emit(f"gen {path} B={B} layers={nl}", **r)
                save()

    for path in ["today", "ours", "fused", "dequant"]:
        if path not in skip:
            gen_runs(model, path)
    del model
    gc.collect()
    if "ours_fp8" not in skip:  # issue 12's second decode option: the nf4_fp8 teacher (same weights, FP8 GEMM)
        model = build_teacher(S, lb, dev, precision="nf4_fp8")
        gen_runs(model, "ours_fp8")
        del model
        gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    if "hf" not in skip:
        tmp = tempfile.mkdtemp(prefix="kd_hf_", dir=os.environ.get("KD_BENCH_TMP"))
        try:
            write_hf_checkpoint(S, lb, tmp, dev)
            log(f"[bench] HF checkpoint ({lb} layers) written ({time.perf_counter() - t_start:.0f}s)")
            for nl in (la, lb):
                try:
                    m = load_hf(tmp, nl, dev, quant=True)
                    quant = "bnb nf4"
                except Exception as e:  # CPU without bitsandbytes' 4-bit path: bf16, reported as such
                    log(f"[bench] bitsandbytes NF4 load failed ({type(e).__name__}: {str(e)[:200]}); bf16 instead")
                    m = load_hf(tmp, nl, dev, quant=False)
                    quant = "bf16 (bnb failed)"
                for B in batches:
                    try:
                        r = run_hf(args, S, dev, T, m, B, n_new1 if B == 1 else n_new)
                        r["weights"] = quant
                    except Exception as e:
                        traceback.print_exc()
                        r = {"batch": B, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    runs[("hf", B, nl)] = r
                    emit(f"gen hf B={B} layers={nl}", **r)
                    save()
                del m
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    ext = {}
    for (path, B, nl) in list(runs):
        if nl != la or (path, B, lb) not in runs:
            continue
        ra, rb = runs[(path, B, la)], runs[(path, B, lb)]
        if "error" in ra or "error" in rb:
            continue
        ext[(path, B)] = extrapolate(ra, rb, la, lb)
        emit(f"80 layers {path} B={B}", **ext[(path, B)])
    RES["extrapolated_80_layers"] = {f"{p} B={b}": v for (p, b), v in ext.items()}

    RES["wall_s"] = time.perf_counter() - t_start
    save()

    # ---- table
    log(f"\n## decode, {'tiny' if small else 'Qwen2.5-72B'}-shaped NF4 teacher, extrapolated to 80 layers "
        f"from {la} and {lb} ({RES['device']}, {RES['wall_s']:.0f}s)")
    log("| path | batch | decode ms/step | decode tokens/s | prefill s | tokens/s (answer of N) |")
    log("|---|---|---|---|---|---|")
    names = {"today": "today (eager, dequant + cuBLAS)", "ours": "static_decode, nf4_kernel=auto (graphs)",
             "fused": "static_decode, read-once kernel at every batch", "dequant": "static_decode, dequant + cuBLAS",
             "ours_fp8": "static_decode, nf4_fp8 teacher (graphs, FP8 GEMM)", "hf": "transformers generate + bnb NF4"}
    for path in names:
        for B in batches:
            e = ext.get((path, B))
            if e:
                log(f"| {names[path]} | {B} | {e['decode_ms_per_step']:.1f} | {e['decode_tokens_per_s']:,.1f} | "
                    f"{e['prefill_s']:.2f} | {e['tokens_per_s']:,.1f} (N={e['new_tokens']}) |")
            elif any(k[0] == path and k[1] == B for k in runs):
                err = next((runs[k].get("error") for k in runs if k[0] == path and k[1] == B and "error" in runs[k]),
                           "not run")
                log(f"| {names[path]} | {B} | - | {str(err)[:60]} | | |")
    if not small:
        t1 = ext.get(("ours", 1), {}).get("decode_tokens_per_s")
        t512 = max((ext.get((p, 512), {}).get("decode_tokens_per_s") or 0) for p in ("ours", "fused", "dequant"))
        log(f"targets: batch 1 >= 40 tok/s (an H200's): {t1 and f'{t1:.1f}'}; batch 512 >= 4000 tok/s (an H100's): "
            f"{t512 and f'{t512:,.0f}'} {'MET' if t512 >= 4000 else 'MISSED'}")
    log("DECODE BENCH DONE")


if __name__ == "__main__":
    main()
