"""Batch-512 NF4 decode: can the NF4 -> bf16 dequantisation of the *next* layer's weights run on a few SMs while
this layer's GEMMs run on the rest?

Why this probe: at batch 512 a 72B layer's GEMMs are compute-bound (1.14 ms, bf16 at the chip's ceiling) and its
dequantisation is memory-bound (0.57-0.62 ms); serially they add up. Session 7 dequantised the next projection on a
side stream during the current GEMM and saw no overlap at all (1.784 vs 1.783 ms per layer): cuBLAS's persistent
Hopper GEMM puts one CTA on every SM and takes its whole register file, so the side kernel's blocks wait for it.
Two things could change that, and this probe times them apart:

- an SM carve-out for the GEMMs (``torch._C._set_sm_carveout_experimental``: cuBLASLt's
  ``CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET``), so the GEMM leaves ``c`` SMs free;
- stream priorities: the GEMM stream high, the dequantisation stream low, so that when both have blocks waiting
  the GEMM's are placed first (else a dequantisation launched first can fill the chip).

Pipeline ("ahead"): layer l+1's four weight groups (q/k/v, o, w1/w3, w2) are dequantised on the side stream into
the spare half of a double buffer while layer l's GEMMs read the other half; events order the buffer reuse. Layers
cycle through 3 different weight sets, so a race (a GEMM reading a half not yet or no longer holding its weights)
shows up as a wrong output, checked against the serial result.

    python3 bench/overlap_probe.py --out $OUT          # one H200, ~1 min
    python3 bench/overlap_probe.py --device cpu --small # smoke test of the pipeline logic (torch dequant, no streams)
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

RES = {"rows": []}


def emit(name, **kv):
    kv = {"name": name, **kv}
    RES["rows"].append(kv)
    print(json.dumps(kv), flush=True)


# 72B layer: (group name, member out_features, in_features, has bias)
GROUPS_72B = [("qkv", [8192, 1024, 1024], 8192, True), ("o", [8192], 8192, False),
              ("w13", [29568, 29568], 8192, False), ("w2", [8192], 29568, False)]
GROUPS_SMALL = [("qkv", [128, 64, 64], 256, True), ("o", [128], 128, False), ("w13", [256, 256], 128, False),
                ("w2", [128], 256, False)]


class Probe:
    def __init__(self, dev, groups, n_sets, B, seed=0):
        from torchao.dtypes.nf4tensor import to_nf4

        self.dev, self.groups, self.B = dev, groups, B
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.sets = []  # per weight set: per group: list of NF4 weights
        for _ in range(n_sets):
            ws = []
            for _, ns, K, _ in groups:
                ws.append([to_nf4((torch.randn(n, K, generator=g) * 0.02).to(torch.bfloat16).to(dev), 64, 256)
                           for n in ns])
            self.sets.append(ws)
        self.bias = [(torch.randn(sum(ns), generator=g) * 0.02).to(torch.bfloat16).to(dev) if hb else None
                     for _, ns, _, hb in groups]
        self.x = [(torch.randn(B, K, generator=g)).to(torch.bfloat16).to(dev) for _, _, K, _ in groups]
        # double buffer: two halves, each one bf16 [sum N, K] per group
        self.bufs = [[torch.empty(sum(ns), K, dtype=torch.bfloat16, device=dev) for _, ns, K, _ in groups]
                     for _ in range(2)]
        self.outs = None
        self.cuda = dev.type == "cuda"
        if self.cuda:
            from kd.teacher import nf4_cuda
            from kd.teacher.nf4_decode import decode_scalers

            self.nc = nf4_cuda
            self.kernel = nf4_cuda._compile("kd_nf4_dequant", nf4_cuda.CudaGemvConfig().defines(), dev)
            self.scal = {id(w): decode_scalers(w) for s in self.sets for grp in s for w in grp}
            self.sms = torch.cuda.get_device_properties(dev).multi_processor_count

    # ---- pieces --------------------------------------------------------------------------------------------
    def dequant_group(self, ws, out):
        off = 0
        for w in ws:
            n = w.shape[0]
            dst = out[off:off + n]
            if not self.cuda:
                dst.copy_(w.get_original_weight())
            else:
                n_words = w.shape[0] * w.shape[1] // 8
                self.kernel(grid=(-(-n_words // 1024), 1, 1), block=(256, 1, 1),
                            args=[w.quantized_data, self.scal[id(w)], self.nc._lut(w, False), dst, n_words])
            off += n
        return out

    def gemm_group(self, gi, w):
        return F.linear(self.x[gi], w, self.bias[gi])

    # ---- variants (n_layers layers, layer l uses weight set l % len(sets)) ---------------------------------
    def serial(self, n_layers):
        outs = []
        for layer in range(n_layers):
            ws = self.sets[layer % len(self.sets)]
            for gi in range(len(self.groups)):
                w = self.dequant_group(ws[gi], self.bufs[0][gi])
                outs.append(self.gemm_group(gi, w))
        return outs

    def gemm_only(self, n_layers, carveout=None, blas="cublaslt"):
        outs = []
        with Carveout(carveout, blas):
            for _ in range(n_layers):
                for gi in range(len(self.groups)):
                    outs.append(self.gemm_group(gi, self.bufs[0][gi]))
        return outs

    def dequant_only(self, n_layers):
        for layer in range(n_layers):
            ws = self.sets[layer % len(self.sets)]
            for gi in range(len(self.groups)):
                self.dequant_group(ws[gi], self.bufs[0][gi])

    def ahead(self, n_layers, side, carveout=None, blas="cublaslt"):
        """Layer l's GEMMs on the current stream read half l % 2; layer l+1's weights are dequantised on ``side``
        into half (l+1) % 2 meanwhile, once layer l-1's GEMMs (the last readers of that half) are done."""
        main = torch.cuda.current_stream(self.dev) if self.cuda else None
        ready, free = {}, {}

        def issue(layer):
            half = self.bufs[layer % 2]
            ws = self.sets[layer % len(self.sets)]
            if self.cuda:
                if layer - 2 in free:
                    side.wait_event(free[layer - 2])
                with torch.cuda.stream(side):
                    for gi in range(len(self.groups)):
                        self.dequant_group(ws[gi], half[gi])
                    ready[layer] = torch.cuda.Event()
                    ready[layer].record(side)
            else:
                for gi in range(len(self.groups)):
                    self.dequant_group(ws[gi], half[gi])

        if self.cuda:
            side.wait_stream(main)  # fork (joins a capture too)
        issue(0)
        outs = []
        for layer in range(n_layers):
            if layer + 1 < n_layers:
                issue(layer + 1)
            if self.cuda:
                main.wait_event(ready[layer])
            with Carveout(carveout, blas):
                for gi in range(len(self.groups)):
                    outs.append(self.gemm_group(gi, self.bufs[layer % 2][gi]))
            if self.cuda:
                free[layer] = torch.cuda.Event()
                free[layer].record(main)
        if self.cuda:
            main.wait_stream(side)  # join
        return outs


def Carveout(c, blas="cublaslt"):
    """GEMMs issued inside leave ``c`` SMs free (:func:`kd.teacher.linear_groups.sm_carveout`; None: no carve-out):
    ``blas="cublaslt"`` through PyTorch's cuBLASLt carve-out, ``"cublas"`` through cuBLAS's SM-count target."""
    from contextlib import nullcontext

    if c is None or not torch.cuda.is_available():
        return nullcontext()
    from kd.teacher.linear_groups import sm_carveout

    return sm_carveout(c, blas)


def graph_ms(fn, dev, stream, replays=10, calls=1):
    """ms per call of ``fn``: captured on ``stream`` (its priority goes into the graph's kernels, if CUDA keeps
    it), replayed ``replays`` times, CUDA events around the replays."""
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(dev).wait_stream(stream)
    torch.cuda.synchronize(dev)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize(dev)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(3):
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / (replays * calls))
    del g
    return sorted(ts)[1]


def eager_ms(fn, dev, stream, n=5):
    with torch.cuda.stream(stream):
        fn()
        torch.cuda.synchronize(dev)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
    b.synchronize()
    return a.elapsed_time(b) / n


def relerr(got, ref):
    num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(got, ref))
    den = sum(float(b.float().pow(2).sum()) for b in ref)
    return (num / den) ** 0.5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--carveouts", default="0,8,16,24,32")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("kd: error: --device cuda but no CUDA device (use --device cpu --small)")
    groups = GROUPS_SMALL if args.small else GROUPS_72B
    B = args.batch or (24 if args.small else 512)
    t0 = time.perf_counter()
    with torch.no_grad():
        p = Probe(dev, groups, 3, B)
        L = args.layers
        ref = [o.clone() for o in p.serial(L)]
        if dev.type != "cuda":
            got = p.ahead(L, None)
            err = relerr(got, ref)
            emit("cpu smoke: ahead vs serial", relerr=err, outputs=len(got))
            if err != 0.0:
                sys.exit("kd: error: the pipelined outputs differ from the serial ones")
            print("OVERLAP PROBE CPU SMOKE OK")
            return
        from kd.teacher import nf4_cuda

        if not nf4_cuda.available(dev):
            sys.exit(f"kd: error: {nf4_cuda.why_unavailable(dev)}")
        hi = torch.cuda.Stream(dev, priority=-100)  # highest the device allows
        lo_side = torch.cuda.Stream(dev, priority=0)
        eq_main = torch.cuda.Stream(dev, priority=0)
        emit("streams", hi=hi.priority, lo=lo_side.priority, sms=p.sms,
             device=torch.cuda.get_device_name(dev), torch=torch.__version__)
        rows = {}

        def t(name, fn, stream=hi, check=False):
            try:
                ms = graph_ms(fn, dev, stream) / L
                row = {"per_layer_ms": ms}
                if check:
                    row["relerr_vs_serial"] = relerr(fn(), ref)
                    torch.cuda.synchronize(dev)
                rows[name] = row
                emit(name, **row)
            except Exception as e:  # noqa: BLE001 - a probe records the failure and goes on
                rows[name] = {"error": repr(e)[:300]}
                emit(name, error=repr(e)[:300])

        t("serial", lambda: p.serial(L))
        t("dequant_only", lambda: p.dequant_only(L))
        t("gemm_only cublas", lambda: p.gemm_only(L))
        cs = [int(c) for c in args.carveouts.split(",")]
        for c in cs:  # cuBLAS with cublasSetSmCountTarget (session 9's opt-in, dequant_ahead_blas="cublas")
            if c:
                t(f"gemm_only cublas smtarget carveout={c}", lambda c=c: p.gemm_only(L, c, "cublas"))
        t("ahead c=none equal-priority", lambda: p.ahead(L, lo_side), stream=eq_main, check=True)
        for c in cs:
            t(f"ahead c={c} prio cublas", lambda c=c: p.ahead(L, lo_side, c, blas="cublas"), check=True)
        # cuBLASLt with PyTorch's carve-out (the default). Session 9 (H100) also timed the side kernel
        # as a few resident blocks (2.25 / 2.20 ms at c=16 / 32 vs 1.94 / 2.11 for many short blocks) and c=48
        # (2.20 ms): both dropped
        torch.backends.cuda.preferred_blas_library("cublaslt")
        t("gemm_only cublaslt", lambda: p.gemm_only(L))
        for c in cs:
            if c:
                t(f"gemm_only cublaslt carveout={c}", lambda c=c: p.gemm_only(L, c))
        for c in cs:
            t(f"ahead c={c} prio", lambda c=c: p.ahead(L, lo_side, c), check=True)
        torch.backends.cuda.preferred_blas_library("cublas")
        eager = {}
        for c in (None, 16):
            try:
                eager[str(c)] = eager_ms(lambda c=c: p.ahead(L, lo_side, c), dev, hi) / L
            except Exception as e:  # noqa: BLE001
                eager[str(c)] = repr(e)[:200]
        eager["serial"] = eager_ms(lambda: p.serial(L), dev, hi) / L
        emit("eager (no graph) per-layer ms", **eager)
        ok = [(v["per_layer_ms"], k) for k, v in rows.items() if k.startswith("ahead") and "per_layer_ms" in v
              and v.get("relerr_vs_serial", 1) < 1e-2]
        if ok and "per_layer_ms" in rows["serial"]:
            best = min(ok)
            emit("summary", serial_ms=rows["serial"]["per_layer_ms"], best_ahead=best[1], best_ahead_ms=best[0],
                 saved_per_80_layers_ms=80 * (rows["serial"]["per_layer_ms"] - best[0]))
        else:
            emit("summary", error="no pipelined variant ran correctly")
    RES["wall_s"] = time.perf_counter() - t0
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "overlap_probe.json"), "w") as f:
            json.dump(RES, f, indent=1)
    print("OVERLAP PROBE DONE")


if __name__ == "__main__":
    main()
