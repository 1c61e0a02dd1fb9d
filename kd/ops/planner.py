"""Peak-memory planner for the online KD recipe (``recipes/kd_lora.py``).

Given a recipe config it builds both torchtune models **on the meta device** (exact parameter counts,
no memory) and estimates the peak memory of one device, broken down into:

- teacher weights (NF4 linears at torchao's exact layout: 0.5 B/weight + int8 block scalers + per-256-block
  factors; embeddings, norms, biases and the output head stay in ``dtype``), plus its transient working set
  (FSDP all-gathered layers, forward intermediates, NF4 dequantised weight);
- student base weights (frozen, ``dtype`` or NF4), LoRA parameters, their gradients and the AdamW state;
  or, for a full fine-tune (a plain builder: no LoRA parameters), every student weight trainable with its
  gradient and optimizer state, all sharded by FSDP2 (torch AdamW: 2 states in the parameter dtype = 4 B/param
  in bf16; torchao ``AdamW8bit``: 1 B per state + one fp32 scale per 256 = 2.03 B/param, measured);
  torch's AdamW keeps ``exp_avg``/``exp_avg_sq`` with ``torch.zeros_like(param)``, i.e. **in the parameter's
  dtype** (bf16 parameters -> bf16 states, no fp32 master copy), gradients are in the parameter dtype too;
  the multi-tensor (foreach, CUDA default) step allocates one temporary the size of the parameters;
- activations saved for backward by every student layer (counted per token from torchtune's layer code:
  RMSNorm inputs, normed inputs, q and the GQA-expanded k/v that SDPA saves, SDPA output + its contiguous copy,
  the 4 MLP intermediates, the rank-r LoRA outputs), or only the layer inputs for checkpointed layers plus one
  recomputed layer during backward;
- the loss head: fused (``loss_form: fused``: ~10 fp32 [chunk, V] buffers + grad of the hidden states) or
  chunked logits (~18 B per logit, the stock torchtune path).

Peak = max over the phases of a step (teacher forward, end of student forward, backward, optimizer step).
The per-token activation formula reproduces the H200 measurements in docs/benchmarks.md within ~2%
(see docs/multi_node.md). API used by the recipe::

    plan = kd.ops.planner.plan_from_config(cfg, world_size)
    print(plan.table())
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from kd.core.config import ConfigError, activation_checkpoint_layers, number
from kd.core.layout import RunLayout
from kd.losses.components import effective_loss_form
from kd.teacher.precision import parse_precision
from kd.train.models import build_on_meta, model_dims
from kd.train.schema import KD_LORA, TEACHER_CACHE  # the recipe's keys, defaults, ranges: the plan reads what it reads
from kd.train.settings import KDLoRASettings, kd_lora_settings, parse_cache

GiB = 2**30
GB10_MEMORY_GIB = 128e9 / GiB  # 128 GB unified memory (CPU + GPU) per DGX Spark = 119.2 GiB
# What a GB10 keeps out of the plan: 8 GiB for the OS, the CUDA context and allocator slack (as on any GPU), plus
# the page cache of the checkpoint shard being read (unified memory: the kernel's cache of a safetensors file
# takes the same DRAM the model does; Qwen2.5-72B-Instruct's shards are <= 3.9 GB) = 12 GiB (`kd plan --gb10`).
GB10_RESERVE_GIB = 8.0 + 4.0

# torchao NF4 layout (block 64, scaler block 256), bytes per weight element
NF4_BYTES_PER_ELEM = 0.5 + 1 / 64  # packed 4-bit data + int8 block scalers
NF4_FACTOR_BLOCK = 64 * 256  # one quantization factor (dtype) per 16384 weights

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
# Fused loss head working set: fp32 [chunk, V] buffers alive at once (measured on the H200: 1.51 GiB at
# chunk 256 and 5.86 GiB at chunk 1024 for V=152,064 -> 10.2-10.4 buffers).
FUSED_HEAD_BUFFERS = 10
# Chunked (stock-style) logits: bytes per logit of [N, V] alive at the end of the forward (student + teacher
# logits upcast to fp32, log-softmaxes saved for backward); stock torchtune measured 20.9 GiB = 18.0 B/logit.
CHUNKED_BYTES_PER_LOGIT = 18  # with bf16 logits; +2 B per dtype byte above 2 (fp32 logits: 22 B)


def _dtype_bytes(name: str) -> int:
    name = str(name).lower()
    if name in ("bf16", "bfloat16", "fp16", "float16", "half"):
        return 2
    if name in ("fp32", "float32", "float"):
        return 4
    raise ConfigError(f"dtype must be bf16 or fp32, got {name!r}.")


@dataclass
class ModelCount:
    """Exact parameter counts of a torchtune decoder, by role (from a meta-device build)."""

    total: int = 0
    linear: int = 0  # decoder-layer projection weights (NF4 candidates)
    other_layer: int = 0  # norms, biases inside decoder layers
    embedding: int = 0
    output: int = 0  # untied output projection (0 when tied)
    final_norm: int = 0
    adapter: int = 0  # LoRA / DoRA
    adapter_tensors: int = 0
    adapter_max: int = 0
    num_layers: int = 0
    embed_dim: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate_dim: int = 0
    vocab_size: int = 0
    lora_rank: int = 0
    lora_per_layer: int = 0  # number of LoRA-wrapped linears per layer
    lora_on_output: bool = False
    tied: bool = False

    @property
    def per_layer_linear(self) -> int:
        return self.linear // max(1, self.num_layers)

    @property
    def per_layer_other(self) -> int:
        return self.other_layer // max(1, self.num_layers)


def count_model(model: torch.nn.Module) -> ModelCount:
    """Count parameters of a (meta) torchtune TransformerDecoder by role."""

    c = ModelCount()
    dims = model_dims(model)
    c.num_layers, c.embed_dim, c.vocab_size = dims["num_layers"], dims["embed_dim"], dims["vocab_size"]
    c.num_heads, c.num_kv_heads, c.head_dim = dims["num_heads"], dims["num_kv_heads"], dims["head_dim"]
    lora_mods_l0 = set()
    for name, p in model.named_parameters():
        n = p.numel()
        c.total += n
        name = name.replace("_checkpoint_wrapped_module.", "")
        if any(k in name for k in ("lora_a", "lora_b", "magnitude")):
            c.adapter += n
            c.adapter_tensors += 1
            c.adapter_max = max(c.adapter_max, n)
            if name.startswith("layers.0.") and "lora_a" in name:
                lora_mods_l0.add(name)
                c.lora_rank = p.shape[0]
            if name.startswith("output.") and "lora_a" in name:
                c.lora_on_output = True
                c.lora_rank = p.shape[0]
        elif name.startswith("layers."):
            leaf = name.split(".")[-2] if name.endswith(".weight") else ""
            if name.endswith(".weight") and leaf in DECODER_LINEARS:
                c.linear += n
                if name.startswith("layers.0.") and leaf == "w1":
                    c.intermediate_dim = p.shape[0]
            else:
                c.other_layer += n
        elif name.startswith("tok_embeddings."):
            c.embedding += n
        elif name.startswith("output."):
            c.output += n
        else:
            c.final_norm += n
    c.lora_per_layer = len(lora_mods_l0)
    c.tied = c.output == 0
    return c


def build_and_count(model_cfg, dtype: torch.dtype = torch.bfloat16) -> ModelCount:
    try:
        model = build_on_meta(model_cfg, dtype)
    except Exception as e:  # bad builder name / kwargs
        msg = " ".join(str(e).split())
        raise ConfigError(f"Cannot build {model_cfg.get('_component_')!r} on the meta device: {msg}") from e
    return count_model(model)


@dataclass
class PlanInputs:
    teacher: ModelCount
    student: ModelCount
    dtype: str = "bf16"
    teacher_quant: Optional[str] = "nf4"  # nf4 | fp8 | nf4_fp8 | None (dense)
    student_quant: Optional[str] = None
    batch_size: int = 1
    seq_len: int = 2048
    ac_layers: int = 0  # student layers with activation checkpointing
    loss_form: str = "fused"
    fused_chunk_size: int = 1024
    world_size: int = 1
    local_world_size: int = 1
    fsdp_strategy: str = "shard"
    teacher_sharding: str = "shard"  # shard | replicate
    device_type: str = "cuda"
    optimizer: str = "AdamW"
    lora_dropout: float = 0.0
    device_memory_bytes: Optional[float] = None
    reserve_bytes: float = 0.0  # CUDA context, allocator slack, OS (unified memory): not in the peak
    teacher_resident: bool = True  # False: targets come from the teacher cache (mode=use, epochs 2+)
    cache_k: int = 0  # teacher cache K (sparse targets per token) when the teacher is not resident


@dataclass
class Plan:
    inputs: PlanInputs
    rows: List[Tuple[str, float, str]] = field(default_factory=list)  # (item, bytes, note) resident at peak
    phases: Dict[str, float] = field(default_factory=dict)
    peak_phase: str = ""

    @property
    def peak_bytes(self) -> float:
        return self.phases[self.peak_phase]

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    @property
    def fits(self) -> Optional[bool]:
        cap = self.inputs.device_memory_bytes
        if cap is None:
            return None
        return self.peak_bytes + self.inputs.reserve_bytes <= cap

    def row(self, name: str) -> float:
        for n, b, _ in self.rows:
            if n == name:
                return b
        raise KeyError(name)

    def table(self) -> str:
        i = self.inputs
        shard = _shard_size(i)
        head = (
            f"kd memory plan (per device): teacher {i.teacher.total / 1e9:.2f}B params "
            f"({i.teacher_quant or i.dtype}), "
            + (f"student {i.student.total:,} params, FULL fine-tune ({i.dtype}, {i.optimizer}), "
               if i.student.adapter == 0 else
               f"student {i.student.total - i.student.adapter:,} base "
               f"({i.student_quant or i.dtype}) + {i.student.adapter:,} LoRA (r={i.student.lora_rank}), ")
            + f"dtype {i.dtype}, batch {i.batch_size} x seq {i.seq_len}, "
            f"AC {i.ac_layers}/{i.student.num_layers} layers, loss {i.loss_form}"
            + (f" (chunk {i.fused_chunk_size})" if i.loss_form == "fused" else "")
            + f", world {i.world_size}"
            + (f" (FSDP {i.fsdp_strategy}, weights sharded over {shard})" if i.world_size > 1 else "")
        )
        w = max(len(r[0]) for r in self.rows) + 2
        lines = [head, "-" * min(120, len(head)), f"{'item':<{w}}{'GiB':>9}  note"]
        for name, b, note in self.rows:
            lines.append(f"{name:<{w}}{b / GiB:>9.2f}  {note}")
        lines.append("-" * 40)
        for ph, b in self.phases.items():
            mark = "  <- peak" if ph == self.peak_phase else ""
            lines.append(f"{'phase: ' + ph:<{w}}{b / GiB:>9.2f}{mark}")
        lines.append(f"{'PEAK (estimate)':<{w}}{self.peak_gib:>9.2f}  ({self.peak_bytes / 1e9:.1f} GB)")
        if i.device_memory_bytes is not None:
            cap = i.device_memory_bytes
            need = self.peak_bytes + i.reserve_bytes
            verdict = "FITS" if need <= cap else "DOES NOT FIT"
            lines.append(
                f"{'device memory':<{w}}{cap / GiB:>9.2f}  peak + {i.reserve_bytes / GiB:.1f} GiB reserve "
                f"({'OS, CUDA context, allocator slack, page cache of a checkpoint shard' if i.reserve_bytes >= GB10_RESERVE_GIB * GiB else 'CUDA context, allocator slack, OS'}) "
                f"= {need / GiB:.1f} GiB -> {verdict} "
                f"(headroom {(cap - need) / GiB:+.1f} GiB)"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        fit = "" if self.fits is None else (" fits" if self.fits else " does NOT fit")
        return f"estimated peak {self.peak_gib:.1f} GiB per device{fit}"


def _shard_size(i: PlanInputs) -> int:
    if i.world_size <= 1:
        return 1
    return i.local_world_size if i.fsdp_strategy == "hybrid" else i.world_size


def activation_elems_per_token(m: ModelCount, lora_dropout: float = 0.0) -> Dict[str, int]:
    """Elements saved for backward per token by one torchtune Qwen2 decoder layer (frozen base, LoRA).

    From torchtune 0.6.1's layer code: ``F.rms_norm`` saves its input (x2 norms), the normed output is saved
    by the projections; SDPA saves q and k, v after torchtune's GQA ``expand(...).flatten`` (a copy at
    ``num_heads``), its output and the ``transpose(1,2).contiguous()`` copy fed to output_proj; the MLP saves
    w1 and w3 outputs, silu(w1) and the product fed to w2; each LoRA linear saves its rank-r intermediate
    (and the dropout mask/input when lora_dropout > 0).
    """
    H = m.embed_dim
    q = m.num_heads * m.head_dim
    kv = q if m.num_kv_heads != m.num_heads else m.num_kv_heads * m.head_dim
    d = {
        "norm inputs": 2 * H,
        "normed inputs": 2 * H,
        "attention q/k/v": q + 2 * kv,
        "attention out (+contiguous)": 2 * q,
        "mlp": 4 * m.intermediate_dim,
        "lora": m.lora_rank * m.lora_per_layer,
    }
    if lora_dropout > 0:
        d["lora dropout"] = 2 * H  # dropped inputs of attention and MLP LoRA (masks ~1 B, ignored)
    return d


def _teacher_quant(cfg) -> Optional[str]:
    """The config's teacher precision (kd.teacher.precision names), None for dense (bf16 / null)."""

    q = parse_precision(cfg.get("teacher_quantization", None))
    return None if q == "bf16" else q


def optimizer_state_bytes(name: str, param_bytes: int) -> Tuple[int, float, str]:
    """(states per parameter, bytes per state, description) of an optimizer class name."""
    n = name.lower()
    if "sgd" in n:
        return 1, float(param_bytes), "1 state in the param dtype"
    if "8bit" in n:
        return 2, 1 + 4 / 256, "torchao 8-bit: int8 codes + an fp32 scale per 256"
    if "4bit" in n:
        return 2, 0.5 + 4 / 128, "torchao 4-bit: packed codes + an fp32 scale per 128"
    if "fp8" in n:
        return 2, 1 + 4 / 256, "torchao FP8 states + scales"
    return 2, float(param_bytes), "2 states in the param dtype (torch uses zeros_like(param))"


# One function on purpose (~135 lines): the rows (teacher, student, activations, head) and the four phases at
# the end share some thirty intermediate byte counts; split apart, each piece would take and return most of
# them, and the accounting would no longer read top to bottom as one memory model.
def estimate(i: PlanInputs) -> Plan:
    """Compute the per-device peak for the given inputs."""
    t, s = i.teacher, i.student
    full = s.adapter == 0  # a plain builder: full fine-tune, every weight trains
    n_train = s.total if full else s.adapter
    eb = _dtype_bytes(i.dtype)
    shard = _shard_size(i)
    fsdp = i.world_size > 1
    N = i.batch_size * i.seq_len  # tokens per micro-batch per device
    cuda = i.device_type == "cuda"
    plan = Plan(inputs=i)
    rows = plan.rows

    def linear_bytes(numel: int, quant: Optional[str]) -> float:
        if quant in ("nf4", "nf4_fp8"):  # nf4_fp8 keeps NF4 storage (+ 8 B of row scales per row, ignored)
            return numel * NF4_BYTES_PER_ELEM + math.ceil(numel / NF4_FACTOR_BLOCK) * eb
        if quant == "fp8":  # e4m3 + one fp32 scale per row (ignored)
            return numel * 1.0
        return numel * eb

    # teacher_sharding=replicate keeps a whole (frozen) teacher on every rank: no weight traffic
    t_shard = 1 if i.teacher_sharding == "replicate" else shard
    t_fsdp = fsdp and t_shard > 1
    # ---- teacher ------------------------------------------------------------------------------------
    t_layers = linear_bytes(t.linear, i.teacher_quant) + t.other_layer * eb
    t_lin_note = {"fp8": "FP8 e4m3", "nf4_fp8": "NF4 (FP8 GEMM)"}.get(i.teacher_quant, "NF4 (torchao layout)")
    t_root = (t.embedding + t.final_norm) * eb
    t_head = t.output * eb
    if i.loss_form == "fused" and not t.tied:
        # the recipe detaches the teacher head and keeps it replicated beside the model (not sharded)
        t_res = t_layers / t_shard + t_root / t_shard + t_head
        # FSDP2 never reshards the root unit after forward: embedding + final norm stay gathered
        t_root_gathered = t_root * (1 - 1 / t_shard) if t_fsdp else 0.0
        note = f"{t_lin_note} linears + embedding/norms/head in dtype" if i.teacher_quant else "dtype"
    else:
        t_res = (t_layers + t_root + t_head) / t_shard
        t_root_gathered = (t_root + t_head) * (1 - 1 / t_shard) if t_fsdp else 0.0
        note = f"{t_lin_note} linears + rest in dtype" if i.teacher_quant else "dtype"
    if t_fsdp:
        note += f"; 1/{t_shard} shard"
    elif fsdp:
        note += "; replicated on every rank (teacher_sharding=replicate)"
    if not i.teacher_resident:
        # teacher cache: the teacher is not loaded; the step holds only the sparse targets
        t_res = t_root_gathered = 0.0
        note = (f"not loaded: teacher_cache targets instead ({i.cache_k} ids + weights per token, "
                f"{N * max(1, i.cache_k) * 12 / 2**20:.1f} MiB per micro-batch)")
    rows.append(("teacher weights", t_res, note))
    if t_root_gathered:
        rows.append(("teacher root (gathered)", t_root_gathered, "FSDP2 keeps the root unit unsharded after forward"))
    t_layer_full = t_layers / max(1, t.num_layers)
    # transient during the teacher forward (no grad): 2 gathered layers (FSDP2 prefetches one ahead),
    # the largest intermediates (w1, w3, silu outputs + residual + normed) and one dequantised weight.
    t_gather = 2 * t_layer_full * (1 - 1 / t_shard) if t_fsdp else 0.0
    t_inter = N * (3 * t.intermediate_dim + 3 * t.embed_dim) * eb
    # one transient dequantised weight: dtype for nf4, e4m3 for nf4_fp8 (kd.teacher.precision)
    t_deq = t.intermediate_dim * t.embed_dim * {"nf4": eb, "nf4_fp8": 1.0}.get(i.teacher_quant, 0.0)
    t_hidden = N * t.embed_dim * eb  # final hidden states kept for the fused head
    if not i.teacher_resident:
        t_gather = t_inter = t_deq = 0.0
        t_hidden = N * max(1, i.cache_k) * 12  # int64 ids + fp32 weights

    # ---- student ------------------------------------------------------------------------------------
    s_base_linear = linear_bytes(s.linear, i.student_quant)
    s_base = s_base_linear + (s.other_layer + s.embedding + s.final_norm + s.output) * eb
    if full:
        rows.append(("student weights (trainable)", s_base / shard,
                     f"full fine-tune: all {s.total:,} params in {i.dtype}" + (f"; 1/{shard} shard" if fsdp else "")))
        lora = 0.0
    else:
        rows.append(("student base weights", s_base / shard,
                     ("NF4 linears + rest in dtype" if i.student_quant else "frozen, dtype")
                     + (f"; 1/{shard} shard" if fsdp else "")))
        lora = s.adapter * eb / shard
        rows.append(("LoRA parameters", lora, f"{s.adapter:,} params in {i.dtype}"))
    n_states, state_b, opt_note = optimizer_state_bytes(i.optimizer, eb)
    opt = n_states * n_train * state_b / shard
    rows.append(("optimizer state", opt, f"{i.optimizer}: {opt_note}, + step counters"
                 + (f"; 1/{shard} shard" if fsdp else "")))
    grads = n_train * eb / shard
    # unsharded gradients of one FSDP unit exist before its reduce-scatter
    s_layer_lora = (s_base if full else s.adapter) / max(1, s.num_layers) * (1 if full else eb)
    big = max(s.embedding, s.output) if full else s.adapter_max
    foreach_tmp = (n_train * eb / shard) if cuda else big * eb

    # activations
    per_tok = activation_elems_per_token(s, i.lora_dropout)
    layer_act = sum(per_tok.values()) * N * eb
    ac = max(0, min(i.ac_layers, s.num_layers))
    ckpt_in = N * s.embed_dim * eb  # a checkpointed layer keeps only its input
    acts = (s.num_layers - ac) * layer_act + ac * ckpt_in
    final = N * s.embed_dim * eb  # final norm input (its output is saved by the head)
    acts += final
    if i.loss_form == "fused":
        lora_head = (s.lora_rank * (s.embed_dim + s.vocab_size) * 4) if s.lora_on_output else 0
        if full:  # the trainable output projection's fp32 [V, H] gradient accumulator
            lora_head = s.vocab_size * s.embed_dim * 4
        head = FUSED_HEAD_BUFFERS * min(i.fused_chunk_size, N) * s.vocab_size * 4 + N * s.embed_dim * eb + lora_head
        head_note = (f"fused: ~{FUSED_HEAD_BUFFERS} fp32 [chunk={i.fused_chunk_size}, V={s.vocab_size}] buffers "
                     "+ grad of hidden" + (" + fp32 [V, H] grad of the output weight" if full
                                           else " (+ fp32 grads of output LoRA)"))
    else:
        per_logit = CHUNKED_BYTES_PER_LOGIT + 2 * (eb - 2)  # student + teacher logits are in dtype
        head = per_logit * N * s.vocab_size
        head_note = f"chunked logits: ~{per_logit} B per logit (N={N}, V={s.vocab_size})"

    rows.append(("activations (student)", acts,
                 f"{layer_act / GiB:.3f} GiB/layer x {s.num_layers - ac} layers"
                 + (f" + inputs of {ac} checkpointed layers" if ac else "")
                 + f" ({sum(per_tok.values())} elem/token/layer)"))
    rows.append(("loss head", head, head_note))
    rows.append(("teacher hidden states", t_hidden, ("sparse cached targets (int64 ids + fp32 weights)"
                 if not i.teacher_resident else "final teacher hidden states for the fused head")
                 if i.loss_form == "fused" else "teacher logits are counted in the loss head"))
    # transient rows (not all alive at the peak)
    rows.append(("teacher forward transient", t_gather + t_inter + t_deq,
                 "gathered layers + intermediates + dequantised weight (teacher phase only)"))
    rows.append(("gradients" if full else "LoRA gradients", grads,
                 f"{i.dtype}, backward/optimizer phases only" + (f"; 1/{shard} shard" if fsdp else "")))
    recompute = layer_act if ac else 0.0
    # backward working set of one layer: gradients of the MLP intermediates and of the hidden states
    bwd_ws = N * (3 * s.intermediate_dim + 2 * s.embed_dim) * eb
    if recompute:
        rows.append(("AC recompute", recompute, "one checkpointed layer re-run during backward"))
    rows.append(("backward working set", bwd_ws, "grads of one layer's MLP intermediates + hidden (backward only)"))

    static = t_res + t_root_gathered + s_base / shard + lora + opt
    s_gather = 2 * (s_base / max(1, s.num_layers)) * (1 - 1 / shard) if fsdp else 0.0
    plan.phases = {
        "teacher forward": static + t_gather + t_inter + t_deq,
        "end of student forward": static + acts + head + t_hidden + s_gather,
        "backward": static + acts - final + grads + recompute + bwd_ws + s_gather + (s_layer_lora if fsdp else 0),
        "optimizer step": static + grads + foreach_tmp,
    }
    plan.peak_phase = max(plan.phases, key=plan.phases.get)
    return plan


# --------------------------------------------------------------------------------------------------
# From a recipe config
# --------------------------------------------------------------------------------------------------
def config_seq_len(cfg) -> int:
    tok = cfg.get("tokenizer", None)
    v = tok.get("max_seq_len", None) if tok is not None else None
    if v is None:
        raise ConfigError(
            "The planner needs the sequence length: set tokenizer.max_seq_len (the recipe pads/truncates to it) "
            "or pass seq_len."
        )
    return int(v)


def check_plan_args(**kw) -> None:
    """The plan's numeric inputs (``kd plan`` flags, or what the recipe passes): one check for both."""

    rules = {  # key: (flag, kind, min)
        "world_size": ("--world-size", int, 1), "local_world_size": ("--nproc-per-node", int, 1),
        "batch_size": ("--batch-size", int, 1), "seq_len": ("--seq-len", int, 1), "ac_layers": ("--ac-layers", int, 0),
        "device_memory_gib": ("--device-memory-gib", float, None), "reserve_gib": ("--reserve-gib", float, 0.0),
    }
    for key, (flag, kind, lo) in rules.items():
        v = number(kw, key, None, kind=kind, min_value=lo, allow_none=True, name=f"{key} ({flag})")
        if key == "device_memory_gib" and v is not None and v <= 0:
            raise ConfigError(f"'{key} ({flag})' must be > 0 GiB, got {v}.")
    ws, lws = kw.get("world_size"), kw.get("local_world_size")
    if ws is not None and lws is not None and ws % lws:
        raise ConfigError(f"world size {ws} (--world-size) is not a multiple of the processes per node {lws} "
                          "(--nproc-per-node).")


def validate_recipe_config(cfg) -> KDLoRASettings:
    """The recipe's own start-up validation (:func:`kd.train.settings.kd_lora_settings`, which
    ``recipes/kd_lora.py`` runs first), so ``kd plan``, ``kd preflight`` and ``kd calibrate`` reject what the recipe
    rejects, with the same line; returns the parsed settings."""
    return kd_lora_settings(cfg)


def chunked_extra_gib(cfg, world_size: int = 1) -> Optional[float]:
    """How much more peak memory per device the config's (chunked) loss form plans than the fused head would,
    in GiB; None when the plan cannot be made (the plan is advice)."""
    from omegaconf import OmegaConf

    try:
        fused = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        for k in ("loss", "kd_loss"):
            fused.pop(k, None)
        fused.loss_form = "fused"
        return (plan_from_config(cfg, world_size).peak_bytes - plan_from_config(fused, world_size).peak_bytes) / 2**30
    except Exception:
        return None


def plan_from_config(
    cfg,
    world_size: int = 1,
    *,
    local_world_size: Optional[int] = None,
    batch_size: Optional[int] = None,
    seq_len: Optional[int] = None,
    ac_layers: Optional[int] = None,
    device_memory_gib: Optional[float] = None,
    reserve_gib: Optional[float] = None,
    teacher_resident: Optional[bool] = None,
) -> Plan:
    """Estimate the per-device peak memory of ``recipes/kd_lora.py`` for ``cfg`` (an OmegaConf DictConfig).

    ``local_world_size`` defaults to ``$LOCAL_WORLD_SIZE`` (set by torchrun) or ``world_size``;
    ``ac_layers`` defaults to the number of layers the recipe checkpoints (``kd.core.config.activation_checkpoint_layers``);
    ``device_memory_gib`` defaults to the CUDA device's total memory when ``device`` is cuda/auto and a GPU
    is present (None on CPU: no fit verdict). ``teacher_resident`` defaults to False for
    ``teacher_cache.mode=use`` (the teacher is never loaded), True otherwise; pass False for the cache epochs
    of ``online_then_cache`` (see :func:`cache_summary`).
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    check_plan_args(world_size=world_size, local_world_size=local_world_size, batch_size=batch_size,
                    seq_len=seq_len, ac_layers=ac_layers, device_memory_gib=device_memory_gib, reserve_gib=reserve_gib)
    for key in ("model", "teacher_model"):
        if cfg.get(key) is None or "_component_" not in cfg[key]:
            raise ConfigError(f"Config section '{key}' with a '_component_' is required for the memory plan.")
    dtype_name = str(cfg.get("dtype", "bf16"))
    tdtype = torch.bfloat16 if _dtype_bytes(dtype_name) == 2 else torch.float32
    student = build_and_count(cfg.model, tdtype)
    teacher = build_and_count(cfg.teacher_model, tdtype)
    device = str(cfg.get("device", "auto")).lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if ac_layers is None:
        # the recipe's own rule (torchtune's enable_activation_checkpointing / ac_mode / ac_option keys)
        ac_layers = len(activation_checkpoint_layers(cfg, student.num_layers))
    if device_memory_gib is None and device_type == "cuda" and torch.cuda.is_available():
        device_memory_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    if reserve_gib is None:
        reserve_gib = 0.0 if device_type == "cpu" else 8.0
    cache = parse_cache(cfg, RunLayout(Path(str(cfg.get("output_dir", ".")))))
    opt = cfg.get("optimizer", None)
    opt_name = str(opt.get("_component_", "torch.optim.AdamW")).rsplit(".", 1)[-1] if opt is not None else "AdamW"
    inputs = PlanInputs(
        teacher=teacher,
        student=student,
        dtype=dtype_name,
        teacher_quant=_teacher_quant(cfg),
        student_quant=cfg.get("student_quantization", None),
        batch_size=int(batch_size if batch_size is not None else KD_LORA.get(cfg, "batch_size")),
        seq_len=int(seq_len if seq_len is not None else config_seq_len(cfg)),
        ac_layers=int(ac_layers),
        loss_form=effective_loss_form(cfg, KD_LORA.get(cfg, "loss_form"))[0],  # torchtune's chunked losses: chunked
        fused_chunk_size=KD_LORA.get(cfg, "fused_chunk_size"),
        world_size=int(world_size),
        local_world_size=int(local_world_size),
        fsdp_strategy=str(KD_LORA.get(cfg, "fsdp_strategy")),
        teacher_sharding=KD_LORA.get(cfg, "teacher_sharding"),
        device_type=device_type,
        optimizer=opt_name,
        lora_dropout=float(cfg.model.get("lora_dropout", 0.0) or 0.0),
        device_memory_bytes=None if device_memory_gib is None else device_memory_gib * GiB,
        reserve_bytes=reserve_gib * GiB,
        teacher_resident=(cache_mode(cfg) != "use") if teacher_resident is None else bool(teacher_resident),
        cache_k=cache.k if cache is not None else 0,
    )
    return estimate(inputs)


# --------------------------------------------------------------------------------------------------
# Teacher cache (kd.cache.store)
# --------------------------------------------------------------------------------------------------
def cache_mode(cfg) -> Optional[str]:
    """``teacher_cache.mode`` (None: no cache), checked as the recipe checks it."""
    sec = cfg.get("teacher_cache", None)
    return None if sec is None else TEACHER_CACHE.get(sec, "mode")


def cache_bytes_per_token_bound(k: int, sampling: str = "random") -> int:
    """Upper bound of the cache size per answer token: 4 B id + 1 B count per distinct draw (<= K) plus
    top-1 id (4 B), entropy (2 B) and the distinct-count (1 B); top-k stores 2 B probabilities instead."""
    return k * (5 if sampling == "random" else 6) + 7


def teacher_forward_epochs(cfg) -> Tuple[float, float]:
    """(epochs that run the teacher forward inside training steps, teacher-only passes over the data) for
    the job-time planner: no cache -> (epochs, 0); online_then_cache -> (1, 0) (plus a fill pass over the few
    samples epoch 1 did not see: the drop_last remainder and the validation split); build -> (0, 1);
    use -> (0, 0). Every other epoch is a student-only step (no teacher forward)."""
    epochs = int(cfg.get("epochs", 1))
    mode = cache_mode(cfg)
    if mode is None:
        return float(epochs), 0.0
    if mode == "online_then_cache":
        return 1.0, 0.0
    if mode == "build":
        return 0.0, 1.0
    return 0.0, 0.0


def cache_summary(cfg, world_size: int = 1, **kw) -> Optional[str]:
    """Lines for ``kd plan`` about the teacher cache: the mode, the size bound, the measured size of an
    existing cache, and the per-device peak of the cache epochs (teacher not loaded)."""
    mode = cache_mode(cfg)
    if mode is None:
        return None
    opts = parse_cache(cfg, RunLayout(Path(str(cfg.get("output_dir", ".")))))
    k, sampling = opts.k, opts.sampling
    lines = [f"teacher cache: mode={mode}, K={k}, sampling={sampling}; size <= "
             f"{cache_bytes_per_token_bound(k, sampling)} B per answer token"]
    d = str(opts.dir)
    if os.path.isfile(os.path.join(d, "cache.json")):
        import json

        from kd.cache.store import CacheKey, TeacherCacheStore

        try:
            s = TeacherCacheStore(d, CacheKey(**json.loads(open(os.path.join(d, "cache.json")).read())))
            s.scan()
            st = s.stats()
            s.close()
            lines.append(f"  existing cache {d}: {st['samples']} samples, {st['answer_tokens']:,} answer tokens, "
                         f"{st['bytes'] / 2**20:.1f} MiB ({st['bytes_per_answer_token']:.1f} B per answer token)")
        except Exception as e:  # advice only
            lines.append(f"  existing cache {d}: unreadable ({e})")
    if mode == "online_then_cache":
        p = plan_from_config(cfg, world_size, teacher_resident=False, **kw)
        lines.append(f"  epochs 2+ (teacher freed): {p.summary()} (the table above is epoch 1)")
    elif mode == "build":
        lines.append("  build: a teacher-only pass (no student): its peak is the 'teacher forward' phase above "
                     "minus the student rows")
    return "\n".join(lines)


def max_batch_size(cfg, world_size: int = 1, *, limit: int = 64, **kw) -> Tuple[Optional[int], List[Plan]]:
    """Largest power-of-two batch size (<= limit) whose plan fits; also returns the plans tried."""
    plans, best = [], None
    b = 1
    while b <= limit:
        p = plan_from_config(cfg, world_size, batch_size=b, **kw)
        plans.append(p)
        if p.fits:
            best = b
        else:
            break
        b *= 2
    return best, plans


def checkpoint_bytes(cfg, plan: Plan) -> Dict[str, float]:
    """Disk needed in output_dir: kept checkpoints (adapter + optimizer state) and the merged model."""
    s = plan.inputs.student
    eb = _dtype_bytes(plan.inputs.dtype)
    n_train = s.adapter or s.total  # full fine-tune: every weight and its optimizer state (kd.train.full shards)
    n_states, state_b, _ = optimizer_state_bytes(plan.inputs.optimizer, eb)
    one = n_train * eb + n_states * n_train * state_b + 1e6  # weights/adapter + optimizer states + recipe state
    keep = cfg.get("keep_last_n_checkpoints", None)
    n = (int(keep) if keep else 1) + 1  # +1: a new checkpoint is written before the oldest is deleted
    merged = (s.total - s.adapter) * eb if cfg.get("save_merged_model", False) else 0.0  # full: = weights
    return {"checkpoints": n * one, "merged": merged, "total": n * one + merged}


@dataclass
class CrossNodeTraffic:
    """Bytes one rank moves over the inter-node link per optimizer step (:func:`cross_node_bytes_per_step`)."""

    rows: List[Tuple[str, float, str]]  # (collective, bytes per optimizer step, note)
    nodes: int
    micro_batches: int  # per optimizer step (gradient_accumulation_steps)

    @property
    def total(self) -> float:
        return float(sum(b for _, b, _ in self.rows))

    def seconds(self, bus_gbps: float) -> float:
        """Time at a bus bandwidth of ``bus_gbps`` GB/s (nccl-tests' busbw, what kd preflight measures)."""
        return self.total / (bus_gbps * 1e9) if bus_gbps > 0 else float("inf")

    def describe(self) -> str:
        return "; ".join(f"{n} {b / 1e9:.3g} GB ({note})" for n, b, note in self.rows) or "nothing crosses nodes"


def cross_node_bytes_per_step(cfg, world_size: int, *, local_world_size: Optional[int] = None,
                              plan: Optional[Plan] = None) -> CrossNodeTraffic:
    """Bytes per optimizer step that cross the link between nodes, per rank, in **bus bytes**: the unit of
    nccl-tests' (and ``kd preflight``'s) bus bandwidth, so ``bytes / busbw`` is the time the collectives take.

    n = ``world_size`` ranks, l = ranks per node (``local_world_size``), N = n / l nodes, G =
    ``gradient_accumulation_steps`` micro-batches per optimizer step, P = trainable parameters (the LoRA adapter,
    or every student weight for a full fine-tune), g = bytes per gradient element (the config's dtype: 2 for bf16),
    W_s = the student's weights in bytes (LoRA base + adapter, or all), W_t = the teacher's gathered weights
    (decoder linears in their storage format -- NF4 0.516 B/weight, FP8 1 B, else dtype -- plus the rest in dtype,
    less the output head that the fused loss keeps replicated).
    The recipe does not skip the gradient sync during accumulation, so gradient collectives run every micro-batch.
    Bus bytes of a collective over k ranks of S bytes: all-reduce 2(k-1)/k S; all-gather and reduce-scatter
    (k-1)/k S.

    - ``fsdp_strategy: hybrid`` (replicate across nodes, shard within a node): weights are gathered inside a node
      only; each micro-batch all-reduces the gradients of a rank's 1/l shard across the N replicas:
      G * 2(N-1)/N * P g / l. (LoRA + hybrid + ``teacher_sharding: replicate`` = the two-Spark LoRA config: only
      this row.)
    - ``fsdp_strategy: shard`` (over all n ranks, so across nodes): each micro-batch all-gathers the student's
      weights for forward and again for backward (once if ``fsdp_reshard_after_forward: False``):
      G * 2 * (n-1)/n * W_s, and reduce-scatters the gradients: G * (n-1)/n * P g.
    - ``teacher_sharding: shard`` with ``fsdp_strategy: shard``: the teacher's weights are all-gathered for every
      micro-batch's forward (no backward): G * (n-1)/n * W_t. (With ``hybrid`` the teacher's shards stay inside a
      node; with ``replicate`` no teacher weights move.) Epochs served by the teacher cache skip this row.
    - a full fine-tune is the same formulas with P = W_s / g = every student weight.

    With one node (N = 1) nothing crosses nodes. For l > 1 the rows count the whole collective per rank (the
    intra-node part included), as the all-reduce bandwidth test over all ranks does.
    """
    if plan is None:
        plan = plan_from_config(cfg, world_size, local_world_size=local_world_size)
    i = plan.inputs
    n, l = max(1, int(i.world_size)), max(1, int(i.local_world_size))
    nodes = max(1, n // l)
    G = int(KD_LORA.get(cfg, "gradient_accumulation_steps"))
    rows: List[Tuple[str, float, str]] = []
    if nodes <= 1:
        return CrossNodeTraffic(rows, nodes, G)
    s, t = i.student, i.teacher
    g = _dtype_bytes(i.dtype)
    full = s.adapter == 0
    P = s.total if full else s.adapter
    what = "every student weight (full fine-tune)" if full else "LoRA"

    def stored(numel: int, quant: Optional[str]) -> float:
        if quant in ("nf4", "nf4_fp8"):
            return numel * NF4_BYTES_PER_ELEM + math.ceil(numel / NF4_FACTOR_BLOCK) * g
        if quant == "fp8":
            return float(numel)
        return float(numel * g)

    W_s = stored(s.linear, i.student_quant) + (s.total - s.linear) * g
    if i.fsdp_strategy == "hybrid":
        rows.append(("gradient all-reduce", G * 2 * (nodes - 1) / nodes * P * g / l,
                     f"{P:,} {what} grads x {g} B across {nodes} nodes, x {G} micro-batches"))
    else:
        passes = 2 if bool(cfg.get("fsdp_reshard_after_forward", True)) else 1
        rows.append(("student weight all-gather", G * passes * (n - 1) / n * W_s,
                     f"{W_s / 1e9:.3g} GB of student weights, {passes} per micro-batch (forward"
                     f"{' + backward' if passes == 2 else ''}) x {G}"))
        rows.append(("gradient reduce-scatter", G * (n - 1) / n * P * g,
                     f"{P:,} {what} grads x {g} B, x {G} micro-batches"))
        if i.teacher_sharding == "shard" and i.teacher_resident:
            head = t.output if (i.loss_form == "fused" and not t.tied) else 0  # the fused head keeps it replicated
            W_t = stored(t.linear, i.teacher_quant) + (t.total - t.linear - head) * g
            rows.append(("teacher weight all-gather", G * (n - 1) / n * W_t,
                         f"{W_t / 1e9:.3g} GB of teacher weights gathered every micro-batch forward x {G}"))
    return CrossNodeTraffic(rows, nodes, G)
