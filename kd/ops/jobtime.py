"""Job-time planner: how long one epoch, the whole run and plan A's teacher generation take (``kd plan --time``).

The estimate is built per component from the work it must do (FLOPs and bytes per token, from the models the
config names, built on the meta device) against a hardware profile (tensor rate per dtype, memory bandwidth),
times an efficiency per component measured by the per-piece benchmarks (each profile's ``sources``; where the
built-in profiles' numbers come from: docs/benchmarks.md, "The planner's built-in profiles"). Token counts come from the data set the config names, tokenized by the config's
tokenizer through the recipe's own dataset code, packed or padded as the recipe's loader does.

Per micro-batch of ``T`` processed positions (padding included: the GPU computes it):

- teacher forward: ``L_t * (2 * P_layer * T + attention) / (R * eff_teacher)`` plus, for an NF4 teacher, the
  dequantisation traffic ``b * P_linear / BW`` (b = 4.5 B for nf4: read 0.5 B, write and read back a 2 B copy;
  2.5 B for nf4_fp8 with a 1 B e4m3 copy; the precision's ``PrecisionSpec.dequant_bytes_per_weight``);
- student forward + backward (LoRA: activation gradients, no base weight gradients):
  ``(2 + 2) * P_layer * T * L_s / (R * eff_student)`` plus one extra forward per checkpointed layer;
- loss head (fused): teacher and student projections ``2 * V * d * T`` each, student backward ``2 * V * d_s * T``,
  at ``eff_head``;
- per optimizer step: AdamW over the LoRA parameters (``16 B`` per parameter through memory);
- per validation: forward of both models over ``max_eval_batches`` batches; per checkpoint: adapter + optimizer
  state written at ``disk_gbps``.

Attention FLOPs count each sample's causal block only (document masking with packing, padding without).
Everything not listed (launches, host work, the data loader) is taken as hidden; the recipe benchmark
(``bench/recipe_bench.py``) compares the prediction with the measured step, see docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from kd.core.config import ConfigError, activation_checkpoint_layers
from kd.data.alpaca import best_fit_bins, greedy_bins
from kd.data.batching import plan_batches
from kd.generate.static_decode import decode_step_cost
from kd.ops.planner import build_and_count, cache_mode, teacher_forward_epochs
from kd.ops.schema import GENERATE_TEACHER
from kd.train.schema import DEFAULT_CACHE_K

TFLOP = 1e12


@dataclass
class Hardware:
    """One device's rates. ``*_eff`` are achieved fractions of ``bf16_tflops`` (or of fp8) per component."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    mem_gbps: float
    interconnect_gbps: float  # GB/s between nodes (data-parallel gradient all-reduce)
    teacher_eff: float
    student_eff: float
    head_eff: float
    disk_gbps: float = 1.0
    optimizer_eff: float = 1.0  # achieved share of mem_gbps by the optimizer step (16 B/param; kd calibrate measures it)
    decode_overhead_ms: float = 0.0  # fixed cost per decode step (launches), eager generation ("today")
    decode_bw_eff: float = 1.0
    # the static decode engine (CUDA graphs, fused glue), per route:
    gemv_bw_eff: float = 0.48  # <= 8 rows: the 4-bit GEMV's share of the memory bandwidth
    decode_gemm_eff: float = 1.0  # dequantise + cuBLAS route: the grouped bf16 GEMMs' share of bf16_tflops
    dequant_bw_eff: float = 0.85  # ... and the NF4 -> bf16 copy's share of the bandwidth (2.5 B/weight)
    static_overhead_ms: float = 4.8  # per step beyond the linears and the KV cache: head, sampler, glue (batch 1)
    static_overhead_ms_per_row: float = 0.0306  # ... growing with the rows (attention, glue): batch 512
    # the read-once NF4 kernel (kd.generate.nf4_matmul, "fused") reads the packed bytes once but is issue-bound on
    # its look-up and scaling, not bandwidth-bound: its time is the longer of its bytes and its work per weight at
    # the CUDA-core rate (fp32-TFLOP/s-normalised operations per weight, by rows, interpolated between the points)
    fp32_tflops: float = 67.0
    fused_ops_per_weight: Dict[str, float] = field(default_factory=lambda: dict(FUSED_OPS_PER_WEIGHT))
    measured: bool = True
    # kd calibrate: the teacher precision (+ "+compile") teacher_eff was measured for ("" = not calibrated; the
    # built-in profiles); kd plan --time warns when a config's teacher differs (teacher_profile_warning)
    teacher_calibrated_for: str = ""
    sources: Dict[str, str] = field(default_factory=dict)


# The read-once NF4 kernel's cost per weight (fp32-op equivalents at the CUDA-core rate: per-layer time x fp32 rate /
# weights) by rows; where these numbers and the H200 constants below come from: docs/benchmarks.md, "The planner's
# built-in profiles"
FUSED_OPS_PER_WEIGHT = {"1": 66.2, "16": 66.7, "128": 103.4, "512": 296.3}

H200 = Hardware(
    name="h200", bf16_tflops=745.0, fp8_tflops=1380.0, mem_gbps=4190.0, interconnect_gbps=25.0,
    teacher_eff=0.84, student_eff=0.54, head_eff=0.70, disk_gbps=1.0, decode_overhead_ms=86.0,
    measured=True,
    sources={
        "bf16_tflops": "measured, bf16 8192^3 matmul on one H200 (gpu-baseline.md, turn 2)",
        "fp8_tflops": "measured, fp8 rowwise _scaled_mm (gpu-baseline.md, turn 2)",
        "mem_gbps": "measured, device-to-device copy 4.18-4.20 TB/s",
        "efficiencies": "per-piece H200 timings (gpu-baseline.md): 72B layer fwd, 7B LoRA layer fwd+bwd, fused head",
    },
)

# GB10 (DGX Spark): data-sheet constants and the H200's efficiencies, NOT measured (docs/benchmarks.md)
GB10 = dataclasses.replace(
    H200,  # efficiencies, disk, interconnect and decode overhead: the H200's, as said above
    name="gb10", bf16_tflops=125.0, fp8_tflops=250.0, mem_gbps=273.0, fp32_tflops=31.0,
    measured=False,
    sources={
        "bf16_tflops": "derived from NVIDIA's 1 PFLOP FP4 (sparse) DGX Spark figure: /2 dense, /2 per dtype width",
        "fp8_tflops": "same derivation",
        "mem_gbps": "NVIDIA DGX Spark specification: 273 GB/s LPDDR5x unified memory",
        "fp32_tflops": "GB10's 31 TFLOP/s single precision (NVIDIA at Hot Chips 2025); the read-once NF4 kernel's "
                       "work per weight is the H100's, assumed to run at the same rate per CUDA-core FLOP",
        "interconnect_gbps": "ConnectX-7 200 Gb/s RoCE",
        "efficiencies": "assumed equal to the H200's measured fractions (not measured on a GB10)",
    },
)

PROFILES = {"h200": H200, "gb10": GB10}


def unmeasured_note(hw: Hardware) -> str:
    """The label of a profile that nobody measured (the GB10's data-sheet constants)."""
    where, out = ("the DGX Spark", "my_spark.yaml") if hw.name == "gb10" else ("that machine", "my_machine.yaml")
    return (f"data sheet, NOT measured: run `kd calibrate --config CFG --out {out}` on {where}, then "
            f"`kd plan --time --hardware {out}`")


def load_hardware(name_or_path: str) -> Hardware:
    """``h200``, ``gb10`` or a YAML file with the :class:`Hardware` fields (missing fields: the H200's)."""
    if name_or_path.lower() in PROFILES:
        return PROFILES[name_or_path.lower()]
    p = Path(name_or_path)
    if not p.is_file():
        raise ConfigError(f"--hardware {name_or_path!r}: use h200, gb10 or a YAML file with the profile's fields.")
    import yaml

    data = yaml.safe_load(p.read_text()) or {}
    known = set(Hardware.__dataclass_fields__)
    bad = sorted(set(data) - known)
    if bad:
        raise ConfigError(f"{p}: unknown hardware field(s) {bad}; known: {sorted(known)}.")
    base = asdict(H200)
    base.update(data, measured=bool(data.get("measured", False)), name=data.get("name", p.stem))
    return Hardware(**base)


# --------------------------------------------------------------------------------------------------
# Data statistics (real token counts of the data set the config names)
# --------------------------------------------------------------------------------------------------
@dataclass
class DataStats:
    lengths: List[int]  # tokens per training sample (after the recipe's template and max_seq_len cut)
    answers: List[int]  # answer (loss) tokens per sample
    val_samples: int
    max_seq_len: int
    packed: bool
    batch_size: int
    packing: str = "best_fit"  # best_fit (kd's default) | greedy (torchtune's PackedDataset)
    source: str = ""  # where the counts come from ("from N training records of FILE", "from the stated ...")

    @property
    def samples(self) -> int:
        return len(self.lengths)


def _cache_key(cfg, lengths: Optional[str] = None) -> str:
    from omegaconf import OmegaConf

    ds = OmegaConf.to_container(cfg.dataset, resolve=True)
    tok = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    h = hashlib.sha256(json.dumps([ds, tok], sort_keys=True, default=str).encode())
    if lengths:  # a stated length distribution (kd plan --time --lengths): no data file is read
        h.update(f"lengths:{lengths}".encode())
        return h.hexdigest()[:16]
    src = ds.get("source") if isinstance(ds, dict) else None
    if src and Path(src).is_file():
        st = Path(src).stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def data_stats(cfg, sample_records: Optional[int] = None, lengths: Optional["StatedLengths"] = None) -> DataStats:
    """Token counts of the config's training split, through the recipe's own dataset builder (cached).

    ``sample_records=N``: tokenize N records drawn evenly from the split and resample their (length, answer)
    pairs, seeded, up to the split's size (a quick estimate of a large data set; the table says so).
    ``lengths``: no data file; draw the samples from a stated length distribution (:func:`stated_stats`)."""
    from torchtune import config as tt_config

    cache = Path(os.environ.get("KD_CACHE_DIR", Path.home() / ".cache" / "kd")) / "jobtime"
    key = _cache_key(cfg, lengths.spec if lengths else None) + (f"-s{sample_records}" if sample_records else "")
    path = cache / f"{key}.json"
    packed = bool(cfg.dataset.get("packed", False))
    packing = str(cfg.dataset.get("packing", "best_fit"))
    bs = int(cfg.get("batch_size", 1))
    if path.is_file():
        d = json.loads(path.read_text())
        return DataStats(d["lengths"], d["answers"], d["val_samples"], d["max_seq_len"], packed, bs, packing,
                         d.get("source", ""))
    if lengths is not None:
        lens, ans, n_val, msl, source = stated_stats(cfg, lengths)
        _write_cache(path, {"lengths": lens, "answers": ans, "val_samples": n_val, "max_seq_len": msl,
                            "source": source})
        return DataStats(lens, ans, n_val, msl, packed, bs, packing, source)
    try:
        tok = tt_config.instantiate(cfg.tokenizer)
        kw = {"split": "train"} if str(cfg.dataset.get("_component_", "")).startswith("kd.") else {}
        dcfg = cfg.dataset.copy()
        dcfg.packed = False
        ds = tt_config.instantiate(dcfg, tok, **kw)
        val = tt_config.instantiate(dcfg, tok, split="val") if kw and cfg.dataset.get("val_size") else []
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise ConfigError(f"kd plan --time: cannot read the config's data set or tokenizer: {e}") from None
    from tqdm import tqdm

    lengths, answers = [], []
    n = len(ds)
    idx = list(range(n)) if not sample_records or sample_records >= n else \
        [int(k * n / sample_records) for k in range(sample_records)]
    for i in tqdm(idx, desc="tokenizing", disable=len(idx) < 2000):
        s = ds[i]
        lengths.append(len(s["tokens"]))
        answers.append(sum(1 for x in s["labels"] if x != -100))
    if len(idx) < n:
        import random

        rng = random.Random(0)
        pick = [rng.randrange(len(idx)) for _ in range(n)]
        lengths, answers = [lengths[j] for j in pick], [answers[j] for j in pick]
    msl = int(getattr(tok, "max_seq_len", None) or max(lengths))
    src = cfg.dataset.get("source", None) or "the config's data set"
    source = (f"from {len(idx):,} of {n:,} training records of {src} (resampled)" if len(idx) < n
              else f"from {n:,} training records of {src}")
    _write_cache(path, {"lengths": lengths, "answers": answers, "val_samples": len(val), "max_seq_len": msl,
                        "source": source})
    return DataStats(lengths, answers, len(val), msl, packed, bs, packing, source)


def _write_cache(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(d, ensure_ascii=False))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Without the model files or the data file: the tokenizer kd derives offline, a stated length distribution
# --------------------------------------------------------------------------------------------------
QWEN2_5_TOKENIZERS = ("torchtune.models.qwen2_5.qwen2_5_tokenizer",)


def resolve_tokenizer(cfg) -> str:
    """Make ``cfg.tokenizer`` name files that exist here; returns the line saying which tokenizer counts the tokens.

    The config's own files when they are all there. Otherwise, for a Qwen2.5 tokenizer only, the real Qwen2.5
    vocabulary kd derives offline from dashscope's ``qwen.tiktoken`` (:func:`kd.data.qwen_tokenizer.qwen2_5_tokenizer_files`:
    the same vocab, merges and special-token ids) replaces them in ``cfg``; any other tokenizer: one error."""
    from omegaconf import OmegaConf, open_dict

    if cfg.get("tokenizer", None) is None:
        raise ConfigError("kd plan --time: the config has no tokenizer section.")
    tok = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    files = {k: v for k, v in tok.items()
             if (k == "path" or k.endswith(("_path", "_file"))) and isinstance(v, str) and v}
    missing = [v for v in files.values() if not Path(v).is_file()]
    if not missing:
        return f"tokens counted with: {files.get('path') or next(iter(files.values()), tok.get('_component_'))} " \
               "(the config's)"
    comp = str(tok.get("_component_", ""))
    if comp not in QWEN2_5_TOKENIZERS:
        raise ConfigError(f"kd plan --time: the config's tokenizer file {missing[0]} is absent and {comp} is not a "
                          "Qwen2.5 tokenizer (the only one kd can stand in for offline): put the files there or "
                          "point tokenizer.path=... (and merges_file=...) at them.")
    from kd.data.qwen_tokenizer import qwen2_5_tokenizer_files

    try:
        q = qwen2_5_tokenizer_files()
    except (OSError, ValueError) as e:
        raise ConfigError(f"kd plan --time: the config's tokenizer file {missing[0]} is absent and kd's offline "
                          f"Qwen2.5 tokenizer cannot be derived here: {e}") from None
    new = {"path": str(q["vocab"]), "merges_file": str(q["merges"])}
    if "special_tokens_path" in files:
        new["special_tokens_path"] = str(q["special_tokens"])
    with open_dict(cfg):
        for k in files:
            if k not in new:  # a file-valued key kd has no stand-in for: leave it out (the builder's default)
                cfg.tokenizer.pop(k)
        for k, v in new.items():
            cfg.tokenizer[k] = v
    return f"tokens counted with: kd's offline Qwen2.5 tokenizer, {q['dir']} (the config's {missing[0]} is absent)"


@dataclass(frozen=True)
class StatedLengths:
    """``kd plan --time --lengths records=N,prompt=D,answer=D[,seed=S]``: the data set described, not read.

    ``prompt``: tokens of the user's question (instruction + input), ``answer``: tokens of the answer, both
    without the chat template and the system prompt (added as measured, :func:`template_overhead`). ``D``:
    ``MEAN:STD`` (log-normal with this mean and standard deviation; STD 0 = every record the same), ``LO-HI``
    (uniform integers), ``pA:X/pB:Y`` (log-normal through two quantiles, e.g. ``p50:400/p95:1500``; ``median``
    = ``p50``) or ``N`` (every record N)."""

    records: int
    prompt: str
    answer: str
    seed: int = 0

    @property
    def spec(self) -> str:
        return f"records={self.records},prompt={self.prompt},answer={self.answer},seed={self.seed}"


LENGTHS_HELP = ("records=N,prompt=D,answer=D[,seed=S]: N records in the data file, question and answer tokens "
                "without template/system prompt; D is MEAN:STD (log-normal), LO-HI (uniform), pA:X/pB:Y "
                "(log-normal through two quantiles, e.g. p50:400/p95:1500) or N")


def parse_lengths(text: str) -> StatedLengths:
    """``--lengths`` -> :class:`StatedLengths` (every distribution checked by drawing once); errors are one line."""
    bad = lambda why: ConfigError(f"--lengths {text!r}: {why} (format: {LENGTHS_HELP}).")  # noqa: E731
    kv = {}
    for part in str(text).split(","):
        k, sep, v = part.partition("=")
        if not sep or not v.strip() or k.strip() not in ("records", "prompt", "answer", "seed") or k.strip() in kv:
            raise bad(f"cannot read {part!r}")
        kv[k.strip()] = v.strip()
    if not {"records", "prompt", "answer"} <= set(kv):
        raise bad(f"missing {', '.join(sorted({'records', 'prompt', 'answer'} - set(kv)))}")
    try:
        st = StatedLengths(int(kv["records"]), kv["prompt"], kv["answer"], int(kv.get("seed", 0)))
    except ValueError:
        raise bad("records and seed are whole numbers") from None
    if st.records < 1:
        raise bad("records must be >= 1")
    for name in ("prompt", "answer"):
        try:
            _length_sampler(getattr(st, name))
        except ValueError as e:
            raise bad(f"{name}={getattr(st, name)}: {e}") from None
    return st


def _length_sampler(d: str):
    """A function ``rng -> int`` (tokens >= 0) for one distribution of :class:`StatedLengths`."""
    from statistics import NormalDist

    if ":" in d and "/" not in d:  # MEAN:STD, log-normal
        m, s = (float(x) for x in d.split(":"))
        if m <= 0 or s < 0:
            raise ValueError("MEAN > 0 and STD >= 0")
        if s == 0:
            return lambda rng: int(round(m))
        sig = math.sqrt(math.log1p((s / m) ** 2))
        mu = math.log(m) - sig * sig / 2
        return lambda rng: max(1, int(round(rng.lognormvariate(mu, sig))))
    if "/" in d:  # pA:X/pB:Y
        q = []
        for t in d.split("/"):
            p, _, v = t.replace("median", "p50").partition(":")
            if not p.startswith("p") or not v:
                raise ValueError(f"quantile {t!r} is not pA:X")
            q.append((float(p[1:]) / 100, float(v)))
        if len(q) != 2 or not all(0 < p < 1 and v > 0 for p, v in q) or q[0][0] == q[1][0]:
            raise ValueError("two quantiles pA:X/pB:Y with 0 < A, B < 100, A != B, X, Y > 0")
        (pa, xa), (pb, xb) = sorted(q)
        if xb < xa:
            raise ValueError("the higher quantile is the longer length")
        za, zb = NormalDist().inv_cdf(pa), NormalDist().inv_cdf(pb)
        sig = (math.log(xb) - math.log(xa)) / (zb - za)
        mu = math.log(xa) - za * sig
        return lambda rng: max(1, int(round(rng.lognormvariate(mu, sig))))
    if "-" in d:  # LO-HI
        lo, hi = (int(x) for x in d.split("-"))
        if not 0 <= lo <= hi:
            raise ValueError("0 <= LO <= HI")
        return lambda rng: rng.randint(lo, hi)
    n = int(d)
    if n < 0:
        raise ValueError("N >= 0")
    return lambda rng: n


def template_overhead(cfg, tok) -> "tuple[int, int, int]":
    """(tokens, loss tokens) of one record with an empty question and answer, through the recipe's template
    (:class:`kd.data.alpaca.AlpacaKDDataset`) with the config's ``system_prompt`` and ``train_on_input``: what
    every record adds to its question and answer tokens; third, the positions after the answer's last loss token
    (the closing ``<|im_end|>``, outside the loss when the tokenizer has a max_seq_len), measured on a 1-token answer."""
    import tempfile

    from kd.data.alpaca import DEFAULT_SYSTEM_PROMPT, AlpacaKDDataset

    d = cfg.dataset
    comp = str(d.get("_component_", ""))
    if not comp.startswith("kd.data."):
        raise ConfigError(f"--lengths: the template is measured with kd's alpaca template; dataset {comp} is not a "
                          "kd.data dataset (give a data file instead).")
    sp = d.get("system_prompt", DEFAULT_SYSTEM_PROMPT) if "system_prompt" in d else DEFAULT_SYSTEM_PROMPT
    with tempfile.TemporaryDirectory() as td:
        one = Path(td) / "one.json"
        one.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a"}]))
        ds = AlpacaKDDataset(tok, one, system_prompt=sp, train_on_input=bool(d.get("train_on_input", False)))
        sid = ds.ids[0]
        _, mask1 = ds._encode(sid)
        ds.records[sid] = {"instruction": "", "input": "", "output": ""}
        tokens, mask = ds._encode(sid)
    last = max((j for j, m in enumerate(mask1) if not m), default=len(mask1) - 1)
    return len(tokens), sum(1 for m in mask if not m), len(mask1) - 1 - last


def stated_stats(cfg, st: StatedLengths):
    """(lengths, answers, val_samples, max_seq_len, source line) of the training split drawn from ``st``: the
    config's ``val_size`` split of ``st.records`` (kd.data.alpaca.split_ids), each sample the template overhead +
    a drawn question + a drawn answer (seeded), cut at max_seq_len as the recipe cuts (the tail, the answer's end,
    goes first; the last kept position is the EOS, outside the loss)."""
    import random

    from torchtune import config as tt_config

    from kd.data.alpaca import split_ids

    try:
        tok = tt_config.instantiate(cfg.tokenizer)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise ConfigError(f"kd plan --time: cannot load the tokenizer: {e}") from None
    ov, ov_loss, tail = template_overhead(cfg, tok)
    d = cfg.dataset
    try:
        n_val = len(split_ids(range(st.records), "val", d.get("val_size", 0.0) or 0.0, int(d.get("seed", 0) or 0)))
    except ValueError as e:
        raise ConfigError(f"--lengths: {e}") from None
    n_train = st.records - n_val
    msl = d.get("max_seq_len", None) or getattr(tok, "max_seq_len", None)
    train_on_input = bool(d.get("train_on_input", False))
    draw_p, draw_a = _length_sampler(st.prompt), _length_sampler(st.answer)
    rng = random.Random(st.seed)
    lengths, answers = [], []
    for _ in range(n_train):
        p, a = draw_p(rng), draw_a(rng)
        n, n_ans = ov + p + a, ov_loss + a + (p if train_on_input else 0)
        if msl and n > msl:  # the cut drops the tail, then the last kept position becomes the (masked) EOS
            n_ans, n = max(0, n_ans - max(0, n - msl - tail) - 1), int(msl)
        lengths.append(n)
        answers.append(n_ans)
    cut = f"cut at max_seq_len {msl}" if msl else "no max_seq_len cut"
    msl = int(msl or max(lengths or [1]))
    source = (f"from the stated distribution {st.spec}: {n_train:,} training records ({n_val:,} held out), each "
              f"+ {ov} template and system-prompt tokens ({ov_loss} in the loss; measured on an empty record), {cut}")
    return lengths, answers, n_val, msl, source


def micro_batches(stats: DataStats, world_size: int = 1, seed: int = 0) -> List[List[int]]:
    """Sample indices of each micro-batch of one epoch on one rank, as the recipe's loader forms them:
    packed = kd.data.alpaca's packing rule (best-fit-decreasing, or torchtune's next-fit with ``packing: greedy``) into
    packs of max_seq_len, then batch_size packs per batch; unpacked = batch_size samples per batch, each batch padded to its longest sample."""
    import random

    if stats.packed:
        units = (best_fit_bins if stats.packing == "best_fit" else greedy_bins)(stats.lengths, stats.max_seq_len)
    else:
        units = [[i] for i in range(stats.samples)]
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    per_rank = order[: len(order) // world_size]
    bs = stats.batch_size
    return [[i for u in per_rank[k:k + bs] for i in units[u]] for k in range(0, len(per_rank) - bs + 1, bs)]


# --------------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------------
@dataclass
class Component:
    name: str
    seconds: float
    note: str = ""


@dataclass
class Phase:
    """A part of the job that repeats ``count`` times at ``seconds`` each (an epoch of one kind, or a pass)."""

    name: str
    count: int
    seconds: float
    components: List[Component]

    @property
    def total_s(self) -> float:
        return self.count * self.seconds


@dataclass
class JobEstimate:
    hardware: Hardware
    components: List[Component]  # of the first phase (the online epoch without a cache)
    epoch_s: float  # seconds of the first phase (one epoch; the build pass for teacher_cache.mode=build)
    run_s: float  # the whole job: sum over the phases
    epochs: int
    steps_per_epoch: int
    micro_batches_per_epoch: int
    processed_tokens_per_epoch: int
    answer_tokens_per_epoch: int
    padding_fraction: float
    step_s: float  # optimizer step of the first phase
    phases: List[Phase] = field(default_factory=list)
    cache_mode: Optional[str] = None
    online_run_s: float = 0.0  # the same job without a teacher cache (for the ratio line)
    warnings: List[str] = field(default_factory=list)  # printed under the title (teacher_profile_warning)

    def table(self) -> str:
        hw = self.hardware
        flag = "" if hw.measured else f"  ({unmeasured_note(hw)})"
        lines = [f"job time on {hw.name}{flag}" + (f", teacher_cache.mode={self.cache_mode}" if self.cache_mode else ""),
                 f"  {self.micro_batches_per_epoch} micro-batches/epoch/rank, {self.steps_per_epoch} optimizer steps/epoch, "
                 f"{self.processed_tokens_per_epoch:,} positions/epoch ({self.padding_fraction:.1%} padding), "
                 f"{self.answer_tokens_per_epoch:,} answer tokens/epoch"]
        lines[1:1] = [f"  {w}" for w in self.warnings]
        phases = self.phases or [Phase("one epoch", self.epochs, self.epoch_s, self.components)]
        unit = "pass" if self.cache_mode == "build" else "epoch"
        for ph in phases:
            many = len(phases) > 1
            if many:
                lines.append(f"  {ph.name}" + (f" (x {ph.count})" if ph.count != 1 else ""))
            lines.append(f"  {'component':<34}{'each' if many else 'per ' + unit:>14}")
            for c in ph.components:
                lines.append(f"  {c.name:<34}{_hms(c.seconds):>14}  {c.note}")
            lines.append(f"  {('= ' + ph.name.split(':')[0].split(' (')[0]) if many else 'one ' + unit:<34}"
                         f"{_hms(ph.seconds):>14}")
        what = f"{self.epochs} epochs" if self.cache_mode != "build" else "teacher-only pass"
        lines.append(f"  {f'whole run ({what})':<34}{_hms(self.run_s):>14}")
        if self.cache_mode in ("online_then_cache", "use"):
            lines.append(f"  vs {self.epochs} epochs online (no cache): {self.run_s / max(1e-9, self.online_run_s):.2f}x "
                         f"of {_hms(self.online_run_s)}")
        if self.cache_mode == "build":
            return "\n".join(lines)
        lines.append(f"  optimizer step: {self.step_s:.2f} s" if self.step_s >= 1 else f"  optimizer step: {_hms(self.step_s)}")
        return "\n".join(lines)


def teacher_calibration(cfg) -> str:
    """The teacher setting a calibrated ``teacher_eff`` holds for: its precision, ``+compile`` when compiled."""
    from kd.teacher.precision import parse_precision

    return parse_precision(cfg.get("teacher_quantization", None)) + ("+compile" if cfg.get("compile", False) else "")


def teacher_profile_warning(hw: Hardware, cfg) -> Optional[str]:
    """One line when ``hw`` (written by ``kd calibrate``) calibrated its teacher efficiency for another teacher
    precision / compile setting than ``cfg`` runs; None otherwise."""
    if not hw.teacher_calibrated_for or cfg.get("teacher_model", None) is None:
        return None
    want = teacher_calibration(cfg)
    if want == hw.teacher_calibrated_for:
        return None
    return (f"warning: profile {hw.name!r} calibrated teacher_eff for a {hw.teacher_calibrated_for} teacher; this "
            f"config runs {want}, so the teacher forward estimate is not calibrated (run kd calibrate with this config)")


def _hms(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    h, m = divmod(s / 60, 60)
    return f"{int(h)} h {int(m):02d} min" if h else f"{m:.1f} min"


def _attn_flops(doc_lens: Sequence[int], n_layers: int, n_heads: int, head_dim: int, passes: float) -> float:
    """Causal attention FLOPs for documents of the given lengths: QK^T and AV, 2*2*L^2/2*h*d per layer per pass."""
    return passes * n_layers * 2.0 * n_heads * head_dim * sum(n * n for n in doc_lens)


# Teacher cache costs (modelled from bytes moved, not measured; bench/recipe_bench.py measures the real step):
# drawing K samples from one teacher row (kd.losses.sparse.sample_teacher_rows) reads/writes ~60 B per vocab
# entry (fp32 upcast, log-softmax, exp, entropy, argmax, fp64 CDF + cumsum, searchsorted); reading a cached
# micro-batch moves its records (<= 5K+7 B per answer token, from disk the first time) and ships the dense
# sparse targets to the device (ids int64 [K] + weights fp32 [K] + top1 + entropy = 12K + 12 B per position).
SAMPLER_BYTES_PER_VOCAB = 60.0
H2D_GBPS = 25.0  # host -> device (PCIe Gen5 x16 is 64 GB/s nominal; assumed achieved, not measured)


@dataclass
class _JobModel:
    """What the phases of :func:`estimate_job` share: the inputs, both models' counts, one epoch's micro-batches
    and the rates (FLOP/s) of the student (``R``) and teacher (``R_t``) GEMMs."""

    cfg: Any
    hw: Hardware
    stats: DataStats
    world_size: int
    s: Any  # student counts (kd.ops.planner.build_and_count)
    t: Any  # teacher counts, None without a teacher
    batches: List[List[int]]
    steps: int
    R: float
    R_t: float
    dequant_bpw: float  # teacher dequantisation traffic, bytes per linear weight per micro-batch (0: none)
    ac: int  # layers under activation checkpointing
    k: int  # teacher-cache draws per position
    sampler_s_per_row: float
    link: Any = None  # kd.ops.planner.CrossNodeTraffic per optimizer step (None on one node)
    full: bool = False  # full fine-tune: weight gradients too, AdamW over every student weight
    opt_shards: int = 1  # ranks the optimizer state is sharded over

    def teacher_fwd(self, T: int, docs: Sequence[int]) -> float:
        t = self.t
        f = 2.0 * (t.linear + t.other_layer) * T + _attn_flops(docs, t.num_layers, t.num_heads, t.head_dim, 1)
        return f / (self.R_t * self.hw.teacher_eff)


def cache_options(cfg):
    """The config's ``teacher_cache`` section as the recipe parses it (:func:`kd.train.settings.parse_cache`)."""
    from kd.core.layout import RunLayout
    from kd.train.settings import parse_cache

    return parse_cache(cfg, RunLayout(cfg.get("output_dir", None) or "."))


def dequant_bytes_per_weight(teacher_quantization) -> float:
    """Bytes moved per teacher linear weight per micro-batch by a per-call dequantisation (the precision's own
    ``PrecisionSpec.dequant_bytes_per_weight``: 4.5 for nf4, 2.5 for nf4_fp8, 0 where the GEMM reads the stored weight
    and the traffic is inside its measured efficiency). On a 273 GB/s GB10 nf4_fp8's is a quarter of an FP8 forward."""
    from kd.teacher.precision import REGISTRY, parse_precision

    return REGISTRY[parse_precision(teacher_quantization)].dequant_bytes_per_weight


def teacher_gemm_fp8(teacher_quantization) -> bool:
    """Whether the precision's GEMM runs in FP8 (the teacher is then costed at ``fp8_tflops``)."""
    from kd.teacher.precision import REGISTRY, parse_precision

    return REGISTRY[parse_precision(teacher_quantization)].gemm == "fp8"


def _total(cs: List[Component]) -> float:
    return sum(c.seconds for c in cs)


def _epoch(m: "_JobModel", teacher: bool, write: bool, read: bool) -> List[Component]:
    """One epoch's components: online (``teacher``), writing the cache (``write``) or reading it (``read``)."""
    cfg, hw, stats, s, t, batches, steps, k = m.cfg, m.hw, m.stats, m.s, m.t, m.batches, m.steps, m.k
    L, A, R, R_t = stats.lengths, stats.answers, m.R, m.R_t
    n_pos = 0
    t_teacher = t_student = t_head = t_dequant = t_write = t_read = 0.0
    for ids in batches:
        b = [L[i] for i in ids]
        T = stats.max_seq_len * stats.batch_size if stats.packed else max(b) * len(b)
        n_pos += T
        docs = b if stats.packed else [max(b)] * len(b)  # padding rows compute full causal blocks
        n_ans = sum(A[i] for i in ids)
        if teacher:
            t_teacher += m.teacher_fwd(T, docs)
            if m.dequant_bpw:
                t_dequant += m.dequant_bpw * t.linear / (hw.mem_gbps * 1e9)
            t_head += 2.0 * t.vocab_size * t.embed_dim * T / (R * hw.head_eff)
        if write:  # the fused head draws for every row it computes (prompt rows too), the writer keeps answers
            t_write += T * m.sampler_s_per_row
        if read:
            t_read += n_ans * (5 * k + 7) / (hw.disk_gbps * 1e9) + T * (12 * k + 12) / (H2D_GBPS * 1e9)
        per_layer = 2.0 * (s.linear + s.adapter) / max(1, s.num_layers) * T
        attn1 = _attn_flops(docs, 1, s.num_heads, s.head_dim, 1)
        fwd = s.num_layers * per_layer + s.num_layers * attn1
        # activation grads (+ weight grads for a full fine-tune); attention bwd ~2x fwd
        bwd = (2 if m.full else 1) * s.num_layers * per_layer + 2 * s.num_layers * attn1
        recompute = m.ac * (per_layer + attn1)
        t_student += (fwd + bwd + recompute) / (R * hw.student_eff)
        t_head += 3 * 2.0 * s.vocab_size * s.embed_dim * T / (R * hw.head_eff)  # fwd + grad wrt hidden + lse
    n_opt = (s.total if m.full else s.adapter) / max(1, m.opt_shards)
    t_opt = steps * 16.0 * n_opt / (hw.mem_gbps * 1e9 * hw.optimizer_eff)
    # The inter-node link (kd.ops.planner.cross_node_bytes_per_step): FSDP2 prefetches the weight gathers and
    # reduces gradients during the backward, so only the part beyond the model's compute shows in the step.
    t_link = link_raw = 0.0
    link_note = ""
    if m.link is not None and m.link.rows:
        rows = [r for r in m.link.rows if teacher or r[0] != "teacher weight all-gather"]
        per_step = sum(b for _, b, _ in rows)
        link_raw = steps * per_step / (hw.interconnect_gbps * 1e9)
        t_link = max(0.0, link_raw - (t_student + (t_teacher if teacher else 0.0)))
        link_note = (f"{per_step / 1e9:.3g} GB/step at {hw.interconnect_gbps:g} GB/s = {link_raw / max(1, steps):.2f} s/step, "
                     f"{'all hidden' if t_link == 0 else 'the rest hidden'} behind compute")
    comps = []
    if teacher:
        comps.append(Component("teacher forward", t_teacher, f"{t.num_layers} layers, {'fp8' if R_t != R else 'bf16'} GEMMs"))
        if t_dequant:
            comps.append(Component("teacher NF4 dequantisation", t_dequant, f"{m.dequant_bpw:g} B/weight per micro-batch"))
    comps.append(Component("student forward + backward", t_student, f"LoRA, AC on {m.ac}/{s.num_layers} layers"))
    comps.append(Component("loss head (fused)", t_head, "teacher + student projections" if teacher
                           else f"student projection + sparse soft-CE over K={k}"))
    if write:
        comps.append(Component("teacher cache write", t_write, f"K={k} draws per position (modelled)"))
    if read:
        comps.append(Component("teacher cache read", t_read, "records + sparse targets to the device (modelled)"))
    comps.append(Component("optimizer", t_opt, f"AdamW over {int(n_opt):,} "
                           f"{'student weights' if m.full else 'LoRA params'} per rank"))
    if m.link is not None and m.link.rows:
        comps.append(Component("inter-node link (not hidden)", t_link, link_note))
    # validation and checkpoints (per epoch)
    eval_every = cfg.get("eval_every_n_steps", None)
    if eval_every:
        n_evals = steps // int(eval_every) + 1
        vb = int(cfg.get("max_eval_batches", 0) or 0) or math.ceil(stats.val_samples / stats.batch_size)
        mean_T = n_pos / max(1, len(batches))
        tl = t.linear if (t is not None and teacher) else 0
        per_val = vb * mean_T * (2.0 * (tl + s.linear + s.adapter)) / (R * hw.teacher_eff)
        comps.append(Component("validation", n_evals * per_val, f"{n_evals} x {vb} batches"))
    save_every = cfg.get("save_every_n_steps", None)
    n_saves = (steps // int(save_every) if save_every else 0) + 1
    ckpt_bytes = s.adapter * (2 + 8)  # bf16 adapter + AdamW's two states
    comps.append(Component("checkpoints", n_saves * ckpt_bytes / (hw.disk_gbps * 1e9), f"{n_saves} saves"))
    return comps


def _teacher_only_pass(m: "_JobModel", fraction: float) -> List[Component]:
    """The build / fill pass (kd.cache.session.CacheSession.fill): the samples (and the validation
    split if validation is on, at the training samples' mean length), right-padded, longest first,
    data-parallel (batch b to rank b % world_size); the teacher head projects the answer rows only.
    ``fraction``: the share of the samples the pass must compute (the fill after epoch 1)."""

    cfg, hw, stats, t, k, world_size = m.cfg, m.hw, m.stats, m.t, m.k, m.world_size
    L, A, R = stats.lengths, stats.answers, m.R

    opts = cache_options(cfg)
    bt = stats.batch_size * stats.max_seq_len if stats.packed else None
    bs = opts.build_batch_size or (stats.batch_size if bt is None else bt)
    max_tok = opts.build_max_tokens or bt
    lens, ans = list(L), list(A)
    if cfg.get("eval_every_n_steps", None) and stats.val_samples:
        ml, ma = round(sum(L) / max(1, len(L))), round(sum(A) / max(1, len(A)))
        lens += [ml] * stats.val_samples
        ans += [ma] * stats.val_samples
    plan = plan_batches(dict(enumerate(lens)), batch_size=int(bs), max_new_tokens=0,
                        max_batch_tokens=int(max_tok) if max_tok else None)
    cost = []
    for b in plan:
        w = max(lens[i] for i in b)
        n_ans = sum(ans[i] for i in b)
        c = m.teacher_fwd(w * len(b), [w] * len(b))
        c_head = 2.0 * t.vocab_size * t.embed_dim * n_ans / (R * hw.head_eff)
        c_dq = m.dequant_bpw * t.linear / (hw.mem_gbps * 1e9)
        cost.append((c, c_head, c_dq, n_ans * m.sampler_s_per_row))
    # the slowest rank's share (rank 0: the longest batches)
    share = [cost[r::world_size] for r in range(world_size)]
    mine = max(share, key=lambda cs: sum(sum(c) for c in cs)) if cost else []
    tot = [fraction * sum(c[j] for c in mine) for j in range(4)]
    n_tok = sum(lens)
    comps = [Component("teacher forward", tot[0], f"{len(plan)} batches of <= {bs} rows"
                       + (f" / {max_tok} tokens" if max_tok else "") + f", {n_tok:,} tokens, {world_size} rank(s)")]
    if m.dequant_bpw:
        comps.append(Component("teacher NF4 dequantisation", tot[2], f"{m.dequant_bpw:g} B/weight per batch"))
    comps.append(Component("teacher head (answer rows)", tot[1], "no student"))
    comps.append(Component("teacher cache write", tot[3], f"K={k} draws per answer token (modelled)"))
    return comps


def estimate_job(cfg, hw: Hardware, stats: Optional[DataStats] = None, world_size: int = 1,
                 nproc_per_node: int = 1) -> JobEstimate:
    """Seconds per component for one epoch and the whole run of ``recipes/kd_lora.py`` under ``cfg``.

    With a ``teacher_cache`` section the job has phases (:func:`kd.ops.planner.teacher_forward_epochs` says how
    many epochs run the teacher): ``online_then_cache`` = epoch 1 online + the cache write, a teacher-only
    fill over the samples epoch 1 did not see, then ``epochs - 1`` student-only epochs that read the cache;
    ``build`` = one teacher-only pass over every sample (the recipe exits after it); ``use`` = ``epochs``
    student-only epochs from the cache."""

    stats = stats or data_stats(cfg)
    s = build_and_count(cfg.model)
    has_teacher = cfg.get("teacher_model", None) is not None
    t = build_and_count(cfg.teacher_model) if has_teacher else None
    mode = cache_mode(cfg) if has_teacher else None
    batches = micro_batches(stats, world_size, int(cfg.get("seed", 0) or 0))
    ga = int(cfg.get("gradient_accumulation_steps", 1))
    steps = len(batches) // ga
    if cfg.get("max_steps_per_epoch", None):
        steps = min(steps, int(cfg.max_steps_per_epoch))
    batches = batches[: steps * ga]
    R = hw.bf16_tflops * TFLOP
    if has_teacher and teacher_gemm_fp8(cfg.get("teacher_quantization", None)):
        R_t = hw.fp8_tflops * TFLOP
    else:
        R_t = R
    dq = dequant_bytes_per_weight(cfg.get("teacher_quantization", None)) if has_teacher else 0.0
    ac = len(activation_checkpoint_layers(cfg, s.num_layers))
    k = cache_options(cfg).k if mode else DEFAULT_CACHE_K
    sampler_s_per_row = (SAMPLER_BYTES_PER_VOCAB * t.vocab_size / (hw.mem_gbps * 1e9)) if t is not None else 0.0
    full = s.adapter == 0
    link = None
    if world_size > nproc_per_node:
        from kd.ops.planner import cross_node_bytes_per_step

        link = cross_node_bytes_per_step(cfg, world_size, local_world_size=nproc_per_node)
    strategy = str(cfg.get("fsdp_strategy", "shard"))
    opt_shards = 1 if world_size == 1 else (world_size if strategy == "shard" else nproc_per_node)
    m = _JobModel(cfg, hw, stats, world_size, s, t, batches, steps, R, R_t, dq, ac, k, sampler_s_per_row,
                  link, full, opt_shards)
    epochs = int(cfg.get("epochs", 1))
    online = _epoch(m, teacher=has_teacher, write=False, read=False)
    phases: List[Phase] = []
    if mode is None:
        phases.append(Phase("one epoch", epochs, _total(online), online))
    else:
        n_online, _n_passes = teacher_forward_epochs(cfg)
        n_online = int(n_online)
        if mode == "build":
            cs = _teacher_only_pass(m, 1.0)
            phases.append(Phase("teacher-only build pass", 1, _total(cs), cs))
        else:
            if mode == "online_then_cache":
                cs = _epoch(m, teacher=True, write=True, read=False)
                phases.append(Phase("epoch 1: online + cache write", n_online, _total(cs), cs))
                if epochs > n_online:
                    n_all = stats.samples + (stats.val_samples if cfg.get("eval_every_n_steps", None) else 0)
                    seen = min(stats.samples, world_size * sum(len(b) for b in batches)) if not stats.packed else \
                        min(stats.samples, world_size * len({i for b in batches for i in b}))
                    frac = (n_all - seen) / max(1, n_all)
                    cs = _teacher_only_pass(m, frac)
                    phases.append(Phase(f"fill: teacher-only pass over {n_all - seen} samples epoch 1 did not see",
                                        1, _total(cs), cs))
            n_cache = epochs - n_online
            if n_cache > 0:
                cs = _epoch(m, teacher=False, write=False, read=True)
                phases.append(Phase("epochs from the cache (no teacher)" if mode == "online_then_cache"
                                    else "epoch from the cache (no teacher)", n_cache, _total(cs), cs))
    first = phases[0]
    run = sum(ph.total_s for ph in phases)
    n_pos = sum((stats.max_seq_len * stats.batch_size if stats.packed else max(stats.lengths[i] for i in ids) * len(ids))
                for ids in batches)
    pad = 1 - sum(stats.lengths[i] for ids in batches for i in ids) / max(1, n_pos)
    n_ans = sum(stats.answers[i] for ids in batches for i in ids)
    per_epoch = [c for c in first.components if c.name not in ("validation", "checkpoints")]
    step = _total(per_epoch) / max(1, steps)
    return JobEstimate(hw, first.components, first.seconds, run, epochs, steps, len(batches), n_pos, n_ans, pad,
                       step, phases=phases, cache_mode=mode, online_run_s=epochs * _total(online),
                       warnings=[w for w in [teacher_profile_warning(hw, cfg)] if w])


# --------------------------------------------------------------------------------------------------
# Plan A: teacher generation
# --------------------------------------------------------------------------------------------------
@dataclass
class GenerationEstimate:
    hardware: Hardware
    prompts: int
    generated_tokens: int
    batch_size: int
    step_ms: float
    tokens_per_s: float
    hours: Dict[int, float]  # nodes -> hours
    fused_step_ms: float
    fused_hours: Dict[int, float]
    route: str = "dequant"

    def table(self) -> str:
        hw = self.hardware
        flag = "" if hw.measured else f"  ({unmeasured_note(hw)})"
        return "\n".join([
            f"plan A teacher generation on {hw.name}{flag}",
            f"  {self.prompts:,} prompts, ~{self.generated_tokens:,} generated tokens, batch {self.batch_size}",
            f"  today's NF4 decode (bf16 dequant per step): {self.step_ms:.0f} ms/step, {self.tokens_per_s:,.0f} tokens/s: "
            + ", ".join(f"{n} node(s) {_hms(h * 3600)}" for n, h in self.hours.items()),
            f"  static decode as built (CUDA graphs; NF4 route at batch {self.batch_size}: {self.route}; "
            + ("read-once kernel costed from the H100's CUDA-core work per weight"
               if self.route == "fused" else "H200-calibrated")
            + f"): {self.fused_step_ms:.0f} ms/step: "
            + ", ".join(f"{n} node(s) {_hms(h * 3600)}" for n, h in self.fused_hours.items()),
        ])


def fused_ops(hw: Hardware, rows: int) -> float:
    """The read-once kernel's cost per weight at ``rows`` (``hw.fused_ops_per_weight``, linear between its points,
    flat past the ends)."""
    pts = sorted((int(k), float(v)) for k, v in hw.fused_ops_per_weight.items())
    if rows <= pts[0][0]:
        return pts[0][1]
    for (r0, v0), (r1, v1) in zip(pts, pts[1:]):
        if rows <= r1:
            return v0 + (v1 - v0) * (rows - r0) / (r1 - r0)
    return pts[-1][1]


def decode_route(B: int, kernel: str = "auto", fused_max_rows: int = 128) -> str:
    """The route a decode step of ``B`` rows takes (kd.generate.nf4_matmul.route on CUDA with NVRTC working)."""
    if kernel == "dequant" or B > fused_max_rows:
        return "dequant"
    return "gemv" if kernel == "auto" and B <= 8 else "fused"


def static_step_ms(hw: Hardware, B: int, context: int, dims: Dict[str, int], kernel: str = "auto",
                   fused_max_rows: int = 128) -> float:
    """One decode step of ``kd.generate.static_decode`` with the NF4 teacher, ms: the linears by their route
    (:func:`decode_route`: kd's 4-bit GEMV up to 8 rows, reading 0.53 B/weight at ``gemv_bw_eff`` of the bandwidth;
    the read-once kernel up to ``fused_max_rows``, the longer of reading 0.53 B/weight and its work per weight
    (:func:`fused_ops`) at the CUDA-core rate; above, dequantisation to bf16, 2.5 B/weight at ``dequant_bw_eff``,
    then bf16 GEMMs at ``decode_gemm_eff``), the KV cache read, and the measured rest (head, sampler, attention
    matmuls, glue: ``static_overhead_ms`` + ``static_overhead_ms_per_row`` per row)."""
    H, I, L = dims["embed_dim"], dims["intermediate_dim"], dims["num_layers"]
    q_out, kvd = dims["num_heads"] * dims["head_dim"], dims["num_kv_heads"] * dims["head_dim"]
    n_lin = L * (2 * H * q_out + 2 * H * kvd + 3 * H * I)
    bw = hw.mem_gbps * 1e9
    route = decode_route(B, kernel, fused_max_rows)
    if route == "gemv":
        lin = n_lin * (0.5 + 2 / 64) / (bw * hw.gemv_bw_eff)
    elif route == "fused":
        lin = max(n_lin * (0.5 + 2 / 64) / bw, n_lin * fused_ops(hw, B) / (hw.fp32_tflops * TFLOP))
    else:
        lin = n_lin * 2.5 / (bw * hw.dequant_bw_eff) + 2 * n_lin * B / (hw.bf16_tflops * TFLOP * hw.decode_gemm_eff)
    kv = decode_step_cost(B, context, weight_format="nf4", **dims).kv_bytes / bw
    return 1e3 * (lin + kv) + hw.static_overhead_ms + hw.static_overhead_ms_per_row * (B - 1)


def estimate_generation(gen_cfg, hw: Hardware, expected_new_tokens: Optional[List[int]] = None,
                        n_prompts: Optional[int] = None) -> GenerationEstimate:
    """Decode time of plan A. "today" (the eager path) from :func:`kd.generate.static_decode.decode_step_cost`: every
    step reads the weights (4.53 B/weight: NF4 read + bf16 copy written and read) and the KV cache, and does the
    matrix and attention FLOPs; the roofline of the two at the profile's rates, plus its measured per-step overhead.
    The static engine as built: :func:`static_step_ms`. Generated length per prompt: the expected answer length (capped at
    max_new_tokens)."""

    m = build_and_count(gen_cfg.model)
    B = int(gen_cfg.get("batch_size", 1))
    max_new = int(gen_cfg.get("max_new_tokens", 1024))
    if expected_new_tokens is None:
        expected_new_tokens = [max_new] * int(n_prompts or 0)
    gen = [min(max_new, n) for n in expected_new_tokens]
    n = len(gen)
    total = sum(gen)
    mean_ctx = 128 + (sum(gen) / max(1, n)) / 2
    dims = dict(num_layers=m.num_layers, embed_dim=m.embed_dim, intermediate_dim=m.intermediate_dim,
                num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, vocab_size=m.vocab_size)

    def step_ms(weight_format: str) -> float:
        # the same bytes/FLOPs model as kd.generate.static_decode (one cost model for the decoder and the planner)
        cost = decode_step_cost(B, int(mean_ctx), weight_format=weight_format, **dims)
        return 1e3 * cost.seconds(hw.mem_gbps * 1e9 * hw.decode_bw_eff,
                                  hw.bf16_tflops * TFLOP * hw.teacher_eff) + hw.decode_overhead_ms

    # rows finish at different lengths: a batch runs as long as its longest row (sorted batching: ~mean of max)
    steps = 0
    srt = sorted(gen)
    for i in range(0, n, B):
        steps += max(srt[i:i + B])
    kernel = GENERATE_TEACHER.get(gen_cfg, "nf4_decode_kernel")  # the recipe's own defaults and checks
    fmax = GENERATE_TEACHER.get(gen_cfg, "nf4_fused_max_batch")
    today = step_ms("nf4_dequant")
    fused = static_step_ms(hw, B, int(mean_ctx), dims, kernel=kernel, fused_max_rows=fmax)
    hours = {k: steps * today / 1e3 / 3600 / k for k in (1, 2)}
    fhours = {k: steps * fused / 1e3 / 3600 / k for k in (1, 2)}
    return GenerationEstimate(hw, n, total, B, today, total / max(1e-9, steps * today / 1e3), hours, fused, fhours,
                              route=decode_route(B, kernel, fmax))
