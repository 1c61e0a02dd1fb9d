"""Alpaca-format Buddhist-scripture QA data for knowledge distillation.

``alpaca_kd_dataset`` is a torchtune-style dataset builder (usable from YAML as
``_component_: kd.data.alpaca.alpaca_kd_dataset``). Each item is a dict with ``tokens``, ``labels`` and
``sample_id``. ``labels`` follow torchtune's SFT convention: equal to ``tokens`` with the masked
(prompt) positions set to -100, NOT shifted (the recipe shifts them), so
``torchtune.data.padded_collate_sft`` works unchanged. ``sample_id`` is the record's 0-based index in
the source file (stable across splits, usable as a key by resumable generation).

Messages: system prompt, user = ``instruction + "\\n" + input`` (just ``instruction`` when input is
empty), assistant = output; tokenized with the tokenizer's own chat template (Qwen2.5 ChatML for
torchtune's ``Qwen2_5Tokenizer``). The loss is only on the answer and the closing ``<|im_end|>``
(unlike torchtune's default, the ``<|im_start|>assistant\n`` header is masked too).

The whole file is validated up front: bad records raise ``ValueError`` naming the file, the record
number (0-based index, plus the line for .jsonl) and the field, or are skipped and counted with
``on_bad_record="skip"``. Special-token strings inside the fields (a forged ``<|im_end|>``) are encoded as plain
text, never as chat-template ids, and the records holding them are counted at setup (kd.data.special_text).

``demo_records()`` deterministically generates the shipped demo set ``kd/data/assets/demo_buddhist_qa.json``
(``python -m kd.data.alpaca --write-demo`` regenerates it).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from torch.utils.data import Dataset

from kd.data.special_text import plain_text, report_special_text

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "你是一位精通佛学的大师，对佛经有深入的理解和研究。请用准确、专业且易懂的方式回答问题。"
CROSS_ENTROPY_IGNORE_IDX = -100
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEMO_DATA_PATH = ASSETS_DIR / "demo_buddhist_qa.json"

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "DEMO_DATA_PATH",
    "AlpacaKDDataset",
    "alpaca_kd_dataset",
    "load_alpaca_records",
    "split_ids",
    "user_content",
    "prompt_messages",
    "sft_messages",
    "demo_records",
    "write_demo_data",
    "TruncationReport",
    "truncation_report",
    "check_truncation",
]


# ----------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------
def _bad(source: Path, where: str, field: Optional[str], why: str) -> str:
    f = f", field '{field}'" if field else ""
    return f"{source}: {where}{f}: {why}"


def _check_record(rec: Any, output_field: str) -> Optional[Tuple[Optional[str], str]]:
    """Return None if ``rec`` is valid, else (field, reason)."""
    if not isinstance(rec, dict):
        return None, f"record must be a JSON object, got {type(rec).__name__}"
    for field, required in (("instruction", True), ("input", False), (output_field, True)):
        if field not in rec or rec[field] is None:
            if required:
                return field, "missing field"
            continue
        val = rec[field]
        if not isinstance(val, str):
            return field, f"must be a string, got {type(val).__name__}"
        if required and not val.strip():
            return field, "empty string"
    return None


def check_local_source(source: Any) -> None:
    """A URL is not a data file: say so with the URL as given (``Path`` would turn ``https://`` into ``https:/``)."""
    import re

    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", str(source))
    if m:
        raise FileNotFoundError(f"{str(source)!r} is a URL; kd reads local .json/.jsonl files: download it first "
                                "(e.g. curl -LO <url>) and pass the local path.")


def load_alpaca_records(
    source: Union[str, Path],
    *,
    on_bad_record: str = "error",
    output_field: str = "output",
) -> Tuple[Dict[int, dict], int]:
    """Load and validate a .json list or .jsonl file of alpaca records.

    Returns ``(records, n_bad)`` where ``records`` maps the 0-based record index in the file
    (the sample id) to the record. Raises ``ValueError`` (naming file, record and field) on the
    first bad record when ``on_bad_record == "error"``; otherwise skips and counts bad records.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    check_local_source(source)
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"data file not found: {source}")
    raw_bytes = source.read_bytes()
    try:
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw_bytes[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{source}: not UTF-8 text (byte 0x{raw_bytes[e.start]:02x} at offset {e.start}, line {line}); "
            "re-encode the file as UTF-8 (e.g. iconv -f GB18030 -t UTF-8)."
        ) from None
    errors: List[str] = []
    raw: List[Tuple[int, str, Any]] = []  # (index, where, record-or-exception-msg)

    stripped = text.lstrip()
    is_jsonl = source.suffix.lower() == ".jsonl" or (source.suffix.lower() != ".json" and not stripped.startswith("["))
    if is_jsonl:
        idx = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"record {idx} (line {lineno})"
            try:
                raw.append((idx, where, json.loads(line)))
            except json.JSONDecodeError as e:
                msg = _bad(source, where, None, f"invalid JSON at line {lineno} column {e.colno}: {e.msg}")
                if on_bad_record == "error":
                    raise ValueError(msg) from None
                errors.append(msg)
            idx += 1
        n_total = idx
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # A broken JSON array cannot be partially recovered: always an error.
            raise ValueError(
                _bad(source, f"invalid JSON at line {e.lineno} column {e.colno}", None, e.msg)
            ) from None
        if not isinstance(data, list):
            raise ValueError(f"{source}: expected a JSON list of records, got {type(data).__name__}")
        raw = [(i, f"record {i}", r) for i, r in enumerate(data)]
        n_total = len(raw)

    records: Dict[int, dict] = {}
    for idx, where, rec in raw:
        bad = _check_record(rec, output_field)
        if bad is not None:
            msg = _bad(source, where, bad[0], bad[1])
            if on_bad_record == "error":
                raise ValueError(msg)
            errors.append(msg)
            continue
        records[idx] = rec
    if errors:
        log.warning(
            "%s: skipped %d bad record(s) of %d; first: %s", source, len(errors), n_total, errors[0]
        )
    if not records:
        raise ValueError(f"{source}: no valid records")
    return records, len(errors)


def split_ids(
    ids: Sequence[int], split: str = "train", val_size: Union[float, int] = 0.0, seed: int = 0
) -> List[int]:
    """Deterministic train/val split of sample ids (sorted result).

    ``val_size``: a float in [0, 1) is a fraction of the records, an int >= 0 a count.
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    ids = sorted(ids)
    if split == "all":
        return ids
    if isinstance(val_size, bool) or val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size!r}")
    if isinstance(val_size, float):
        if val_size < 1:
            n_val = int(round(len(ids) * val_size))
        elif val_size.is_integer():
            n_val = int(val_size)
        else:
            raise ValueError(f"fractional val_size must be < 1, got {val_size}")
    else:
        n_val = int(val_size)
    if n_val > len(ids):
        raise ValueError(f"val_size={val_size} exceeds the number of records ({len(ids)})")
    perm = list(ids)
    random.Random(seed).shuffle(perm)
    val = set(perm[:n_val])
    return [i for i in ids if (i in val) == (split == "val")]


# ----------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------
def user_content(record: dict) -> str:
    """``instruction + "\\n" + input``, or just ``instruction`` when input is empty/missing."""
    instruction = record["instruction"]
    inp = record.get("input") or ""
    return f"{instruction}\n{inp}" if inp.strip() else instruction


def prompt_messages(record: dict, system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> list:
    """torchtune ``Message`` list (system, user) without the answer, for generation/evaluation.

    To tokenize for generation: ``tokenizer.tokenize_messages(msgs + [Message("assistant", "")],
    add_eos=False)`` gives the prompt ending in ``<|im_start|>assistant\\n``.
    """
    from torchtune.data import Message

    msgs = []
    if system_prompt:
        msgs.append(Message(role="system", content=system_prompt, masked=True))
    msgs.append(Message(role="user", content=user_content(record), masked=True))
    return msgs


def sft_messages(
    record: dict,
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    *,
    train_on_input: bool = False,
    output_field: str = "output",
) -> list:
    """Messages (system, user, assistant) with torchtune masking for SFT/KD training."""
    from torchtune.data import Message

    msgs = prompt_messages(record, system_prompt)
    for m in msgs:
        m.masked = not train_on_input
    msgs.append(Message(role="assistant", content=record[output_field], masked=False))
    return msgs


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------
class AlpacaKDDataset(Dataset):
    """Map-style dataset over validated alpaca records; items are {tokens, labels, sample_id}."""

    def __init__(
        self,
        tokenizer,
        source: Union[str, Path],
        *,
        system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
        split: str = "train",
        val_size: Union[float, int] = 0.0,
        seed: int = 0,
        max_seq_len: Optional[int] = None,
        train_on_input: bool = False,
        on_bad_record: str = "error",
        output_field: str = "output",
        train_on_header: bool = False,
    ):
        check_local_source(source)
        self.source = Path(source)
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.train_on_input = train_on_input
        # True: the assistant header ("<|im_start|>assistant\n") keeps its labels, as torchtune's own datasets
        # leave it (stock torchtune KD trains on it); False (default): the loss is on the answer only
        self.train_on_header = bool(train_on_header)
        self.output_field = output_field
        self.max_seq_len = max_seq_len if max_seq_len is not None else getattr(tokenizer, "max_seq_len", None)
        self.records, self.n_bad = load_alpaca_records(
            self.source, on_bad_record=on_bad_record, output_field=output_field
        )
        self.split = split
        self.ids: List[int] = split_ids(list(self.records), split, val_size, seed)
        # special-token strings in the text (a forged "<|im_end|>") are encoded as plain text: counted here, once
        self.n_special_text = report_special_text(
            {i: self.records[i] for i in self.ids}, tokenizer, where=f"{self.source} ({split} split)",
            fields=dict.fromkeys(("instruction", "input", output_field, "original_output")))

    def __len__(self) -> int:
        return len(self.ids)

    def record(self, i: int) -> dict:
        """The raw record of item ``i`` (not the sample id)."""
        return self.records[self.ids[i]]

    def _assistant_header(self) -> List[int]:
        if not hasattr(self, "_hdr"):
            self._hdr = self.tokenizer.encode("assistant\n", add_bos=False, add_eos=False)
        return self._hdr

    def answer_lengths(self, i: int) -> Tuple[int, int, int]:
        """(full token length, answer tokens before truncation, answer tokens kept) of item ``i``."""
        # torchtune tokenizers truncate to their own max_seq_len inside tokenize_messages: measure without it
        tok_max = getattr(self.tokenizer, "max_seq_len", None)
        try:
            if tok_max is not None:
                self.tokenizer.max_seq_len = None
            tokens, mask = self._encode(self.ids[i])
        finally:
            if tok_max is not None:
                self.tokenizer.max_seq_len = tok_max
        n_ans = sum(1 for m in mask if not m)
        if self.max_seq_len is None or len(tokens) <= self.max_seq_len:
            return len(tokens), n_ans, n_ans
        from torchtune.data import truncate

        kept = sum(1 for m in truncate(mask, self.max_seq_len, True) if not m)
        return len(tokens), n_ans, kept

    def _encode(self, sid: int) -> Tuple[List[int], List[bool]]:
        """Untruncated (tokens, mask) of sample ``sid``; mask True = no loss (prompt, header)."""
        msgs = sft_messages(
            self.records[sid], self.system_prompt, train_on_input=self.train_on_input, output_field=self.output_field
        )
        with plain_text(self.tokenizer):  # data text never becomes a chat-template token (kd.data.special_text)
            tokens, mask = self.tokenizer.tokenize_messages(msgs, add_eos=True)
        mask = list(mask)
        if not self.train_on_input and not self.train_on_header:
            # torchtune leaves the assistant header ("<|im_start|>assistant\n") unmasked: mask it
            # too, so the loss is only on the answer (+ the closing <|im_end|>).
            first = next((j for j, m in enumerate(mask) if not m), None)
            im_start = getattr(self.tokenizer, "im_start_id", None)
            if first is not None and im_start is not None and tokens[first] == im_start:
                n_hdr = 1 + len(self._assistant_header())
                for j in range(first, min(first + n_hdr, len(mask) - 1)):
                    mask[j] = True
        return list(tokens), mask

    def __getitem__(self, i: int) -> Dict[str, Any]:
        from torchtune.data import truncate

        sid = self.ids[i]
        tokens, mask = self._encode(sid)
        if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.tokenizer.eos_id)
            mask = truncate(mask, self.max_seq_len, True)
        labels = [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, mask)]
        return {"tokens": list(tokens), "labels": labels, "sample_id": sid}


def alpaca_kd_dataset(tokenizer, source: str, *, packed: bool = False, packing: str = "best_fit", **options):
    """torchtune dataset builder: ``_component_: kd.data.alpaca.alpaca_kd_dataset``.

    ``options`` are the keyword arguments of :class:`AlpacaKDDataset` (``system_prompt``, ``split``, ``val_size``,
    ``seed``, ``max_seq_len``, ``train_on_input``, ``on_bad_record``, ``output_field``, ``train_on_header``),
    written once there.
    Returns an ``AlpacaKDDataset`` (attributes ``ids``, ``n_bad``, ``records``), or a torchtune
    ``PackedDataset`` around it when ``packed=True`` (the unpacked dataset is at ``.ds``).
    """
    return maybe_pack(AlpacaKDDataset(tokenizer, source, **options), tokenizer, packed, packing)


PACKING = ("best_fit", "greedy")


def best_fit_bins(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Best-fit-decreasing bin packing: sample indices per pack, every pack's total <= ``capacity``.

    Longest samples first, each into the fullest pack it still fits (ties: the earliest pack), else a new one.
    Deterministic. Used by :class:`BestFitPackedDataset` and by ``kd.ops.jobtime`` (one rule for both).
    """
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    free: List[Tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the pack size {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            rem, b = free.pop(k)
            bins[b].append(i)
            rem -= n
        else:
            b = len(bins)
            bins.append([i])
            rem = capacity - n
        if rem > 0:
            bisect.insort(free, (rem, b))
    for b in bins:
        b.sort()  # data-set order inside a pack (the document mask makes the order irrelevant to the loss)
    return bins


def greedy_bins(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """torchtune ``PackedDataset``'s rule (next fit, in data-set order, no splitting), for the planner."""
    bins: List[List[int]] = []
    cur: List[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if used + n > capacity and cur:
            bins.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        bins.append(cur)
    return bins


def _with_sample_ids(pack: Dict[str, Any], sample_ids: Optional[List[Any]], members: Sequence[int]) -> Dict[str, Any]:
    """``pack`` plus ``sample_ids`` [n] int64: the ``sample_id`` of each of its samples, in pack order (the
    teacher cache keys its records per sample and splits a pack by ``seq_lens``); omitted when the
    underlying items have no ``sample_id``. torchtune's ``padded_collate_packed`` ignores the key."""
    import torch

    if sample_ids is None:
        return pack
    return {**pack, "sample_ids": torch.tensor([sample_ids[i] for i in members], dtype=torch.long)}


def _item_sample_ids(items) -> Optional[List[int]]:
    sids = [x.get("sample_id") for x in items]
    return None if any(v is None for v in sids) else [int(v) for v in sids]


def _packed_base():
    from torchtune.datasets import PackedDataset

    class BestFitPackedDataset(PackedDataset):
        """torchtune's ``PackedDataset`` (same items: tokens, labels, input_pos, seq_lens with the end-of-pack
        padding as its own segment, so torchtune's collate builds the same document masks), packed
        best-fit-decreasing instead of next-fit in order. Items also name their samples (``sample_ids``,
        in pack order, one per leading ``seq_lens`` entry).

        Why: next-fit leaves each pack's tail empty whenever the next sample does not fit. On the benchmark's
        Buddhist-QA length distribution (docs/benchmarks.md) next-fit pads 18.1% of every 2,048-token pack and
        best-fit pads a few percent, which is that much less teacher and student compute per epoch.
        """

        def _pack(self) -> None:
            items = [self.ds[i] for i in range(len(self.ds))]
            lengths = [len(x["tokens"]) for x in items]
            self.pack_members = best_fit_bins(lengths, self.max_seq_len)
            self.sample_ids = _item_sample_ids(items)
            for members in self.pack_members:
                pack = {"tokens": [], "labels": [], "input_pos": [], "seq_lens": []}
                for i in members:
                    pack["tokens"] += items[i]["tokens"]
                    pack["labels"] += items[i]["labels"]
                    pack["input_pos"] += list(range(lengths[i]))
                    pack["seq_lens"].append(lengths[i])
                self._add_pack(pack)

        def __getitem__(self, idx: int) -> Dict[str, Any]:
            return _with_sample_ids(self.packs[idx], self.sample_ids, self.pack_members[idx])

    return BestFitPackedDataset


def _packed_greedy():
    from torchtune.datasets import PackedDataset

    class GreedyPackedDataset(PackedDataset):
        """torchtune's ``PackedDataset`` exactly as it packs (next fit, in order), whose items also name their
        samples (``sample_ids``). The members are :func:`greedy_bins` (torchtune's rule), checked against
        every pack's ``seq_lens``."""

        def _pack(self) -> None:
            super()._pack()
            items = [self.ds[i] for i in range(len(self.ds))]
            lengths = [len(x["tokens"]) for x in items]
            self.sample_ids = _item_sample_ids(items)
            members = greedy_bins(lengths, self.max_seq_len)
            ok = len(members) == len(self.packs) and all(
                [int(v) for v in p["seq_lens"][:len(m)]] == [lengths[i] for i in m] for p, m in zip(self.packs, members))
            self.pack_members = members if ok else None  # None: the teacher cache refuses these packs

        def __getitem__(self, idx: int) -> Dict[str, Any]:
            if self.pack_members is None:
                return self.packs[idx]
            return _with_sample_ids(self.packs[idx], self.sample_ids, self.pack_members[idx])

    return GreedyPackedDataset


def maybe_pack(ds, tokenizer, packed: bool, packing: str = "best_fit"):
    """Pack ``ds`` into sequences of ``ds.max_seq_len`` when asked: ``packing='best_fit'`` (default; kd's
    ``BestFitPackedDataset``) or ``'greedy'`` (torchtune's ``PackedDataset`` packing as it is). Both name
    each pack's samples (``sample_ids``) for the teacher cache."""
    if not packed:
        return ds

    if packing not in PACKING:
        raise ValueError(f"packing must be one of {list(PACKING)}, got {packing!r}")
    if ds.max_seq_len is None:
        raise ValueError("packed=True needs max_seq_len (argument or tokenizer.max_seq_len)")
    pad = getattr(tokenizer, "pad_id", None)
    cls = _packed_base() if packing == "best_fit" else _packed_greedy()
    return cls(ds, max_seq_len=ds.max_seq_len, padding_idx=0 if pad is None else pad)


# ----------------------------------------------------------------------------------------------
# Demo data (deterministic)
# ----------------------------------------------------------------------------------------------
def demo_records() -> List[dict]:
    """120 deterministic alpaca records (20 topics x 6 question kinds)."""
    out = []
    for i, (n, src, dfn, key, pra, quote, qexp) in enumerate(TOPICS):
        v = i % 3
        out.append({"instruction": DEF_Q[v].format(n=n), "input": "", "output": dfn})
        out.append({"instruction": SRC_Q[v].format(n=n), "input": "", "output": src})
        out.append({"instruction": KEY_Q[v].format(n=n), "input": "", "output": key})
        out.append({"instruction": PRA_Q[v].format(n=n), "input": "", "output": pra})
        out.append({"instruction": QUOTE_Q[v], "input": quote, "output": qexp})
        out.append({"instruction": CTX_Q[v], "input": DEF_Q[(v + 1) % 3].format(n=n), "output": dfn + key})
    return out


def write_demo_data(path: Union[str, Path] = DEMO_DATA_PATH) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(demo_records(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path



TOPICS = [
    ("心经", "《心经》全称《般若波罗蜜多心经》，玄奘法师译本最为流行，是般若经典的精要。",
     "《心经》是一部仅二百六十字的般若经典，讲述观自在菩萨以般若智慧照见五蕴皆空。",
     "《心经》的核心是以般若智慧观照诸法空相，从而度一切苦厄。",
     "可以每日读诵《心经》，并在起心动念处观照烦恼本空，不随境转。",
     "色不异空，空不异色，色即是空，空即是色。",
     "这句经文说明一切物质现象与空性不二，色法因缘和合而生，没有独立不变的自性。"),
    ("金刚经", "《金刚经》全称《金刚般若波罗蜜经》，鸠摩罗什译本流传最广。",
     "《金刚经》是佛陀与须菩提的问答，阐明无相、无住的般若智慧。",
     "《金刚经》的要义是破除对相的执著，应无所住而生其心。",
     "在布施、持戒等善行中不执著于我在行善，做了便放下，不求回报。",
     "凡所有相，皆是虚妄。若见诸相非相，即见如来。",
     "一切现象都是因缘所生、变化无常的，若能不执著于相，便能体认如来的法身。"),
    ("四圣谛", "四圣谛是佛陀在鹿野苑初转法轮时所说的根本教法。",
     "四圣谛即苦谛、集谛、灭谛、道谛，是佛法的基本纲领。",
     "四圣谛揭示了苦的事实、苦的原因、苦的止息以及止息苦的方法。",
     "遇到痛苦时先如实承认苦，再观察其背后的贪爱与执著，并依八正道修行。",
     "此是苦，此是苦集，此是苦灭，此是苦灭之道。",
     "这是佛陀对四圣谛的宣说，依次指出苦、苦的成因、苦的止息和通往止息的道路。"),
    ("八正道", "八正道出自佛陀初转法轮的教说，在《杂阿含经》等经典中多有记载。",
     "八正道是正见、正思维、正语、正业、正命、正精进、正念、正定八种修行方法。",
     "八正道是通往灭苦的中道，可归纳为戒、定、慧三学。",
     "日常中说诚实柔和的话、从事正当的职业，并保持正念觉察身心。",
     "诸比丘，何者为中道？即八正道。",
     "佛陀指出远离苦行与纵欲两边的中道，就是具体的八正道修行。"),
    ("缘起", "缘起法是佛陀在菩提树下所证悟的根本道理，见于《杂阿含经》。",
     "缘起是说一切现象都依赖因缘条件而生起，也依赖因缘条件而消灭。",
     "缘起说明诸法没有独立自存的实体，这是理解空性与无我的基础。",
     "面对得失时观察事物由众多条件促成，便不会过分执取，也更懂得感恩。",
     "此有故彼有，此生故彼生；此无故彼无，此灭故彼灭。",
     "这是缘起法的经典表述，说明事物相互依存，条件具足则生，条件消散则灭。"),
    ("无我", "无我是三法印之一，在《阿含经》与各部论典中反复阐述。",
     "无我是说五蕴和合的身心中，找不到一个常住不变、能够主宰的自我。",
     "无我的要义在于破除我执，我执是一切烦恼的根源。",
     "当自尊心受挫时，观察这个受伤的我只是念头与感受的组合，执著便会减轻。",
     "色无常，无常即苦，苦即非我。",
     "这句经文由无常推到苦，再由苦推到非我，说明五蕴中没有真实的自我。"),
    ("明心见性", "明心见性是禅宗的核心主张，集中体现在《六祖坛经》中。",
     "明心见性是指明了自己的本心，彻见本来具足的佛性。",
     "禅宗认为众生本具佛性，只因妄想执著而不能证得，悟则当下即是。",
     "在行住坐卧中返观自心，不随妄念流转，让清净本心自然显现。",
     "何期自性，本自清净；何期自性，本不生灭。",
     "这是六祖惠能开悟时所说，表明自性本来清净、不生不灭、本自具足。"),
    ("十二因缘", "十二因缘见于《阿含经》，是佛陀对生死流转过程的详细说明。",
     "十二因缘是无明、行、识、名色、六入、触、受、爱、取、有、生、老死十二支。",
     "十二因缘说明众生因无明而流转生死，断除无明便能出离轮回。",
     "在感受生起时觉察它，不让受转成贪爱与执取，便是在切断十二因缘的链条。",
     "无明缘行，行缘识，识缘名色。",
     "这是十二因缘顺观的开头，说明由无明引发行为，行为又牵引出后续的生命流转。"),
    ("六度", "六度是大乘菩萨道的修行纲要，在《般若经》等经典中广为宣说。",
     "六度即布施、持戒、忍辱、精进、禅定、般若六种波罗蜜。",
     "六度以般若为导，使前五度成为到达彼岸的修行，而不是有所求的善行。",
     "可以从小处开始：乐于分享、遵守戒律、宽容他人、坚持用功、安定心念、培养智慧。",
     "菩萨于法，应无所住，行于布施。",
     "这句经文教导菩萨行布施时不住于相，不执著施者、受者与所施之物。"),
    ("三法印", "三法印是判别佛法的标准，见于《杂阿含经》等经典。",
     "三法印是诸行无常、诸法无我、涅槃寂静。",
     "凡符合三法印的教法就是佛法，它是检验正法的印记。",
     "遇事时提醒自己一切都在变化、没有永恒的自我，心便容易平静。",
     "诸行无常，是生灭法；生灭灭已，寂灭为乐。",
     "这首偈说明一切有为法都在生灭变化，当生灭止息时便证得寂灭涅槃之乐。"),
    ("五蕴", "五蕴的教法遍见于《阿含经》，《心经》也说照见五蕴皆空。",
     "五蕴是色、受、想、行、识，是构成众生身心的五类要素。",
     "五蕴说明所谓的我只是五类现象的暂时聚合，其中没有实在的主宰。",
     "静坐时分别觉察身体、感受、念头、意志与了别，看清它们的来去。",
     "照见五蕴皆空，度一切苦厄。",
     "观自在菩萨以般若智慧照见身心五蕴都是空性，因此超越了一切苦难。"),
    ("涅槃", "涅槃是佛教修行的最终目标，在《涅槃经》与《阿含经》中都有阐述。",
     "涅槃意为寂灭，是贪嗔痴等烦恼彻底熄灭、不再流转生死的境界。",
     "涅槃不是断灭虚无，而是烦恼止息后的寂静与解脱。",
     "每当放下一分贪嗔，就体会到一分清凉，这是向涅槃迈进的一步。",
     "涅槃寂静。",
     "这是三法印之一，指出烦恼熄灭后的涅槃境界是究竟寂静安乐的。"),
    ("般若", "般若思想集中见于《大般若经》《金刚经》《心经》等般若部经典。",
     "般若是梵语音译，意为能够照见诸法实相的智慧。",
     "般若智慧能破除一切执著，是成佛的根本，被称为诸佛之母。",
     "通过闻思经典、如理思维和禅修观照，逐步培养看清实相的智慧。",
     "般若波罗蜜多是大神咒，是大明咒，是无上咒。",
     "这句经文赞叹般若智慧具有破除一切苦厄的巨大力量，无与伦比。"),
    ("戒定慧", "戒定慧三学是佛法修行的总纲，见于《楞严经》等经典。",
     "戒定慧是持戒、禅定与智慧三种修学，又称三无漏学。",
     "由戒生定，由定发慧，三学次第增上，最终断除烦恼。",
     "先守好身口的行为，再练习专注，专注深入后以观照开发智慧。",
     "摄心为戒，因戒生定，因定发慧，是则名为三无漏学。",
     "这句出自《楞严经》，说明收摄身心即是戒，由戒而得定，由定而生慧。"),
    ("慈悲", "慈悲是大乘佛法的核心精神，在《大智度论》等论典中有详细论述。",
     "慈是给予众生快乐，悲是拔除众生痛苦。",
     "佛教的慈悲是无缘大慈、同体大悲，平等对待一切众生。",
     "可以每天为他人送上祝福，并在别人困难时尽力伸出援手。",
     "大慈与一切众生乐，大悲拔一切众生苦。",
     "这句出自《大智度论》，说明慈是给予快乐，悲是拔除痛苦，对象是一切众生。"),
    ("因果", "因果法则贯穿整个佛法，在《阿含经》和《因果经》中多有开示。",
     "因果是说善因得善果、恶因得恶果，行为必然带来相应的结果。",
     "因果不虚，众生的苦乐都源于自己过去的身口意行为。",
     "起心动念时谨慎，多种善因，少造恶业，并坦然接受已成熟的果报。",
     "欲知前世因，今生受者是；欲知来世果，今生作者是。",
     "这句偈语说明今生的境遇是过去行为的结果，而今生的作为又决定未来的果报。"),
    ("中道", "中道思想出自佛陀初转法轮，龙树菩萨在《中论》中进一步阐发。",
     "中道是远离苦行与纵欲、常见与断见等两边的正确道路。",
     "中道不是折中妥协，而是不落两边地如实观察缘起。",
     "修行既不过度逼迫自己，也不放纵懈怠，如调琴弦一般松紧适中。",
     "众因缘生法，我说即是空，亦为是假名，亦是中道义。",
     "这首偈出自《中论》，说明缘起之法即是空，也是假名安立，这就是中道。"),
    ("三宝", "皈依三宝是成为佛弟子的开始，在各部经律中都有记载。",
     "三宝是佛宝、法宝、僧宝，是佛教徒皈依的对象。",
     "佛是觉悟者，法是佛所说的教法，僧是依法修行的团体，三者缺一不可。",
     "可以通过受持三皈依、亲近善知识、学习经典来恭敬三宝。",
     "自皈依佛，当愿众生，体解大道，发无上心。",
     "这是三皈依文的第一句，发愿众生都能体悟大道，发起求无上菩提的心。"),
    ("四无量心", "四无量心在《阿含经》和《大智度论》中都有阐述。",
     "四无量心是慈、悲、喜、舍四种广大无量的心。",
     "四无量心以无量众生为对象，能对治嗔恨、伤害、嫉妒与偏执。",
     "可以修习慈心观，从自己开始，依次把祝福扩展到亲人、陌生人乃至怨敌。",
     "慈无量心，悲无量心，喜无量心，舍无量心。",
     "这是四无量心的名称，表示以慈悲喜舍四种心平等普遍地对待一切众生。"),
    ("空性", "空性思想贯穿般若经典，龙树菩萨在《中论》中系统论证。",
     "空性是说一切法都由因缘和合而成，没有独立不变的自性。",
     "空不是什么都没有，而是缘起无自性，因此空与有并不矛盾。",
     "遇到执著的事物时，思维它的因缘组成，便能看破而不被束缚。",
     "以有空义故，一切法得成。",
     "这句出自《中论》，说明正因为一切法是空的，才能依因缘而成立和变化。"),
]

# Instruction templates per aspect; a topic uses variant (topic_index % len) for variety.
DEF_Q = ["什么是{n}？", "请解释{n}的含义。", "{n}指的是什么？"]
SRC_Q = ["{n}出自哪里？", "{n}的经典依据是什么？", "请说明{n}的出处。"]
KEY_Q = ["请简要说明{n}的核心要义。", "{n}最重要的思想是什么？", "如何理解{n}？"]
PRA_Q = ["在日常修行中如何实践{n}？", "普通人怎样在生活中运用{n}？", "修习{n}有什么方法？"]
QUOTE_Q = ["请解释下面这句经文的含义。", "这句经文说的是什么意思？", "请用简单的话解读以下经文。"]
CTX_Q = ["请根据佛学知识回答下面的问题。", "请回答关于佛法的问题。", "请简要回答。"]

ENGLISH = (
    "The Heart Sutra teaches that form is emptiness and emptiness is form. "
    "The Four Noble Truths are the truth of suffering, its origin, its cessation, and the path. "
    "The Noble Eightfold Path consists of right view, right intention, right speech, right action, "
    "right livelihood, right effort, right mindfulness and right concentration. "
    "Dependent origination means that all phenomena arise from causes and conditions. "
    "Hello, world! This is a small byte-level BPE tokenizer trained for unit tests. "
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > . , ; : ! ? "
    "In the Diamond Sutra, the Buddha explains non-attachment to Subhuti. "
    "Knowledge distillation trains a small student model to match a large teacher model. "
)


if __name__ == "__main__":  # pragma: no cover
    import argparse

    p = argparse.ArgumentParser(description="kd.data.alpaca utilities")
    p.add_argument("--write-demo", nargs="?", const=str(DEMO_DATA_PATH), help="(re)write the demo data set")
    a = p.parse_args()
    if a.write_demo:
        print(write_demo_data(a.write_demo))


# ----------------------------------------------------------------------------------------------
# Truncation report (setup time)
# ----------------------------------------------------------------------------------------------
class TruncationReport(NamedTuple):
    n: int  # samples checked
    n_all_cut: int  # samples whose whole answer lies beyond max_seq_len (they train on nothing)
    n_part_cut: int  # samples that lose part of their answer
    longest: Tuple[int, int]  # (sample id, token length) of the longest sample
    over: List[Tuple[int, int]]  # (sample id, token length) of samples longer than max_seq_len (first 5)
    max_seq_len: Optional[int]


def _alpaca_parts(ds) -> List["AlpacaKDDataset"]:
    if isinstance(ds, AlpacaKDDataset):
        return [ds]
    if hasattr(ds, "ds"):  # torchtune PackedDataset
        return _alpaca_parts(ds.ds)
    out = []
    for d in getattr(ds, "datasets", None) or getattr(ds, "_datasets", None) or []:  # ConcatDataset
        out += _alpaca_parts(d)
    return out


def truncation_report(ds, progress: bool = False) -> Optional[TruncationReport]:
    """Tokenize every sample of the kd datasets inside ``ds`` once and count what ``max_seq_len`` cuts.
    None when ``ds`` holds no :class:`AlpacaKDDataset` (other datasets are not inspected)."""
    parts = _alpaca_parts(ds)
    if not parts:
        return None
    from tqdm import tqdm

    n = n_all = n_part = 0
    longest = (-1, -1)
    over: List[Tuple[int, int]] = []
    total = sum(len(p) for p in parts)
    bar = tqdm(total=total, desc="checking sample lengths", disable=not progress or total < 2000, leave=False)
    for p in parts:
        for i in range(len(p)):
            length, n_ans, kept = p.answer_lengths(i)
            sid = p.ids[i]
            n += 1
            if length > longest[1]:
                longest = (sid, length)
            if p.max_seq_len is not None and length > p.max_seq_len:
                if len(over) < 5:
                    over.append((sid, length))
                if kept == 0 and n_ans > 0:
                    n_all += 1
                elif kept < n_ans:
                    n_part += 1
            bar.update(1)
    bar.close()
    return TruncationReport(n, n_all, n_part, longest, over, parts[0].max_seq_len)


def check_truncation(ds, name: str = "train", progress: bool = False) -> Optional[TruncationReport]:
    """Warn (with counts and the over-long sample ids) when ``max_seq_len`` cuts answers; raise ValueError when
    it cuts every answer (nothing would be trained)."""
    r = truncation_report(ds, progress=progress)
    if r is None or (r.n_all_cut == 0 and r.n_part_cut == 0 and not r.over):
        return r
    ids = ", ".join(f"record {sid} ({length} tokens)" for sid, length in r.over)
    msg = (f"{name} data: max_seq_len={r.max_seq_len} cuts {r.n_all_cut} of {r.n} samples' whole answer and part "
           f"of {r.n_part_cut} more; over-long: {ids}{' ...' if len(r.over) == 5 else ''}; longest record "
           f"{r.longest[0]} ({r.longest[1]} tokens)")
    if r.n_all_cut >= r.n:
        raise ValueError(msg + ": no answer token is left to train on; raise tokenizer.max_seq_len or shorten the "
                         "prompts (system_prompt / instruction).")
    log.warning(msg + " (raise tokenizer.max_seq_len to keep them).")
    return r
