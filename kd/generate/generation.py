"""Batched, resumable, data-parallel teacher generation for offline distillation.

Pieces (used by ``recipes/generate_teacher.py`` and ``recipes/evaluate.py``):

- :func:`generate_batch`: one left-padded batch through a torchtune ``TransformerDecoder`` with KV caches
  (``setup_caches``; the cache is sized to this batch), per-row position ids and attention masks built from
  the padding (torchtune's ``get_causal_mask_from_padding_mask`` / ``get_position_ids_from_padding_mask``),
  logits computed for the LAST position only (:class:`LastTokenHead`: a 152k-vocab prefill would otherwise
  materialise ``B x S x V`` logits), stop on any of ``stop_ids`` per row, early exit when every row stopped.
- Sampling (:func:`sample_next`): greedy for ``temperature == 0``; otherwise temperature, optional top-k and
  top-p (nucleus), then inverse-CDF sampling with ONE uniform number per (sample, step) drawn from a
  counter-based hash of ``(per-sample seed, step)``. The per-sample seed is ``hash(seed, sample_id)``, so a
  sample's random stream does not depend on its batch, rank, world size or on a resume.
- :class:`ResultStore`: one JSON-lines file per rank under ``<output_dir>/parts/``; each batch is appended
  with a single ``write`` then ``flush`` + ``fsync``. Readers ignore a torn last line; a writer truncates its
  own file to the last complete line before appending, so ``kill -9`` at any moment loses at most the batch
  in flight and never corrupts the file.
- :func:`plan_batches`: the prompts sorted by token length (longest first, ties by id) and cut into batches
  (``batch_size`` and ``max_batch_tokens`` = B x (prompt + max_new_tokens) limits); batch ``b`` belongs to rank
  ``b % world_size``. The plan depends on the data only, so after a resume (any world size) a batch is the
  same group of samples as before, minus the ones already done.
- The recipe's default decoder is :class:`kd.generate.static_decode.StaticDecoder` (static KV cache per bucket, CUDA graphs,
  NF4 weights read once per step); :func:`generate_batch` is the eager reference it is tested against.
- :func:`merge_results`: the alpaca JSON in source order (``instruction``, ``input``, ``output`` = teacher
  answer, ``original_output``, plus ``id`` and flags) and LLaMA-Factory's ``dataset_info.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from kd.core.atomic import append_durably, atomic_write_text, truncate_durably
from kd.core.config import DataError
from kd.core.rng import counter_uniform, sample_seed, signed64
from kd.data.batching import plan_batches

# the seeds and batching the engine uses, importable with it (they live in kd.core.rng / kd.data.batching because the
# teacher cache samples and batches with them too)
REEXPORTED = (sample_seed, plan_batches)
from kd.data.alpaca import prompt_messages
from kd.data.special_text import plain_text

log = logging.getLogger(__name__)

# seeds and counter-based random numbers live in kd.core.rng (the cache samples with them too)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def sample_next(
    logits: torch.Tensor, params: SamplingParams, seeds: Optional[torch.Tensor], step, *, max_candidates: int = 1024
) -> torch.Tensor:
    """Next token per row from ``logits`` [B, V] (fp32).

    Sampling looks at the ``max_candidates`` most likely tokens (``torch.topk``, far cheaper than sorting a
    152k vocabulary for every row and step) with probabilities normalised over the FULL vocabulary, so the
    nucleus is exact whenever it fits in the candidates (at temperature 0.7 / top-p 0.9 it practically always
    does); otherwise the tail beyond the candidates is dropped. ``step``: int or int64 device tensor (no host
    sync: the CUDA-graph decode step samples entirely on the GPU)."""
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    V = logits.shape[-1]
    k = min(V, max_candidates, params.top_k or V)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    top, si = torch.topk(logits, k, dim=-1, sorted=True)
    sp = torch.exp(top - lse)
    if params.top_k is not None and params.top_k <= k:
        sp = sp / sp.sum(-1, keepdim=True)
    cum = sp.cumsum(-1)
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        keep = (cum - sp) < params.top_p
        sp = sp * keep
        cum = sp.cumsum(-1)
    u = counter_uniform(seeds, step).to(cum.device)
    target = (u * cum[:, -1].double()).to(cum.dtype).unsqueeze(-1)
    idx = torch.searchsorted(cum, target, right=True).clamp_max(k - 1)
    # never land on a zero-probability tail entry (rounding at the very end of the cdf)
    n_keep = (sp > 0).sum(-1, keepdim=True).clamp_min(1)
    idx = torch.minimum(idx, n_keep - 1)
    return si.gather(-1, idx).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Model plumbing: last-token head, KV caches
# --------------------------------------------------------------------------------------------------
class LastTokenHead(nn.Module):
    """``model.output`` replacement that projects only the last position: returns [B, 1, V]."""

    def __init__(self, inner: Any):
        super().__init__()
        if isinstance(inner, nn.Module):
            self.inner = inner
        else:  # torchtune TiedLinear (not a module)
            object.__setattr__(self, "_tied", inner)
            self.inner = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h[:, -1:]
        return self.inner(h) if self.inner is not None else self._tied(h)


def install_last_token_head(model: nn.Module) -> nn.Module:
    if not isinstance(model.output, LastTokenHead):
        model.output = LastTokenHead(model.output)
    return model


def remove_last_token_head(model: nn.Module) -> nn.Module:
    if isinstance(model.output, LastTokenHead):
        model.output = model.output.inner if model.output.inner is not None else model.output._tied
    return model


def teardown_kv_caches(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "kv_cache") and getattr(m, "kv_cache", None) is not None:
            m.kv_cache = None
            m.cache_enabled = False


def setup_kv_caches(model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
    teardown_kv_caches(model)
    with torch.device(device):
        model.setup_caches(batch_size=batch_size, dtype=dtype, decoder_max_seq_len=max_len)


def decode_qkv(attn, x: torch.Tensor, y: torch.Tensor, input_pos, qkv=None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [b, H, 1, d], k and v [b, H_kv, 1, d] of one decode token through a torchtune attention module's
    projections, RoPE and q/k norms (shared by the eager grouped decode and kd.generate.static_decode).
    ``qkv``: optional callable ``x -> (q_proj(x), k_proj(x), v_proj(x))`` for self-attention (``y is x``), e.g. a
    :class:`kd.generate.linear_groups.LinearGroup` running the three as one GEMM."""
    b = x.shape[0]
    if qkv is not None and y is x:
        qp, kp, vp = qkv(x)
    else:
        qp, kp, vp = attn.q_proj(x), attn.k_proj(y), attn.v_proj(y)
    q = qp.view(b, 1, attn.num_heads, attn.head_dim)
    if attn.pos_embeddings is not None:
        q = attn.pos_embeddings(q, input_pos=input_pos)
    q = q.transpose(1, 2)
    if attn.q_norm is not None:
        q = attn.q_norm(q)
    k = kp.view(b, 1, -1, attn.head_dim)
    v = vp.view(b, 1, -1, attn.head_dim)
    if attn.pos_embeddings is not None:
        k = attn.pos_embeddings(k, input_pos=input_pos)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if attn.k_norm is not None:
        k = attn.k_norm(k)
    return q, k, v


def _grouped_decode_forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, mask=None, input_pos=None):
    """torchtune ``MultiHeadAttention.forward`` for ONE new token with a KV cache, without expanding the KV heads.

    torchtune expands the ``n_kv`` cached heads to ``n_h`` query heads (``expand().flatten()`` = a copy of the
    whole cache per layer per step: 8 -> 64 heads for Qwen2.5-72B). Here the ``n_h / n_kv`` query heads of a group
    are batched against their shared K/V: ``[b, n_kv, g, d] @ [b, n_kv, d, L]``, reading the cache once.
    Anything else (prefill, no cache, no mask) goes to the stock forward."""
    if x.shape[1] != 1 or y is None or mask is None or self.kv_cache is None or not self.cache_enabled \
            or not isinstance(mask, torch.Tensor):
        return type(self).forward(self, x, y, mask=mask, input_pos=input_pos)
    q, k, v = decode_qkv(self, x, y, input_pos)
    k, v = self.kv_cache.update(k, v)  # [b, n_kv, L, d]
    return grouped_decode_attend(self, q, k, v, mask)


def grouped_decode_attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One decode step of ``attn`` (a torchtune ``MultiHeadAttention``): the ``g = n_h / n_kv`` query heads of a group
    attend to their shared K/V without expanding it, then the output projection.

    q: [b, n_h, 1, d] (from :func:`decode_qkv`); k, v: [b, n_kv, L, d]; mask: [b, 1, L] bool (True = attend).
    Returns [b, 1, n_h * d] projected to [b, 1, dim]. Scores and softmax in fp32."""
    b = q.shape[0]
    g = attn.num_heads // attn.num_kv_heads
    qg = q.reshape(b, attn.num_kv_heads, g, attn.head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (attn.head_dim ** -0.5)  # [b, n_kv, g, L]
    scores = scores.masked_fill(~mask[:, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [b, n_kv, g, d]
    out = out.reshape(b, attn.num_heads, 1, attn.head_dim).transpose(1, 2).reshape(b, 1, -1)
    return attn.output_proj(out)


class patched_forwards:
    """Context manager: each ``(module, forward)`` pair of ``self.mods`` runs ``forward`` instead of the module's own
    until exit (an instance attribute, removed again on exit). Subclasses fill ``mods``."""

    mods: List[Tuple[nn.Module, object]]

    def __enter__(self):
        for m, fwd in self.mods:
            m.forward = fwd
        return self

    def __exit__(self, *exc):
        for m, _ in self.mods:
            m.__dict__.pop("forward", None)
        return False


class patched_attention(patched_forwards):
    """Every torchtune ``MultiHeadAttention`` of ``model`` runs ``forward`` (bound to the module) instead of its own
    until exit (``enabled=False``: nothing is patched)."""

    def __init__(self, model: nn.Module, forward, enabled: bool = True):
        import types

        from torchtune.modules import MultiHeadAttention

        self.mods = [(m, types.MethodType(forward, m)) for m in model.modules()
                     if isinstance(m, MultiHeadAttention)] if enabled else []


def grouped_decode_attention(model: nn.Module, enabled: bool = True) -> patched_attention:
    """Context manager: every torchtune ``MultiHeadAttention`` of ``model`` uses :func:`_grouped_decode_forward`."""
    return patched_attention(model, _grouped_decode_forward, enabled)


# --------------------------------------------------------------------------------------------------
# Batched generation
# --------------------------------------------------------------------------------------------------
@dataclass
class Generation:
    tokens: List[int]  # answer tokens, stop token excluded
    finish: str  # "stop" | "length"
    stop_token: Optional[int] = None  # the stop id that ended the answer (finish == "stop")


def check_batch(prompts: Sequence[Sequence[int]], params: "SamplingParams", seeds) -> int:
    """Number of prompts; ValueError for an empty prompt, or for sampling without per-sample seeds."""
    if prompts and min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt")
    if prompts and not params.greedy and seeds is None:
        raise ValueError("sampling needs per-sample seeds")
    return len(prompts)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, total_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one batch: (tokens [B, P] int64, padded with ``pad_id``; mask [B, total_len] bool,
    True at real prompt tokens and at every position after the prompt), P = the longest prompt. On the CPU."""
    P = max(len(p) for p in prompts)
    tok = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    pad_mask = torch.zeros((len(prompts), total_len), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tok[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        pad_mask[i, P - len(p):] = True
    return tok, pad_mask


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Iterable[int],
    pad_id: int,
    params: SamplingParams = SamplingParams(),
    seeds: Optional[Sequence[int]] = None,
    device: torch.device = torch.device("cpu"),
    cache_dtype: Optional[torch.dtype] = None,
    check_every: int = 4,
    grouped_attention: bool = True,
) -> List[Generation]:
    """Generate answers for a batch of prompts (token id lists) with a KV cache; rows are left-padded.

    ``model`` must have a :class:`LastTokenHead` (see :func:`install_last_token_head`). Row ``i`` depends only
    on its own prompt and ``seeds[i]`` (masks and positions isolate it from the padding and other rows).
    """
    from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask

    if not isinstance(model.output, LastTokenHead):
        raise ValueError("generate_batch needs install_last_token_head(model) first")
    B = check_batch(prompts, params, seeds)
    if B == 0:
        return []
    P = max(len(p) for p in prompts)
    L = P + max_new_tokens
    cache_dtype = cache_dtype or next(p for p in model.parameters() if p.is_floating_point()).dtype
    if cache_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        cache_dtype = torch.bfloat16
    tok, pad_mask = left_pad(prompts, pad_id, L)
    tok, pad_mask = tok.to(device), pad_mask.to(device)
    input_pos = get_position_ids_from_padding_mask(pad_mask)  # [B, L]
    seeds_t = torch.tensor([signed64(s) for s in seeds], dtype=torch.int64, device=device) if seeds is not None else None
    stop_t = torch.tensor(sorted(set(int(s) for s in stop_ids)), dtype=torch.long, device=device)
    key_pos = torch.arange(L, device=device)

    setup_kv_caches(model, B, L, cache_dtype, device)
    gqa = grouped_decode_attention(model, enabled=grouped_attention)
    gqa.__enter__()
    try:
        prefill_mask = get_causal_mask_from_padding_mask(pad_mask[:, :P], target_seq_len=L)
        logits = model(tok, mask=prefill_mask, input_pos=input_pos[:, :P])[:, -1]
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        n_steps = 0
        for s in range(max_new_tokens):
            nxt = sample_next(logits.float(), params, seeds_t, s)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, s] = nxt
            done |= torch.isin(nxt, stop_t)
            n_steps = s + 1
            if s == max_new_tokens - 1:
                break
            if (s + 1) % check_every == 0 and bool(done.all()):
                break
            q = P + s
            step_mask = ((key_pos <= q).unsqueeze(0) & pad_mask)[:, None, :]  # [B, 1, L]
            logits = model(nxt[:, None], mask=step_mask, input_pos=input_pos[:, q:q + 1])[:, -1]
    finally:
        gqa.__exit__(None, None, None)
        teardown_kv_caches(model)
    return to_generations(out[:, :n_steps].cpu().tolist(), stop_t.tolist(), max_new_tokens)


def to_generations(rows: Sequence[Sequence[int]], stop_ids: Iterable[int], max_new_tokens: int) -> List[Generation]:
    """Generated token rows (padding after a stop) -> answers cut before their first stop token."""
    stops = set(int(t) for t in stop_ids)
    res = []
    for row in rows:
        cut = next((j for j, t in enumerate(row) if t in stops), None)
        if cut is None:
            res.append(Generation(tokens=list(row[:max_new_tokens]), finish="length"))
        else:
            res.append(Generation(tokens=list(row[:cut]), finish="stop", stop_token=row[cut]))
    return res


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------
def prompt_tokens(tokenizer, record: dict, system_prompt: Optional[str]) -> List[int]:
    """ChatML prompt ending in ``<|im_start|>assistant\\n`` (the tokenizer's own template)."""
    from torchtune.data import Message

    msgs = prompt_messages(record, system_prompt) + [Message(role="assistant", content="", masked=True)]
    with plain_text(tokenizer):  # a "<|im_end|>" in the record stays text (kd.data.special_text)
        toks, _ = tokenizer.tokenize_messages(msgs, add_eos=False)
    return list(toks)


def prompt_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()[:16]


def stop_token_ids(tokenizer) -> List[int]:
    st = getattr(tokenizer, "special_tokens", {}) or {}
    ids = [st[n] for n in ("<|im_end|>", "<|endoftext|>") if n in st]
    if getattr(tokenizer, "eos_id", None) is not None:
        ids.append(tokenizer.eos_id)
    if not ids:
        raise ValueError("the tokenizer has no <|im_end|> / <|endoftext|> / eos token to stop on")
    return sorted(set(ids))


# --------------------------------------------------------------------------------------------------
# Crash-safe result files
# --------------------------------------------------------------------------------------------------
def _read_jsonl_tolerant(path: Path) -> Tuple[List[dict], int]:
    """Complete, valid lines of ``path``; returns (records, number of ignored bad/torn lines)."""
    data = path.read_bytes()
    recs, bad = [], 0
    end = data.rfind(b"\n")
    if end != len(data) - 1 and len(data) > 0:
        bad += 1  # torn tail (no newline): ignored
    body = data[: end + 1] if end >= 0 else b""
    for line in body.split(b"\n"):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r, dict) or "id" not in r:
                raise ValueError
            recs.append(r)
        except ValueError:
            bad += 1
    return recs, bad


class ResultStore:
    """``<root>/parts/rank-XXXXX.jsonl`` files (one writer each); see the module docstring."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.parts = self.root / "parts"
        self._f = None

    def part_files(self) -> List[Path]:
        return sorted(self.parts.glob("rank-*.jsonl")) if self.parts.is_dir() else []

    def scan(self, hashes: Optional[Dict[int, str]] = None) -> Tuple[Dict[int, dict], int]:
        """All results, ignoring torn/bad lines; returns (id -> record, n_ignored). Later lines win, except that
        with ``hashes`` a record whose ``prompt_hash`` matches the current prompt beats one that does not
        (a regenerated sample may sit in another rank's file than its stale line)."""
        out: Dict[int, dict] = {}
        n_bad = 0
        for p in self.part_files():
            recs, bad = _read_jsonl_tolerant(p)
            n_bad += bad
            for r in recs:
                i = int(r["id"])
                if hashes is not None and i in out and out[i].get("prompt_hash") == hashes.get(i) \
                        and r.get("prompt_hash") != hashes.get(i):
                    continue
                out[i] = r
        return out, n_bad

    def open_for_append(self, rank: int) -> Path:
        self.parts.mkdir(parents=True, exist_ok=True)
        path = self.parts / f"rank-{rank:05d}.jsonl"
        if path.exists():
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                log.warning(f"{path}: dropping a torn last line ({len(data) - keep} bytes) left by a crash")
                truncate_durably(path, keep)
        self._f = open(path, "ab")
        return path

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        append_durably(self._f, lines.encode())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# --------------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------------
def summarize(results: Dict[int, dict]) -> Dict[str, Any]:
    n = len(results)
    trunc = sorted(i for i, r in results.items() if r.get("finish") == "length")
    empty = sorted(i for i, r in results.items() if not str(r.get("output", "")).strip())
    toks = [int(r.get("n_tokens", 0)) for r in results.values()]
    return {
        "samples": n,
        "generated_tokens": int(sum(toks)),
        "mean_answer_tokens": (sum(toks) / n) if n else 0.0,
        "max_answer_tokens": max(toks) if toks else 0,
        "truncated": len(trunc),
        "truncated_ids": trunc[:50],
        "empty": len(empty),
        "empty_ids": empty[:50],
    }


def merge_results(
    records: Dict[int, dict],
    results: Dict[int, dict],
    out_dir: str | Path,
    *,
    dataset_name: str = "teacher_distill",
    hashes: Optional[Dict[int, str]] = None,
    allow_missing: bool = False,
    system_prompt: Optional[str] = None,
) -> Path:
    """Write ``<out_dir>/<dataset_name>.json`` (alpaca, source order) and ``dataset_info.json``.

    ``dataset_info.json`` is LLaMA-Factory's dataset registry (its data/README.md): formatting ``alpaca`` and a
    ``columns`` mapping prompt/query/response -> instruction/input/output and, when ``system_prompt`` is given
    (the prompt the teacher answered under), ``system`` -> a ``system`` field carried by every record, so
    training the same file in LLaMA-Factory keeps the system prompt the answers were generated with.

    ``output`` is the teacher's answer; an EMPTY teacher answer is replaced by the original label
    (``teacher_empty: true``) so every record stays trainable; ``teacher_truncated`` flags answers that hit
    ``max_new_tokens``."""

    missing = [i for i in sorted(records) if i not in results]
    if hashes is not None:
        stale = [i for i in sorted(records) if i in results and results[i].get("prompt_hash") != hashes[i]]
        missing += stale
    if missing and not allow_missing:
        raise DataError(
            f"{len(missing)} sample(s) have no (current) teacher answer, e.g. ids {sorted(missing)[:10]}; "
            "run the generation again (it resumes) or set allow_missing=True."
        )
    missing_set = set(missing)
    rows = []
    for sid in sorted(records):
        if sid in missing_set:
            continue
        rec, res = records[sid], results[sid]
        ans = str(res.get("output", ""))
        empty = not ans.strip()
        rows.append({
            "id": sid,
            "instruction": rec["instruction"],
            "input": rec.get("input") or "",
            "output": rec["output"] if empty else ans,
            "original_output": rec["output"],
            "teacher_truncated": res.get("finish") == "length",
            "teacher_empty": empty,
        })
        if system_prompt:
            rows[-1]["system"] = system_prompt
    out_dir = Path(out_dir)
    fname = f"{dataset_name}.json"
    path = out_dir / fname
    atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    if system_prompt:
        columns["system"] = "system"
    info = {dataset_name: {"file_name": fname, "formatting": "alpaca", "columns": columns}}
    atomic_write_text(out_dir / "dataset_info.json", json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    return path
