"""Static-shape decoding for teacher generation: one KV cache per (batch, length) bucket, the decode step captured
as CUDA graphs, sampling on the GPU, no per-step host sync. Same tokens as :func:`kd.generate.generation.generate_batch`.

Why: a Qwen2.5-72B decode step is ~2,000 small kernels (80 layers x projections, norms, RoPE, attention, plus
the sampler); launched from Python that alone is tens of ms per token at batch 1. :class:`StaticDecoder` keeps
every tensor a step touches at a fixed address, so the step can be captured once and replayed:

- **state** (per bucket, reused by every batch of the same shape): the KV cache (torchtune ``setup_caches``,
  ``[B, n_kv, L, d]`` per layer, ``L`` rounded up to ``attn_bucket``), the padding mask and RoPE positions
  ``[B, L]``, the fed token ``[B, 1]``, the step counters (int64 device tensors), ``done`` ``[B]``, the answer
  buffer ``[B, max_new_tokens]``, the per-sample seeds;
- **step** (:meth:`StaticDecoder._step`): embed the fed token, every layer writes its new K/V at the cache slot
  ``q`` with ``index_copy_`` (a device index; torchtune's ``KVCache.update`` asserts on a device value, a host
  sync) and attends to the first ``Lc`` slots only (``Lc`` = ``q + 1`` rounded up to ``attn_bucket``: one graph
  per ``Lc``, so a step reads the filled part of the cache, not all of ``L``), grouped-query attention without
  expanding KV heads, last-token head, :func:`kd.generate.generation.sample_next` with the step as a device tensor
  (counter-based random numbers: same stream as the eager path), the token written into the answer buffer;
- **stop check**: every ``check_every`` steps ``done.all()`` is copied to pinned host memory without blocking and
  read when that copy has landed (``torch.cuda.Event.query``); the host waits only when it runs more than two
  checks ahead of the GPU. A batch may therefore run a few steps past the moment every row stopped; those steps
  write padding and the answers are cut at the first stop token as before, so results do not change.
- **batch buckets**: a batch smaller than the current bucket (but more than half of it; the last batch, or
  ``max_batch_tokens`` giving a few rows less) is padded with one-token rows that are done from the start, so
  it reuses the cache and the graphs instead of re-allocating and re-capturing;
- on CPU (tests, CPU generation) the same step runs eagerly; ``cuda_graphs=False`` does that on CUDA too.

Prefill stays eager (torchtune's attention over the whole prompt; NF4 linears dequantise + GEMM), and so does the
first decode step of each ``Lc`` bucket: it is the warm-up (Triton tuning, bitsandbytes' first call) before the
capture. Decode steps route the NF4 linears through :func:`kd.generate.nf4_matmul.nf4_matmul` (``nf4_kernel``:
the read-once kernels up to ``nf4_fused_max_batch`` rows; larger batches dequantise + cuBLAS, which wins once the
GEMM is compute-bound).

:func:`decode_step_cost` gives the bytes and FLOPs of one decode step for a model shape and batch (the planner's
estimate of generation time on other hardware: ``max(bytes / bandwidth, flops / peak)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from kd.core.rng import signed64
from kd.generate.generation import (
    Generation,
    LastTokenHead,
    SamplingParams,
    check_batch,
    decode_qkv,
    grouped_decode_attend,
    left_pad,
    patched_attention,
    patched_forwards,
    sample_next,
    setup_kv_caches,
    teardown_kv_caches,
    to_generations,
)
from kd.generate.linear_groups import LinearGroups
from kd.generate.nf4_matmul import FUSED_MAX_ROWS, DecodeRoute
from kd.teacher.nf4 import set_decode_

__all__ = ["StaticDecoder", "DecodeStepCost", "decode_step_cost", "QWEN2_5_72B_SHAPE"]


# --------------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------------
QWEN2_5_72B_SHAPE = dict(num_layers=80, embed_dim=8192, intermediate_dim=29568, num_heads=64, num_kv_heads=8,
                         head_dim=128, vocab_size=152064)


@dataclass(frozen=True)
class DecodeStepCost:
    """Bytes moved and FLOPs of one decode step (every row generates one token).

    ``weight_bytes``: decoder-layer linears (as stored, read once: NF4 0.5 B + scalers, or 4.5 B more per weight on
    the dequantise-to-bf16 path) + the bf16 output head; ``kv_bytes``: KV cache read (``context`` slots per row) and
    written (one slot); ``flops``: 2 x rows x (linear + head weights) + attention (QK^T and PV)."""

    weight_bytes: float
    kv_bytes: float
    flops: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    def seconds(self, bandwidth_bytes_per_s: float, flops_per_s: float) -> float:
        """Roofline time of the step: the slower of moving the bytes and doing the FLOPs."""
        return max(self.bytes / bandwidth_bytes_per_s, self.flops / flops_per_s)


def decode_step_cost(batch: int, context: int, *, num_layers: int = 80, embed_dim: int = 8192,
                     intermediate_dim: int = 29568, num_heads: int = 64, num_kv_heads: int = 8, head_dim: int = 128,
                     vocab_size: int = 152064, weight_format: str = "nf4", kv_bytes_per_elem: int = 2,
                     nf4_block: int = 64) -> DecodeStepCost:
    """Bytes and FLOPs of one decode step of a Qwen2-style decoder (defaults: Qwen2.5-72B).

    Args:
        batch: rows decoded together (tokens generated per step).
        context: mean number of cache slots each row attends to in the step (prompt + tokens so far).
        weight_format: ``nf4`` (fused decode: 0.5 B/weight + one bf16 scaler per ``nf4_block`` weights),
            ``nf4_dequant`` (today's training path: the NF4 read + a bf16 copy written and read back, 4.5 B more),
            ``fp8`` (1 B/weight + a per-row fp32 scale) or ``bf16`` (2 B/weight).
    Returns :class:`DecodeStepCost`. Example (one Spark, 273 GB/s): ``decode_step_cost(1, 600).seconds(273e9, 1e15)``.
    """
    kv = num_kv_heads * head_dim
    lin = num_layers * (2 * embed_dim * embed_dim + 2 * embed_dim * kv + 3 * embed_dim * intermediate_dim)
    per_w = {"nf4": 0.5 + 2.0 / nf4_block, "nf4_dequant": 0.5 + 2.0 / nf4_block + 4.0, "fp8": 1.0,
             "bf16": 2.0}.get(weight_format)
    if per_w is None:
        raise ValueError(f"kd: unknown weight_format {weight_format!r} (nf4, nf4_dequant, fp8, bf16)")
    head = vocab_size * embed_dim
    weight_bytes = lin * per_w + head * 2.0 + num_layers * (2 * embed_dim + 2 * kv) * 2.0  # + norms, qkv biases
    kv_bytes = batch * num_layers * 2 * kv * kv_bytes_per_elem * (context + 1)
    flops = 2.0 * batch * (lin + head) + 4.0 * batch * num_layers * num_heads * head_dim * context
    return DecodeStepCost(float(weight_bytes), float(kv_bytes), float(flops))


# --------------------------------------------------------------------------------------------------
# Attention for the static step
# --------------------------------------------------------------------------------------------------
@dataclass
class _StepKernels:
    """What a decode step's attention forward uses besides torchtune's modules (passed in, not stashed on them)."""

    slot: torch.Tensor  # [1] int64: the cache slot of this step's token
    first: Optional[torch.Tensor] = None  # [B] int64: each row's first prompt slot (fused attention reads from it)
    groups: Optional[LinearGroups] = None  # q/k/v as one GEMM where that pays (large batches on CUDA)
    fused_attention: bool = False  # kd.generate.decode_attention (one Triton kernel) instead of the eager maths


def _static_decode_forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, mask=None, input_pos=None,
                           step: _StepKernels):
    """torchtune ``MultiHeadAttention.forward`` for one new token per row at cache slot ``step.slot``.

    Writes K/V with ``index_copy_`` (no host value needed) and attends to the first ``mask.shape[-1]`` slots,
    the query heads of a group batched against their shared K/V (as :func:`kd.generate.generation._grouped_decode_forward`),
    or, with ``step.fused_attention``, in one kernel that reads only slots ``step.first[row] .. step.slot``.
    Prefill (more than one token) goes to the stock forward."""
    if x.shape[1] != 1 or mask is None or self.kv_cache is None:
        return type(self).forward(self, x, y, mask=mask, input_pos=input_pos)
    grp = step.groups.attn.get(id(self)) if step.groups is not None else None
    q, k, v = decode_qkv(self, x, y, input_pos, qkv=grp)
    kc, vc = self.kv_cache.k_cache, self.kv_cache.v_cache
    kc.index_copy_(2, step.slot, k.to(kc.dtype))
    vc.index_copy_(2, step.slot, v.to(vc.dtype))
    Lc = mask.shape[-1]
    if step.fused_attention and q.dtype == kc.dtype:
        from kd.generate.decode_attention import decode_attention

        b = q.shape[0]
        out = decode_attention(q[:, :, 0], kc, vc, mask, scale=self.head_dim ** -0.5, first=step.first,
                               last=step.slot)
        return self.output_proj(out.view(b, 1, -1))
    return grouped_decode_attend(self, q, kc[:, :, :Lc], vc[:, :, :Lc], mask)


# --------------------------------------------------------------------------------------------------
# Fused pointwise glue for the CUDA-graph step
# --------------------------------------------------------------------------------------------------
class _Glue:
    """``torch.compile``'d versions of the decode step's pointwise glue: torchtune's ``RMSNorm`` (fp32 ``rms_norm``,
    cast back), Qwen2's RoPE (the inference branch: cache rows at ``input_pos``, rotate-half) and ``silu(w1 x) * w3 x``.

    Why: at batch 1 a 72B layer's 4-bit linears take ~0.23 ms, and eagerly its two norms, two RoPEs and the gate are
    ~28 small kernels of a few us each in a CUDA graph; Inductor fuses each into one kernel (docs/offline.md has the
    profile). Shapes
    are static per batch bucket (``dynamic=False``), so there is one compile per shape, done in the eager warm-up
    step before capture. The math is the modules' own (fp32 where they use fp32), rounded once instead of per op:
    GPU decode only; CPU decoding never uses it, so it stays bit-identical to ``generate_batch``. If compiling
    fails, the step logs it once and runs the modules' eager forwards."""

    fns = None
    failed: Optional[str] = None

    @staticmethod
    def raw():
        """The three functions uncompiled (rms(x, scale, eps), rope(x, cache, input_pos), silu_mul(a, b))."""
        import torch.nn.functional as F

        def rms(x, w, eps: float):
            return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(x.dtype)

        def rope(x, cache, input_pos):
            seq_len, hd = x.size(1), x.size(-1)
            rc = cache[input_pos].view(-1, seq_len, 1, hd * 2)
            cos, sin = rc[..., :hd].to(x.dtype), rc[..., hd:].to(x.dtype)
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return ((x * cos) + (torch.cat((-x2, x1), dim=-1) * sin)).type_as(x)

        def silu_mul(a, b):
            return F.silu(a) * b

        return rms, rope, silu_mul

    @classmethod
    def get(cls):
        if cls.fns is None:
            c = partial(torch.compile, dynamic=False, fullgraph=True)
            cls.fns = tuple(c(f) for f in cls.raw())
        return cls.fns

    @classmethod
    def call(cls, i: int, eager, *args):
        if cls.failed is None:
            try:
                return cls.get()[i](*args)
            except Exception as e:  # no compiler on this machine, an Inductor bug: eager from now on
                cls.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                import warnings

                warnings.warn(f"kd: fused decode glue disabled ({cls.failed}); the modules run eagerly")
        return eager()


class fused_glue(patched_forwards):
    """Context manager: the decode step's RMSNorms, Qwen2 RoPEs and SiLU feed-forwards run :class:`_Glue`'s
    compiled functions (``enabled=False``: none of that), feed-forwards in ``groups`` run w1 and w3 through
    their :class:`kd.generate.linear_groups.LinearGroup` (one GEMM where that pays)."""

    def __init__(self, model: nn.Module, enabled: bool = True, groups: Optional[LinearGroups] = None):
        self.mods = []
        from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
        from torchtune.modules import FeedForward, RMSNorm

        for m in model.modules():
            if enabled and type(m) is RMSNorm:
                self.mods.append((m, partial(self._rms, m)))
            elif enabled and type(m) is Qwen2RotaryPositionalEmbeddings:
                self.mods.append((m, partial(self._rope, m)))
            elif type(m) is FeedForward and isinstance(m.activation, nn.SiLU) and m.w3 is not None:
                grp = groups.ffn.get(id(m)) if groups is not None else None
                if enabled or grp is not None:  # the gate compiled, and/or w1 and w3 as one GEMM
                    self.mods.append((m, partial(self._ffn, m, grp, enabled)))

    @staticmethod
    def _rms(m, x):
        return _Glue.call(0, lambda: type(m).forward(m, x), x, m.scale, float(m.eps))

    @staticmethod
    def _rope(m, x, *, input_pos=None):
        if input_pos is None:
            return type(m).forward(m, x, input_pos=input_pos)
        return _Glue.call(1, lambda: type(m).forward(m, x, input_pos=input_pos), x, m.cache, input_pos)

    @staticmethod
    def _ffn(m, run, glue: bool, x):
        a, b = run(x) if run is not None else (m.w1(x), m.w3(x))
        if not glue:
            return m.w2(m.activation(a) * b)
        return m.w2(_Glue.call(2, lambda: m.activation(a) * b, a, b))


# --------------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------------
@dataclass
class _Bucket:
    """Static tensors of one (rows, cache length, answer length, sampling) shape; see the module docstring."""

    B: int
    L: int
    max_new: int
    tok: torch.Tensor  # [B, 1] int64: token fed to the next step
    pad_mask: torch.Tensor  # [B, L] bool
    input_pos: torch.Tensor  # [B, L] int64 RoPE positions
    key_pos: torch.Tensor  # [L] int64
    seeds: torch.Tensor  # [B] int64
    stop: torch.Tensor  # [n_stop] int64
    done: torch.Tensor  # [B] bool
    out: torch.Tensor  # [B, max_new] int64
    s: torch.Tensor  # [1] int64: index of the answer token fed to the next step
    q: torch.Tensor  # [1] int64: cache slot of the next step (= P + s)
    first: torch.Tensor  # [B] int64: each row's first prompt slot (P - its prompt length)
    graphs: Dict[int, "torch.cuda.CUDAGraph"]  # Lc -> graph
    warm: set  # Lc buckets whose eager warm-up step ran


class DecodeTiming:
    """The decode phase of the last :meth:`StaticDecoder.generate` call (prefill excluded): ``steps`` decode steps
    between two marks, CUDA events on the GPU (no sync until :meth:`ms_per_step` is read), the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.steps = device, 0
        self._t: List[object] = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._t.append(ev)
        else:
            import time

            self._t.append(time.perf_counter())

    def ms_per_step(self) -> float:
        if len(self._t) != 2 or self.steps == 0:
            return float("nan")
        a, b = self._t
        if self.device.type == "cuda":
            b.synchronize()
            return a.elapsed_time(b) / self.steps
        return (b - a) * 1e3 / self.steps


class StaticDecoder:
    """Generate with static per-bucket state and (on CUDA) CUDA-graph decode steps. Create once per model and call
    :meth:`generate` per batch (same arguments and results as :func:`kd.generate.generation.generate_batch`).

    Args:
        model: torchtune ``TransformerDecoder`` with a :class:`kd.generate.generation.LastTokenHead`.
        device, cache_dtype: where the caches live and their dtype (default: the model's float dtype).
        cuda_graphs: capture decode steps (default: on CUDA).
        attn_bucket: cache length granularity (``L`` and the per-graph attention length ``Lc``).
        check_every: steps between stop checks.
        nf4_kernel / nf4_fused_max_batch: decode kernel of NF4 linears (``auto``, ``fused`` or ``dequant``:
            :class:`kd.generate.nf4_matmul.DecodeRoute`) and the largest batch the read-once kernels take (bigger
            batches: dequantise + cuBLAS). ``nf4_kernel=None`` leaves the linears alone (training's dequantise + GEMM).
        fuse_glue: on CUDA, run norms, RoPE and the SiLU gate of decode steps as compiled kernels (:class:`fused_glue`).
        fuse_linears: on CUDA, q/k/v and w1/w3 of NF4 / nf4_fp8 teachers as one GEMM each at batches that take the
            dequantise + GEMM route (:mod:`kd.generate.linear_groups`).
        fused_attention: on CUDA with Triton, a decode step's attention is one kernel reading only the filled slots
            (:mod:`kd.generate.decode_attention`), for batches with at least one (row, KV head) per SM (smaller ones
            keep the batched-GEMM path, which spreads a row's work over more SMs).
    """

    def __init__(self, model: nn.Module, *, device: torch.device, cache_dtype: Optional[torch.dtype] = None,
                 cuda_graphs: Optional[bool] = None, attn_bucket: int = 256, check_every: int = 16,
                 nf4_kernel: Optional[str] = "auto", nf4_fused_max_batch: int = FUSED_MAX_ROWS,
                 fuse_glue: bool = True, fuse_linears: bool = True, fused_attention: bool = True):
        if not isinstance(model.output, LastTokenHead):
            raise ValueError("StaticDecoder needs install_last_token_head(model) first")
        self.model = model
        self.device = torch.device(device)
        dt = cache_dtype or next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.cache_dtype = dt if dt in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("kd: cuda_graphs needs a CUDA device")
        self.attn_bucket = int(attn_bucket)
        self.check_every = max(1, int(check_every))
        self.nf4_kernel = nf4_kernel
        self.nf4_fused_max_batch = int(nf4_fused_max_batch)
        self.fuse_glue = bool(fuse_glue) and self.device.type == "cuda"
        cuda = self.device.type == "cuda"
        self.route = DecodeRoute(nf4_kernel, self.nf4_fused_max_batch) if nf4_kernel is not None else None
        self.groups = LinearGroups(model) if fuse_linears and cuda else None
        from kd.generate import decode_attention

        self.fused_attention = bool(fused_attention) and decode_attention.available(self.device)
        self._bucket: Optional[_Bucket] = None
        self._key: Optional[tuple] = None
        self._pool = None
        self.n_captures = 0  # graphs captured so far (tests, logs)
        self.last_timing = DecodeTiming(self.device)  # decode phase of the last generate() (benchmarks)

    # ---- state ---------------------------------------------------------------------------------------------
    def _get_bucket(self, B: int, need_L: int, max_new: int, n_stop: int, key_extra: tuple) -> _Bucket:
        bk = self._bucket
        if bk is not None and bk.B == B and bk.L >= need_L and bk.max_new >= max_new \
                and bk.stop.numel() == n_stop and self._key == key_extra:
            for m in self.model.modules():  # zero the cache: slots past a row's prompt must not hold stale values
                if getattr(m, "kv_cache", None) is not None:
                    m.kv_cache.reset()
            return bk
        self.close()
        L = int(math.ceil(need_L / self.attn_bucket) * self.attn_bucket)
        setup_kv_caches(self.model, B, L, self.cache_dtype, self.device)
        dev = self.device
        z = partial(torch.zeros, device=dev)
        bk = _Bucket(B=B, L=L, max_new=max_new, tok=z((B, 1), dtype=torch.long),
                     pad_mask=z((B, L), dtype=torch.bool), input_pos=z((B, L), dtype=torch.long),
                     key_pos=torch.arange(L, device=dev), seeds=z(B, dtype=torch.long),
                     stop=z(n_stop, dtype=torch.long), done=z(B, dtype=torch.bool),
                     out=z((B, max_new), dtype=torch.long), s=z(1, dtype=torch.long), q=z(1, dtype=torch.long),
                     first=z(B, dtype=torch.long), graphs={}, warm=set())
        self._bucket, self._key = bk, key_extra
        return bk

    def close(self) -> None:
        """Drop the graphs and the KV cache (call before another use of the model)."""
        if self._bucket is not None:
            self._bucket.graphs.clear()
            self._bucket = None
            teardown_kv_caches(self.model)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ---- one decode step -----------------------------------------------------------------------------------
    def _step(self, bk: _Bucket, Lc: int, params: SamplingParams, pad_id: int) -> None:
        """Feed ``bk.tok`` at slot ``bk.q``, sample answer token ``bk.s + 1``, advance; device ops only."""
        B = bk.B
        mask = ((bk.key_pos[:Lc] <= bk.q) & bk.pad_mask[:, :Lc])[:, None, :]  # [B, 1, Lc]
        pos = bk.input_pos.gather(1, bk.q.expand(B, 1))  # [B, 1]
        logits = self.model(bk.tok, mask=mask, input_pos=pos)[:, -1]
        nxt = sample_next(logits.float(), params, bk.seeds, bk.s + 1)
        nxt = torch.where(bk.done, torch.full_like(nxt, pad_id), nxt)
        bk.out.index_copy_(1, bk.s + 1, nxt[:, None])
        bk.done |= (nxt[:, None] == bk.stop[None, :]).any(-1)
        bk.tok.copy_(nxt[:, None])
        bk.s += 1
        bk.q += 1

    def _run_step(self, bk: _Bucket, Lc: int, params: SamplingParams, pad_id: int) -> None:
        if not self.cuda_graphs:
            return self._step(bk, Lc, params, pad_id)
        g = bk.graphs.get(Lc)
        if g is not None:
            g.replay()
            return
        if Lc not in bk.warm:  # first step of this bucket: eager (warm-up), capture at the next one
            bk.warm.add(Lc)
            return self._step(bk, Lc, params, pad_id)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, pool=self._pool, ):
            self._step(bk, Lc, params, pad_id)  # recorded, not run
        bk.graphs[Lc] = g
        self.n_captures += 1
        g.replay()

    # ---- generate ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Iterable[int],
                 pad_id: int, params: SamplingParams = SamplingParams(), seeds: Optional[Sequence[int]] = None
                 ) -> List[Generation]:
        from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask

        B = check_batch(prompts, params, seeds)
        if B == 0:
            return []
        P = max(len(p) for p in prompts)
        stops = sorted(set(int(s) for s in stop_ids))
        key = (params, seeds is None, int(pad_id))
        n_real = B
        cur = self._bucket
        if cur is not None and B < cur.B <= 2 * B and cur.L >= P + max_new_tokens and cur.max_new >= max_new_tokens \
                and self._key == key and cur.stop.numel() == len(stops):
            # a smaller batch rides in the current bucket (no new cache, no re-capture): padding rows of one
            # pad token, marked done from the start; rows do not see each other (masks), results are cut to n_real
            B = cur.B
            prompts = list(prompts) + [[int(pad_id)]] * (B - n_real)
            if seeds is not None:
                seeds = list(seeds) + [0] * (B - n_real)
        bk = self._get_bucket(B, P + max_new_tokens, max_new_tokens, len(stops), key)
        L = bk.L
        # fill the static state (host -> device copies, once per batch)
        tok, pad_mask = left_pad(prompts, pad_id, L)
        bk.pad_mask.copy_(pad_mask)
        bk.input_pos.copy_(get_position_ids_from_padding_mask(pad_mask))
        if seeds is not None:
            bk.seeds.copy_(torch.tensor([signed64(s) for s in seeds], dtype=torch.int64))
        bk.stop.copy_(torch.tensor(stops, dtype=torch.long))
        bk.first.copy_(torch.tensor([P - len(p) for p in prompts], dtype=torch.long))
        tok = tok.to(self.device)

        n_dec = 0
        if self.route is not None:
            # every decode batch goes through the route, which sends batches past nf4_fused_max_batch rows to
            # dequantise + cuBLAS itself (prefill has more rows than B: training's dequantise + GEMM)
            n_dec = set_decode_(self.model, self.route, B)
        try:
            # prefill (eager, torchtune attention; fills cache slots [0, P))
            prefill_mask = get_causal_mask_from_padding_mask(bk.pad_mask[:, :P], target_seq_len=L)
            logits = self.model(tok, mask=prefill_mask, input_pos=bk.input_pos[:, :P])[:, -1]
            nxt = sample_next(logits.float(), params, bk.seeds if seeds is not None else None, 0)
            bk.out.fill_(pad_id)
            bk.out[:, 0] = nxt
            bk.done.copy_((nxt[:, None] == bk.stop[None, :]).any(-1))
            if n_real < B:
                bk.done[n_real:] = True
            bk.tok.copy_(nxt[:, None])
            bk.s.fill_(0)
            bk.q.fill_(P)
            n_steps = 1
            pending: List[Tuple[object, torch.Tensor]] = []
            step = _StepKernels(slot=bk.q, first=bk.first, groups=self.groups,
                                fused_attention=self.fused_attention and self._attention_fills_gpu(B))
            with patched_attention(self.model, partial(_static_decode_forward, step=step)), \
                    fused_glue(self.model, self.fuse_glue, self.groups):
                timing = self.last_timing = DecodeTiming(self.device)
                timing.mark()
                for s in range(max_new_tokens - 1):
                    if s % self.check_every == 0 and self._all_done(bk, pending):
                        break
                    Lc = min(L, int(math.ceil((P + s + 1) / self.attn_bucket) * self.attn_bucket))
                    self._run_step(bk, Lc, params, pad_id)
                    n_steps = s + 2
                timing.mark()
                timing.steps = n_steps - 1
        finally:
            if n_dec:
                set_decode_(self.model, None)
        return to_generations(bk.out[:n_real, :n_steps].cpu().tolist(), stops, max_new_tokens)

    def _attention_fills_gpu(self, B: int) -> bool:
        from torchtune.modules import MultiHeadAttention

        nkv = next((m.num_kv_heads for m in self.model.modules() if isinstance(m, MultiHeadAttention)), 1)
        return B * nkv >= torch.cuda.get_device_properties(self.device).multi_processor_count

    def _all_done(self, bk: _Bucket, pending: list) -> bool:
        """Whether every row had stopped as of a previous check (CUDA: without waiting for the GPU, except to
        stay at most two checks ahead of it); on CPU the current value."""
        if self.device.type != "cuda":
            return bool(bk.done.all())
        flag = torch.empty(1, dtype=torch.bool, pin_memory=True)
        flag.copy_(bk.done.all().reshape(1), non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        pending.append((ev, flag))
        while pending and (pending[0][0].query() or len(pending) > 2):
            ev0, f0 = pending.pop(0)
            ev0.synchronize()
            if bool(f0[0]):
                return True
        return False
