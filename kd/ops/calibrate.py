"""``kd calibrate``: measure this machine at the job's shapes and write a hardware profile for ``kd plan --time``.

    kd calibrate --config CFG [key=value ...] [--out PROFILE.yaml] [--name NAME] [--overwrite]
                 [--base h200|gb10|PROFILE.yaml] [--device cuda|cpu] [--doc-len N] [--reps N]
                 [--disk-mb N] [--allreduce-mb N]
    kd plan --time --config CFG --hardware PROFILE.yaml

Nothing is loaded from disk: both models are built from the config's own builders on the meta device
(:func:`kd.train.models.build_on_meta`, the counts of :func:`kd.ops.planner.build_and_count`) and ONE decoder layer of
each is materialised with seeded random weights. The micro-batch is the job's: ``batch_size`` packs of
``tokenizer.max_seq_len`` tokens for packed data (document-masked through torchtune's ``padded_collate_packed``, as
the recipe's loader collates them), or ``batch_size`` rows padded to one width otherwise. The documents of a pack
(and the width of an unpacked batch) are those of the data set's median micro-batch when the data set and tokenizer
can be read (a quick sample of 256 records, :func:`kd.ops.jobtime.data_stats`), else synthetic ``--doc-len``
documents (default 512 tokens, capped at max_seq_len); the profile's ``sources`` say which.

Measured (each: warm-up, then the median of ``--reps`` timed calls, ``torch.cuda.synchronize`` on GPU; a
measurement that fails records its error in ``sources`` and the field keeps the base profile's value):

- GEMM rate in the run's ``dtype`` (bf16 on GPU) at the teacher's and the student's seven linear shapes with ``T``
  tokens (``bf16_tflops``: the teacher's shapes; the student's are in ``sources``);
- FP8 rowwise ``torch._scaled_mm`` (as :func:`kd.teacher.precision.fp8_linear` calls it) at the teacher's shapes
  (``fp8_tflops``; CUDA sm_89+ only, elsewhere "not available" and the base value);
- NF4 dequantisation of the teacher's largest linear by :func:`kd.teacher.nf4.dequantize_nf4` (reported in ``sources``;
  the decode field ``dequant_bw_eff`` describes the static decode engine's CUDA kernel and keeps the base value);
- the read-once NF4 decode kernel (:mod:`kd.generate.nf4_matmul`, CUDA with Triton) over one teacher layer's
  projections at 1, 16, 128 and 512 rows (``fused_ops_per_weight``: what ``kd plan --time`` costs generation with);
- device-to-device copy (``mem_gbps``: bytes read + written per second, bounded buffer);
- one teacher decoder layer forward in the config's ``teacher_quantization`` (converted by
  :func:`kd.teacher.precision.quantize_layer_` after :func:`~kd.teacher.precision.resolve_precision`, so a device that
  cannot run it falls back as the recipe does), compiled per layer as ``training.compile_model`` does when
  ``compile: True``;
- attention alone at that length with the recipe's mask (flex/SDPA through torchtune's attention call; reported);
- one student LoRA layer forward + backward, with activation checkpointing if the config checkpoints any layer (and
  without if it leaves any unchecked), compiled as the config says;
- the fused loss head forward + backward (:class:`kd.losses.heads.FusedKDHead` with the config's ``loss:`` /
  ``kd_loss:`` at ``fused_chunk_size``);
- disk: a bounded temporary file (``--disk-mb``, at most 256 MB) written and fsync'ed in the output_dir's parent,
  then deleted (``disk_gbps``);
- under ``torchrun`` with WORLD_SIZE > 1: an all-reduce of a bounded payload (``--allreduce-mb``, at most 256 MB;
  a 16 GB test froze a DGX Spark) on every rank, then only rank 0 measures the rest and writes the profile.

Derivation: ``teacher_eff``, ``student_eff`` and ``head_eff`` are chosen so that :func:`kd.ops.jobtime.estimate_job`
itself, run on this one micro-batch, gives the measured times: the model's component at efficiency 1 divided by
the measured time (teacher: layers x the layer time, minus the model's separate NF4 dequantisation term for
``nf4``; the model's teacher rate is ``fp8_tflops`` for fp8 / nf4_fp8 and ``bf16_tflops`` otherwise, exactly as in
``estimate_job``). ``interconnect_gbps`` = the all-reduce's bus bandwidth, 2(n-1)/n x payload / time (nccl-tests'
unit, which :func:`kd.ops.planner.cross_node_bytes_per_step` counts the link's bytes in). The decode fields keep the base profile's values. ``teacher_calibrated_for`` records
the precision (and ``+compile``) the teacher efficiency holds for: ``kd plan --time`` warns when a config differs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from kd.core.config import ConfigError, activation_checkpoint_layers
from kd.ops import jobtime
from kd.ops.jobtime import Hardware

MAX_DISK_MB = 256
MAX_ALLREDUCE_MB = 256  # never more: a 16 GB all-reduce test froze a DGX Spark (unified memory)
DEFAULT_DOC_LEN = 512
DECODE_FIELDS = ("decode_overhead_ms", "decode_bw_eff", "gemv_bw_eff", "decode_gemm_eff", "static_overhead_ms",
                 "static_overhead_ms_per_row", "fp32_tflops", "fused_ops_per_weight")


@dataclass
class Row:
    what: str
    value: str
    shape: str


@dataclass
class Calibration:
    """What ``kd calibrate`` measured (seconds unless said) and the profile it derived."""

    hardware: Hardware
    rows: List[Row] = field(default_factory=list)
    measured: Dict[str, float] = field(default_factory=dict)
    model_check: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # component -> (model s, measured s)

    def table(self) -> str:
        w1 = max([len(r.what) for r in self.rows] + [4])
        w2 = max([len(r.value) for r in self.rows] + [5])
        lines = [f"kd calibrate: {self.hardware.name}", f"  {'what':<{w1}}  {'value':<{w2}}  shape"]
        lines += [f"  {r.what:<{w1}}  {r.value:<{w2}}  {r.shape}" for r in self.rows]
        if self.model_check:
            lines.append("  kd plan --time's model with this profile, same micro-batch:")
            for k, (m, s) in self.model_check.items():
                lines.append(f"    {k:<30} model {_ms(m):>11}  measured {_ms(s):>11}")
        return "\n".join(lines)


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def _sig(x: float, n: int = 5) -> float:
    return float(f"{x:.{n}g}")


# --------------------------------------------------------------------------------------------------
# Timing and set-up helpers
# --------------------------------------------------------------------------------------------------
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_call(fn: Callable[[], Any], dev: torch.device, warm: int, reps: int, min_time: float = 0.0) -> float:
    """Median wall seconds of ``reps`` calls after ``warm`` untimed ones (synchronised on CUDA); with ``min_time``,
    more calls (at most 50) until they span about that many seconds (a CPU shared with other work: the median
    then covers the load's ups and downs as a training run's steps do)."""
    for _ in range(max(0, warm)):
        fn()
    _sync(dev)
    n = max(1, reps)
    if min_time > 0:
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        n = min(50, max(n, math.ceil(min_time / max(1e-9, time.perf_counter() - t0))))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _dtype(cfg) -> torch.dtype:
    name = str(cfg.get("dtype", "bf16")).lower()
    if name in ("fp32", "float32", "float"):
        return torch.float32
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    raise ConfigError(f"dtype must be bf16 or fp32, got {name!r}.")


def resolve_device(cfg, device: Optional[str] = None) -> torch.device:
    """``--device``, else the config's ``device``, else cuda when available, else cpu (cuda:LOCAL_RANK under torchrun)."""
    name = device or cfg.get("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"kd calibrate runs on cuda or cpu, got device {name!r}.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available on this machine (use --device cpu).")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ConfigError(f"kd calibrate runs on cuda or cpu, got device {name!r}.")
    return dev


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    proc = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                proc = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {proc} ({torch.get_num_threads()} threads)"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")[:40] or "machine"


def random_init_(mod: torch.nn.Module, dev: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Materialise a meta-device torchtune module on ``dev`` in ``dtype`` with seeded random weights (std 0.02;
    norm weights 1) and its RoPE caches."""
    g = torch.Generator(device=dev).manual_seed(seed)
    mod.to_empty(device=dev)
    mod.to(dtype)
    with torch.no_grad():
        for n, p in mod.named_parameters():
            if p.dim() == 1 and not n.endswith("bias"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    with torch.device(dev):
        for sub in mod.modules():
            if hasattr(sub, "rope_init"):
                sub.rope_init()
    return mod


def _holder(layer: torch.nn.Module) -> torch.nn.Module:
    """A module with ``layers = [layer]``, so the recipe's own per-model helpers (activation checkpointing,
    ``training.compile_model``) apply to the one layer exactly as to a whole model."""
    h = torch.nn.Module()
    h.layers = torch.nn.ModuleList([layer])
    return h


def linear_shapes(c) -> List[Tuple[int, int, int]]:
    """(out, in, count) of a decoder layer's seven projections from :class:`kd.ops.planner.ModelCount`."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    d, i = c.embed_dim, c.intermediate_dim
    shapes: Dict[Tuple[int, int], int] = {}
    for s in [(q, d), (kv, d), (kv, d), (d, q), (i, d), (i, d), (d, i)]:
        shapes[s] = shapes.get(s, 0) + 1
    return [(n, k, m) for (n, k), m in shapes.items()]


# --------------------------------------------------------------------------------------------------
# The micro-batch
# --------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """The calibration micro-batch: ``rows`` x ``width`` positions; ``docs[r]`` = document lengths of row r (packed;
    the end-of-pack padding is not a document), or one full-width document per row (unpacked)."""

    rows: int
    width: int
    packed: bool
    docs: List[List[int]]
    origin: str

    @property
    def tokens(self) -> int:
        return self.rows * self.width

    def describe(self) -> str:
        if self.packed:
            n = sum(len(d) for d in self.docs)
            return f"{self.rows} x {self.width} packed ({n} docs, mean {sum(map(sum, self.docs)) / max(1, n):.0f} tok)"
        return f"{self.rows} x {self.width} (unpacked, padded rows)"


def job_batch(cfg, doc_len: Optional[int] = None, use_data: bool = True) -> Batch:
    """The job's micro-batch shape (see the module docstring)."""
    from kd.ops.planner import config_seq_len

    bs = int(cfg.get("batch_size", 1))
    S = config_seq_len(cfg)
    packed = bool(cfg.dataset.get("packed", False)) if cfg.get("dataset", None) is not None else False
    if doc_len is None and use_data:
        try:
            stats = jobtime.data_stats(cfg, sample_records=256)
            mb = jobtime.micro_batches(stats, 1, int(cfg.get("seed", 0) or 0))
            if mb:
                if packed:
                    key = lambda ids: sum(stats.lengths[i] ** 2 for i in ids)  # noqa: E731  (attention work)
                else:
                    key = lambda ids: max(stats.lengths[i] for i in ids) * len(ids)  # noqa: E731
                ids = sorted(mb, key=key)[len(mb) // 2]
                lens = [stats.lengths[i] for i in ids]
                origin = "the data set's median micro-batch (256 records sampled)"
                if packed:
                    rows = [list(p) for p in _pack(lens, S, bs)]
                    return Batch(bs, S, True, rows, origin)
                return Batch(len(lens), max(lens), False, [[max(lens)] for _ in lens], origin)
        except Exception as e:  # no tokenizer / data set here: synthetic documents
            reason = " ".join(str(e).split())[:160]
            origin_fail = f"data set not readable ({type(e).__name__}: {reason})"
        else:
            origin_fail = "data set empty"
    else:
        origin_fail = "--doc-len given" if doc_len is not None else "data not used"
    n = min(S, int(doc_len or DEFAULT_DOC_LEN))
    if packed:
        k, r = divmod(S, n)
        row = [n] * k + ([r] if r else [])
        return Batch(bs, S, True, [list(row) for _ in range(bs)], f"synthetic {n}-token documents ({origin_fail})")
    return Batch(bs, n, False, [[n] for _ in range(bs)], f"synthetic {n}-token rows ({origin_fail})")


def _pack(lens: Sequence[int], S: int, bs: int) -> List[List[int]]:
    from kd.data.alpaca import best_fit_bins

    bins = [[lens[i] for i in b] for b in best_fit_bins(list(lens), S)]
    while len(bins) < bs:
        bins.append(list(bins[len(bins) % max(1, len(bins))]) if bins else [S])
    return bins[:bs]


def model_inputs(batch: Batch, dev: torch.device) -> Dict[str, Any]:
    """``mask`` / ``input_pos`` as the recipe's collate makes them (torchtune ``padded_collate_packed``: a flex
    BlockMask on CUDA, a dense block-causal mask elsewhere; nothing for unpacked rows: causal SDPA)."""
    if not batch.packed:
        return {"mask": None, "input_pos": None}
    from torchtune.data import padded_collate_packed
    from torchtune.utils import batch_to_device

    packs = []
    for docs in batch.docs:
        seg = list(docs) + ([batch.width - sum(docs)] if sum(docs) < batch.width else [])
        pos = torch.cat([torch.arange(n) for n in seg])
        packs.append({"tokens": torch.zeros(batch.width, dtype=torch.long), "labels": torch.zeros(batch.width, dtype=torch.long),
                      "input_pos": pos, "seq_lens": torch.tensor(seg)})
    b = padded_collate_packed(packs)
    batch_to_device(b, dev)
    return {"mask": b["mask"], "input_pos": b["input_pos"]}


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------
class _Run:
    def __init__(self, cfg, dev: torch.device, base: Hardware, reps: int, warm: int, log=print):
        self.cfg, self.dev, self.base = cfg, dev, base
        self.dtype = _dtype(cfg)
        self.reps, self.warm = reps, warm
        self.rows: List[Row] = []
        self.sources: Dict[str, str] = {}
        self.values: Dict[str, float] = {}
        self.log = log

    def attempt(self, key: str, fn: Callable[[], None]) -> bool:
        """Run one measurement; a failure is recorded (``sources[key]``) and never aborts the calibration."""
        t0 = time.perf_counter()
        try:
            fn()
            ok = True
        except Exception as e:  # noqa: BLE001 - any failure of one piece: record it, keep the base value
            msg = " ".join(str(e).split())[:240]
            self.sources[f"error_{key}"] = f"{type(e).__name__}: {msg}"
            self.rows.append(Row(key, "FAILED", f"{type(e).__name__}: {msg[:80]}"))
            ok = False
        finally:
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
        self.log(f"kd calibrate: {key} {'done' if ok else 'FAILED'} ({time.perf_counter() - t0:.1f} s)")
        return ok

    def t(self, fn) -> float:
        return time_call(fn, self.dev, self.warm, self.reps, min_time=0.0 if self.dev.type == "cuda" else 0.2)


def _gemm(run: _Run, counts, T: int, which: str) -> Tuple[float, str]:
    """Aggregate GEMM rate (FLOP/s) over one layer's projections of ``counts`` at T tokens, in the run's dtype."""
    dev, dt = run.dev, run.dtype
    flops = secs = 0.0
    for n, k, m in linear_shapes(counts):
        x = torch.randn(T, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
        s = run.t(lambda x=x, w=w: torch.nn.functional.linear(x, w))
        flops += m * 2.0 * T * n * k
        secs += m * s
    return flops / secs, f"{which} layer's 7 projections at T={T} ({', '.join(f'{n}x{k}' for n, k, _ in linear_shapes(counts))})"


def _fp8_problem(dev: torch.device) -> str:
    if dev.type != "cuda":
        return f"not available on {dev.type} (FP8 GEMMs need CUDA sm_89+; the CPU runs an emulation)"
    from kd.teacher.precision import FP8_MIN_CAPABILITY

    cap = torch.cuda.get_device_capability(dev)
    if cap < FP8_MIN_CAPABILITY:
        return f"not available on sm_{cap[0]}{cap[1]} (FP8 tensor cores need sm_89+)"
    return ""


def _fp8_gemm(run: _Run, counts, T: int) -> float:
    from kd.teacher.precision import quantize_rowwise

    dev = run.dev
    T16 = T + (-T) % 16
    flops = secs = 0.0
    for n, k, m in linear_shapes(counts):
        x8, sx = quantize_rowwise(torch.randn(T16, k, device=dev, dtype=torch.bfloat16))
        w8, sw = quantize_rowwise(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02)
        swr = sw.reshape(1, -1)
        s = run.t(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=swr, out_dtype=torch.bfloat16,
                                           use_fast_accum=True))
        flops += m * 2.0 * T16 * n * k
        secs += m * s
    return flops / secs


def _copy_gbps(run: _Run, nbytes: int) -> float:
    x = torch.empty(nbytes // 4, device=run.dev, dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    s = run.t(lambda: y.copy_(x))
    return 2.0 * x.numel() * 4 / s / 1e9


def _nf4_dequant(run: _Run, counts) -> Tuple[float, int, str]:
    """(seconds, weights, impl) of kd's dequantisation of the teacher's largest projection."""
    from torchao.dtypes.nf4tensor import to_nf4

    from kd.teacher.nf4 import dequantize_nf4, uses_triton

    n, k = max(((n, k) for n, k, _ in linear_shapes(counts)), key=lambda s: s[0] * s[1])
    w = torch.randn(n, k, device=run.dev, dtype=run.dtype) * 0.02
    w4 = to_nf4(w, 64, 256)
    del w
    s = run.t(lambda: dequantize_nf4(w4))
    return s, n * k, ("triton" if uses_triton(w4) else "torch") + f" {n}x{k}"


#: decode batches the read-once NF4 kernel is timed at (kd.ops.jobtime.fused_ops interpolates between them)
FUSED_ROWS = (1, 16, 128, 512)


def _nf4_read_once(run: _Run, counts, fp32_tflops: float) -> Dict[str, float]:
    """``fused_ops_per_weight`` for :func:`kd.ops.jobtime.fused_ops`: the read-once kernel
    (:func:`kd.generate.nf4_matmul.nf4_matmul_fused`, tiles tuned on the first call) over one teacher layer's seven
    projections at each of :data:`FUSED_ROWS` rows, as seconds x ``fp32_tflops`` / weights, so the planner gives back
    the measured time on this machine."""
    from torchao.dtypes.nf4tensor import to_nf4

    from kd.generate.nf4_matmul import nf4_matmul_fused

    ws = []
    for n, k, m in linear_shapes(counts):
        ws.append((to_nf4(torch.randn(n, k, device=run.dev, dtype=torch.bfloat16) * 0.02, 64, 256), m))
    n_layer = sum(w.shape[0] * w.shape[1] * m for w, m in ws)
    out = {}
    for rows in FUSED_ROWS:
        xs = [torch.randn(rows, w.shape[1], device=run.dev, dtype=torch.bfloat16) for w, _ in ws]
        s = run.t(lambda: [nf4_matmul_fused(x, w) for x, (w, m) in zip(xs, ws) for _ in range(m)])
        out[str(rows)] = s * fp32_tflops * 1e12 / n_layer
    return out


def _teacher_layer(run: _Run, cfg, batch: Batch, inputs) -> Tuple[float, str]:
    """Seconds of one teacher decoder layer forward (no grad), in the config's precision and compile setting."""
    from torchtune import training

    from kd.teacher.precision import quantize_layer_, resolve_precision
    from kd.train.models import build_on_meta

    prec = resolve_precision(cfg.get("teacher_quantization", None), run.dev, run.dtype, warn=False)
    meta = build_on_meta(cfg.teacher_model, run.dtype)
    layer = random_init_(meta.layers[0], run.dev, run.dtype, seed=1)
    del meta
    if prec.name in ("fp8", "nf4_fp8"):
        from kd.teacher.precision import exact_casts_under_compile

        exact_casts_under_compile()  # as apply_precision does for the recipe
    backend = "torchao" if prec.impl == "fp8:torchao" else "kd"
    quantize_layer_(layer, prec.name, fp8_backend=backend)
    layer.eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    h = _holder(layer)
    if cfg.get("compile", False):
        training.compile_model(h, verbose=False)
    layer = h.layers[0]
    from kd.ops.planner import build_and_count

    d = build_and_count(cfg.teacher_model).embed_dim
    x = torch.randn(batch.rows, batch.width, d, device=run.dev, dtype=run.dtype)

    def fwd():
        with torch.no_grad():
            layer(x, **inputs)

    s = run.t(fwd)
    desc = prec.name + (f" (requested {prec.requested}: {prec.fallback_reason})" if prec.name != prec.requested else "")
    return s, f"{desc} [{prec.impl}]" + (", compiled" if cfg.get("compile", False) else ", eager")


def _attention(run: _Run, counts, batch: Batch, inputs) -> float:
    """Seconds of the attention call alone (torchtune's SDPA / flex path with the recipe's mask), teacher heads."""
    from torchtune.modules.attention_utils import _sdpa_or_flex_attention

    attn = _sdpa_or_flex_attention()
    B, S, h, hd = batch.rows, batch.width, counts.num_heads, counts.head_dim
    q = torch.randn(B, h, S, hd, device=run.dev, dtype=run.dtype)
    k = torch.randn(B, h, S, hd, device=run.dev, dtype=run.dtype)  # torchtune expands the kv heads before the call
    v = torch.randn(B, h, S, hd, device=run.dev, dtype=run.dtype)
    mask = inputs["mask"]

    def f():
        with torch.no_grad():
            attn(q, k, v, mask=mask, dropout_p=0.0, is_causal=mask is None)

    return run.t(f)


def _student_layer(run: _Run, cfg, batch: Batch, inputs, checkpointed: bool) -> float:
    """Seconds of one student LoRA layer forward + backward (activation gradients, adapter gradients; every weight's
    gradient for a full fine-tune, as the recipe trains it)."""
    from torchtune import training

    from kd.train.models import apply_activation_checkpointing, build_on_meta, is_adapter_param

    meta = build_on_meta(cfg.model, run.dtype)
    d = meta.tok_embeddings.embedding_dim
    layer = random_init_(meta.layers[0], run.dev, run.dtype, seed=2)
    del meta
    full = not any(is_adapter_param(n) for n, _ in layer.named_parameters())  # a plain builder: full fine-tune
    for n, p in layer.named_parameters():
        p.requires_grad_(full or is_adapter_param(n))
    h = _holder(layer)
    if checkpointed:
        apply_activation_checkpointing(h, [0])
    if cfg.get("compile", False):
        training.compile_model(h, verbose=False)
    layer = h.layers[0]
    layer.train()
    x0 = torch.randn(batch.rows, batch.width, d, device=run.dev, dtype=run.dtype)
    g = torch.randn_like(x0)

    def step():
        x = x0.detach().requires_grad_(True)
        y = layer(x, **inputs)
        y.backward(g)

    return run.t(step)


def _head(run: _Run, cfg, batch: Batch, has_teacher: bool) -> Tuple[float, str]:
    """Seconds of the fused loss head forward + backward over the micro-batch's positions."""
    from kd.losses.components import build_losses
    from kd.losses.heads import FusedKDHead, FusedTargets
    from kd.ops.planner import build_and_count
    from kd.train.models import build_on_meta, is_adapter_param

    meta = build_on_meta(cfg.model, run.dtype)
    out = meta.output
    if isinstance(out, torch.nn.Module):
        random_init_(out, run.dev, run.dtype, seed=3)
    else:  # tied: the projection is the embedding table
        random_init_(meta.tok_embeddings, run.dev, run.dtype, seed=3)
    chunk = int(cfg.get("fused_chunk_size", 1024))
    head = FusedKDHead(out, chunk_size=chunk)
    for n, p in head.named_parameters():
        p.requires_grad_(is_adapter_param(n) or n.startswith("lora_"))
    ce, kd = build_losses(cfg, "fused")
    ratio = float(cfg.get("kd_ratio", 0.5)) if has_teacher else 0.0
    B, S = batch.rows, batch.width
    d = meta.tok_embeddings.embedding_dim
    V = meta.tok_embeddings.num_embeddings
    g = torch.Generator(device=run.dev).manual_seed(4)
    h0 = torch.randn(B, S, d, device=run.dev, dtype=run.dtype, generator=g)
    labels = torch.randint(0, V, (B, S), device=run.dev, generator=g)
    labels[:, : S // 2] = -100  # prompt positions: no loss (the recipe masks them the same way)
    th = tw = None
    if has_teacher:
        tc = build_and_count(cfg.teacher_model)
        th = torch.randn(B, S, tc.embed_dim, device=run.dev, dtype=run.dtype, generator=g)
        tw = torch.randn(tc.vocab_size, tc.embed_dim, device=run.dev, dtype=run.dtype, generator=g) * 0.02

    def step():
        h = h0.detach().requires_grad_(True)
        with head.fused(FusedTargets(labels=labels, loss=ce, kd_loss=kd, kd_ratio=ratio, teacher_hidden=th,
                                     teacher_weight=tw)) as call:
            loss = head(h)
        loss.backward()
        return call

    s = run.t(step)
    form = str(cfg.get("loss_form", "fused"))
    note = f"fused, chunk {chunk}, V={V}" + ("" if form == "fused" else f" (the config runs loss_form={form}: "
                                                                        "the fused head was measured)")
    return s, note


def _optimizer(run: _Run, cfg) -> Tuple[float, int, str]:
    """(seconds, parameters, name) of one optimizer step as the recipe takes it: gradient clipping (``clip_grad_norm``)
    + the config's optimizer over the student's adapter parameters (random values and gradients)."""
    from torchtune import config as tt_config

    from kd.train.models import build_on_meta, is_adapter_param

    meta = build_on_meta(cfg.model, run.dtype)
    g = torch.Generator(device=run.dev).manual_seed(5)
    params = []
    for n, p in meta.named_parameters():
        if is_adapter_param(n):
            q = torch.nn.Parameter(torch.empty(p.shape, device=run.dev, dtype=run.dtype).normal_(0, 0.02, generator=g))
            q.grad = torch.empty_like(q).normal_(0, 1e-3, generator=g)
            params.append(q)
    del meta
    if not params:
        raise RuntimeError("the student has no adapter parameters (a full fine-tune): optimizer not measured")
    opt = tt_config.instantiate(cfg.optimizer, params)
    clip = cfg.get("clip_grad_norm", None)

    def step():
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm=float(clip))
        opt.step()

    s = run.t(step)
    return s, sum(p.numel() for p in params), type(opt).__name__ + (f" + clip_grad_norm {clip}" if clip else "")


def _disk(run: _Run, where: Path, mb: int) -> Tuple[float, Path]:
    """GB/s of writing ``mb`` MB (8 MB blocks, then fsync) to a temporary file in ``where``; deleted after."""
    where.mkdir(parents=True, exist_ok=True) if not where.exists() else None
    block = os.urandom(8 << 20)
    n = max(1, (mb << 20) // len(block))
    fd, name = tempfile.mkstemp(prefix=".kd_calibrate_", dir=str(where))
    try:
        t0 = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            for _ in range(n):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        s = time.perf_counter() - t0
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    return n * len(block) / s / 1e9, where


def _disk_dir(cfg) -> Path:
    """The output_dir's parent (the nearest existing ancestor: nothing is created)."""
    p = Path(str(cfg.get("output_dir", ".") or ".")).expanduser().absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def allreduce(dev: torch.device, mb: int, reps: int = 5) -> Tuple[float, float, int, int]:
    """Under torchrun (WORLD_SIZE > 1): (all-reduce seconds, bus bandwidth GB/s, payload bytes, world size) of a
    bf16 payload of ``mb`` MB (capped at 256 MB), on every rank. Initialises the process group if needed."""
    import datetime

    import torch.distributed as dist

    mb = max(1, min(int(mb), MAX_ALLREDUCE_MB))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=int(os.environ.get("KD_CALIBRATE_TIMEOUT", 600))))
    n = dist.get_world_size()
    x = torch.ones((mb << 20) // 2, device=dev, dtype=torch.bfloat16)
    s = time_call(lambda: dist.all_reduce(x), dev, 2, reps)
    nbytes = x.numel() * 2
    return s, 2.0 * (n - 1) / n * nbytes / s / 1e9, nbytes, n


# --------------------------------------------------------------------------------------------------
# The model check and the derivation
# --------------------------------------------------------------------------------------------------
def model_components(cfg, hw: Hardware, batch: Batch) -> Dict[str, float]:
    """Seconds per component that :func:`kd.ops.jobtime.estimate_job` gives for ONE micro-batch shaped like
    ``batch`` (no validation, checkpoints, accumulation or cache phases)."""
    from omegaconf import OmegaConf

    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for k in ("teacher_cache", "eval_every_n_steps", "max_steps_per_epoch", "save_every_n_steps"):
        if k in c:
            del c[k]
    c.gradient_accumulation_steps = 1
    c.epochs = 1
    lengths = [n for docs in batch.docs for n in docs]
    stats = jobtime.DataStats(lengths=lengths, answers=[n // 2 for n in lengths], val_samples=0,
                              max_seq_len=batch.width, packed=batch.packed, batch_size=batch.rows,
                              packing="best_fit")
    est = jobtime.estimate_job(c, hw, stats, world_size=1)
    if est.micro_batches_per_epoch != 1 or est.processed_tokens_per_epoch != batch.tokens:
        raise RuntimeError(f"the model saw {est.micro_batches_per_epoch} micro-batches / "
                           f"{est.processed_tokens_per_epoch} positions for the calibration batch {batch.describe()}")
    return {x.name: x.seconds for x in est.components}


def teacher_calibration(cfg) -> str:
    return jobtime.teacher_calibration(cfg)


def derive(cfg, base: Hardware, batch: Batch, m: Dict[str, float], *, name: str,
           sources: Dict[str, str]) -> Tuple[Hardware, Dict[str, Tuple[float, float]]]:
    """The profile from the measurements ``m`` (keys: bf16_tflops, fp8_tflops, mem_gbps, disk_gbps,
    interconnect_gbps, teacher_layer_s, student_layer_s / student_layer_ac_s, head_s); absent keys keep
    ``base``'s values. Returns (profile, {component: (model s, measured s)})."""
    from kd.ops.planner import build_and_count

    hw = replace(base, name=name, measured=True, sources=dict(sources))
    for k in ("bf16_tflops", "fp8_tflops", "mem_gbps", "disk_gbps", "interconnect_gbps"):
        if k in m:
            setattr(hw, k, _sig(m[k]))
    if "fused_ops_per_weight" in m:
        hw.fused_ops_per_weight = {r: _sig(v) for r, v in m["fused_ops_per_weight"].items()}
    one = replace(hw, teacher_eff=1.0, student_eff=1.0, head_eff=1.0)
    comps = model_components(cfg, one, batch)
    s = build_and_count(cfg.model)
    has_teacher = cfg.get("teacher_model", None) is not None
    targets: Dict[str, float] = {}
    if has_teacher and "teacher_layer_s" in m:
        t = build_and_count(cfg.teacher_model)
        meas = t.num_layers * m["teacher_layer_s"]
        dq = comps.get("teacher NF4 dequantisation", 0.0)
        if meas - dq <= 0:
            hw.sources["teacher_eff"] = (f"base {base.name}'s value: the model's NF4 dequantisation term ({_ms(dq)}) "
                                         f"exceeds the measured teacher ({_ms(meas)})")
        else:
            hw.teacher_eff = _sig(comps["teacher forward"] / (meas - dq))
            targets["teacher forward (+ NF4 dequant)"] = meas
        hw.teacher_calibrated_for = teacher_calibration(cfg)
    ac = len(activation_checkpoint_layers(cfg, s.num_layers))
    need = (["student_layer_ac_s"] if ac else []) + (["student_layer_s"] if ac < s.num_layers else [])
    if all(k in m for k in need):
        meas = ac * m.get("student_layer_ac_s", 0.0) + (s.num_layers - ac) * m.get("student_layer_s", 0.0)
        hw.student_eff = _sig(comps["student forward + backward"] / meas)
        targets["student forward + backward"] = meas
    if "head_s" in m:
        hw.head_eff = _sig(comps["loss head (fused)"] / m["head_s"])
        targets["loss head (fused)"] = m["head_s"]
    if "optimizer_s" in m and comps.get("optimizer", 0) > 0:
        hw.optimizer_eff = _sig(comps["optimizer"] / m["optimizer_s"])
        targets["optimizer"] = m["optimizer_s"]
    check: Dict[str, Tuple[float, float]] = {}
    if targets:
        got = model_components(cfg, hw, batch)
        for k, v in targets.items():
            model = got["teacher forward"] + got.get("teacher NF4 dequantisation", 0.0) if k.startswith("teacher") \
                else got[k]
            check[k] = (model, v)
    return hw, check


# --------------------------------------------------------------------------------------------------
# The whole calibration
# --------------------------------------------------------------------------------------------------
def calibrate(cfg, *, name: Optional[str] = None, base: Hardware = jobtime.H200, device: Optional[str] = None,
              doc_len: Optional[int] = None, reps: Optional[int] = None, disk_mb: Optional[int] = None,
              allreduce_mb: int = 64, log=print) -> Calibration:
    from kd.ops.planner import build_and_count

    dev = resolve_device(cfg, device)
    cuda = dev.type == "cuda"
    reps = int(reps or 5)
    warm = 3 if cuda else 1
    if disk_mb is None:
        disk_mb = MAX_DISK_MB if cuda else 32
    disk_mb = max(1, min(int(disk_mb), MAX_DISK_MB))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    run = _Run(cfg, dev, base, reps, warm, log=log)
    dname = device_name(dev)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tag = f"{dname}, {now}"
    run.sources["device"] = f"{dname}; torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if cuda else "")
    run.sources["date"] = now
    run.sources["base"] = f"fields not measured keep the {base.name!r} profile's values"

    # all-reduce first, on every rank (then only rank 0 goes on)
    if world > 1:
        def ar():
            s, bus, nbytes, n = allreduce(dev, allreduce_mb, reps)
            run.values["interconnect_gbps"] = bus  # kd plan --time divides bus bytes by it
            run.sources["interconnect_gbps"] = (
                f"measured: all-reduce of {nbytes / 1e6:.0f} MB bf16 over {n} ranks "
                f"({os.environ.get('LOCAL_WORLD_SIZE', '?')} per node) {_ms(s)}, bus bandwidth {bus:.2f} GB/s; "
                f"value = the bus bandwidth (kd plan --time counts the link's bytes as bus bytes), {tag}")
            run.rows.append(Row("all-reduce bus bandwidth", f"{bus:.2f} GB/s", f"{nbytes / 1e6:.0f} MB x {n} ranks"))
        run.attempt("all-reduce", ar)
        if int(os.environ.get("RANK", "0") or 0) != 0:  # the other ranks only join the all-reduce
            return Calibration(replace(base, sources=dict(run.sources)), run.rows, dict(run.values))
    else:
        run.sources["interconnect_gbps"] = (f"base {base.name}'s value: not measured (single process; start kd "
                                            "calibrate under torchrun on every node to measure the all-reduce)")

    s_cnt = build_and_count(cfg.model)
    has_teacher = cfg.get("teacher_model", None) is not None
    t_cnt = build_and_count(cfg.teacher_model) if has_teacher else None
    batch = job_batch(cfg, doc_len)
    T = batch.tokens
    run.sources["shape"] = f"micro-batch {batch.describe()} = {T} positions, dtype {cfg.get('dtype', 'bf16')}; " \
                           f"{batch.origin}"
    log(f"kd calibrate: {dname}; micro-batch {batch.describe()} ({batch.origin})")
    dtn = "bf16" if run.dtype == torch.bfloat16 else "fp32"

    def copy():
        nbytes = (1 << 30) if cuda else (64 << 20)
        v = _copy_gbps(run, nbytes)
        run.values["mem_gbps"] = v
        run.sources["mem_gbps"] = f"measured: device copy of {nbytes >> 20} MiB, (read + write) bytes / time, {tag}"
        run.rows.append(Row("copy bandwidth", f"{v:,.1f} GB/s", f"{nbytes >> 20} MiB"))

    run.attempt("copy bandwidth", copy)

    def gemm():
        shapes = [(t_cnt, "teacher")] if has_teacher else []
        shapes.append((s_cnt, "student"))
        for c, which in shapes:
            r, desc = _gemm(run, c, T, which)
            run.rows.append(Row(f"{dtn} GEMM ({which})", f"{r / 1e12:,.2f} TFLOP/s", desc))
            key = "bf16_tflops" if "bf16_tflops" not in run.values else "student_gemm_tflops"
            run.values[key] = r / 1e12
            run.sources[key] = f"measured: {dtn} F.linear over the {desc}, {tag}"

    run.attempt(f"{dtn} GEMM", gemm)

    if has_teacher:
        problem = _fp8_problem(dev)
        if problem:
            run.sources["fp8_tflops"] = f"{problem}: base {base.name}'s value kept"
            run.rows.append(Row("FP8 GEMM (teacher)", "not available", problem))
        else:
            def fp8():
                r = _fp8_gemm(run, t_cnt, T)
                run.values["fp8_tflops"] = r / 1e12
                run.sources["fp8_tflops"] = (f"measured: torch._scaled_mm rowwise e4m3 (fast accumulation, bf16 out) over "
                                             f"the teacher layer's 7 projections at T={T + (-T) % 16}, {tag}")
                run.rows.append(Row("FP8 GEMM (teacher)", f"{r / 1e12:,.2f} TFLOP/s", f"teacher shapes, T={T}"))

            run.attempt("FP8 GEMM", fp8)

        def nf4():
            s, n, impl = _nf4_dequant(run, t_cnt)
            rate = n * (0.5 + (2 if run.dtype == torch.bfloat16 else 4)) / s / 1e9
            run.values["nf4_dequant_gbps"] = rate
            run.rows.append(Row("NF4 dequantisation", f"{n / s / 1e9:,.2f} Gweights/s = {rate:,.1f} GB/s", impl))
            src = f"kd.teacher.nf4.dequantize_nf4 ({impl}) {n / s / 1e9:.3f} Gweights/s = {rate:.1f} GB/s, {tag}"
            # the training path's kernel; dequant_bw_eff is the static decode engine's (kd.teacher.nf4_cuda): a decode
            # field, kept from the base profile
            run.sources["dequant_bw_eff"] = (f"base {base.name}'s value (the static decode engine's CUDA kernel is not "
                                             f"measured); the training path's NF4 dequantisation: {src}")
            run.sources["nf4_dequant"] = f"measured: {src} (inside the teacher layer time)"

        run.attempt("NF4 dequantisation", nf4)

        from kd.generate.nf4_matmul import fused_available

        if fused_available(run.dev):
            def read_once():
                ops = _nf4_read_once(run, t_cnt, base.fp32_tflops)
                run.values["fused_ops_per_weight"] = ops
                run.sources["fused_ops_per_weight"] = (
                    f"measured: kd.generate.nf4_matmul's read-once kernel over one teacher layer's projections at "
                    f"{', '.join(map(str, FUSED_ROWS))} rows, as s x {base.fp32_tflops:g} TFLOP/s (the base's fp32 "
                    f"rate) / weights, {tag}")
                run.rows.append(Row("read-once NF4 kernel", " / ".join(f"{v:.0f}" for v in ops.values()),
                                    f"fp32-op equivalents per weight at {'/'.join(map(str, FUSED_ROWS))} rows"))

            run.attempt("read-once NF4 kernel", read_once)

    inputs: Dict[str, Any] = {}

    def mk_inputs():
        inputs.update(model_inputs(batch, dev))

    run.attempt("mask", mk_inputs)
    if "mask" not in inputs:
        inputs.update({"mask": None, "input_pos": None})
    comp = "compiled" if cfg.get("compile", False) else "eager"

    if has_teacher:
        def attn():
            s = _attention(run, t_cnt, batch, inputs)
            f = jobtime._attn_flops([n for d in batch.docs for n in d], 1, t_cnt.num_heads, t_cnt.head_dim, 1)
            kind = "document-masked" if batch.packed else "causal"
            mname = type(inputs["mask"]).__name__ if inputs["mask"] is not None else "is_causal"
            run.rows.append(Row("attention (teacher heads)", f"{_ms(s)} = {f / s / 1e12:,.2f} TFLOP/s",
                                f"{batch.describe()}, {kind} ({mname})"))
            run.sources["attention"] = f"measured: {_ms(s)} per teacher layer, {kind} {mname}, {tag} (in the layer time)"

        run.attempt("attention", attn)

        def teacher():
            s, desc = _teacher_layer(run, cfg, batch, inputs)
            run.values["teacher_layer_s"] = s
            run.rows.append(Row("teacher layer forward", _ms(s), f"{desc}, {batch.describe()}"))
            run.sources["teacher_layer"] = f"measured: one teacher layer forward {_ms(s)}, {desc}, {tag}"

        run.attempt("teacher layer", teacher)

    ac = len(activation_checkpoint_layers(cfg, s_cnt.num_layers))
    variants = ([True] if ac else []) + ([False] if ac < s_cnt.num_layers else [])
    for ckpt in variants:
        def student(ckpt=ckpt):
            s = _student_layer(run, cfg, batch, inputs, ckpt)
            run.values["student_layer_ac_s" if ckpt else "student_layer_s"] = s
            what = f"student LoRA layer fwd+bwd{' (AC)' if ckpt else ''}"
            run.rows.append(Row(what, _ms(s), f"{comp}, {batch.describe()}"))
            run.sources["student_layer" + ("_ac" if ckpt else "")] = f"measured: {what} {_ms(s)}, {comp}, {tag}"

        run.attempt("student layer" + (" (AC)" if ckpt else ""), student)

    def head():
        s, note = _head(run, cfg, batch, has_teacher)
        run.values["head_s"] = s
        run.rows.append(Row("fused loss head fwd+bwd", _ms(s), f"{note}, {T} positions"))
        run.sources["head"] = f"measured: fused loss head fwd+bwd {_ms(s)}, {note}, {T} positions, {tag}"

    run.attempt("loss head", head)

    def optimizer():
        s, n, what = _optimizer(run, cfg)
        run.values["optimizer_s"] = s
        run.rows.append(Row("optimizer step", _ms(s), f"{what}, {n:,} adapter params"))
        run.sources["optimizer"] = f"measured: {what} over {n:,} adapter params {_ms(s)}, {tag}"

    run.attempt("optimizer step", optimizer)

    def disk():
        v, where = _disk(run, _disk_dir(cfg), disk_mb)
        run.values["disk_gbps"] = v
        run.sources["disk_gbps"] = f"measured: {disk_mb} MB written + fsync'ed in {where} (deleted), {tag}"
        run.rows.append(Row("disk write", f"{v:,.2f} GB/s", f"{disk_mb} MB in {where}"))

    run.attempt("disk write", disk)

    for k, src in (("bf16_tflops", "GEMM"), ("mem_gbps", "copy")):
        if k not in run.values:
            run.sources.setdefault(k, f"base {base.name}'s value ({src} measurement failed)")
    if has_teacher and "fp8_tflops" not in run.values:
        run.sources.setdefault("fp8_tflops", f"base {base.name}'s value (FP8 measurement failed)")
    if "dequant_bw_eff" not in run.sources:
        run.sources["dequant_bw_eff"] = f"base {base.name}'s value (no teacher / not measured)"
    run.sources["decode"] = (f"{', '.join(f for f in DECODE_FIELDS if f not in run.values)}, dequant_bw_eff: base "
                             f"{base.name}'s values (not measured by kd calibrate)")
    name = name or _slug(dname)
    try:
        hw, check = derive(cfg, base, batch, run.values, name=name, sources=run.sources)
    except Exception as e:  # noqa: BLE001 - keep the measured rates, the base efficiencies
        msg = f"{type(e).__name__}: {' '.join(str(e).split())[:240]}"
        run.sources["error_derive"] = msg
        run.rows.append(Row("derive efficiencies", "FAILED", msg[:80]))
        hw = replace(base, name=name, measured=True, sources=dict(run.sources))
        for k in ("bf16_tflops", "fp8_tflops", "mem_gbps", "disk_gbps", "interconnect_gbps"):
            if k in run.values:
                setattr(hw, k, _sig(run.values[k]))
        if "fused_ops_per_weight" in run.values:
            hw.fused_ops_per_weight = dict(run.values["fused_ops_per_weight"])
        check = {}
    prec = teacher_calibration(cfg) if has_teacher else "-"
    for k, src in (("teacher_eff", f"teacher_layer: teacher forward calibrated for {prec}"),
                   ("student_eff", "student_layer"), ("head_eff", "head"), ("optimizer_eff", "optimizer")):
        if k not in hw.sources:
            ok = (k == "teacher_eff" and "teacher_layer_s" in run.values) or \
                 (k == "student_eff" and any(x in run.values for x in ("student_layer_s", "student_layer_ac_s"))) or \
                 (k == "head_eff" and "head_s" in run.values) or (k == "optimizer_eff" and "optimizer_s" in run.values)
            hw.sources[k] = (f"derived so kd plan --time reproduces the measured {src} ({batch.describe()})"
                             if ok else f"base {base.name}'s value (measurement failed or no teacher)")
    return Calibration(hw, run.rows, dict(run.values), check)


# --------------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------------
def profile_dict(hw: Hardware) -> Dict[str, Any]:
    d = asdict(hw)
    out = {"name": d.pop("name"), "measured": True}
    d.pop("measured")
    src = d.pop("sources")
    out.update({k: (_sig(v) if isinstance(v, float) else v) for k, v in d.items()})
    out["sources"] = {k: str(v) for k, v in src.items()}
    return out


def write_profile(hw: Hardware, path: Path, overwrite: bool = False) -> Path:
    import yaml

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"--out {str(path)!r} exists; pass --overwrite to replace it, or choose another path.")
    if path.parent and not path.parent.exists():
        raise ConfigError(f"--out {str(path)!r}: directory {str(path.parent)!r} does not exist.")
    text = ("# hardware profile written by `kd calibrate` (kd/ops/calibrate.py); use: kd plan --time --hardware "
            f"{path.name} --config ...\n") + yaml.safe_dump(profile_dict(hw), sort_keys=False, allow_unicode=True,
                                                           width=120)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def main(argv: List[str]) -> int:
    from kd.ops.planner import validate_recipe_config
    from kd.ops.preflight import load_config

    p = argparse.ArgumentParser(prog="kd calibrate",
                                description="Measure this machine at a kd_lora config's shapes; write a hardware "
                                            "profile for kd plan --time --hardware.")
    p.add_argument("--config", required=True)
    p.add_argument("--out", default=None, help="profile YAML to write (default: <name>.yaml)")
    p.add_argument("--name", default=None, help="profile name (default: from the device name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--base", default="h200", help="profile whose values fill what is not measured (h200|gb10|YAML)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: the config's device, else cuda if available)")
    p.add_argument("--doc-len", type=int, default=None,
                   help="synthetic document length instead of the data set's median micro-batch")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (median; default 5)")
    p.add_argument("--disk-mb", type=int, default=None, help=f"disk test size, MB (<= {MAX_DISK_MB})")
    p.add_argument("--allreduce-mb", type=int, default=64, help=f"all-reduce payload under torchrun, MB (<= {MAX_ALLREDUCE_MB})")
    args, overrides = p.parse_known_args(argv)
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        raise ConfigError(f"unknown option(s) {' '.join(flags)} (see kd calibrate --help).")
    for k in ("doc_len", "reps", "disk_mb", "allreduce_mb"):
        v = getattr(args, k)
        if v is not None and v < 1:
            raise ConfigError(f"--{k.replace('_', '-')} must be >= 1, got {v}.")
    if args.disk_mb is not None and args.disk_mb > MAX_DISK_MB:
        raise ConfigError(f"--disk-mb must be <= {MAX_DISK_MB}, got {args.disk_mb}.")
    if args.allreduce_mb > MAX_ALLREDUCE_MB:
        raise ConfigError(f"--allreduce-mb must be <= {MAX_ALLREDUCE_MB} (a 16 GB test froze a DGX Spark), "
                          f"got {args.allreduce_mb}.")
    rank = int(os.environ.get("RANK", "0") or 0)
    if args.out and rank == 0 and Path(args.out).exists() and not args.overwrite:
        raise ConfigError(f"--out {args.out!r} exists; pass --overwrite to replace it, or choose another path.")
    cfg = load_config(args.config, overrides)
    if cfg.get("max_new_tokens", None) is not None and cfg.get("teacher_model", None) is None:
        raise ConfigError("kd calibrate needs a kd_lora config (a student model:, teacher_model:, batch_size); "
                          "this looks like a generation config.")
    if cfg.get("model", None) is None:
        raise ConfigError(f"{args.config}: no 'model:' section (kd calibrate needs a kd_lora config).")
    validate_recipe_config(cfg)
    base = jobtime.load_hardware(args.base)
    try:
        cal = calibrate(cfg, name=args.name, base=base, device=args.device, doc_len=args.doc_len, reps=args.reps,
                        disk_mb=args.disk_mb, allreduce_mb=args.allreduce_mb,
                        log=lambda s: print(s, file=sys.stderr, flush=True))
    except ConfigError:
        raise
    except Exception as e:  # never a traceback: every measurement is guarded, this is what is left (set-up)
        if os.environ.get("KD_DEBUG"):
            raise
        raise ConfigError(f"calibration could not start: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                          "(KD_DEBUG=1 shows the traceback)") from None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if rank != 0:
        print(f"kd calibrate: rank {rank}: all-reduce measured; rank 0 writes the profile")
        return 0
    out = Path(args.out or f"{cal.hardware.name}.yaml")
    write_profile(cal.hardware, out, overwrite=args.overwrite)
    print(cal.table())
    print(f"wrote {out}  (kd plan --time --config {args.config} --hardware {out})")
    return 0
