"""CUDA C++ NF4 kernels compiled at run time with NVRTC (``torch.cuda._compile_kernel``): no build step, no extra
package (NVRTC ships with PyTorch's CUDA wheels, also the aarch64 CUDA 13 builds the DGX Spark runs).

Why CUDA and not Triton: at 4 bits every weight needs a code-book look-up, and Triton can only gather it through L1
(``tl.load(table + code)``), and at one row that look-up, not the bytes, sets the time. Here the code book lives in
shared memory, laid out for the look-ups: at batch 1 this GEMV reads a 72B layer about twice as fast as bitsandbytes'
``gemv_4bit`` and 3x as fast as kd's read-once Triton kernel (docs/offline.md, "Decode routes").

Kernels (``CudaGemvConfig.kind``; the fastest is timed once per weight shape, :func:`tune`):

- ``mma`` (``M <= 8`` rows of x, tensor cores): a block owns 16 weight rows, its warps split K. For one
  ``mma.m16n8k16`` the four lanes of a quad supply a row's 16 "k" values as two bf16 pairs each; every pair is ONE
  shared-memory read from a 256-entry table indexed by the packed byte (both nibbles' codes, even column in the low
  half), replicated 32 times so that lane ``l`` reads its own bank (32 KB, conflict-free). The k order inside an MMA
  is chosen so that each MMA stays inside one 64-weight scaler block: the block's 4 MMAs are scaled once per row.
  x rows are the MMA's N: up to 8 rows cost the same as one.
- ``mma_a``: the same MMAs, with each warp's weight tile and scalers staged through shared memory by 16-byte
  ``cp.async`` copies ``stages`` steps deep (loads in flight without holding registers); K % 128 == 0.
- ``lut16`` (one row): 16 fp32 codes in 16 banks (conflict-free for any look-up pattern), one FMA per weight,
  KD_R rows per block; the fastest for the small k/v projections (N = 1024).

All three multiply a 64-weight block's products by its scaler once, so they equal dequantise + matmul up to the
bf16 rounding of the weights, not bit for bit (one-hot inputs DO return torchao's dequantised columns bit for bit:
tests/test_nf4_cuda.py). The linear's bias is added in the kernel before the one rounding to bf16.

- :func:`dequant` (large M: the bf16 weight for cuBLAS): bit-identical to torchao's ``get_original_weight()``
  (bf16 code x bf16 scaler is exact in fp32, rounded once with ``cvt.rn``); 4-byte reads and 16-byte writes per lane,
  contiguous per warp. At M = 512 with cuBLAS: 1.81 ms per 72B layer against 2.02 for kd's Triton dequantisation
  (which also recomputes the double-quantised scalers per call) and 1.23 for bf16 cuBLAS alone.

Everything here needs CUDA; :func:`why_unavailable` says whether NVRTC built the kernels on this device (and why not);
``kd.generate.nf4_matmul`` uses its Triton kernel and kd.teacher.nf4's dequantisation where it did not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

__all__ = ["available", "why_unavailable", "CudaGemvConfig", "gemv", "dequant", "dequant_fp8", "fp8_available",
           "fp8_from_packed", "gemv_candidates", "tune",
           "SOURCE"]

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
struct alignas(16) U4 { u32 x, y, z, w; };
struct alignas(8) U2 { u32 x, y; };

__device__ __forceinline__ float bf_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ float bf1(u16 v) { return __uint_as_float(((u32)v) << 16); }
// two fp32 -> packed bf16x2 (round to nearest even): lo in bits 0-15
__device__ __forceinline__ u32 pack_bf2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ u16 to_bf(float v) { return (u16)(pack_bf2(v, 0.f) & 0xffffu); }
// the weights are read once. KD_LD picks the load's cache hints (a tuning choice): 0 streams past L1, 1 is the
// read-only path, 2 adds an L2 prefetch of the surrounding 256 bytes to 0, 3 the evict-first (.cs) load
#ifndef KD_LD
#define KD_LD 0
#endif
#if KD_LD == 0
#define KD_LDOP "ld.global.nc.L1::no_allocate"
#elif KD_LD == 1
#define KD_LDOP "ld.global.nc"
#elif KD_LD == 2
#define KD_LDOP "ld.global.nc.L1::no_allocate.L2::256B"
#else
#define KD_LDOP "ld.global.cs"
#endif
__device__ __forceinline__ U4 ld_stream(const U4* p) {
  U4 r;
  asm volatile(KD_LDOP ".v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ void ld_stream2(const unsigned char* p, u32& a, u32& b) {
  asm volatile(KD_LDOP ".v2.u32 {%0,%1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ u32 lds(u32 addr) {
  u32 v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void cp_async8(u32 dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(u32 dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
// D += A (16x16 bf16, row) * B (16x8 bf16, col), fp32 accumulators (sm_80+)
__device__ __forceinline__ void mma_bf16(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// the pair-table entry of byte `sel` of word w for this lane: (byte << 7) + tb, one PRMT and one LEA
#define KD_ENTRY(w, sel) (lds((__byte_perm((w), 0, (sel)) << 7) + tb))

// ---- lut16: one row of x, y[n] = sum_c scaler[n, c/2] * sum_{k in chunk c} x[k] * code[q[n, k]] ----------------
// q: [N, K/32] 16-byte chunks (torchao packing: byte b of a row holds column 2b in its high nibble, 2b+1 low).
// A block of KD_W warps owns KD_R rows; every lane one 16-byte chunk of each row at a time.
extern "C" __global__ void __launch_bounds__(KD_W * 32)
kd_nf4_gemv(const U4* __restrict__ q, const u16* __restrict__ s, const u32* __restrict__ lut,
            const U4* __restrict__ x, u16* __restrict__ y, int N, int K, const u16* __restrict__ bias, int has_bias) {
  constexpr int T = KD_W * 32;
  __shared__ float tab[16];  // 16 words in 16 banks: conflict-free for any 32 look-ups
  __shared__ float red[KD_W][KD_R];
  if (threadIdx.x < 16) tab[threadIdx.x] = __uint_as_float(lut[threadIdx.x]);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int C = K >> 5, nblk = K >> 6;
  const int n0 = blockIdx.x * KD_R;
  float acc[KD_R];
#pragma unroll
  for (int r = 0; r < KD_R; ++r) acc[r] = 0.f;
  for (int c = threadIdx.x; c < C; c += T) {
    U4 w[KD_R];
#pragma unroll
    for (int r = 0; r < KD_R; ++r) w[r] = ld_stream(q + (u64)min(n0 + r, N - 1) * C + c);
    float xf[32];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const U4 xv = x[c * 4 + i];
      const u32 a[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) { xf[8 * i + 2 * j] = bf_lo(a[j]); xf[8 * i + 2 * j + 1] = bf_hi(a[j]); }
    }
#pragma unroll
    for (int r = 0; r < KD_R; ++r) {
      const u32 b[4] = {w[r].x, w[r].y, w[r].z, w[r].w};
      float d0 = 0.f, d1 = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const u32 byte = (b[i] >> (8 * j)) & 0xffu;  // memory byte 4i+j: columns 8i+2j (high), 8i+2j+1 (low)
          d0 = fmaf(tab[byte >> 4], xf[8 * i + 2 * j], d0);
          d1 = fmaf(tab[byte & 15u], xf[8 * i + 2 * j + 1], d1);
        }
      }
      acc[r] = fmaf(bf1(s[(u64)min(n0 + r, N - 1) * nblk + (c >> 1)]), d0 + d1, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < KD_R; ++r) {
    float v = acc[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) red[warp][r] = v;
  }
  __syncthreads();
  const int n = n0 + threadIdx.x;
  if (threadIdx.x < KD_R && n < N) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < KD_W; ++w) v += red[w][threadIdx.x];
    if (has_bias) v += bf1(bias[n]);  // the linear's bias, before the one rounding to bf16
    y[n] = to_bf(v);
  }
}

// ---- mma: Y[m, n] = sum_b scaler[n, b] * sum_{k in block b} X[m, k] * code[q[n, k]], M <= 8, tensor cores ------
// A block owns 16 weight rows (the MMA's M); its KD_W warps split the K blocks (64 weights = 32 bytes each).
// In one MMA the four lanes of a quad (i = lane % 4) supply the 16 "k" of a row: lane i's two registers per row are
// the pair-table entries of bytes 8i+2m and 8i+2m+1 of the current 32-byte block (mma m = 0..3), i.e. real columns
// 16i+4m .. 16i+4m+3; the B registers hold X at exactly those columns (X row = lane / 4, the MMA's N). Every MMA
// therefore stays inside one scaler block, and the block's four MMAs are scaled once per row.
// The pair table: byte e's two codes as bf16 (high nibble = even column in the low half), replicated 32 times so
// lane l reads entry e at e * 32 + l, in its own bank (32 KB, conflict-free).
__device__ __forceinline__ void kd_block_mma(float (&acc)[4], const u32 (&w)[4], const u32* xl, int b, float sa,
                                             float sb, u32 tb) {
  const U4 x0 = *(const U4*)(xl + 32 * b), x1 = *(const U4*)(xl + 32 * b + 4);
  const u32 xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
  float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const u32 wa = w[m >> 1], wb = w[2 + (m >> 1)];
    const int j = 2 * (m & 1);
    const u32 a0 = KD_ENTRY(wa, 0x4440 + j);  // row g, byte 2m
    const u32 a1 = KD_ENTRY(wb, 0x4440 + j);  // row g+8, byte 2m
    const u32 a2 = KD_ENTRY(wa, 0x4441 + j);  // row g, byte 2m+1
    const u32 a3 = KD_ENTRY(wb, 0x4441 + j);  // row g+8, byte 2m+1
    mma_bf16(d, a0, a1, a2, a3, xv[2 * m], xv[2 * m + 1]);
  }
  acc[0] = fmaf(sa, d[0], acc[0]);
  acc[1] = fmaf(sa, d[1], acc[1]);
  acc[2] = fmaf(sb, d[2], acc[2]);
  acc[3] = fmaf(sb, d[3], acc[3]);
}

// D fragment: lane (g, i) holds rows g (acc 0, 1) and g+8 (acc 2, 3), X rows 2i and 2i+1; reduce over the warps
__device__ __forceinline__ void kd_mma_write(const float (&acc)[4], float* red, int g, int i, int warp, int N, int M,
                                             u16* y, const u16* bias, int has_bias) {
  float* rw = red + warp * 128;
  rw[(2 * i) * 16 + g] = acc[0];
  rw[(2 * i + 1) * 16 + g] = acc[1];
  rw[(2 * i) * 16 + g + 8] = acc[2];
  rw[(2 * i + 1) * 16 + g + 8] = acc[3];
  __syncthreads();
  if (threadIdx.x < 128) {
    const int col = threadIdx.x >> 4, r = threadIdx.x & 15, n = blockIdx.x * 16 + r;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < KD_W; ++w) v += red[w * 128 + threadIdx.x];
    if (col < M && n < N) {
      if (has_bias) v += bf1(bias[n]);
      y[(u64)col * N + n] = to_bf(v);
    }
  }
}

extern "C" __global__ void __launch_bounds__(KD_W * 32)
kd_nf4_gemv_mma(const unsigned char* __restrict__ q, const u16* __restrict__ s, const u32* __restrict__ lut,
                const u32* __restrict__ x, u16* __restrict__ y, int N, int K, int M,
                const u16* __restrict__ bias, int has_bias) {
  __shared__ u32 tab[256 * 32];
  __shared__ float red[KD_W * 128];
  for (int t = threadIdx.x; t < 256 * 32; t += KD_W * 32) tab[t] = lut[t >> 5];
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, i = lane & 3;
  const int nblk = K >> 6;
  const int ra = min(blockIdx.x * 16 + g, N - 1), rb = min(blockIdx.x * 16 + g + 8, N - 1);
  const unsigned char* qa = q + (u64)ra * (K >> 1) + 8 * i;
  const unsigned char* qb = q + (u64)rb * (K >> 1) + 8 * i;
  const u16* sa = s + (u64)ra * nblk;
  const u16* sb = s + (u64)rb * nblk;
  const u32* xl = x + (u64)min(g, M - 1) * (K >> 1) + 8 * i;  // X as bf16 pairs (words); block b at word 32 b
  const u32 tb = smem_addr(tab) + 4 * lane;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int b0 = warp * KD_U; b0 < nblk; b0 += KD_W * KD_U) {
    u32 w[KD_U][4];
    float sc[KD_U][2];
#pragma unroll
    for (int u = 0; u < KD_U; ++u) {  // every load of the step issued before any use
      const int b = min(b0 + u, nblk - 1);  // a tail step re-reads the last block and is scaled by 0
      ld_stream2(qa + 32 * b, w[u][0], w[u][1]);
      ld_stream2(qb + 32 * b, w[u][2], w[u][3]);
      const bool ok = b0 + u < nblk;
      sc[u][0] = ok ? bf1(sa[b]) : 0.f;
      sc[u][1] = ok ? bf1(sb[b]) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < KD_U; ++u) kd_block_mma(acc, w[u], xl, min(b0 + u, nblk - 1), sc[u][0], sc[u][1], tb);
  }
  kd_mma_write(acc, red, g, i, warp, N, M, y, bias, has_bias);
}

// ---- mma_a: kd_nf4_gemv_mma with each warp's weight tile (16 rows x KD_U blocks) and its scalers staged through
// shared memory by 16-byte cp.async copies (L2 -> shared, no registers held), KD_S steps deep (KD_S - 1 in flight
// while one is multiplied). The copy layout (lane = consecutive 16-byte chunks) differs from the MMA layout (lane =
// 8 bytes of one row per block), so a warp barrier follows each wait; rows are padded by 32 bytes so that the
// MMA-layout reads (LDS.64) are free of bank conflicts. Needs K % 128 == 0 and an even KD_U.
// Dynamic shared memory: the 32 KB pair table, KD_W * 512 B of reduction, KD_W * KD_S stages of KD_STAGE bytes.
#define KD_RS (KD_U * 32 + 32)
#define KD_STAGE (16 * KD_RS + 32 * KD_U)
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}
extern "C" __global__ void __launch_bounds__(KD_W * 32)
kd_nf4_gemv_mma_a(const unsigned char* __restrict__ q, const u16* __restrict__ s, const u32* __restrict__ lut,
                  const u32* __restrict__ x, u16* __restrict__ y, int N, int K, int M,
                  const u16* __restrict__ bias, int has_bias) {
  extern __shared__ __align__(16) unsigned char dsm[];
  u32* tab = (u32*)dsm;
  float* red = (float*)(dsm + 32768);
  unsigned char* stg = dsm + 32768 + KD_W * 512;
  for (int t = threadIdx.x; t < 256 * 32; t += KD_W * 32) tab[t] = lut[t >> 5];
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, i = lane & 3;
  const int nblk = K >> 6, row0 = blockIdx.x * 16;
  const u32* xl = x + (u64)min(g, M - 1) * (K >> 1) + 8 * i;
  const u32 tb = smem_addr(tab) + 4 * lane;
  unsigned char* mine = stg + warp * KD_S * KD_STAGE;
  const u32 mine_s = smem_addr(mine);
  constexpr int STEP = KD_W * KD_U, CPR = 2 * KD_U;  // 16-byte chunks per row and step
  const int nit = warp * KD_U < nblk ? (nblk - warp * KD_U + STEP - 1) / STEP : 0;
  auto issue = [&](int t) {
    if (t < nit) {
      const int b0 = warp * KD_U + t * STEP;
      const u32 sl = mine_s + (t % KD_S) * KD_STAGE;
#pragma unroll
      for (int k = 0; k < KD_U; ++k) {  // 16 rows x CPR chunks = 32 * KD_U: KD_U per lane, consecutive lanes
        const int c = lane + 32 * k, r = c / CPR, cc = c % CPR;
        const int b = min(b0 + (cc >> 1), nblk - 1);
        cp_async16(sl + r * KD_RS + cc * 16, q + (u64)min(row0 + r, N - 1) * (K >> 1) + 32 * b + 16 * (cc & 1));
      }
#pragma unroll
      for (int k = 0; k < (8 * KD_U + 31) / 32; ++k) {  // 16 rows x KD_U/2 scaler pairs
        const int wi = lane + 32 * k;
        if (wi < 8 * KD_U) {
          const int r = wi / (KD_U / 2), v = wi % (KD_U / 2);
          const int b = min(b0 + 2 * v, nblk - 2);
          cp_async4(sl + 16 * KD_RS + wi * 4, s + (u64)min(row0 + r, N - 1) * nblk + b);
        }
      }
    }
    cp_commit();  // one group per step, empty past the end: the wait counts stay aligned
  };
#pragma unroll
  for (int t = 0; t < KD_S - 1; ++t) issue(t);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int t = 0; t < nit; ++t) {
    cp_wait<KD_S - 2>();  // this lane's copies of step t have landed
    __syncwarp();         // ... and every other lane's
    const unsigned char* sl = mine + (t % KD_S) * KD_STAGE;
    const u16* ss = (const u16*)(sl + 16 * KD_RS);
    const int b0 = warp * KD_U + t * STEP;
    u32 w[KD_U][4];
    float sc[KD_U][2];
#pragma unroll
    for (int u = 0; u < KD_U; ++u) {
      const U2 a = *(const U2*)(sl + g * KD_RS + 32 * u + 8 * i);
      const U2 c = *(const U2*)(sl + (g + 8) * KD_RS + 32 * u + 8 * i);
      w[u][0] = a.x; w[u][1] = a.y; w[u][2] = c.x; w[u][3] = c.y;
      const bool ok = b0 + u < nblk;
      sc[u][0] = ok ? bf1(ss[g * KD_U + u]) : 0.f;
      sc[u][1] = ok ? bf1(ss[(g + 8) * KD_U + u]) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < KD_U; ++u) kd_block_mma(acc, w[u], xl, min(b0 + u, nblk - 1), sc[u][0], sc[u][1], tb);
    issue(t + KD_S - 1);  // into the slot of step t-1, which every lane finished reading before the barrier
  }
  cp_wait<0>();
  kd_mma_write(acc, red, g, i, warp, N, M, y, bias, has_bias);
}

// ---- dequant: out (bf16, as packed pairs) = code[q] * scaler, bit-identical to torchao; q: n_words 4-byte words
extern "C" __global__ void __launch_bounds__(256)
kd_nf4_dequant(const u32* __restrict__ q, const u16* __restrict__ s, const u32* __restrict__ lut,
               U4* __restrict__ out, int n_words) {
  __shared__ float tab[16];
  if (threadIdx.x < 16) tab[threadIdx.x] = __uint_as_float(lut[threadIdx.x]);
  __syncthreads();
  const long long stride = (long long)gridDim.x * 256 * 4;
  for (long long base = (long long)blockIdx.x * 256 * 4 + (threadIdx.x & ~31) * 4 + (threadIdx.x & 31);
       base < n_words; base += stride) {
    u32 wv[4];
    float sc[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // 4 words per lane, each warp instruction reading 128 contiguous bytes
      const long long idx = base + 32 * i;
      wv[i] = idx < n_words ? __ldg(q + idx) : 0u;
      sc[i] = idx < n_words ? bf1(s[idx >> 3]) : 0.f;  // 8 words = 64 weights per scaler
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const long long idx = base + 32 * i;
      if (idx < n_words) {
        u32 o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const u32 byte = (wv[i] >> (8 * j)) & 0xffu;
          o[j] = pack_bf2(tab[byte >> 4] * sc[i], tab[byte & 15u] * sc[i]);
        }
        out[idx] = U4{o[0], o[1], o[2], o[3]};
      }
    }
  }
}

// NF4 -> e4m3 for the nf4_fp8 teacher (kd.teacher.precision): w8 = e4m3_rne(satfinite((code * scaler) * inv[row]))
// in fp32, as the Triton kernel / torch reference there. The same 4-byte reads per lane; 8 bytes written per word
#if __CUDA_ARCH__ >= 890
__device__ __forceinline__ u32 pack_e4m3x2(float first, float second) {  // first -> the low byte (lower column)
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(second), "f"(first));
  return (u32)r;
}
#else
__device__ __forceinline__ u32 pack_e4m3x2(float, float) { __trap(); return 0u; }  // no FP8 before sm_89
#endif
extern "C" __global__ void __launch_bounds__(256)
kd_nf4_fp8(const u32* __restrict__ q, const u16* __restrict__ s, const u32* __restrict__ lut,
           const float* __restrict__ inv, U2* __restrict__ out, int n_words, int blocks_per_row) {
  __shared__ float tab[16];
  if (threadIdx.x < 16) tab[threadIdx.x] = __uint_as_float(lut[threadIdx.x]);
  __syncthreads();
  const long long stride = (long long)gridDim.x * 256 * 4;
  for (long long base = (long long)blockIdx.x * 256 * 4 + (threadIdx.x & ~31) * 4 + (threadIdx.x & 31);
       base < n_words; base += stride) {
    u32 wv[4];
    float sc[4], iv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const long long idx = base + 32 * i;
      const bool ok = idx < n_words;
      wv[i] = ok ? __ldg(q + idx) : 0u;
      sc[i] = ok ? bf1(s[idx >> 3]) : 0.f;
      iv[i] = ok ? __ldg(inv + (idx >> 3) / blocks_per_row) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const long long idx = base + 32 * i;
      if (idx < n_words) {
        u32 o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const u32 byte = (wv[i] >> (8 * j)) & 0xffu;
          o[j] = pack_e4m3x2((tab[byte >> 4] * sc[i]) * iv[i], (tab[byte & 15u] * sc[i]) * iv[i]);
        }
        out[idx] = U2{o[0] | (o[1] << 16), o[2] | (o[3] << 16)};
      }
    }
  }
}
"""


@dataclass(frozen=True)
class CudaGemvConfig:
    kind: str = "mma"  # "mma_a" / "mma" (tensor cores, M <= 8; cp.async-staged / register loads), "lut16" (M = 1)
    warps: int = 8  # warps per block (they split K)
    unroll: int = 4  # mma kinds: scaler blocks per warp and step
    stages: int = 4  # mma_a: steps staged per warp (stages - 1 in flight)
    rows: int = 4  # lut16: output rows per block
    ld: int = 0  # the weight loads' cache hints (KD_LD in SOURCE)

    def defines(self) -> Dict[str, int]:
        return {"KD_W": self.warps, "KD_U": self.unroll, "KD_S": self.stages, "KD_R": self.rows, "KD_LD": self.ld}

    def smem(self) -> int:
        """mma_a's dynamic shared memory: the pair table, the reduction, the stages."""
        return 32768 + self.warps * 512 + self.warps * self.stages * (16 * (self.unroll * 32 + 32) + 32 * self.unroll)


def gemv_candidates(N: int, K: int, M: int = 1):
    """The tile choices timed once per weight shape (each is one NVRTC compile, ~0.5 s, cached per process);
    ``KD_NF4_CUDA_KINDS`` (comma list) keeps only those kinds."""
    keep = set(filter(None, os.environ.get("KD_NF4_CUDA_KINDS", "mma_a,mma,lut16").split(",")))
    for cfg in _all_candidates(N, K, M):
        if cfg.kind in keep:
            yield cfg


def _all_candidates(N: int, K: int, M: int):
    if K % 128 == 0:
        for warps, unroll, stages in ((4, 4, 4), (8, 4, 3), (4, 8, 3), (8, 2, 4), (4, 4, 6)):
            yield CudaGemvConfig("mma_a", warps, unroll, stages)
    for ld in (0, 2, 3):
        for warps, unroll in ((8, 4), (8, 2)):
            yield CudaGemvConfig("mma", warps, unroll, ld=ld)
        if M == 1:
            for warps, rows in ((8, 4), (4, 8)):
                yield CudaGemvConfig("lut16", warps, rows=rows, ld=ld)


_KERNELS: Dict[Tuple, object] = {}
_STATUS: Dict[int, Optional[str]] = {}  # device index -> None (works) or the reason it does not
_LUTS: Dict[Tuple, torch.Tensor] = {}


def _compile(name: str, defines: Dict[str, int], device: torch.device):
    key = (name, tuple(sorted(defines.items())), device.index)
    k = _KERNELS.get(key)
    if k is None:
        head = "".join(f"#define {a} {b}\n" for a, b in defines.items())
        with torch.cuda.device(device):
            k = torch.cuda._compile_kernel(head + SOURCE, name)
        _KERNELS[key] = k
    return k


def why_unavailable(device: torch.device) -> Optional[str]:
    """None if the NVRTC kernels compile and run on ``device``, else the reason (checked once per device)."""
    if device.type != "cuda":
        return "not a CUDA device"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _STATUS:
        return _STATUS[idx]
    dev = torch.device("cuda", idx)
    why = None
    if not hasattr(torch.cuda, "_compile_kernel"):
        why = f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)"
    else:
        try:
            _compile("kd_nf4_gemv_mma", CudaGemvConfig().defines(), dev)
        except Exception as e:  # no NVRTC library, an unsupported architecture, ...
            why = f"NVRTC could not build the kernels: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    _STATUS[idx] = why
    return why


def available(device: torch.device) -> bool:
    return why_unavailable(device) is None


def _lut(w, pair: bool) -> torch.Tensor:
    """The code book as 32-bit words on ``w``'s device: 16 fp32 values, or 256 bf16 pairs (byte -> (code[hi], code[lo]))."""
    if not pair:
        return _code_words(w.nf4)
    key = (w.nf4.device, w.nf4.dtype, pair, w.nf4.data_ptr())
    t = _LUTS.get(key)
    if t is None:
        if w.nf4.dtype != torch.bfloat16:
            raise ValueError(f"kd: the CUDA NF4 kernels take a bf16 code book, got {w.nf4.dtype}")
        bits = w.nf4.detach().view(torch.int16).to(torch.int64) & 0xFFFF
        b = torch.arange(256, device=bits.device)
        words = bits[b >> 4] | (bits[b & 15] << 16)  # even column (high nibble) in the low half
        t = _LUTS[key] = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()
    return t


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def gemv(x: torch.Tensor, w, scalers: torch.Tensor, cfg: CudaGemvConfig,
         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [M, K] (bf16, M <= 8; M = 1 for lut16) @ dequant(w).T + bias -> [M, N] (bf16)``; ``scalers``: the bf16
    per-64 scalers of ``w`` (:func:`kd.teacher.nf4.cached_scalers`); ``bias`` [N] (bf16) is added inside the
    kernel, before the one rounding to bf16 (a launch less per biased projection)."""
    N, K = w.shape
    M = x.shape[0] if x.dim() == 2 else 1
    if x.dtype != torch.bfloat16 or x.shape[-1] != K or K % 64 or w.block_size != 64 or w.nf4.dtype != torch.bfloat16:
        raise ValueError(f"kd: the CUDA NF4 GEMV wants bf16 x [M, {K}], a bf16 code book and 64-weight blocks "
                         f"(K % 64 == 0), got {x.dtype} {tuple(x.shape)}, block {w.block_size}")
    mma = cfg.kind in ("mma", "mma_a")
    if M > (8 if mma else 1):
        raise ValueError(f"kd: CUDA NF4 GEMV kind {cfg.kind!r} takes at most {8 if mma else 1} rows, got {M}")
    if cfg.kind == "mma_a" and (K % 128 or cfg.unroll % 2):
        raise ValueError(f"kd: CUDA NF4 GEMV kind 'mma_a' needs K % 128 == 0 and an even unroll (K={K})")
    qd = w.quantized_data
    if not _aligned(qd):
        raise ValueError("kd: the packed NF4 data is not 16-byte aligned (a view at an odd offset)")
    x = x.reshape(M, K)
    if not x.is_contiguous() or not _aligned(x):
        x = x.contiguous().clone()
    dev = x.device
    y = torch.empty(M, N, dtype=torch.bfloat16, device=dev)
    b = bias if bias is not None and bias.dtype == torch.bfloat16 and bias.is_contiguous() and bias.numel() == N \
        else None
    tail = [b if b is not None else y, int(b is not None)]
    if cfg.kind == "lut16":
        k = _compile("kd_nf4_gemv", cfg.defines(), dev)
        k(grid=(-(-N // cfg.rows), 1, 1), block=(32 * cfg.warps, 1, 1),
          args=[qd, scalers, _lut(w, False), x, y, N, K, *tail])
    elif cfg.kind == "mma":
        k = _compile("kd_nf4_gemv_mma", cfg.defines(), dev)
        k(grid=(-(-N // 16), 1, 1), block=(32 * cfg.warps, 1, 1), args=[qd, scalers, _lut(w, True), x, y, N, K, M, *tail])
    elif cfg.kind == "mma_a":
        k = _compile("kd_nf4_gemv_mma_a", cfg.defines(), dev)
        k.set_shared_memory_config(cfg.smem())
        k(grid=(-(-N // 16), 1, 1), block=(32 * cfg.warps, 1, 1), args=[qd, scalers, _lut(w, True), x, y, N, K, M, *tail],
          shared_mem=cfg.smem())
    else:
        raise ValueError(f"kd: unknown CUDA NF4 GEMV kind {cfg.kind!r} (mma_a, mma, lut16)")
    return y if bias is None or b is not None else y + bias


def _check_dequant(w, out: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The packed data of ``w`` after the kernels' layout checks; ``out`` (if given) must be a contiguous
    ``[N, K]`` tensor of ``dtype`` (e.g. a row slice of a buffer shared by several weights)."""
    N, K = w.shape
    if w.block_size % 8 or w.dtype != torch.bfloat16:
        raise ValueError(f"kd: CUDA NF4 dequant wants bf16 weights in blocks of a multiple of 8 (got {w.dtype}, "
                         f"{w.block_size})")
    qd = w.quantized_data
    if not _aligned(qd):
        raise ValueError("kd: the packed NF4 data is not 16-byte aligned (a view at an odd offset)")
    if w.block_size != 64:
        raise ValueError("kd: CUDA NF4 dequant assumes 64-weight blocks (8 words per scaler)")
    if out is not None and (tuple(out.shape) != (N, K) or out.dtype != dtype or not out.is_contiguous()
                            or not _aligned(out)):
        raise ValueError(f"kd: dequant out= must be a contiguous, 16-byte aligned {dtype} [{N}, {K}] tensor")
    return qd


def _dequant_grid(n_words: int) -> int:
    """Blocks for the dequantisation kernels: one per 1,024 packed words (each lane 4), so every lane runs the
    grid-stride loop once. Why: measured faster than a fixed number of blocks per SM looping over the weight
    (within ~8% of a plain bf16 copy's bandwidth; docs/offline.md)."""
    return max(1, -(-n_words // 1024))


def dequant(w, scalers: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The bf16 weight of ``w`` (bit-identical to torchao's ``get_original_weight()``) with the CUDA kernel,
    written into ``out`` when given (a contiguous bf16 ``[N, K]``, e.g. rows of a fused q/k/v buffer)."""
    N, K = w.shape
    qd = _check_dequant(w, out, torch.bfloat16)
    dev = qd.device
    k = _compile("kd_nf4_dequant", CudaGemvConfig().defines(), dev)
    out = torch.empty(N, K, dtype=torch.bfloat16, device=dev) if out is None else out
    n_words = N * K // 8
    k(grid=(_dequant_grid(n_words), 1, 1), block=(256, 1, 1), args=[qd, scalers, _lut(w, False), out, n_words])
    return out


def dequant_fp8(w, scalers: torch.Tensor, inv: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``w`` as e4m3 ``[N, K]`` for the nf4_fp8 teacher: ``e4m3(satfinite((code * scaler) * inv[row]))`` in fp32,
    bit-identical to :func:`kd.teacher.precision.nf4_to_fp8` (``inv`` [N] fp32 from ``nf4_fp8_scales``); 0.5 B read
    and 1 B written per weight. Needs sm_89+ (FP8 conversions). ``out``: as :func:`dequant`, in e4m3."""
    qd = _check_dequant(w, out, torch.float8_e4m3fn)
    return fp8_from_packed(qd, scalers, w.nf4, inv, w.shape, out)


def fp8_available(device: torch.device) -> bool:
    """The NF4 -> FP8 kernel runs here: NVRTC works and the GPU has FP8 conversions (sm_89+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and available(device)


def fp8_from_packed(qd: torch.Tensor, scalers: torch.Tensor, code: torch.Tensor, inv: torch.Tensor, shape,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`dequant_fp8` on the raw pieces of a torchao NF4 weight (64-weight blocks): packed bytes ``qd``, bf16
    per-block ``scalers``, the bf16 16-entry code book, ``inv`` [N] fp32; ``shape`` = (N, K)."""
    N, K = int(shape[0]), int(shape[1])
    dev = qd.device
    if torch.cuda.get_device_capability(dev) < (8, 9):
        raise ValueError("kd: the CUDA NF4 -> FP8 kernel needs compute capability 8.9+")
    if inv.dtype != torch.float32 or inv.numel() != N or not inv.is_contiguous():
        raise ValueError(f"kd: dequant_fp8 wants inv as a contiguous fp32 [{N}]")
    if K % 64 or scalers.dtype != torch.bfloat16 or scalers.numel() != N * K // 64 or not _aligned(qd):
        raise ValueError(f"kd: dequant_fp8 wants K % 64 == 0, bf16 scalers [{N * K // 64}] and aligned data")
    k = _compile("kd_nf4_fp8", CudaGemvConfig().defines(), dev)
    out = torch.empty(N, K, dtype=torch.float8_e4m3fn, device=dev) if out is None else out
    n_words = N * K // 8
    k(grid=(_dequant_grid(n_words), 1, 1), block=(256, 1, 1),
      args=[qd, scalers.contiguous(), _code_words(code), inv, out, n_words, K // 64])
    return out


def _code_words(code: torch.Tensor) -> torch.Tensor:
    """The 16 bf16 codes as fp32 bit patterns (int32), cached per code-book tensor."""
    key = (code.device, code.dtype, False, code.data_ptr())
    t = _LUTS.get(key)
    if t is None:
        if code.dtype != torch.bfloat16:
            raise ValueError(f"kd: the CUDA NF4 kernels take a bf16 code book, got {code.dtype}")
        t = _LUTS[key] = code.detach().float().view(torch.int32).contiguous()
    return t


_TUNED: Dict[Tuple[int, int, int], CudaGemvConfig] = {}


def tune(N: int, K: int, M: int, w=None, x: Optional[torch.Tensor] = None) -> CudaGemvConfig:
    """The fastest :func:`gemv_candidates` entry for an ``M x K @ K x N`` product, timed once per shape on CUDA
    (never during CUDA-graph capture; ``KD_NF4_TUNE=0`` skips the timing), the default elsewhere."""
    from kd.core.kernels import can_time, fastest
    from kd.teacher.nf4 import cached_scalers

    key = (N, K, M)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if w is None or not can_time(x):
        return CudaGemvConfig()
    s = cached_scalers(w)
    cands = list(gemv_candidates(N, K, M))
    best = fastest(cands, lambda c: gemv(x, w, s, c), iters=10, graph=True) or CudaGemvConfig()
    _TUNED[key] = best
    return best
