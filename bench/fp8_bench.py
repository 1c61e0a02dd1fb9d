"""FP8 teacher benchmark (issue 10): one Qwen2.5-72B decoder layer in bf16 / nf4 / fp8 / nf4_fp8, random weights.

In one run (each part writes its results to $OUT/fp8_bench.json as soon as it is done):
  check    the CPU emulation equals the GPU path on a small layer: FP8 weights and activations bit for bit
           (torchao's and kd's), NF4->FP8 Triton kernel == torch reference bit for bit, per-linear and per-layer
           output differences GPU vs CPU emulation (next to the bf16 layer's own GPU-vs-CPU difference);
  pieces   one 8192x8192->29568 projection: NF4->FP8 dequant vs its memory-bound floor (copy bandwidth measured
           in the same run), activation quantisation, _scaled_mm, the whole FP8 projection; bf16 for scale;
  layer    one 72B layer forward (B x S tokens), median of --iters CUDA-event timings after --warmup calls, eager
           and torch.compile'd, for bf16 | nf4 (kd fast NF4) | fp8 (torchao Float8DynamicActivationFloat8Weight
           PerRow) | fp8_kd (kd RowwiseFP8Linear, torch._scaled_mm) | nf4_fp8 (NF4 storage, Triton NF4->FP8,
           _scaled_mm); bytes of the layer's linears (x80 = the teacher's), compile warm-up of a first layer and of
           a second layer instance of the same shape (projected 80-layer warm-up = first + 79 x second);
  stack    a stack of --stack-layers random 72B layers (same seeded weights for every precision, one layer resident
           at a time) + the final RMSNorm: relative error of each layer's output and of the final hidden states vs
           bf16 (and bf16 vs fp32 for context).

    # on the GPU machine, from the repository root (torch 2.11, torchao 0.15, triton, torchtune importable):
    PYTHONPATH=$PWD python bench/fp8_bench.py                      # everything, 4 x 2048 tokens, ~6-8 min
    PYTHONPATH=$PWD python bench/fp8_bench.py --parts check,pieces,layer --no-compile    # quick look
    # CPU dry run at tiny shapes (logic only, timings meaningless; FP8 runs emulated, no torchao FP8 on CPU):
    PYTHONPATH=$PWD python bench/fp8_bench.py --device cpu --small
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
from _common import call_times_ms, random_init_  # bench/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.teacher import precision as P  # noqa: E402

R: dict = {}
ROWS: list = []
ARGS = None


def log(*a):
    print(*a, flush=True)


def save():
    out = ARGS.out
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "fp8_bench.json").write_text(json.dumps(R, indent=1, default=str) + "\n")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn, dev, iters, warmup):
    """(median, min, max) ms: CUDA events on cuda, perf_counter elsewhere."""
    ts = call_times_ms(fn, dev, iters, warmup)
    return statistics.median(ts), min(ts), max(ts)


def rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()  # the check compares device results with CPU ones
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bf16_ulps(a, b) -> dict:
    """Differences in units of b's bf16 ulp: max and the fraction of elements more than 1 ulp apart."""
    a, b = a.float().cpu(), b.float().cpu()
    ulp = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(1e-30))) - 7)
    d = (a - b).abs() / ulp
    return {"max_ulps": d.max().item(), "frac_gt_1ulp": (d > 1).float().mean().item()}


def bits_equal(a, b) -> float:
    """Fraction of bit-identical elements of two fp8 / float tensors."""
    a, b = a.cpu(), b.cpu()
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return (a == b).float().mean().item()


def row(group, name, text):
    ROWS.append((group, name, text))
    log(f"[{group}] {name}: {text}")


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
def make_layer(dims, dev, seed, dtype=torch.bfloat16):
    """One torchtune Qwen2 decoder layer with seeded random weights (std 0.02, norms 1, q/k/v biases)."""
    from torchtune.models.qwen2._component_builders import qwen2

    with torch.device("meta"):
        m = qwen2(vocab_size=128, num_layers=1, num_heads=dims["heads"], num_kv_heads=dims["kv"],
                  embed_dim=dims["dim"], intermediate_dim=dims["ffn"], max_seq_len=8192, rope_base=1e6)
    layer = m.layers[0]
    random_init_(layer, dev, torch.Generator(device=dev).manual_seed(seed), dtype)
    layer.eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


VARIANTS = {
    # name: (kd.teacher.precision name, fp8 backend)
    "bf16": ("bf16", None),
    "nf4": ("nf4", None),
    "fp8": ("fp8", "torchao"),
    "fp8_kd": ("fp8", "kd"),
    "nf4_fp8": ("nf4_fp8", None),
}


def convert(layer, variant, dev, impl="auto"):
    prec, backend = VARIANTS[variant]
    if backend == "torchao" and dev.type != "cuda":
        raise RuntimeError("torchao FP8 needs CUDA sm_89+ (runs as fp8_kd, emulated, on CPU)")
    return P.quantize_layer_(layer, prec, fp8_backend=backend or "kd", impl=impl)


def layer_input(dims, B, S, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.randn(B, S, dims["dim"], device=dev, dtype=torch.bfloat16, generator=g)


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------
def emulated_copy(base, l_dev, variant):
    """The CPU emulation of ``l_dev``: torchao fp8 -> kd's emulated RowwiseFP8Linear quantised on the CPU from the
    same bf16 weights (the claim under test: same rounding); kd fp8 / nf4_fp8 -> the device layer's own FP8 / NF4
    tensors moved to the CPU (same NF4 codes), run with the emulated GEMM and the torch NF4->FP8 reference."""
    cpu = torch.device("cpu")
    l_emu = copy.deepcopy(base).to(cpu)
    if variant == "fp8":
        convert(l_emu, "fp8_kd", cpu, impl="emulate")
        return l_emu
    dev_mods = dict(l_dev.named_modules())
    for name, m in list(l_emu.named_modules()):
        d = dev_mods.get(name)
        if not isinstance(d, (P.RowwiseFP8Linear, P.NF4FP8Linear)):
            continue
        bias = None if d.bias is None else d.bias.detach().cpu()
        if isinstance(d, P.RowwiseFP8Linear):
            new = P.RowwiseFP8Linear(d.weight_fp8.cpu(), d.weight_scale.cpu(), bias, impl="emulate")
        else:
            new = P.NF4FP8Linear(P.nf4_to_device(d.weight.data, cpu), bias, impl="emulate", dequant_impl="torch")
        parent, _, leaf = name.rpartition(".")
        setattr(l_emu.get_submodule(parent) if parent else l_emu, leaf, new)
    return l_emu


def part_check(dev, dims_small):
    """Emulation (CPU) == GPU path, on a small layer."""
    cpu = torch.device("cpu")
    out = R.setdefault("check", {})
    B, S = 2, 128
    base = make_layer(dims_small, dev, seed=11)
    x = layer_input(dims_small, B, S, dev, seed=12)
    with torch.no_grad():
        # activation quantisation: the compiled CUDA kernel vs the eager CPU formula
        x2 = x.reshape(-1, x.shape[-1]) * 3.0
        q_dev, s_dev = P._act_quant(x2)
        q_cpu, s_cpu = P.quantize_rowwise(x2.cpu())
        out["act_quant_bits_equal"] = bits_equal(q_dev, q_cpu)
        out["act_scale_equal"] = bits_equal(s_dev, s_cpu)
        row("check", "activation quant, compiled (device vs CPU emulation)",
            f"fp8 bits equal {out['act_quant_bits_equal']:.6f}, scales equal {out['act_scale_equal']:.6f}")
        q_e, s_e = P.quantize_rowwise(x2)  # eager on the device
        out["act_quant_eager_bits_equal"] = bits_equal(q_e, q_cpu)
        out["act_scale_eager_equal"] = bits_equal(s_e, s_cpu)
        row("check", "activation quant, eager (device vs CPU emulation)",
            f"fp8 bits equal {out['act_quant_eager_bits_equal']:.6f}, scales equal {out['act_scale_eager_equal']:.6f}")
        if dev.type == "cuda":
            try:
                from torchao.quantization import PerRow
                from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

                xt = Float8Tensor.from_hp(x2, granularity=PerRow())
                out["torchao_act_bits_equal"] = bits_equal(xt.qdata, q_cpu)
                out["torchao_act_scale_equal"] = bits_equal(xt.scale.reshape(-1), s_cpu.reshape(-1))
                row("check", "torchao activation quant vs CPU emulation",
                    f"bits equal {out['torchao_act_bits_equal']:.6f}, scales {out['torchao_act_scale_equal']:.6f}")
            except Exception as e:
                row("check", "torchao activation quant", f"FAILED {type(e).__name__}: {str(e)[:200]}")
        # dense layer: the GPU-vs-CPU difference that has nothing to do with FP8 (attention/norm kernels)
        y_bf = base(x)
        base_cpu = copy.deepcopy(base).to(cpu)
        y_bf_cpu = base_cpu(x.cpu())
        out["bf16_layer_gpu_vs_cpu_rel"] = rel(y_bf, y_bf_cpu)
        row("check", "bf16 layer, device vs CPU (context)", f"rel {out['bf16_layer_gpu_vs_cpu_rel']:.2e}")
        for variant in (("fp8",) if dev.type == "cuda" else ()) + ("fp8_kd", "nf4_fp8"):
            try:
                l_dev = copy.deepcopy(base)
                convert(l_dev, variant, dev)
                l_emu = emulated_copy(base, l_dev, variant)
                r = {}
                # weights bit for bit, linear by linear
                eq, n = [], 0
                for (name, m_dev), (_, m_emu) in zip(l_dev.named_modules(), l_emu.named_modules()):
                    if isinstance(m_emu, P.RowwiseFP8Linear):
                        w = getattr(m_dev, "weight", None)  # torchao: a Float8Tensor parameter
                        wq = w.qdata if hasattr(w, "qdata") else m_dev.weight_fp8
                        ws = w.scale.reshape(-1) if hasattr(w, "qdata") else m_dev.weight_scale
                        eq.append((bits_equal(wq, m_emu.weight_fp8), bits_equal(ws, m_emu.weight_scale)))
                    elif isinstance(m_emu, P.NF4FP8Linear):
                        w8_dev = P.nf4_to_fp8(m_dev.weight, m_dev.weight_inv_scale)  # triton on CUDA
                        w8_ref = P.nf4_to_fp8(m_emu.weight, m_emu.weight_inv_scale, impl="torch")  # CPU reference
                        eq.append((bits_equal(w8_dev, w8_ref), bits_equal(m_dev.weight_scale, m_emu.weight_scale)))
                    else:
                        continue
                    n += 1
                    if n == 1:  # one linear, same input: only the GEMM's accumulation differs
                        xin = x2[:, : m_emu.in_features].contiguous()
                        ya, yb = m_dev(xin), m_emu(xin.cpu())
                        r["linear_rel"] = rel(ya, yb)
                        r.update({f"linear_{k}": v for k, v in bf16_ulps(ya, yb).items()})
                r["weights_bits_equal_min"] = min(e[0] for e in eq)
                r["weight_scales_equal_min"] = min(e[1] for e in eq)
                r["layer_rel_gpu_vs_emulation"] = rel(l_dev(x), l_emu(x.cpu()))
                r["layer_rel_vs_bf16"] = rel(l_dev(x), y_bf)
                out[variant] = r
                row("check", f"{variant} (device) vs CPU emulation",
                    f"weights bit-equal {r['weights_bits_equal_min']:.6f}, scales {r['weight_scales_equal_min']:.6f}; "
                    f"one linear rel {r['linear_rel']:.2e} (max {r['linear_max_ulps']:.1f} bf16 ulps, "
                    f"{100 * r['linear_frac_gt_1ulp']:.3f}% > 1 ulp); layer rel {r['layer_rel_gpu_vs_emulation']:.2e} "
                    f"(bf16 layer's own device-vs-CPU {out['bf16_layer_gpu_vs_cpu_rel']:.2e}); vs bf16 {r['layer_rel_vs_bf16']:.2e}")
                del l_dev, l_emu
            except Exception as e:
                row("check", variant, f"FAILED {type(e).__name__}: {str(e)[:200]}")
                traceback.print_exc()
    ok = all(isinstance(out.get(v), dict) and out[v]["weights_bits_equal_min"] == 1.0
             and out[v]["weight_scales_equal_min"] == 1.0 for v in ("fp8_kd", "nf4_fp8"))
    ok = ok and out.get("act_quant_eager_bits_equal") == 1.0 and out.get("act_scale_eager_equal") == 1.0
    out["emulation_exact"] = ok
    row("check", "VERDICT", "emulation rounding == eager device path bit for bit (weights, scales, activations)" if ok else
        "MISMATCH: see the fractions above")


def part_pieces(dev, dims, T):
    from torchao.dtypes.nf4tensor import to_nf4

    out = R.setdefault("pieces", {})
    D, FF = dims["dim"], dims["ffn"]
    it, wu = ARGS.iters, ARGS.warmup
    W = torch.empty(FF, D, device=dev, dtype=torch.bfloat16).normal_(0, 0.02)
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    flop = 2 * T * D * FF
    with torch.no_grad():
        if dev.type == "cuda":
            big = torch.empty(2 ** 30, device=dev, dtype=torch.bfloat16)
            dst = torch.empty_like(big)
            ms = time_ms(lambda: dst.copy_(big), dev, 10, 3)[0]
            bw = 2 * big.numel() * 2 / (ms * 1e-3)
            del big, dst
        else:
            bw = 20e9
        out["copy_bytes_per_s"] = bw
        row("pieces", "device copy bandwidth (read+write)", f"{bw / 1e12:.2f} TB/s")
        t = time_ms(lambda: x @ W.t(), dev, it, wu)[0]
        out["bf16_projection_ms"] = t
        row("pieces", f"bf16 projection {T}x{D}->{FF}", f"{t:.3f} ms ({flop / t / 1e9:.0f} TFLOP/s)")
        w4 = to_nf4(W, 64, 256)
        s, inv = P.nf4_fp8_scales(w4)
        t = time_ms(lambda: P.nf4_to_fp8(w4, inv), dev, it, wu)[0]
        nbytes = W.numel() * (0.5 + 1.0) + W.numel() / 64 * 2  # packed codes + fp8 out + scalers
        floor = nbytes / bw * 1e3
        out.update(nf4_to_fp8_ms=t, nf4_to_fp8_floor_ms=floor)
        row("pieces", f"NF4->FP8 dequant {FF}x{D}", f"{t:.3f} ms vs memory-bound floor {floor:.3f} ms ({t / floor:.2f}x)")
        from kd.teacher.nf4 import dequantize_nf4

        t2 = time_ms(lambda: dequantize_nf4(w4), dev, it, wu)[0]
        out["nf4_to_bf16_ms"] = t2
        row("pieces", f"NF4->bf16 dequant (kd.teacher.nf4) {FF}x{D}", f"{t2:.3f} ms")
        t = time_ms(lambda: P._act_quant(x), dev, it, wu)[0]
        out["act_quant_ms"] = t
        row("pieces", f"activation quant {T}x{D} (compiled on CUDA)", f"{t:.3f} ms")
        w8 = P.nf4_to_fp8(w4, inv)
        x8, sx = P._act_quant(x)
        if dev.type == "cuda":
            f = lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=s.reshape(1, -1), out_dtype=torch.bfloat16,
                                         use_fast_accum=True)
            t = time_ms(f, dev, it, wu)[0]
            out["scaled_mm_ms"] = t
            row("pieces", "_scaled_mm rowwise alone", f"{t:.3f} ms ({flop / t / 1e9:.0f} TFLOP/s)")
        m = P.NF4FP8Linear(w4, None)
        t = time_ms(lambda: m(x), dev, it, wu)[0]
        out["nf4_fp8_projection_ms"] = t
        row("pieces", "nf4_fp8 projection (dequant + act quant + GEMM)", f"{t:.3f} ms")
        lin = nn.Linear(D, FF, bias=False, device=dev, dtype=torch.bfloat16)
        lin.weight.copy_(W)
        m8 = P.RowwiseFP8Linear.from_linear(lin)
        t = time_ms(lambda: m8(x), dev, it, wu)[0]
        out["fp8_kd_projection_ms"] = t
        row("pieces", "fp8 (kd) projection (act quant + GEMM)", f"{t:.3f} ms")
    W = x = w4 = w8 = x8 = m = m8 = lin = None  # freed (the timed lambdas above hold these names)


def part_layer(dev, dims, B, S):
    import torch._dynamo

    out = R.setdefault("layer", {})
    x = layer_input(dims, B, S, dev)
    n_layers = 80
    with torch.no_grad():
        ref = make_layer(dims, dev, seed=1)
        y_ref = ref(x)
        del ref
        for variant in ARGS.variants.split(","):
            if variant not in VARIANTS:
                row("layer", variant, "unknown variant")
                continue
            r = out.setdefault(variant, {})
            try:
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    m0 = torch.cuda.memory_allocated(dev)
                layer = make_layer(dims, dev, seed=1)
                convert(layer, variant, dev)
                gc.collect()
                lb = P.linear_bytes(layer)
                r["linear_bytes_per_layer"] = lb
                r["teacher_linears_gib_80_layers"] = lb * n_layers / 2 ** 30
                if dev.type == "cuda":
                    r["layer_allocated_gib"] = (torch.cuda.memory_allocated(dev) - m0) / 2 ** 30
                y = layer(x)
                r["rel_err_vs_bf16"] = rel(y, y_ref)
                med, mn, mx = time_ms(lambda: layer(x), dev, ARGS.iters, ARGS.warmup)
                r["eager_ms"] = med
                row("layer", f"{variant} eager", f"{med:.2f} ms (min {mn:.2f}, max {mx:.2f}); linears "
                    f"{lb / 2 ** 20:.2f} MiB/layer = {r['teacher_linears_gib_80_layers']:.1f} GiB for 80 layers; "
                    f"rel err vs bf16 {r['rel_err_vs_bf16']:.2e}")
                if not ARGS.no_compile:
                    torch._dynamo.reset()
                    t0 = time.perf_counter()
                    c = torch.compile(layer)
                    yc = c(x)
                    sync(dev)
                    r["compile_first_layer_s"] = time.perf_counter() - t0
                    med, mn, mx = time_ms(lambda: c(x), dev, ARGS.iters, ARGS.warmup)
                    r["compiled_ms"] = med
                    r["compiled_rel_err_vs_bf16"] = rel(yc, y_ref)
                    # a second layer instance of the same shape (as the teacher's next layer): reuses the graph?
                    layer2 = make_layer(dims, dev, seed=2)
                    convert(layer2, variant, dev)
                    t0 = time.perf_counter()
                    c2 = torch.compile(layer2)
                    c2(x)
                    sync(dev)
                    r["compile_second_layer_s"] = time.perf_counter() - t0
                    # the second call includes one forward: the rest is what a 2nd..80th layer adds to the warm-up
                    r["compile_second_layer_extra_s"] = max(0.0, r["compile_second_layer_s"] - med / 1e3)
                    r["projected_warmup_80_layers_s"] = (r["compile_first_layer_s"]
                                                         + (n_layers - 1) * r["compile_second_layer_extra_s"])
                    row("layer", f"{variant} compiled", f"{med:.2f} ms (min {mn:.2f}, max {mx:.2f}); rel err vs bf16 "
                        f"{r['compiled_rel_err_vs_bf16']:.2e}; compile: first layer {r['compile_first_layer_s']:.1f} s, "
                        f"second {r['compile_second_layer_s']:.2f} s (incl. one forward) -> 80 layers ~{r['projected_warmup_80_layers_s']:.0f} s")
                    del c, c2, layer2, yc
                layer = y = None  # freed (the timed lambdas above hold these names)
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                row("layer", variant, f"FAILED {r['error']}")
                traceback.print_exc()
            save()
    bf = out.get("bf16", {})
    for v, r in out.items():
        if v != "bf16" and isinstance(r, dict) and "eager_ms" in r and "eager_ms" in bf:
            r["eager_vs_bf16_eager"] = r["eager_ms"] / bf["eager_ms"]
            if "compiled_ms" in r:
                r["compiled_vs_bf16_eager"] = r["compiled_ms"] / bf["eager_ms"]
                if "compiled_ms" in bf:
                    r["compiled_vs_bf16_compiled"] = r["compiled_ms"] / bf["compiled_ms"]


def part_stack(dev, dims, B, S):
    from torchtune.modules import RMSNorm

    out = R.setdefault("stack", {})
    L = ARGS.stack_layers
    x0 = layer_input(dims, B, S, dev, seed=3)
    norm = RMSNorm(dims["dim"], eps=1e-6).to(dev)
    hs = {}
    with torch.no_grad():
        names = ["fp32"] + [v for v in ARGS.variants.split(",") if v in VARIANTS]
        for variant in names:
            try:
                h = x0.float() if variant == "fp32" else x0
                per_layer = []
                for i in range(L):
                    layer = make_layer(dims, dev, seed=100 + i)
                    if variant == "fp32":
                        layer.float()
                    else:
                        convert(layer, variant, dev)
                    h = layer(h)
                    per_layer.append(h.float().cpu() if dev.type == "cpu" else h.float())
                    del layer
                hs[variant] = (per_layer, norm(h.float()))
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:
                out[variant] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                row("stack", variant, f"FAILED {out[variant]['error']}")
                traceback.print_exc()
        if "bf16" not in hs:
            return
        ref_layers, ref_final = hs["bf16"]
        for variant, (layers, final) in hs.items():
            if variant == "bf16":
                continue
            r = {"per_layer_rel_err": [rel(a, b) for a, b in zip(layers, ref_layers)],
                 "final_hidden_rel_err": rel(final, ref_final)}
            out[variant] = r
            row("stack", f"{variant} vs bf16, {L} layers",
                f"per layer {' '.join(f'{e:.2e}' for e in r['per_layer_rel_err'])}; final hidden states "
                f"{r['final_hidden_rel_err']:.2e}")
        del hs


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU dry run)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per forward (batch x seq)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--stack-layers", type=int, default=8)
    ap.add_argument("--variants", default="bf16,nf4,fp8,fp8_kd,nf4_fp8")
    ap.add_argument("--parts", default="check,pieces,layer,stack")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ARGS = args = ap.parse_args()
    P.exact_casts_under_compile()  # compiled layers round as the eager path (what the recipe does for FP8 teachers)
    dev = torch.device(args.device)
    dims = dict(dim=8192, ffn=29568, heads=64, kv=8)
    dims_small = dict(dim=1024, ffn=2816, heads=8, kv=2)
    if args.small:
        dims = dict(dim=256, ffn=512, heads=4, kv=2)
        dims_small = dict(dim=256, ffn=512, heads=4, kv=2)  # NF4 needs numel % (64 * 256) == 0
        args.tokens, args.seq, args.iters, args.warmup = min(args.tokens, 128), min(args.seq, 64), 3, 1
        args.stack_layers = min(args.stack_layers, 3)
    if dev.type == "cpu":
        args.no_compile = True if not os.environ.get("KD_BENCH_CPU_COMPILE") else args.no_compile
        if "fp8" in args.variants.split(","):
            args.variants = ",".join(v for v in args.variants.split(",") if v != "fp8")  # torchao FP8 is CUDA-only
    torch.backends.cuda.matmul.allow_tf32 = False
    B, S = args.tokens // args.seq, args.seq
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, argv=sys.argv, dims=dims, tokens=B * S,
               gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               capability=torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None,
               date=time.strftime("%Y-%m-%d %H:%M:%S"))
    for mod in ("torchtune", "torchao", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:
            env[mod] = f"unavailable ({type(e).__name__})"
    try:
        from torchao.utils import _is_fbgemm_gpu_genai_available

        env["fbgemm_gpu_genai"] = bool(_is_fbgemm_gpu_genai_available())  # torchao then quantises with fbgemm
    except Exception:
        env["fbgemm_gpu_genai"] = "unknown"
    env["paths"] = {q: P.resolve_precision(q, dev, torch.bfloat16).describe() for q in ("bf16", "nf4", "fp8", "nf4_fp8")}
    R["env"] = env
    log(f"[env] {json.dumps(env, default=str)}")
    parts = {"check": lambda: part_check(dev, dims_small), "pieces": lambda: part_pieces(dev, dims, B * S),
             "layer": lambda: part_layer(dev, dims, B, S), "stack": lambda: part_stack(dev, dims, B, S)}
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            parts[part]()
        except Exception as e:
            row(part, "FAILED", f"{type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
        R.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
        log(f"[{part}] done in {time.perf_counter() - t0:.0f} s")
        save()
    log(f"\n==== FP8 BENCH ({env['gpu']}, torch {env['torch']}, torchao {env['torchao']}, triton {env['triton']}; "
        f"{B}x{S} tokens, dims {dims}) ====")
    lay = R.get("layer", {})
    if lay:
        log(f"{'variant':<9} | {'eager ms':>9} | {'compiled ms':>11} | {'x bf16 eager':>12} | {'linears GiB/80L':>15} | "
            f"{'rel err':>8} | {'warm-up 80L s':>13}")
        for v, r in lay.items():
            if not isinstance(r, dict) or "eager_ms" not in r:
                continue
            best = min(r["eager_ms"], r.get("compiled_ms", float("inf")))
            bf = lay.get("bf16", {}).get("eager_ms")
            log(f"{v:<9} | {r['eager_ms']:9.2f} | {r.get('compiled_ms', float('nan')):11.2f} | "
                f"{(best / bf if bf else float('nan')):12.2f} | {r['teacher_linears_gib_80_layers']:15.1f} | "
                f"{r['rel_err_vs_bf16']:8.2e} | {r.get('projected_warmup_80_layers_s', float('nan')):13.0f}")
    w0 = max((len(a) for a, _, _ in ROWS), default=1)
    w1 = max((len(b) for _, b, _ in ROWS), default=1)
    for a, b, c in ROWS:
        log(f"{a:<{w0}} | {b:<{w1}} | {c}")
    if args.out:
        log(f"JSON: {Path(args.out) / 'fp8_bench.json'}")


if __name__ == "__main__":
    main()
