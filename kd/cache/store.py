"""Teacher cache: K tokens sampled from the teacher per answer token, computed once, read every epoch.

Random-Sampling KD (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
ACL 2025, arXiv 2503.16870, sec. 3): at every answer position draw ``K`` tokens WITH REPLACEMENT from the
teacher's distribution ``p = softmax(z_t / T)`` and keep them as unique ids with counts ``c``. The estimate
``p_hat = c / K`` is unbiased (``E[p_hat] = p``), so the sparse soft cross-entropy

    L = -sum_j p_hat_j log q_{id_j},      q = softmax(z_s / T)

has ``E[L] = H(p, q)`` and gradient ``dL/dz_s = (q - p_hat) / T`` whose expectation is the full forward-KL
gradient ``(q - p) / T`` (the loss lives in :func:`kd.losses.distillation.fused_linear_kd_ce`, ``teacher_sparse=``).
Caching the top-k renormalised probabilities instead (DistillKit, EasyDistill) is a BIASED estimate
(paper sec. 2.2); ``sampling="topk"`` is kept for comparison only.

Pieces:

- :func:`kd.losses.sparse.sample_teacher_rows`: the per-chunk sampler (inverse CDF in float64 on a counter-based uniform per
  (sample, position, draw), so a sample's draws do not depend on its batch, rank or world size), plus the
  teacher's entropy ``H(p)`` (so the true KL can still be logged: ``KL = H(p, q) - H(p)``) and top-1 id.
- :class:`CacheKey`: what the cache is valid for (teacher checkpoint fingerprint, precision, temperature, K,
  sampling, seed, tokenizer, chat template, max_seq_len). A mismatch is refused with the differing fields
  named; ``rebuild=True`` moves the old cache aside (nothing is deleted).
- :class:`TeacherCacheStore`: ``<dir>/cache.json`` (the key) and ``<dir>/shards/rank-XXXXX.bin``, one
  append-only file per writing rank. Each sample is one self-delimiting record (header + CRC32) written with
  one ``write`` + ``flush`` + ``fsync``; a reader ignores a torn or corrupt tail and a writer truncates its
  own file to the last complete record before appending, so ``kill -9`` loses at most the batch in flight.
  Shards are read through ``mmap``. Entries are keyed by sample id + a hash of the sample's token ids and
  labels: a changed sample is "missing" and gets refilled, never silently reused.
- :func:`sync_shards`: copies every rank's shard to every node (broadcast over the process group, one
  writer per node) so no shared file system is needed.

Record layout (little endian; ``n`` answer positions, ``e`` stored entries)::

    header (48 B): magic "KDTC", version u16, kind u16 (0 counts / 1 top-k probs), sample_id i64,
                   hash 16 B, n u32, e u32, payload_len u32, crc32 u32 (of header[:44] + payload)
    payload:       ids u32[e], top1 u32[n], entropy f16[n], weights (u8 counts | f16 probs)[e],
                   n_unique u8[n], zero padding to 8 B

i.e. ``5 e + 7 n`` bytes (+48 per sample) for random sampling: at most 67 B per answer token at K = 12,
usually far less (a confident teacher repeats its top tokens).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import queue
import struct
import threading
import time
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from kd.core.atomic import atomic_write_text
from kd.data.batching import plan_batches
from kd.losses.sparse import SparseTargets, TeacherSamples

log = logging.getLogger(__name__)

FORMAT = "kd-teacher-cache-v1"
MAGIC = b"KDTC"
VERSION = 1
KIND_COUNTS, KIND_TOPK = 0, 1
_HDR = struct.Struct("<4sHHq16sIIII")  # 48 bytes
assert _HDR.size == 48

# splitmix increment per position (odd, distinct from kd.generate.generation's per-step golden constant)
_C_POS = 0xD1B54A32D192ED03 - (1 << 64)


class CacheError(ValueError):
    """A user-facing teacher-cache problem (mismatched key, missing entries)."""


def sample_seed(seed: int, sample_id: int) -> int:
    """Signed 64-bit seed of one sample (sha256 of "cache:seed:id")."""
    h = hashlib.sha256(f"kd-cache:{int(seed)}:{int(sample_id)}".encode()).digest()
    v = int.from_bytes(h[:8], "little")
    return v - (1 << 64) if v >= (1 << 63) else v


def row_seeds(sample_ids: Sequence[int], seq_len: int, seed: int, device=None) -> torch.Tensor:
    """[B * seq_len] int64: the seed of position i of sample b is ``sample_seed(seed, id_b) + i * C``."""
    base = torch.tensor([sample_seed(seed, s) for s in sample_ids], dtype=torch.int64)
    pos = torch.arange(seq_len, dtype=torch.int64) * _C_POS  # wraps mod 2**64, as intended
    return (base[:, None] + pos[None, :]).reshape(-1).to(device)


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
def sample_hash(tokens: Sequence[int], labels: Sequence[int]) -> bytes:
    """16-byte blake2b of the sample's token ids and (unshifted) labels."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.digest()


def answer_positions(labels: Sequence[int], ignore_index: int = -100) -> np.ndarray:
    """Positions i whose (shifted) target ``labels[i + 1]`` is not ignored: the rows the loss uses."""
    lab = np.asarray(labels, dtype=np.int64)
    return np.flatnonzero(lab[1:] != ignore_index)


def encode_record(sample_id: int, h: bytes, ids: np.ndarray, probs: Optional[np.ndarray], entropy: np.ndarray,
                  top1: np.ndarray, k: int) -> bytes:
    """One record from the rows of one sample: ids [n, k] (draws, or top-k ids with ``probs`` [n, k])."""
    n = ids.shape[0]
    if probs is None:  # random: unique ids with counts per row
        kind = KIND_COUNTS
        s = np.sort(ids.astype(np.int64), axis=1)
        start = np.ones_like(s, dtype=bool)
        start[:, 1:] = s[:, 1:] != s[:, :-1]
        flat_start = np.flatnonzero(start.ravel())
        ent_ids = s.ravel()[flat_start].astype(np.uint32)
        counts = np.diff(np.append(flat_start, n * k)).astype(np.uint8)
        nuniq = start.sum(1).astype(np.uint8)
        weights = counts.tobytes()
    else:
        kind = KIND_TOPK
        ent_ids = ids.astype(np.uint32).ravel()
        weights = probs.astype(np.float16).ravel().tobytes()
        nuniq = np.full(n, k, dtype=np.uint8)
    e = ent_ids.shape[0]
    payload = b"".join([
        ent_ids.tobytes(), top1.astype(np.uint32).tobytes(), entropy.astype(np.float16).tobytes(), weights,
        nuniq.tobytes(),
    ])
    payload += b"\0" * (-len(payload) % 8)
    head = _HDR.pack(MAGIC, VERSION, kind, int(sample_id), h, n, e, len(payload), 0)[:44]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


@dataclass(frozen=True)
class Entry:
    shard: int  # index into TeacherCacheStore._maps
    offset: int  # payload offset in the shard file
    kind: int
    n: int
    e: int
    hash: bytes


def _parse(buf, shard: int) -> Tuple[List[Tuple[int, Entry]], int, int]:
    """Complete, CRC-valid records of one shard buffer: ([(sample_id, Entry)], valid_bytes, n_bad_tail_bytes)."""
    out, off, size = [], 0, len(buf)
    while off + _HDR.size <= size:
        magic, ver, kind, sid, h, n, e, plen, crc = _HDR.unpack_from(buf, off)
        end = off + _HDR.size + plen
        if magic != MAGIC or ver != VERSION or end > size:
            break
        if zlib.crc32(buf[off + _HDR.size:end], zlib.crc32(buf[off:off + 44])) != crc:
            break
        out.append((sid, Entry(shard, off + _HDR.size, kind, n, e, bytes(h))))
        off = end
    return out, off, size - off


# --------------------------------------------------------------------------------------------------
# Cache key
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheKey:
    """What a cache is valid for; every field must match for a cache to be used or extended."""

    format: str
    teacher: str  # fingerprint of the teacher checkpoint files + teacher_model config
    precision: str  # teacher quantization / dtype
    temperature: float
    k: int
    sampling: str
    seed: int
    tokenizer: str  # fingerprint of the tokenizer files and their encoding of a probe text
    template: str  # fingerprint of the chat template (a probe conversation tokenized by the data set's rules)
    max_seq_len: Optional[int]

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    def diff(self, other: "CacheKey") -> List[str]:
        return [f"{f.name}: cache has {getattr(other, f.name)!r}, this run has {getattr(self, f.name)!r}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
        h.update(b"\0")
    return h.hexdigest()[:20]


def checkpoint_fingerprint(checkpoint_dir, checkpoint_files: Optional[Sequence[str]] = None,
                           model_cfg: Any = None) -> str:
    """Cheap identity of an HF checkpoint: config.json, and per weight file its name, size, safetensors
    header (tensor names, dtypes, shapes, offsets) and the first and last MiB of data (fine-tuned or
    re-quantised weights differ there). Reads ~2 MiB per file, not the 140 GB of a 72B model."""
    d = Path(checkpoint_dir)
    parts = [json.dumps(model_cfg, sort_keys=True, default=str).encode()]
    cfg = d / "config.json"
    if cfg.is_file():
        parts.append(cfg.read_bytes())
    files = list(checkpoint_files) if checkpoint_files else sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        files = sorted(p.name for p in d.glob("*.bin"))
    for name in files:
        p = d / name
        if not p.is_file():
            raise CacheError(f"teacher checkpoint file {p} does not exist")
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(1 << 20)
            f.seek(max(0, size - (1 << 20)))
            tail = f.read(1 << 20)
        parts += [name.encode(), str(size).encode(), head, tail]
    return _sha(*parts)


_PROBE_TEXT = "kd teacher cache probe: 色即是空，空即是色。 Hello 123 <|im_end|>"


def tokenizer_fingerprint(tokenizer_cfg: Any, tokenizer) -> str:
    """Files named by the tokenizer config (contents), its other options except max_seq_len (a key field
    of its own), and the ids it gives a probe text."""
    parts = []
    for k, v in sorted((tokenizer_cfg or {}).items()):
        if k == "max_seq_len":
            continue
        if isinstance(v, str) and os.path.isfile(v):
            parts += [k.encode(), Path(v).read_bytes()]
        else:
            parts += [k.encode(), json.dumps(v, sort_keys=True, default=str).encode()]
    try:
        parts.append(np.asarray(tokenizer.encode(_PROBE_TEXT, add_bos=False, add_eos=False), np.int64).tobytes())
    except TypeError:
        parts.append(np.asarray(tokenizer.encode(_PROBE_TEXT), np.int64).tobytes())
    return _sha(*parts)


# dataset options that select/split records but do not change how one record is tokenized
# (packing too: a sample has the same tokens, labels and draws packed or not, so the cache is shared)
_DATA_SELECTION_KEYS = {"source", "split", "val_size", "seed", "packed", "packing", "on_bad_record"}


def template_fingerprint(dataset_cfg: Any, dataset, tokenizer) -> str:
    """The data set's formatting options (system prompt, masking, ...) and, for kd.data.alpaca datasets, the
    tokens + mask of a probe conversation through its own message builder and the tokenizer's template."""
    parts = []
    if isinstance(dataset_cfg, dict):
        parts.append(json.dumps({k: v for k, v in dataset_cfg.items() if k not in _DATA_SELECTION_KEYS},
                                sort_keys=True, default=str).encode())
    else:
        parts.append(json.dumps(dataset_cfg, sort_keys=True, default=str).encode())
    base = getattr(dataset, "ds", dataset)
    if hasattr(base, "system_prompt") and hasattr(tokenizer, "tokenize_messages"):
        from kd.data.alpaca import sft_messages

        msgs = sft_messages({"instruction": "probe question", "input": "", "output": "probe answer"},
                            base.system_prompt, train_on_input=getattr(base, "train_on_input", False))
        toks, mask = tokenizer.tokenize_messages(msgs, add_eos=True)
        parts += [np.asarray(toks, np.int64).tobytes(), np.asarray(mask, np.int8).tobytes()]
    return _sha(*parts)


# --------------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------------
class TeacherCacheStore:
    """``<root>/cache.json`` + ``<root>/shards/rank-XXXXX.bin`` (see the module docstring)."""

    KEY_FILE = "cache.json"

    def __init__(self, root, key: CacheKey):
        self.root = Path(root)
        self.key = key
        self.shards = self.root / "shards"
        self._f = None
        self._rank: Optional[int] = None
        self._maps: List[Any] = []
        self._files: List[Any] = []
        self.index: Dict[int, List[Entry]] = {}
        self.n_bad_tail = 0

    def __getstate__(self):
        # data-loader workers (spawn) get a copy without open files; they re-map the shards lazily
        st = dict(self.__dict__)
        st.update(_f=None, _maps=[], _files=[], _rescan=True)
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)

    # -- key ------------------------------------------------------------------------------------
    def check_or_init_key(self, *, rebuild: bool = False, create: bool = True, is_writer: bool = True) -> None:
        """Refuse a cache built for another setup (naming the fields), or move it aside with ``rebuild``."""

        kf = self.root / self.KEY_FILE
        if kf.is_file():
            try:
                saved = CacheKey(**json.loads(kf.read_text()))
            except (TypeError, ValueError) as e:
                raise CacheError(f"{kf} is not a teacher-cache key file ({e}); move it away or set "
                                 "teacher_cache.rebuild=True") from None
            diffs = self.key.diff(saved)
            if diffs and not rebuild:
                raise CacheError(
                    f"the teacher cache in {self.root} was built for a different setup: " + "; ".join(diffs)
                    + ". Rebuild it with teacher_cache.rebuild=True (the old cache is moved aside, not deleted) "
                    "or point teacher_cache.dir elsewhere.")
            if diffs and rebuild and is_writer:
                aside = self.root.with_name(f"{self.root.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
                try:
                    os.rename(self.root, aside)
                    log.warning(f"teacher cache: old cache ({'; '.join(diffs)}) moved to {aside}")
                except FileNotFoundError:  # another node on a shared file system moved it first
                    pass
            elif not diffs:
                return
        if not create:
            if not kf.is_file():
                raise CacheError(f"no teacher cache in {self.root} (no {self.KEY_FILE}); build it first with "
                                 "teacher_cache.mode=build (or online_then_cache)")
            return
        if is_writer:
            self.shards.mkdir(parents=True, exist_ok=True)
            atomic_write_text(kf, json.dumps(self.key.to_json(), indent=2, sort_keys=True) + "\n")

    # -- writing --------------------------------------------------------------------------------
    def shard_path(self, rank: int) -> Path:
        return self.shards / f"rank-{rank:05d}.bin"

    def open_for_append(self, rank: int) -> Path:
        """Open this rank's shard for appending, first truncating a torn/corrupt tail left by a crash."""
        self.shards.mkdir(parents=True, exist_ok=True)
        path = self.shard_path(rank)
        if path.exists() and path.stat().st_size > 0:
            with open(path, "r+b") as f:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                try:
                    _, keep, bad = _parse(data, 0)
                finally:
                    data.close()
                if bad:
                    log.warning(f"{path}: dropping {bad} bytes of a torn/corrupt last record left by a crash")
                    f.truncate(keep)
                    f.flush()
                    os.fsync(f.fileno())
        self._f = open(path, "ab")
        self._rank = rank
        return path

    def append(self, records: Sequence[bytes]) -> None:
        """Append whole records with ONE write, then flush + fsync (at most this call is lost to a crash)."""
        if records:
            self._f.write(b"".join(records))
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._close_maps()

    # -- reading --------------------------------------------------------------------------------
    def _close_maps(self) -> None:
        for m in self._maps:
            m.close()
        for f in self._files:
            f.close()
        self._maps, self._files = [], []

    def shard_files(self) -> List[Path]:
        return sorted(self.shards.glob("rank-*.bin")) if self.shards.is_dir() else []

    def valid_length(self, path: Path) -> int:
        """Bytes of complete records at the start of ``path`` (0 if absent)."""
        if not path.is_file() or path.stat().st_size == 0:
            return 0
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                return _parse(m, 0)[1]
            finally:
                m.close()

    def scan(self) -> Dict[int, List[Entry]]:
        """(Re)map every shard and index its complete records: sample id -> entries (newest last)."""
        self._close_maps()
        self.index, self.n_bad_tail = {}, 0
        for i, p in enumerate(self.shard_files()):
            if p.stat().st_size == 0:
                continue
            f = open(p, "rb")
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._files.append(f)
            self._maps.append(m)
            recs, _, bad = _parse(m, len(self._maps) - 1)
            self.n_bad_tail += bad
            for sid, ent in recs:
                self.index.setdefault(sid, []).append(ent)
        return self.index

    def lookup(self, sample_id: int, h: bytes) -> Optional[Entry]:
        if self.__dict__.pop("_rescan", False):
            self.scan()
        for ent in reversed(self.index.get(int(sample_id), ())):
            if ent.hash == h:
                return ent
        return None

    def missing(self, wanted: Dict[int, bytes]) -> List[int]:
        """Sample ids of ``wanted`` (id -> hash) without an entry for their current tokens."""
        return sorted(s for s, h in wanted.items() if self.lookup(s, h) is None)

    def read(self, ent: Entry) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Views into the mapped shard: (ids u32[e], weights float32[e], n_unique u8[n], top1 u32[n],
        entropy f16[n]) -- weights = counts / K for random sampling, the stored probabilities for top-k."""
        m, off, n, e = self._maps[ent.shard], ent.offset, ent.n, ent.e
        ids = np.frombuffer(m, np.uint32, e, off)
        off += 4 * e
        top1 = np.frombuffer(m, np.uint32, n, off)
        off += 4 * n
        ent_ = np.frombuffer(m, np.float16, n, off)
        off += 2 * n
        if ent.kind == KIND_COUNTS:
            w = np.frombuffer(m, np.uint8, e, off).astype(np.float32) / float(self.key.k)
            off += e
        else:
            w = np.frombuffer(m, np.float16, e, off).astype(np.float32)
            off += 2 * e
        nuniq = np.frombuffer(m, np.uint8, n, off)
        return ids, w, nuniq, top1, ent_

    def stats(self) -> Dict[str, float]:
        """Samples, answer tokens, stored bytes and bytes per answer token of the current index."""
        n_samples = n_tok = n_ent = 0
        size = 0
        for p in self.shard_files():
            size += p.stat().st_size
        for ents in self.index.values():
            ent = ents[-1]
            n_samples += 1
            n_tok += ent.n
            n_ent += ent.e
        return {"samples": n_samples, "answer_tokens": n_tok, "entries_per_token": n_ent / max(1, n_tok),
                "bytes": size, "bytes_per_answer_token": size / max(1, n_tok)}


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------
def _segment_list(segments: Optional["Segments"], sample_ids, hashes, B: int, S: int):
    """[(row, start, length, sample_id, hash)]: ``segments`` as host tuples, or one whole row per sample."""
    if segments is None:
        return [(b, 0, None, int(s), h) for b, (s, h) in enumerate(zip(sample_ids, hashes))]
    hn = segments.hash.cpu().numpy()
    return [(int(r), int(o), int(n), int(s), bytes(hn[j])) for j, (r, o, n, s) in enumerate(zip(
        segments.row.tolist(), segments.start.tolist(), segments.length.tolist(), segments.sample_id.tolist()))]


def _segment_rows(lab_row: np.ndarray, start: int, length: Optional[int], ignore_index: int) -> np.ndarray:
    """Positions of one sample's answer rows in its batch row (shifted labels ``lab_row`` [S]).

    Whole row (``length`` None, unpacked): every valid position. A segment of a pack: the positions
    ``start + i`` for ``i < length - 1`` with a valid target, i.e. the rows the sample alone has
    (:func:`answer_positions`); its last position's target is the NEXT sample's first label (torchtune's
    packed shift), which is no row of this sample (masked anyway unless the first token is trained on)."""
    if length is None:
        return np.flatnonzero(lab_row != ignore_index)
    return start + np.flatnonzero(lab_row[start:start + length - 1] != ignore_index)


def sparse_targets_for_batch(store: TeacherCacheStore, sample_ids: Sequence[int], hashes: Sequence[bytes],
                             labels_shifted: torch.Tensor, ignore_index: int = -100,
                             segments: Optional["Segments"] = None) -> SparseTargets:
    """[B*S] rows of sparse targets for a batch (``labels_shifted`` [B, S], CPU or not): right-padded
    samples (``segments`` None: sample b is row b), or packs (``segments``: each sample's entry is laid out
    at its own span of its pack row, in pack order, so it lines up with the row's valid tokens). A valid row
    that belongs to no sample (a pack boundary whose next sample trains on its first token) gets weight 0.

    Raises :class:`CacheError` if a sample has no entry for its current tokens, or an entry whose number of
    answer positions differs from the batch's (a changed masking rule)."""
    lab = labels_shifted.detach().cpu()
    B, S = lab.shape
    labn = lab.numpy()
    K = store.key.k
    ids = torch.zeros(B * S, K, dtype=torch.int64)
    w = torch.zeros(B * S, K, dtype=torch.float32)
    top1 = torch.zeros(B * S, dtype=torch.int64)
    ent_t = torch.zeros(B * S, dtype=torch.float32)
    for b, start, length, sid, h in _segment_list(segments, sample_ids, hashes, B, S):
        ent = store.lookup(sid, h)
        if ent is None:
            raise CacheError(f"sample {sid} has no teacher-cache entry for its current tokens in {store.root}; "
                             "run teacher_cache.mode=build (it fills only what is missing)")
        rows = torch.from_numpy(_segment_rows(labn[b], start, length, ignore_index).astype(np.int64))
        if rows.numel() != ent.n:
            raise CacheError(f"sample {sid}: the cache has {ent.n} answer positions, the batch {rows.numel()}; "
                             "the masking changed: rebuild the cache (teacher_cache.rebuild=True)")
        e_ids, e_w, nuniq, t1, en = store.read(ent)
        nu = torch.from_numpy(nuniq.astype(np.int64))
        # slot of every entry inside its row: 0..nuniq-1
        starts = torch.cumsum(nu, 0) - nu
        row_of = torch.repeat_interleave(torch.arange(ent.n), nu)
        slot = torch.arange(ent.e) - starts[row_of]
        r = b * S + rows
        ids[r[row_of], slot] = torch.from_numpy(e_ids.astype(np.int64))
        w[r[row_of], slot] = torch.from_numpy(e_w)
        top1[r] = torch.from_numpy(t1.astype(np.int64))
        ent_t[r] = torch.from_numpy(en.astype(np.float32))
    return SparseTargets(ids, w, top1, ent_t)


def records_from_samples(samples: TeacherSamples, sample_ids: Sequence[int], hashes: Sequence[bytes],
                         labels_shifted: torch.Tensor, k: int, ignore_index: int = -100,
                         skip: Iterable[int] = (), segments: Optional["Segments"] = None) -> List[bytes]:
    """Encode the rows of each sample of a batch ([B, S] shifted labels) into records, leaving out the sample
    ids in ``skip``: right-padded (``segments`` None: sample b is row b; ``sample_ids``/``hashes`` per row) or
    packed (``segments``: each sample's rows are cut from its span of its pack row, see
    :func:`_segment_rows`; ``sample_ids``/``hashes`` are then ignored)."""
    lab = labels_shifted.detach().cpu()
    B, S = lab.shape
    labn = lab.numpy()
    ids = samples.ids.cpu().numpy().reshape(B, S, -1)
    probs = samples.probs.cpu().numpy().reshape(B, S, -1) if samples.probs.numel() else None
    ent = samples.entropy.float().cpu().numpy().reshape(B, S)
    top1 = samples.top1.cpu().numpy().reshape(B, S)
    skip = set(int(s) for s in skip)
    out = []
    for b, start, length, sid, h in _segment_list(segments, sample_ids, hashes, B, S):
        if sid in skip:
            continue
        rows = _segment_rows(labn[b], start, length, ignore_index)
        out.append(encode_record(sid, h, ids[b, rows], None if probs is None else probs[b, rows],
                                 ent[b, rows], top1[b, rows], k))
    return out


class Segments(NamedTuple):
    """Which samples the rows of a batch hold, for N samples: sample ``sample_id[j]`` (``hash[j]``, 16 B of
    :func:`sample_hash`) occupies positions ``[start[j], start[j] + length[j])`` of batch row ``row[j]``.
    Right-padded batch: one segment per row, start 0; packed batch: the pack's samples in pack order.
    All int64 [N] except ``hash`` [N, 16] uint8."""

    row: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    sample_id: torch.Tensor
    hash: torch.Tensor

    @staticmethod
    def from_batch(batch: Dict[str, Any]) -> "Segments":
        return Segments(*(batch[f"cache_seg_{f}"] for f in Segments._fields))


def item_segments(items: Sequence[Dict[str, Any]]) -> List[Tuple[int, int, int, int, bytes]]:
    """[(row, start, length, sample_id, hash)] of a list of data items: an unpacked item (``tokens``,
    ``labels``, ``sample_id``) is one sample at 0; a pack (kd.data.alpaca's packed data sets: ``seq_lens`` and
    ``sample_ids``) holds ``len(sample_ids)`` samples of ``seq_lens`` tokens back to back (its last
    ``seq_lens`` entry may be the end-of-pack padding). The hash is that of the sample's own tokens and
    labels, so a sample has the same key packed or not."""
    out = []
    for b, x in enumerate(items):
        if "seq_lens" in x:
            if "sample_ids" not in x:
                raise CacheError("teacher_cache on packed data needs packs that name their samples (kd.data.alpaca's "
                                 "packed data sets, packing best_fit or greedy)")
            sids = [int(v) for v in x["sample_ids"]]
            lens = [int(v) for v in x["seq_lens"][:len(sids)]]
            tok, lab = np.asarray(x["tokens"], np.int64), np.asarray(x["labels"], np.int64)
            o = 0
            for s, n in zip(sids, lens):
                out.append((b, o, n, s, sample_hash(tok[o:o + n], lab[o:o + n])))
                o += n
        else:
            if "sample_id" not in x:
                raise CacheError("teacher_cache needs data items with a 'sample_id' (kd.data.alpaca datasets)")
            out.append((b, 0, len(x["tokens"]), int(x["sample_id"]), sample_hash(x["tokens"], x["labels"])))
    return out


def segments_tensors(segs: Sequence[Tuple[int, int, int, int, bytes]]) -> Segments:
    if not segs:
        z = torch.zeros(0, dtype=torch.int64)
        return Segments(z, z, z, z, torch.zeros(0, 16, dtype=torch.uint8))
    r, o, n, s, h = zip(*segs)
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return Segments(t(r), t(o), t(n), t(s), torch.tensor(np.frombuffer(b"".join(h), np.uint8).reshape(-1, 16)))


def segment_row_seeds(segs: Sequence[Tuple[int, int, int, int, bytes]], B: int, S: int, seed: int) -> torch.Tensor:
    """[B, S] int64 per-position seeds: position i of a sample gets ``sample_seed(seed, id) + i * C`` wherever
    the sample sits (row, offset in a pack), so its draws are those of the same sample unpacked, built
    alone or in any batch: a deterministic function of the sample (what resume exactness needs). Positions
    of no sample (padding) get 0 (their rows are not valid)."""
    out = torch.zeros(B, S, dtype=torch.int64)
    for b, o, n, s, _ in segs:
        n = min(n, S - o)
        out[b, o:o + n] = sample_seed(seed, s) + torch.arange(n, dtype=torch.int64) * _C_POS
    return out


class CacheCollate:
    """Wraps a collate function (``padded_collate_sft`` or ``padded_collate_packed``): the batch also carries
    its :class:`Segments` (``cache_seg_row``, ``cache_seg_start``, ``cache_seg_length``,
    ``cache_seg_sample_id`` [N] int64, ``cache_seg_hash`` [N, 16] uint8: which sample sits where, one per row
    unpacked, the pack's samples in pack order packed) and ``cache_row_seed`` [B, S] int64
    (:func:`segment_row_seeds`), and, when ``read`` is set, the cached sparse targets of its rows
    (``teacher_ids`` [B*S, K], ``teacher_weights``, ``teacher_top1``, ``teacher_entropy``), gathered on the
    host in the data loader (in its workers when num_workers > 0), so the training step needs no host
    sync: the tensors travel to the device with the batch."""

    def __init__(self, collate, store: "TeacherCacheStore", seed: int, ignore_index: int = -100):
        self.collate = collate
        self.store = store
        self.seed = seed
        self.ignore_index = ignore_index
        self.read = False

    def __call__(self, items):
        out = self.collate(items)
        segs = item_segments(items)
        B, S = out["labels"].shape
        seg = segments_tensors(segs)
        out.update({f"cache_seg_{f}": v for f, v in zip(Segments._fields, seg)})
        out["cache_row_seed"] = segment_row_seeds(segs, B, S, self.seed)
        if self.read:
            lab = out["labels"]
            shifted = torch.cat([lab[:, 1:], torch.full_like(lab[:, :1], self.ignore_index)], dim=1)
            st = sparse_targets_for_batch(self.store, (), (), shifted, self.ignore_index, segments=seg)
            out.update(teacher_ids=st.ids, teacher_weights=st.weights, teacher_top1=st.top1,
                       teacher_entropy=st.entropy)
        return out


def unpacked_view(ds):
    """The per-sample data set behind ``ds``: a packed data set's ``.ds`` (every sample of it is in one
    pack), a ConcatDataset of such views, or ``ds`` itself. The cache is indexed and filled per sample."""
    from torch.utils.data import ConcatDataset

    if isinstance(ds, ConcatDataset):
        parts = [unpacked_view(d) for d in ds.datasets]
        return ds if all(p is d for p, d in zip(parts, ds.datasets)) else ConcatDataset(parts)
    if hasattr(ds, "packs") and hasattr(ds, "ds"):
        if getattr(ds, "pack_members", None) is None:
            raise CacheError("teacher_cache on packed data needs packs that name their samples (kd.data.alpaca's "
                             "packed data sets, packing best_fit or greedy)")
        return ds.ds
    return ds


class DatasetIndex(NamedTuple):
    """Per item of a data set: ``sample_id``, ``hash`` (16 B), ``length`` (tokens)."""

    sample_ids: List[int]
    hashes: List[bytes]
    lengths: List[int]

    def wanted(self) -> Dict[int, bytes]:
        return dict(zip(self.sample_ids, self.hashes))


def index_dataset(ds, progress: bool = False, desc: str = "teacher cache: indexing data") -> DatasetIndex:
    """Tokenize every item once (for the hashes the cache keys on, and the lengths the build batches use)."""
    from tqdm import tqdm

    sids, hs, lens = [], [], []
    for i in tqdm(range(len(ds)), disable=not progress, desc=desc, dynamic_ncols=True):
        item = ds[i]
        if "sample_id" not in item:
            raise CacheError("teacher_cache needs data items with a 'sample_id' (kd.data.alpaca datasets; index the "
                             "per-sample view of packed data: unpacked_view)")
        sids.append(int(item["sample_id"]))
        hs.append(sample_hash(item["tokens"], item["labels"]))
        lens.append(len(item["tokens"]))
    if len(set(sids)) != len(sids):
        raise CacheError("teacher_cache needs unique sample ids; the data set repeats some (a ConcatDataset of "
                         "two sources?): use one source file")
    return DatasetIndex(sids, hs, lens)


def build_batches(index: DatasetIndex, positions: Sequence[int], batch_size: int,
                  max_batch_tokens: Optional[int] = None) -> List[List[int]]:
    """Data-set positions grouped into teacher-only batches: longest first, ties by sample id; depends only
    on the data, so a resumed build re-runs exactly the batches of an uninterrupted one."""

    by_sid = {index.sample_ids[i]: i for i in positions}
    lengths = {index.sample_ids[i]: index.lengths[i] for i in positions}
    return [[by_sid[s] for s in b] for b in
            plan_batches(lengths, batch_size=batch_size, max_new_tokens=0, max_batch_tokens=max_batch_tokens)]


# --------------------------------------------------------------------------------------------------
# Asynchronous writer (GPU -> pinned host copy on the main thread, encode + append on a thread)
# --------------------------------------------------------------------------------------------------
class CacheWriter:
    """Appends records of trained batches without stalling the training step on CUDA: device tensors are
    copied to host with ``non_blocking`` and an event; a thread waits for the event, encodes and appends.
    On CPU everything happens inline. ``flush()`` waits for all pending batches (call it before a
    checkpoint and at the end of the writing phase); a writer error is raised there."""

    def __init__(self, store: TeacherCacheStore, rank: int, ignore_index: int = -100):
        self.store = store
        self.ignore_index = ignore_index
        store.open_for_append(rank)
        self._q: "queue.Queue" = queue.Queue(maxsize=2)
        self._err: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self.written: Dict[int, bytes] = {}  # sample ids written by this writer (id -> hash)

    def _encode_append(self, samples, segments: "Segments", labels):
        segs = _segment_list(segments, (), (), *labels.shape)
        skip = [s for _, _, _, s, h in segs if self.store.lookup(s, h) is not None or self.written.get(s) == h]
        recs = records_from_samples(samples, (), (), labels, self.store.key.k, self.ignore_index, skip,
                                    segments=segments)
        self.store.append(recs)
        for _, _, _, s, h in segs:
            self.written[s] = h

    def submit(self, samples: TeacherSamples, segments: "Segments", labels_shifted: torch.Tensor) -> None:
        """Queue the records of one batch: ``samples`` for its B*S rows, its :class:`Segments` (which sample
        sits where: one per row, or the samples of each pack) and shifted labels [B, S] (any device).
        Samples already stored are skipped."""
        if self._err is not None:
            raise self._err
        if samples.ids.device.type != "cuda":
            self._encode_append(samples, Segments(*(x.cpu() for x in segments)), labels_shifted.cpu())
            return
        host = TeacherSamples(*(x.to("cpu", non_blocking=True) if x.numel() else x.cpu() for x in samples))
        seg = Segments(*(x.to("cpu", non_blocking=True) for x in segments))
        lab = labels_shifted.to("cpu", non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="kd-cache-writer")
            self._thread.start()
        self._q.put((ev, host, seg, lab))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                ev, host, seg, lab = item
                ev.synchronize()
                if self._err is None:
                    self._encode_append(host, seg, lab)
            except BaseException as e:  # reported by flush()/submit()
                self._err = e
            finally:
                self._q.task_done()

    def flush(self) -> None:
        if self._thread is not None:
            self._q.join()
        if self._err is not None:
            raise self._err

    def close(self) -> None:
        self.flush()
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None
        if self.store._f is not None:
            self.store._f.close()
            self.store._f = None


# --------------------------------------------------------------------------------------------------
# No shared file system: copy every rank's shard to every node
# --------------------------------------------------------------------------------------------------
def sync_shards(store: TeacherCacheStore, rank: int, world_size: int, local_rank: int, device,
                chunk_bytes: int = 64 << 20) -> int:
    """Make every node's ``shards/`` hold every shard's complete records (collective; no-op for one process).

    Every rank reports the valid length of each shard file it sees (``rank-XXXXX.bin``, whichever job wrote
    it: a cache built by 4 ranks can be used by 2). For each shard the longest copy is the source (shards are
    append-only, so a shorter copy is a prefix); on every node, local rank 0 receives by broadcast the tail its
    copy lacks. On a shared file system every copy is already complete and nothing moves. Returns the number
    of bytes this process wrote."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return 0
    if store._f is not None:
        store._f.flush()
    files = {int(p.stem.split("-")[1]): p for p in store.shard_files()}
    n = torch.tensor([max(files) + 1 if files else 0], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    n = int(n)
    if n == 0:
        return 0
    lens = torch.zeros(world_size, n, dtype=torch.int64, device=device)
    for j, p in files.items():
        lens[rank, j] = store.valid_length(p)
    dist.all_reduce(lens)  # each row is filled by its own rank only
    lens = lens.cpu()
    written = 0
    for j in range(n):
        col = lens[:, j]
        total = int(col.max())
        if total == 0:
            continue
        src_rank = int(torch.nonzero(col == total)[0, 0])
        have = int(col[rank])
        needs = local_rank == 0 and have < total
        low = torch.tensor([have if needs else (1 << 62)], dtype=torch.int64, device=device)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        start = int(low)
        if start >= total:
            continue
        path = store.shard_path(j)
        f = None
        if needs:
            store.shards.mkdir(parents=True, exist_ok=True)
            f = open(path, "r+b" if path.exists() else "wb")
            f.truncate(have)
            f.seek(have)
        src = open(path, "rb") if rank == src_rank else None
        if src is not None:
            src.seek(start)
        off = start
        while off < total:
            m = min(chunk_bytes, total - off)
            buf = torch.empty(m, dtype=torch.uint8, device=device)
            if src is not None:
                buf.copy_(torch.frombuffer(bytearray(src.read(m)), dtype=torch.uint8))
            dist.broadcast(buf, src=src_rank)
            if f is not None and off + m > have:
                lo = max(0, have - off)
                f.write(buf[lo:].cpu().numpy().tobytes())
                written += m - lo
            off += m
        if src is not None:
            src.close()
        if f is not None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
    dist.barrier()
    return written
