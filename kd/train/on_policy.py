"""On-policy distillation: the student answers the step's prompts, the teacher scores those answers.

GKD (Agarwal et al., ICLR 2024, "On-Policy Distillation of Language Models", Algorithm 1): with probability
``lmbda`` an optimizer step trains on sequences SAMPLED FROM THE STUDENT ``y ~ q_theta(. | x)`` instead of the
dataset's answers, and minimises the token-level divergence ``D(p_T || q_theta)(y | x)`` on them (no gradient
through the sampling, GKD eq. 2 with the stop-gradient of Algorithm 1). MiniLLM (Gu et al. 2024) is the
reverse-KL special case; "on-policy distillation" (Thinking Machines, 2025) the same idea with reverse KL.
TRL's ``GKDTrainer`` defaults: ``lmbda=0.5``, ``beta=0.5`` (JSD), ``temperature=0.9``, ``max_new_tokens=128``.

Pieces used by ``recipes/kd_lora.py`` (``on_policy:`` config section):

- :class:`OnPolicyConfig` / :func:`parse_on_policy`: the section, validated (unknown keys -> "did you mean").
- :func:`is_on_policy_step`: the per-step coin, a hash of ``(seed, step)``: no RNG state, so a resumed run (any
  world size) takes exactly the same decisions, and every rank agrees without communication.
- :func:`prompts_from_batch`: a padded SFT micro-batch ``tokens`` / ``labels`` [B, S] (unshifted, torchtune's
  ``padded_collate_sft``) -> the prompt of each row = the tokens before its first label (the ChatML prompt ending
  in ``<|im_start|>assistant\\n``).
- :func:`generation_seeds`: one sampling seed per row from ``(seed, step, prompt tokens)``: a sample's random
  stream does not depend on its batch, rank, world size or on a resume.
- :func:`build_on_policy_batch`: prompt + generated answer (+ the stop token the student emitted, so it learns
  where the teacher would stop), right-padded, labels on the generated tokens only, in the dataset's convention.
- :func:`student_generation`: context manager that makes a (possibly FSDP2-sharded, fused-head, chunked-output)
  training student a generator: eval mode, :class:`kd.generate.generation.LastTokenHead`, no output chunking, and under
  FSDP2 the parameters gathered ONCE for the whole generation (``unshard`` + ``reshard_after_forward=False``)
  instead of one all-gather per generated token.
- :func:`generate_on_policy`: all of the above for the micro-batches of one optimizer step; returns
  :class:`OnPolicyBatches` (the batches and the local generated-token count, for the global normalisation).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from kd.core.config import ConfigError
from kd.core.keys import Schema, kd_key
from kd.generate.generation import (
    SamplingParams,
    generate_batch,
    install_last_token_head,
    remove_last_token_head,
    stop_token_ids,
)

__all__ = [
    "ON_POLICY_KEYS",
    "OnPolicyConfig",
    "OnPolicyBatches",
    "parse_on_policy",
    "is_on_policy_step",
    "count_on_policy_steps",
    "prompts_from_batch",
    "generation_seeds",
    "build_on_policy_batch",
    "student_generation",
    "generate_on_policy",
]

ON_POLICY = Schema("on_policy (section of kd_lora)", "'on_policy'", [
    kd_key("lmbda", "probability that an optimizer step is on-policy (GKD's lambda)", "float", None, lo=0.0, hi=1.0,
       required=True),
    kd_key("temperature", "the student's sampling temperature (0 = greedy)", "float", 0.9, lo=0.0),
    kd_key("top_p", "nucleus sampling", "float", 1.0, lo=1e-6, hi=1.0),
    kd_key("top_k", "top-k sampling (null = off)", "int", None, lo=1, nullable=True),
    kd_key("max_new_tokens", "longest student answer", "int", 128, lo=1),
    kd_key("seed", "seed of the on-policy coin and the sampling (default: the run's seed)", "int", None, lo=0,
       nullable=True),
])
ON_POLICY_KEYS = ON_POLICY.names


@dataclass(frozen=True)
class OnPolicyConfig:
    """``lmbda``: probability that an optimizer step is on-policy (GKD's lambda; 0 = never, 1 = always).
    ``temperature`` / ``top_p`` / ``top_k``: the student's sampling (temperature 0 = greedy).
    ``max_new_tokens``: answer length cap. ``seed``: the coin and sampling seed (default: the run's seed)."""

    lmbda: float
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: Optional[int] = None
    max_new_tokens: int = 128
    seed: int = 0


def parse_on_policy(section: Any, run_seed: Optional[int]) -> Optional[OnPolicyConfig]:
    """The recipe's ``on_policy:`` section (a mapping or None) -> :class:`OnPolicyConfig`, or None when the section
    is absent. Raises :class:`kd.core.config.ConfigError` for unknown keys and bad values."""

    if section is None:
        return None
    if not hasattr(section, "keys"):
        raise ConfigError(f"'on_policy' must be a mapping (lmbda, temperature, max_new_tokens, ...), got {section!r}.")
    ON_POLICY.check(section)
    get = partial(ON_POLICY.get, section)
    seed = get("seed")
    return OnPolicyConfig(
        lmbda=get("lmbda"), temperature=get("temperature"), top_p=get("top_p"), top_k=get("top_k"),
        max_new_tokens=get("max_new_tokens"),
        seed=int(seed if seed is not None else (run_seed or 0)),
    )


# The stream names passed here ("kd.on_policy.coin", ...) are seeds, not module paths: renaming one changes every draw.
def _hash64(*parts: Any) -> int:
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def is_on_policy_step(cfg: OnPolicyConfig, step: int) -> bool:
    """Whether optimizer step ``step`` (0-based: the number of steps already taken) is on-policy:
    ``u(seed, step) < lmbda`` with ``u`` a hash-derived uniform in [0, 1) (so ``lmbda`` 0 / 1 are never / always)."""
    if cfg.lmbda <= 0.0:
        return False
    if cfg.lmbda >= 1.0:
        return True
    return _hash64("kd.on_policy.coin", cfg.seed, int(step)) / float(1 << 63) < cfg.lmbda


def count_on_policy_steps(cfg: OnPolicyConfig, n_steps: int) -> int:
    """How many of the steps ``0 .. n_steps - 1`` are on-policy (recomputed after a resume: nothing is stored)."""
    return sum(is_on_policy_step(cfg, s) for s in range(int(n_steps)))


def prompts_from_batch(tokens: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> List[Optional[List[int]]]:
    """Prompt token ids of each row of a padded SFT batch.

    Args:
        tokens: [B, S] int64, right-padded.
        labels: [B, S] int64, UNSHIFTED (``labels[i] == tokens[i]`` on answer tokens, ``ignore_index`` on the
            prompt and the padding), as ``torchtune.data.padded_collate_sft`` makes them.
    Returns: per row, ``tokens[:j]`` with ``j`` the first labelled position, or None when the row has no label
    (or no prompt) -- such a row gets no on-policy answer. (One host copy of the batch: generation needs it.)
    """
    if tokens.shape != labels.shape or tokens.dim() != 2:
        raise ValueError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} must be the same [B, S]")
    valid = labels != ignore_index
    has = valid.any(-1)
    first = torch.where(has, valid.int().argmax(-1), torch.zeros_like(has, dtype=torch.long))
    rows, firsts, hs = tokens.cpu().tolist(), first.cpu().tolist(), has.cpu().tolist()
    return [row[:j] if h and j > 0 else None for row, j, h in zip(rows, firsts, hs)]


def generation_seeds(cfg: OnPolicyConfig, step: int, prompts: Sequence[Optional[Sequence[int]]]) -> List[int]:
    """Sampling seed per row: a hash of (seed, step, the prompt's tokens) -- the same sample at the same step gets
    the same random stream whatever batch, rank or world size it lands in."""
    out = []
    for p in prompts:
        ph = hashlib.sha256(repr(list(p or ())).encode()).hexdigest()[:16]
        out.append(_hash64("kd.on_policy.sample", cfg.seed, int(step), ph))
    return out


def build_on_policy_batch(
    prompts: Sequence[Optional[Sequence[int]]],
    answers: Sequence[Optional[Sequence[int]]],
    *,
    pad_id: int,
    ignore_index: int,
    device: torch.device,
) -> Dict[str, torch.Tensor]:
    """``{"tokens": [B, L], "labels": [B, L]}`` (int64, right-padded, labels UNSHIFTED like the dataset's) with
    ``tokens = prompt + answer`` and labels equal to the tokens on the answer only. A row whose prompt is None
    becomes one padding token with no label. ``answers`` include the stop token when the student emitted one."""
    rows, labs = [], []
    for p, a in zip(prompts, answers):
        if p is None:
            rows.append([pad_id])
            labs.append([ignore_index])
            continue
        a = list(a or ())
        rows.append(list(p) + a)
        labs.append([ignore_index] * len(p) + a)
    L = max(len(r) for r in rows)
    tok = torch.full((len(rows), L), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), L), ignore_index, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labs)):
        tok[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        lab[i, : len(l)] = torch.tensor(l, dtype=torch.long)
    return {"tokens": tok.to(device), "labels": lab.to(device)}


def _fsdp_modules(model: nn.Module) -> List[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def student_generation(model: nn.Module, *, reshard_after_forward: bool = True) -> Iterator[nn.Module]:
    """Turn the training student into a generator for the duration of the block.

    - eval mode (LoRA dropout off), restored afterwards;
    - ``model.output`` wrapped in :class:`kd.generate.generation.LastTokenHead` (works for :class:`kd.losses.heads.FusedKDHead`,
      whose forward without targets returns logits, and for a plain/LoRA linear); ``num_output_chunks`` set to 0
      (the chunked loss form's chunked output would hand the head a list);
    - FSDP2: every FSDP unit is all-gathered once (``unshard``) and kept gathered across the decode steps
      (``set_reshard_after_forward(False)``): one all-gather of the student per generation instead of one per
      generated token, and no collective at all while decoding (ranks may stop after different lengths). After
      the block the units are resharded and ``reshard_after_forward`` restored (the recipe's value on the layers,
      False on the root as FSDP2's own root heuristic has it). Costs the full unsharded student in memory while
      generating. With HSDP of one GPU per node (the two-node config) the shard group has size 1: nothing moves.
    """

    fsdp = _fsdp_modules(model)
    was_training = model.training
    chunks = getattr(model, "num_output_chunks", 0)
    model.eval()
    if chunks:
        model.num_output_chunks = 0
    install_last_token_head(model)
    try:
        for m in fsdp:
            m.set_reshard_after_forward(False, recurse=False)
        for m in fsdp:  # same order on every rank: the all-gathers line up
            m.unshard()
        yield model
    finally:
        remove_last_token_head(model)
        if chunks:
            model.num_output_chunks = chunks
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(bool(reshard_after_forward) if m is not model else False, recurse=False)
        model.train(was_training)


class OnPolicyBatches(NamedTuple):
    """The student's answers for one optimizer step.

    batches: per micro-batch, ``{"tokens", "labels"}`` [B, L] int64 (labels unshifted, on the answers only).
    n_tokens: LOCAL number of generated tokens (stop tokens included) = label count (the recipe replaces it by
    the global count, a 0-d float32 tensor). n_rows: local number of answered rows.
    seconds: this rank's generation wall time.
    """

    batches: List[Dict[str, torch.Tensor]]
    n_tokens: Any
    n_rows: int
    seconds: float


@torch.no_grad()
def generate_on_policy(
    model: nn.Module,
    micro: Sequence[Dict[str, torch.Tensor]],
    cfg: OnPolicyConfig,
    *,
    step: int,
    tokenizer: Any,
    ignore_index: int,
    device: torch.device,
    dtype: torch.dtype,
    reshard_after_forward: bool = True,
) -> OnPolicyBatches:
    """Sample the student's answer to every prompt of the step's micro-batches (the project's batched KV-cache
    generation, :func:`kd.generate.generation.generate_batch`, all rows of the step in one call), with the student's CURRENT
    weights (LoRA included); one on-policy batch per micro-batch. The result never carries gradients (GKD's
    stop-gradient on the samples)."""

    t0 = time.perf_counter()
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    stops = stop_token_ids(tokenizer)
    # ALL rows of the step (every micro-batch) in ONE generate_batch call: decoding is memory-bound, so G
    # micro-batches generated together cost about one generation, not G.
    prompts = [prompts_from_batch(b["tokens"], b["labels"], ignore_index) for b in micro]
    flat = [(k, i, p) for k, ps in enumerate(prompts) for i, p in enumerate(ps) if p is not None]
    answers: List[List[Optional[List[int]]]] = [[None] * len(ps) for ps in prompts]
    n_tok = 0
    gens = []
    # entered on every rank even with nothing to answer: under FSDP2 its unshard is a collective
    with student_generation(model, reshard_after_forward=reshard_after_forward):
        if flat:
            gens = generate_batch(
                model, [p for _, _, p in flat], max_new_tokens=cfg.max_new_tokens, stop_ids=stops,
                pad_id=tokenizer.pad_id, params=params, seeds=generation_seeds(cfg, step, [p for _, _, p in flat]),
                device=device, cache_dtype=dtype,
            )
    for (k, i, _), g in zip(flat, gens):
        answers[k][i] = list(g.tokens) + ([g.stop_token] if g.stop_token is not None else [])
        n_tok += len(answers[k][i])
    out = [build_on_policy_batch(ps, ans, pad_id=tokenizer.pad_id, ignore_index=ignore_index, device=device)
           for ps, ans in zip(prompts, answers)]
    return OnPolicyBatches(out, n_tok, len(flat), time.perf_counter() - t0)
