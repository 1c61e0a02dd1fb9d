"""Full-shape KD benchmarks on one GPU: stock torchtune path vs kd's path, same inputs, same run.

Pieces (``--pieces``, comma separated):
  ceiling  big bf16 matmul (8192^3, random data) and a device-to-device copy: the ceilings used below
  nf4      one 29568x8192 projection: dequantisation alone (torchao eager / torchao compiled / kd Triton / kd eager /
           bitsandbytes) and the linear at --tokens tokens (bf16 / torchao linear_nf4 / kd / bnb matmul_4bit)
  layer    one Qwen2.5-72B decoder layer forward, --tokens tokens: bf16 vs torchao NF4 vs kd fast NF4
  head     output projections (V=152,064) + loss, fwd+bwd, --tokens tokens: stock chunked CE+FKL (8 chunks) vs
           kd.losses.distillation.fused_linear_kd_ce; time and extra peak memory
  step     whole KD step: 72B NF4 teacher (80 layers, quantised layer by layer) + 7B LoRA r64 student,
           --batch x --seq tokens: stock (torchao linear_nf4, chunked logits, stock losses) vs kd (fast NF4,
           hidden states only, fused loss; variant syntax kd[:cCHUNK][:acK] = loss chunk_size, activation
           checkpointing on the first K of 28 student layers). Recommended config: kd:c256:ac8.
           Teacher-cache variants (kd.cache.store, same syntax): kdw = kd + drawing K=12 cache samples in the
           fused head and copying them to the host (epoch 1 of teacher_cache.mode=online_then_cache); cache = no
           teacher forward, sparse cached targets [N, 12] (epochs 2+ / mode=use); build = teacher forward +
           sampling only, no student (mode=build). With kd, kdw and cache in one run it prints the 3-epoch cost
           of online_then_cache relative to online every epoch.

Random weights initialised on the GPU, no checkpoint. Run (see docs/benchmarks.md for the device command):
  python bench/kd_step.py --pieces all --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import types

import torch
import torch.nn.functional as F
from _common import call_times_ms  # bench/ is on sys.path when run as a script

GiB = 2 ** 30
DEV = "cuda"
RESULTS: dict = {}
ROWS: list = []  # (piece, variant, metric strings) for the final table


def log(*a):
    print(*a, flush=True)


def import_torchtune():
    """torchtune imports `datasets` at package import; stub it if that import is broken on this machine."""
    try:
        import torchtune  # noqa: F401
        return "ok"
    except Exception as e:  # pragma: no cover
        log(f"torchtune import failed ({type(e).__name__}: {str(e)[:200]}); stubbing `datasets`")
        for k in [k for k in sys.modules if k == "datasets" or k.startswith("datasets.") or k.startswith("torchtune")]:
            del sys.modules[k]
        stub = types.ModuleType("datasets")
        stub.load_dataset = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("datasets stub"))
        stub.Dataset = object
        stub.__getattr__ = lambda name: object
        sys.modules["datasets"] = stub
        import torchtune  # noqa: F401
        return "stubbed datasets"


def time_cuda(fn, n=10, warm=3):
    """Median (and min, max) ms of n calls, timed with CUDA events, after warm-up."""
    ts = call_times_ms(fn, torch.device("cuda"), n, warm)
    return statistics.median(ts), min(ts), max(ts)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def init_(mod):
    with torch.no_grad():
        for _, p in mod.named_parameters(recurse=False):
            if p.dim() == 1:
                p.fill_(1.0) if p.numel() else None
            else:
                p.normal_(0, 0.02)
    if hasattr(mod, "rope_init"):
        mod.rope_init()


def init_module(mod):
    for m in mod.modules():
        init_(m)
    with torch.no_grad():  # q/k/v biases: small, not 1
        for n, p in mod.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    for m in mod.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    mod.to(DEV)


# ------------------------------------------------------------------------------------------------- ceiling
def piece_ceiling(args):
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    med, mn, mx = time_cuda(lambda: a @ b, n=20, warm=5)
    tf = 2 * n ** 3 / (med * 1e-3) / 1e12
    x = torch.empty(2 * GiB // 2, device=DEV, dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    cm, _, _ = time_cuda(lambda: y.copy_(x), n=20, warm=3)
    bw = 2 * x.numel() * 2 / (cm * 1e-3) / 1e12
    RESULTS["ceiling"] = dict(matmul_ms=med, matmul_tflops=tf, copy_tbps=bw)
    ROWS.append(("ceiling", "bf16 matmul 8192^3", f"{tf:.0f} TFLOP/s ({med:.3f} ms)"))
    ROWS.append(("ceiling", "d2d copy 2 GiB", f"{bw:.2f} TB/s read+write"))
    log(f"[ceiling] bf16 matmul {tf:.0f} TFLOP/s; copy {bw:.2f} TB/s")
    a = b = x = y = None  # freed (the timed lambdas above hold these names)
    torch.cuda.empty_cache()


def ceiling_tflops():
    return RESULTS.get("ceiling", {}).get("matmul_tflops", 790.0)


def ceiling_bw():
    return RESULTS.get("ceiling", {}).get("copy_tbps", 4.3)


# ------------------------------------------------------------------------------------------------- nf4
def piece_nf4(args):
    from torchao.dtypes.nf4tensor import linear_nf4, to_nf4

    from kd.teacher import nf4 as knf4
    O, I, T = 29568, 8192, args.tokens
    W = torch.randn(O, I, device=DEV, dtype=torch.bfloat16) * 0.02
    w4 = to_nf4(W)
    ref = w4.get_original_weight()
    out = {}
    d_tri = knf4.dequantize_nf4(w4, impl="triton")
    out["triton_bit_exact"] = bool(torch.equal(d_tri.view(torch.int16), ref.view(torch.int16)))
    d_eag = knf4.dequantize_nf4(w4, impl="torch")
    out["eager_bit_exact"] = bool(torch.equal(d_eag.view(torch.int16), ref.view(torch.int16)))
    del d_tri, d_eag
    ideal = O * I * 2.5 / (ceiling_bw() * 1e12) * 1e3
    deq = {
        "torchao get_original_weight": lambda: w4.get_original_weight(),
        "kd triton": lambda: knf4.dequantize_nf4(w4, impl="triton"),
        "kd eager (CPU fallback math)": lambda: knf4.dequantize_nf4(w4, impl="torch"),
    }
    try:
        comp = torch.compile(lambda: w4.get_original_weight())
        comp()
        deq["torchao under torch.compile"] = comp
    except Exception as e:
        log("[nf4] compile failed", type(e).__name__, str(e)[:200])
    bnbq = None
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
        q, qs = bf.quantize_4bit(W, quant_type="nf4", blocksize=64)
        bnbq = (bnb, q, qs)
        deq["bitsandbytes dequantize_4bit"] = lambda: bf.dequantize_4bit(q, qs, quant_type="nf4")
    except Exception as e:
        log("[nf4] bitsandbytes unavailable", type(e).__name__, str(e)[:200])
    sweep = {}
    for blk, nw in [(1024, 4), (2048, 8), (4096, 8), (8192, 8), (4096, 16), (8192, 16)]:
        sc = knf4.dequantize_scalers(w4)
        sweep[f"{blk}/{nw}"] = time_cuda(lambda: knf4._dequant_triton(w4, sc, blk, nw), n=20, warm=3)[0]
    out["triton_sweep_ms(block/warps, scalers precomputed)"] = sweep
    out["scalers_ms"] = time_cuda(lambda: knf4.dequantize_scalers(w4), n=20, warm=3)[0]
    best = min(sweep, key=sweep.get)
    knf4._TRITON_CFG.update(block=int(best.split("/")[0]), num_warps=int(best.split("/")[1]))
    log(f"[nf4] triton sweep {sweep}, scalers {out['scalers_ms']:.3f} ms -> using {knf4._TRITON_CFG}")
    ROWS.append(("nf4 dequant 29568x8192", f"kd triton kernel alone, best {best}",
                 f"{sweep[best]:.3f} ms (+ scalers {out['scalers_ms']:.3f} ms)"))
    out["dequant_ms"] = {}
    for k, f in deq.items():
        m, _, _ = time_cuda(f, n=20, warm=3)
        out["dequant_ms"][k] = m
        ROWS.append(("nf4 dequant 29568x8192", k, f"{m:.3f} ms ({ideal / m * 100:.0f}% of mem-bound {ideal:.3f} ms)"))
    x = torch.randn(T, I, device=DEV, dtype=torch.bfloat16)
    lin = {
        "bf16 F.linear": lambda: F.linear(x, W),
        "torchao linear_nf4": lambda: linear_nf4(x, w4),
        "kd linear_nf4_fast": lambda: knf4.linear_nf4_fast(x, w4),
    }
    if bnbq is not None:
        bnb, q, qs = bnbq
        lin["bnb matmul_4bit"] = lambda: bnb.matmul_4bit(x, q.t(), quant_state=qs)
    with torch.no_grad():
        y_ref = linear_nf4(x, w4)
        out["kd_vs_linear_nf4_rel"] = rel(knf4.linear_nf4_fast(x, w4), y_ref)
        out["linear_ms"] = {}
        for k, f in lin.items():
            m, _, _ = time_cuda(f, n=10, warm=3)
            out["linear_ms"][k] = m
        base = out["linear_ms"]["bf16 F.linear"]
        for k, m in out["linear_ms"].items():
            tf = 2 * T * O * I / (m * 1e-3) / 1e12
            ROWS.append((f"nf4 linear {T}x8192->29568", k, f"{m:.2f} ms, {m / base:.2f}x bf16, {tf:.0f} TFLOP/s"))
    RESULTS["nf4"] = out
    log(f"[nf4] {json.dumps(out)}")
    W = w4 = ref = x = None  # freed (the timed lambdas above hold these names)
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- layer
def piece_layer(args):
    from torchtune.models.qwen2._component_builders import qwen2

    from kd.teacher import nf4 as knf4
    from kd.train.models import nf4_linears_
    B, S = args.tokens // args.seq, args.seq
    with torch.device("meta"):
        m = qwen2(vocab_size=1024, num_layers=1, num_heads=64, num_kv_heads=8, embed_dim=8192,
                  intermediate_dim=29568, max_seq_len=4096, rope_base=1e6)
    layer = m.layers[0]
    layer.to_empty(device=DEV)
    init_module(layer)
    layer.to(torch.bfloat16).eval()
    nparam = sum(p.numel() for n, p in layer.named_parameters() if p.dim() == 2)
    x = torch.randn(B, S, 8192, device=DEV, dtype=torch.bfloat16)
    flop = 2 * nparam * B * S + 2 * B * S * S * 8192  # matmuls + causal attention (QK^T and AV, halved)
    res = {}
    with torch.no_grad():
        y_bf16 = layer(x)
        res["bf16"] = time_cuda(lambda: layer(x), n=10, warm=3)[0]
        nf4_linears_(layer, fast=False)
        torch.cuda.empty_cache()
        y_stock = layer(x)
        res["torchao NF4 (linear_nf4)"] = time_cuda(lambda: layer(x), n=10, warm=3)[0]
        knf4.set_fast_(layer, True)
        y_fast = layer(x)
        res["kd fast NF4"] = time_cuda(lambda: layer(x), n=10, warm=3)[0]
    errs = dict(fast_vs_stock_nf4=rel(y_fast, y_stock), nf4_vs_bf16=rel(y_stock, y_bf16))
    base = res["bf16"]
    for k, ms in res.items():
        tf = flop / (ms * 1e-3) / 1e12
        ROWS.append((f"72B layer fwd {B}x{S}", k, f"{ms:.2f} ms, {ms / base:.2f}x bf16, {tf:.0f} TFLOP/s "
                                                  f"({tf / ceiling_tflops() * 100:.0f}% of matmul ceiling)"))
    RESULTS["layer"] = dict(ms=res, rel_err=errs, params=nparam, flop=flop)
    log(f"[layer] {json.dumps(RESULTS['layer'])}")
    layer = m = x = None  # freed (the timed lambdas above hold these names)
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- head
def _stock_losses(C):
    from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss
    return CEWithChunkedOutputLoss(num_output_chunks=C), ForwardKLWithChunkedOutputLoss(num_output_chunks=C)


def _fused_available():
    try:
        from kd.losses.distillation import DistillationLoss, fused_linear_kd_ce  # noqa: F401
        return True
    except Exception as e:
        log(f"kd.losses.distillation.fused_linear_kd_ce unavailable: {type(e).__name__}: {str(e)[:200]}")
        return False


def piece_head(args):
    V, Hs, Ht, C, kd_ratio = 152064, 3584, 8192, 8, 0.5
    B, S = args.tokens // args.seq, args.seq
    N = B * S
    g = torch.Generator(device=DEV).manual_seed(1)
    hs0 = torch.randn(B, S, Hs, device=DEV, dtype=torch.bfloat16, generator=g)
    ht = torch.randn(B, S, Ht, device=DEV, dtype=torch.bfloat16, generator=g)
    Ws = torch.randn(V, Hs, device=DEV, dtype=torch.bfloat16, generator=g) * 0.02
    Wt = torch.randn(V, Ht, device=DEV, dtype=torch.bfloat16, generator=g) * 0.02
    labels = torch.randint(0, V, (B, S), device=DEV, generator=g)
    labels[:, :256] = -100
    ce, kd = _stock_losses(C)
    res = {}

    def stock():
        hs = hs0.detach().requires_grad_(True)
        s = [c @ Ws.T for c in hs.chunk(C, dim=1)]
        with torch.no_grad():
            t = [c @ Wt.T for c in ht.chunk(C, dim=1)]
        loss = (1 - kd_ratio) * ce(s, labels) + kd_ratio * kd(s, t, labels)
        loss.backward()
        return loss.detach(), hs.grad

    variants = {"stock chunked CE+FKL (8 chunks)": stock}
    if _fused_available():
        from kd.losses.distillation import DistillationLoss, fused_linear_kd_ce
        dl = DistillationLoss(kind="forward_kl", soft_ce=True)  # torchtune FKL value parity

        def make_fused(cs):
            def fused():
                hs = hs0.detach().requires_grad_(True)
                o = fused_linear_kd_ce(hs.view(N, Hs), Ws, labels.view(N), teacher_hidden=ht.view(N, Ht),
                                       teacher_weight=Wt, kd_ratio=kd_ratio, loss=dl, chunk_size=cs)
                loss = o.loss_sum / o.n_valid.clamp_min(1)
                loss.backward()
                return loss.detach(), hs.grad
            return fused

        for cs in [int(c) for c in args.head_chunks.split(",")]:
            variants[f"kd fused_linear_kd_ce chunk {cs}"] = make_fused(cs)
    outs = {}
    for k, f in variants.items():
        torch.cuda.synchronize(); torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            outs[k] = f()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / GiB
            ms = time_cuda(f, n=args.head_iters, warm=1)[0]
            res[k] = dict(ms=ms, extra_peak_gib=peak, loss=outs[k][0].item())
        except torch.OutOfMemoryError as e:
            res[k] = dict(error=f"OOM {str(e)[:120]}")
    # FLOP: student head fwd + dgrad (2 x 2NVHs) + teacher head fwd (2NVHt)
    flop = 2 * N * V * Hs * 2 + 2 * N * V * Ht
    for k, r in res.items():
        if "ms" in r:
            tf = flop / (r["ms"] * 1e-3) / 1e12
            ROWS.append((f"loss head {N} tok V={V}", k, f"{r['ms']:.1f} ms, extra peak {r['extra_peak_gib']:.2f} GiB, "
                                                        f"{tf:.0f} TFLOP/s, loss {r['loss']:.4f}"))
        else:
            ROWS.append((f"loss head {N} tok V={V}", k, r["error"]))
    if len(outs) >= 2:
        items = list(outs.items())
        l0, g0 = items[0][1]
        for k, (l1, g1) in items[1:]:
            res[k]["loss_rel_diff"] = abs(l1.item() - l0.item()) / abs(l0.item())
            res[k]["grad_rel_err"] = rel(g1, g0)
            ROWS.append((f"loss head {N} tok V={V}", k + " vs stock",
                         f"loss rel diff {res[k]['loss_rel_diff']:.2e}, grad rel err {res[k]['grad_rel_err']:.2e}"))
    # pick the loss chunk for the step: fastest with <= 2 GiB extra peak, else the lowest-memory one
    fused = {k: r for k, r in res.items() if k.startswith("kd fused") and "ms" in r}
    if fused:
        ok = {k: r for k, r in fused.items() if r["extra_peak_gib"] <= 2.0}
        pick = min(ok, key=lambda k: ok[k]["ms"]) if ok else min(fused, key=lambda k: fused[k]["extra_peak_gib"])
        RESULTS["auto_loss_chunk"] = int(pick.rsplit(" ", 1)[1])
    RESULTS["head"] = res
    log(f"[head] {json.dumps(res)}")
    hs0 = ht = Ws = Wt = outs = None  # freed (the timed lambdas above hold these names)
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- step
def build_teacher(fast):
    from torchtune.models.qwen2_5 import qwen2_5_72b_instruct

    from kd.train.models import nf4_linears_
    t0 = time.perf_counter()
    with torch.device("meta"):
        teacher = qwen2_5_72b_instruct()
    for m in [teacher.tok_embeddings, teacher.norm, teacher.output]:
        m.to_empty(device=DEV)
        init_module(m)
        m.to(torch.bfloat16)
    for layer in teacher.layers:
        layer.to_empty(device=DEV)
        init_module(layer)
        layer.to(torch.bfloat16)
        nf4_linears_(layer, fast=fast)
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.cuda.synchronize(); torch.cuda.empty_cache()
    teacher.eval()
    log(f"[step] teacher 80L NF4 built+quantised in {time.perf_counter() - t0:.1f}s, "
        f"mem {torch.cuda.memory_allocated() / GiB:.1f} GiB")
    return teacher


def build_student(rank=64, alpha=128):
    from torchtune.models.qwen2_5 import lora_qwen2_5_7b_instruct
    from torchtune.modules.peft import get_adapter_params, set_trainable_params
    with torch.device("meta"):
        student = lora_qwen2_5_7b_instruct(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
                                           apply_lora_to_mlp=True, apply_lora_to_output=False,
                                           lora_rank=rank, lora_alpha=alpha)
    student.to_empty(device=DEV)
    init_module(student)
    student.to(torch.bfloat16)
    set_trainable_params(student, get_adapter_params(student))
    return student


def count_params(model):
    """(linear params inside layers, output head params, lora params)"""
    lin = lora = 0
    for n, p in model.named_parameters():
        if n.startswith("layers.") and p.dim() == 2:
            if "lora_" in n:
                lora += p.numel()
            else:
                lin += p.numel()
    return lin, model.output.weight.numel(), lora


def piece_step(args):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    teacher = build_teacher(fast=False)
    student = build_student()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, fused=True)
    log(f"[step] student built; resident {torch.cuda.memory_allocated() / GiB:.1f} GiB")
    resident = torch.cuda.memory_allocated() / GiB
    B, S, C, kd_ratio = args.batch, args.seq, 8, 0.5
    N = B * S
    V = 152064
    t_lin, t_head, _ = count_params(teacher)
    s_lin, s_head, s_lora = count_params(student)
    Lt, Ht, Ls, Hs = 80, 8192, 28, 3584
    # FLOP per token: teacher fwd (linears + head + causal attention), student fwd + input-grad bwd of the frozen
    # weights (2x fwd), LoRA adapters fwd + both grads (3x), attention fwd + 2x bwd.
    att_t = 2 * S * Ht * Lt  # causal: (QK^T + AV) * 1/2 = 2*S*d per layer per token
    att_s = 2 * S * Hs * Ls
    # the frozen student weights get no weight-gradient: 3x -> 2x for them
    flop_tok = (2 * (t_lin + t_head) + att_t) + (2 * 2 * (s_lin + s_head) + 3 * att_s) + 3 * 2 * s_lora
    RESULTS["flop_per_token"] = dict(total=flop_tok, teacher_linear=t_lin, teacher_head=t_head, student_linear=s_lin,
                                     student_head=s_head, student_lora=s_lora, attn_teacher=att_t, attn_student=att_s)
    log(f"[step] FLOP/token {flop_tok / 1e9:.1f} G (teacher lin {t_lin / 1e9:.2f}B head {t_head / 1e9:.2f}B; "
        f"student lin {s_lin / 1e9:.2f}B head {s_head / 1e9:.2f}B lora {s_lora / 1e6:.1f}M)")

    g = torch.Generator(device=DEV).manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        tok = torch.randint(0, 151000, (B, S), device=DEV, generator=g)
        lab = tok.clone(); lab[:, :512] = -100
        lab = torch.hstack((lab[:, 1:], torch.full((B, 1), -100, device=DEV)))
        batches.append((tok, lab))

    ce, kdl = _stock_losses(C)
    orig_layers = list(student.layers)
    t_unembed, s_unembed = teacher.unembed, student.unembed

    def configure(kind, ac_layers=0):
        from kd.teacher import nf4 as knf4
        knf4.set_fast_(teacher, kind != "stock")
        for i in range(Ls):
            student.layers[i] = checkpoint_wrapper(orig_layers[i]) if i < ac_layers else orig_layers[i]
        if kind == "stock":
            teacher.unembed, student.unembed = t_unembed, s_unembed
            teacher.set_num_output_chunks(C); student.set_num_output_chunks(C)
        else:  # hidden states only: the fused loss does the output projections chunk by chunk
            teacher.unembed = lambda h: teacher.norm(h)
            student.unembed = lambda h: student.norm(h)

    if _fused_available():
        from kd.losses.distillation import DistillationLoss, fused_linear_kd_ce
        dl = DistillationLoss(kind="forward_kl", soft_ce=True)  # torchtune FKL value parity
    else:
        fused_linear_kd_ce = None

    step_chunk = [1024]

    from kd.losses.sparse import SparseTargets, TeacherSampler, sample_teacher_rows
    Kc = 12
    cache_t = []
    for _ in batches:  # cached targets: K slots of weight 1/K (the worst case: all draws distinct)
        cache_t.append(SparseTargets(torch.randint(0, V, (N, Kc), device=DEV, generator=g),
                                     torch.full((N, Kc), 1.0 / Kc, device=DEV),
                                     torch.randint(0, V, (N,), device=DEV, generator=g), torch.rand(N, device=DEV)))
    seeds = torch.arange(N, device=DEV, dtype=torch.int64) * 0x5851F42D4C957F2D

    def step(kind, tok, lab, parts, bi=0):
        e = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
        e[0].record()
        tout = None
        if kind != "cache":
            with torch.no_grad():
                tout = teacher(tok)
        e[1].record()
        if kind == "build":  # teacher-only pass: draw the cache samples from the answer rows' logits
            with torch.no_grad():
                h = tout.view(N, Ht)
                rows = torch.nonzero(lab.view(N) != -100).squeeze(1)
                for c0 in range(0, rows.numel(), step_chunk[0]):
                    r = rows[c0:c0 + step_chunk[0]]
                    out = sample_teacher_rows(F.linear(h[r], teacher.output.weight), seeds[r], Kc, 1.0, "random")
                    [x.to("cpu", non_blocking=True) for x in out if x.numel()]
            for i in range(1, 4):
                e[i + 1].record()
            e[4].synchronize()
            parts.append([e[i].elapsed_time(e[i + 1]) for i in range(4)])
            return torch.zeros(())
        sout = student(tok)
        e[2].record()
        if kind in ("kdw", "cache"):
            extra = dict(teacher_sampler=TeacherSampler(Kc, 1.0, "random", seeds)) if kind == "kdw" else \
                dict(teacher_sparse=cache_t[bi])
            o = fused_linear_kd_ce(sout.view(N, Hs), student.output.weight, lab.view(N),
                                   teacher_hidden=None if tout is None else tout.view(N, Ht),
                                   teacher_weight=None if tout is None else teacher.output.weight,
                                   kd_ratio=kd_ratio, loss=DistillationLoss(kind="forward_kl"),
                                   chunk_size=step_chunk[0], **extra)
            if o.samples is not None:  # what the recipe's CacheWriter does on the main thread
                [x.to("cpu", non_blocking=True) for x in o.samples if x.numel()]
            loss = o.loss_sum / o.n_valid.clamp_min(1)
        elif kind == "stock":
            loss = (1 - kd_ratio) * ce(sout, lab) + kd_ratio * kdl(sout, tout, lab)
        elif fused_linear_kd_ce is not None:
            o = fused_linear_kd_ce(sout.view(N, Hs), student.output.weight, lab.view(N),
                                   teacher_hidden=tout.view(N, Ht), teacher_weight=teacher.output.weight,
                                   kd_ratio=kd_ratio, loss=dl, chunk_size=step_chunk[0])
            loss = o.loss_sum / o.n_valid.clamp_min(1)
        else:  # fused loss not there yet: stock losses on chunked logits computed from the hidden states
            sl = [student.output(c) for c in sout.chunk(C, dim=1)]
            with torch.no_grad():
                tl_ = [teacher.output(c) for c in tout.chunk(C, dim=1)]
            loss = (1 - kd_ratio) * ce(sl, lab) + kd_ratio * kdl(sl, tl_, lab)
        e[3].record()
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        e[4].record()
        e[4].synchronize()
        parts.append([e[i].elapsed_time(e[i + 1]) for i in range(4)])
        return loss.detach()

    default_chunk = RESULTS.get("auto_loss_chunk", 1024) if args.loss_chunk == "auto" else int(args.loss_chunk)
    variants = []
    for v in args.variants.split(","):
        f = v.split(":")
        ac = next((int(x[2:]) for x in f[1:] if x.startswith("ac")), 0)
        cs = next((int(x[1:]) for x in f[1:] if x.startswith("c")), default_chunk)
        variants.append((f[0], ac, cs))
    res = {}
    for kind, ac, cs in variants:
        name = kind + (f" loss-chunk {cs}" if kind != "stock" else "") + (f" +AC {ac}/{Ls}" if ac else "")
        if name in res:
            name += " (repeat)"
        configure(kind, ac)
        step_chunk[0] = cs
        torch.cuda.synchronize(); torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        parts, losses = [], []
        try:
            for i, (tok, lab) in enumerate(batches):
                if i == args.warmup:
                    parts.clear()
                    torch.cuda.synchronize(); t0 = time.perf_counter()
                losses.append(step(kind, tok, lab, parts, i))
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / args.steps
            peak = torch.cuda.max_memory_allocated() / GiB
            p = [statistics.mean(x[i] for x in parts) for i in range(4)]
            tps = N / dt
            tf = flop_tok * tps / 1e12
            res[name] = dict(step_ms=dt * 1e3, tok_s=tps, tflops=tf, pct_ceiling=tf / ceiling_tflops() * 100,
                             peak_gib=peak, teacher_fwd_ms=p[0], student_fwd_ms=p[1], loss_ms=p[2],
                             bwd_opt_ms=p[3], first_loss=losses[0].item(), last_loss=losses[-1].item())
            log(f"[step] {name}: {json.dumps(res[name])}")
        except torch.OutOfMemoryError as e:
            res[name] = dict(error=f"OOM: {str(e)[:160]}")
            log(f"[step] {name}: OOM")
        for l_ in losses:
            del l_
        torch.cuda.empty_cache()
    base = res.get("stock", {}).get("tok_s")
    for name, r in res.items():
        if "error" in r:
            ROWS.append((f"KD step {B}x{S}", name, r["error"][:100]))
            continue
        sp = f", {r['tok_s'] / base:.2f}x stock" if base else ""
        ROWS.append((f"KD step {B}x{S}", name,
                     f"{r['tok_s']:.0f} tok/s{sp}, {r['step_ms']:.0f} ms, {r['tflops']:.0f} TFLOP/s "
                     f"({r['pct_ceiling']:.0f}% of matmul), peak {r['peak_gib']:.1f} GiB "
                     f"({r['peak_gib'] * GiB / 1e9:.1f} GB); teacher {r['teacher_fwd_ms']:.0f} | student fwd "
                     f"{r['student_fwd_ms']:.0f} | loss fwd {r['loss_ms']:.0f} | bwd+opt {r['bwd_opt_ms']:.0f} ms"))
    RESULTS["step"] = dict(resident_gib=resident, batch=B, seq=S, results=res)
    # teacher cache: 3-epoch job cost relative to online KD every epoch (same chunk / AC for all three)
    by_kind = {}
    for (kind, ac, cs) in variants:
        for name, r in res.items():
            if name.startswith(kind + " ") or name == kind:
                by_kind.setdefault(kind, r)
    if all(k in by_kind and "error" not in by_kind[k] for k in ("kd", "kdw", "cache")):
        kd_ms, w_ms, c_ms = (by_kind[k]["step_ms"] for k in ("kd", "kdw", "cache"))
        cache = dict(write_overhead_pct=(w_ms / kd_ms - 1) * 100, cache_step_vs_online=c_ms / kd_ms,
                     three_epochs_online_then_cache_vs_online=(w_ms + 2 * c_ms) / (3 * kd_ms))
        if "build" in by_kind and "error" not in by_kind["build"]:
            cache["three_epochs_build_then_use_vs_online"] = (by_kind["build"]["step_ms"] + 3 * c_ms) / (3 * kd_ms)
        RESULTS["teacher_cache"] = cache
        ROWS.append(("teacher cache", "3 epochs vs online every epoch",
                     ", ".join(f"{k} {v:.3f}" for k, v in cache.items())))
        log(f"[step] teacher cache: {json.dumps(cache)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pieces", default="all")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--head-iters", type=int, default=5)
    ap.add_argument("--variants", default="stock,kd:c1024,kd:c256:ac8",
                    help="step variants: stock | kd[:acK][:cC] (K student layers checkpointed, loss chunk C)")
    ap.add_argument("--head-chunks", default="256,512,1024,2048")
    ap.add_argument("--loss-chunk", default="auto", help="fused loss chunk_size in the step (auto: from head)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    pieces = ["ceiling", "nf4", "layer", "head", "step"] if args.pieces == "all" else args.pieces.split(",")
    if "ceiling" not in pieces:
        pieces = ["ceiling"] + pieces
    RESULTS["env"] = env = dict(torch=torch.__version__, cuda=torch.version.cuda,
                                gpu=torch.cuda.get_device_name(0), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                                argv=sys.argv, torchtune_import=import_torchtune())
    for mod in ["torchtune", "torchao", "triton", "bitsandbytes"]:
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:
            env[mod] = f"unavailable ({type(e).__name__})"
    log(f"[env] {json.dumps(env)}")
    torch.manual_seed(0)
    for p in pieces:
        t0 = time.perf_counter()
        try:
            globals()[f"piece_{p}"](args)
        except Exception as e:
            log(f"[{p}] FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
            RESULTS[p + "_error"] = f"{type(e).__name__}: {str(e)[:500]}"
            ROWS.append((p, "FAILED", f"{type(e).__name__}: {str(e)[:120]}"))
        torch.cuda.empty_cache()
        log(f"[{p}] done in {time.perf_counter() - t0:.0f}s")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    log("\n==== SUMMARY (" + env["gpu"] + f", torch {env['torch']}, torchao {env['torchao']}, "
        f"torchtune {env['torchtune']}, triton {env['triton']}, bnb {env['bitsandbytes']}) ====")
    w0 = max(len(r[0]) for r in ROWS); w1 = max(len(r[1]) for r in ROWS)
    for a, b, c in ROWS:
        log(f"{a:<{w0}} | {b:<{w1}} | {c}")


if __name__ == "__main__":
    main()
