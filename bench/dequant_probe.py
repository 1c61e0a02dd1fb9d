"""Variants of the CUDA NF4 -> bf16 dequantisation kernel (the batch-512 decode route's weight pass), at two 72B
shapes, against bf16 copy and fill bandwidth: words per lane (4, 8), plain or streaming (.cs) stores, grid-stride
loops over 4 / 8 / 16 blocks per SM or one block per 256 x words (``gall``), and 16-byte loads per lane (``v4``).
CUDA-graph timed (bench/decode_bench.graph_ms); every variant's output is compared bit for bit with
kd.teacher.nf4_cuda.dequant (``*_MISMATCH`` marks a difference).

Session 7 (bench/logs/dequant_probe_h200_s7_call1.*): ``gall`` was the fastest (w1 0.156 ms against 0.170 with
8 blocks per SM, 3.93 TB/s against 3.62; copy 4.25), so kd.teacher.nf4_cuda now launches one block per 1,024
words. That call also timed a side-stream prefetch of the next projection's weight during the current GEMM
(commit 71dbe31): no overlap (1.784 against 1.783 ms per layer at batch 512), so it was removed.

    python3 bench/dequant_probe.py [--out $OUT]       # one H200: ~30 s
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_bench as db  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RES = {}

# DQ_W words per lane per iteration (each warp instruction 128 contiguous bytes); DQ_CS: streaming (.cs) stores
VARIANT = r"""
#ifndef DQ_W
#define DQ_W 4
#endif
#ifndef DQ_CS
#define DQ_CS 0
#endif
__device__ __forceinline__ void st16(U4* p, u32 a, u32 b, u32 c, u32 d) {
#if DQ_CS
  asm volatile("st.global.cs.v4.u32 [%0], {%1,%2,%3,%4};" :: "l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
#else
  *p = U4{a, b, c, d};
#endif
}
extern "C" __global__ void __launch_bounds__(256)
dq_var(const u32* __restrict__ q, const u16* __restrict__ s, const u32* __restrict__ lut,
       U4* __restrict__ out, int n_words) {
  __shared__ float tab[16];
  if (threadIdx.x < 16) tab[threadIdx.x] = __uint_as_float(lut[threadIdx.x]);
  __syncthreads();
  const long long per_block = 256LL * DQ_W;
  const long long stride = (long long)gridDim.x * per_block;
  for (long long base = (long long)blockIdx.x * per_block + (threadIdx.x & ~31) * DQ_W + (threadIdx.x & 31);
       base < n_words; base += stride) {
    u32 wv[DQ_W];
    float sc[DQ_W];
#pragma unroll
    for (int i = 0; i < DQ_W; ++i) {
      const long long idx = base + 32 * i;
      wv[i] = idx < n_words ? __ldg(q + idx) : 0u;
      sc[i] = idx < n_words ? bf1(s[idx >> 3]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < DQ_W; ++i) {
      const long long idx = base + 32 * i;
      if (idx < n_words) {
        u32 o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const u32 byte = (wv[i] >> (8 * j)) & 0xffu;
          o[j] = pack_bf2(tab[byte >> 4] * sc[i], tab[byte & 15u] * sc[i]);
        }
        st16(out + idx, o[0], o[1], o[2], o[3]);
      }
    }
  }
}
// 16-byte loads: each thread 4 consecutive words (one scaler), 64 contiguous output bytes
extern "C" __global__ void __launch_bounds__(256)
dq_v4(const U4* __restrict__ q, const u16* __restrict__ s, const u32* __restrict__ lut,
      U4* __restrict__ out, int n_quads) {
  __shared__ float tab[16];
  if (threadIdx.x < 16) tab[threadIdx.x] = __uint_as_float(lut[threadIdx.x]);
  __syncthreads();
  for (long long t = (long long)blockIdx.x * 256 + threadIdx.x; t < n_quads; t += (long long)gridDim.x * 256) {
    const U4 v = ld_stream(q + t);
    const float sc = bf1(s[t >> 1]);
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      u32 o[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const u32 byte = (w[i] >> (8 * j)) & 0xffu;
        o[j] = pack_bf2(tab[byte >> 4] * sc, tab[byte & 15u] * sc);
      }
      st16(out + 4 * t + i, o[0], o[1], o[2], o[3]);
    }
  }
}
"""


def emit(name, **kv):
    RES[name] = kv
    print(json.dumps({"name": name, **kv}), flush=True)


def kernels(dev, ms):
    from torchao.dtypes.nf4tensor import to_nf4

    from kd.teacher import nf4_cuda as nc
    from kd.teacher.nf4_decode import decode_scalers

    sm = nc._sm_count(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (N, K) in (("w1", (29568, 8192)), ("q", (8192, 8192))):
        w4 = to_nf4((torch.randn(N, K, device=dev, generator=g) * 0.02).to(torch.bfloat16), 64, 256)
        s = decode_scalers(w4)
        ref = nc.dequant(w4, s)
        out = torch.empty_like(ref)
        n_words = N * K // 8
        nbytes = N * K * 2.5 + s.numel() * 2
        qd = w4.quantized_data
        head = "".join(f"#define {a} {b}\n" for a, b in nc.CudaGemvConfig().defines().items())
        lut = nc._lut(w4, False)
        row = {"N": N, "K": K, "bytes": nbytes}

        def put(key, t, ok=True):
            row[key + "_ms"] = t
            row[key + "_TBps"] = nbytes / t / 1e9
            if not ok:
                row[key + "_MISMATCH"] = True

        put("kd_dequant", ms(lambda: nc.dequant(w4, s, out=out)))
        src = ref.clone()
        row["copy_bf16_ms"] = ms(lambda: out.copy_(src))
        row["copy_bf16_TBps"] = 4 * N * K / row["copy_bf16_ms"] / 1e9
        row["fill_bf16_ms"] = ms(lambda: out.fill_(0))
        row["fill_bf16_TBps"] = 2 * N * K / row["fill_bf16_ms"] / 1e9
        del src
        for W in (4, 8):
            for cs in (0, 1):
                try:
                    src = f"{head}#define DQ_W {W}\n#define DQ_CS {cs}\n" + nc.SOURCE + VARIANT
                    k = torch.cuda._compile_kernel(src, "dq_var")
                except Exception as e:
                    row[f"w{W}_cs{cs}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    continue
                for mult in (4, 8, 16, 0):
                    grid = -(-n_words // (256 * W)) if mult == 0 else min(-(-n_words // (256 * W)), mult * sm)

                    def run(k=k, grid=grid):
                        k(grid=(grid, 1, 1), block=(256, 1, 1), args=[qd, s, lut, out, n_words])
                    out.zero_()
                    run()
                    put(f"w{W}_cs{cs}_g{mult or 'all'}", ms(run), torch.equal(out, ref))
        for cs in (0, 1):
            try:
                k = torch.cuda._compile_kernel(f"{head}#define DQ_CS {cs}\n" + nc.SOURCE + VARIANT, "dq_v4")
            except Exception as e:
                row[f"v4_cs{cs}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            for mult in (8, 16, 0):
                nq = n_words // 4
                grid = -(-nq // 256) if mult == 0 else min(-(-nq // 256), mult * sm)

                def run(k=k, grid=grid):
                    k(grid=(grid, 1, 1), block=(256, 1, 1), args=[qd, s, lut, out, nq])
                out.zero_()
                run()
                put(f"v4_cs{cs}_g{mult or 'all'}", ms(run), torch.equal(out, ref))
        best = min((k for k in row if k.endswith("_ms") and not k.startswith(("copy", "fill"))
                    and not row.get(k[:-3] + "_MISMATCH")), key=lambda k: row[k])
        row["best"] = best[:-3]
        emit(f"dequant {name}", **row)
        del w4, s, ref, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kd: error: bench/dequant_probe.py times CUDA kernels; no CUDA device here")
    dev = torch.device("cuda")
    from kd.teacher import nf4_cuda

    if not nf4_cuda.available(dev):
        sys.exit(f"kd: error: {nf4_cuda.why_unavailable(dev)}")
    t0 = time.perf_counter()
    with torch.no_grad():
        kernels(dev, lambda fn: db.graph_ms(fn, dev, calls=5, replays=10))
    RES["wall_s"] = time.perf_counter() - t0
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "dequant_probe.json"), "w") as f:
            json.dump(RES, f, indent=1)
    print("DEQUANT PROBE DONE")


if __name__ == "__main__":
    main()
