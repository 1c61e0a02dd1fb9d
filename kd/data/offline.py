"""Offline distillation, step 2 (data side): SFT on teacher answers mixed with the original labels.

``mixed_sft_dataset`` is a torchtune dataset builder for the merged file written by
``recipes/generate_teacher.py`` (alpaca records with ``output`` = teacher answer and ``original_output``)::

    dataset:
      _component_: kd.data.offline.mixed_sft_dataset
      source: outputs/qwen72b_generate/teacher_distill.json
      teacher_fraction: 0.7     # 70% of the samples train on the teacher's answer, 30% on the original label
      seed: 0                   # split seed and (unless mix_seed is set) mixing seed
      val_size: 0.02

Which target a sample gets is decided by ``sha256(mix_seed:sample_id)``: the samples of the split are
ordered by that hash and the first ``round(teacher_fraction * n)`` use the teacher answer, so the fraction is
met exactly, the choice is reproducible across runs/ranks/resumes, and changing the seed reshuffles it.
Samples whose teacher answer is unusable (``teacher_empty``; ``teacher_truncated`` unless
``truncated="teacher"``) always use the original label; they count towards the original share, so the
realised teacher fraction (``.teacher_fraction_realised``) can be lower than requested when many answers are bad.
Items are ``{tokens, labels, sample_id}`` exactly like :func:`kd.data.alpaca.alpaca_kd_dataset`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from kd.data.alpaca import DEFAULT_SYSTEM_PROMPT, AlpacaKDDataset, maybe_pack

log = logging.getLogger(__name__)

__all__ = ["mixed_sft_dataset", "MixedSFTDataset", "choose_targets"]


def _mix_key(seed: int, sid: int) -> bytes:
    return hashlib.sha256(f"mix:{int(seed)}:{int(sid)}".encode()).digest()


def choose_targets(ids: List[int], teacher_fraction: float, seed: int, usable: Optional[Dict[int, bool]] = None) -> Dict[int, str]:
    """``{sample_id: "teacher" | "original"}`` with exactly ``round(teacher_fraction * len(ids))`` candidates
    for the teacher (the ids with the smallest seeded hashes); unusable teacher answers fall back to original."""
    if not 0.0 <= teacher_fraction <= 1.0:
        raise ValueError(f"teacher_fraction must be in [0, 1], got {teacher_fraction}")
    order = sorted(ids, key=lambda i: _mix_key(seed, i))
    k = int(round(teacher_fraction * len(ids)))
    teach = set(order[:k])
    usable = usable or {}
    return {i: "teacher" if (i in teach and usable.get(i, True)) else "original" for i in ids}


class MixedSFTDataset(AlpacaKDDataset):
    """An :class:`kd.data.alpaca.AlpacaKDDataset` whose per-sample target is the teacher answer or the original label."""

    def __init__(
        self,
        tokenizer,
        source: Union[str, Path],
        *,
        teacher_fraction: float = 0.7,
        seed: int = 0,
        mix_seed: Optional[int] = None,
        truncated: str = "original",
        **kwargs: Any,
    ):
        if truncated not in ("original", "teacher"):
            raise ValueError(f"truncated must be 'original' or 'teacher', got {truncated!r}")
        super().__init__(tokenizer, source, seed=seed, output_field="output", **kwargs)
        # sample id = the record's id in the ORIGINAL source file (the merged file carries it as "id")
        by_sid: Dict[int, dict] = {}
        for idx in self.ids:
            rec = self.records[idx]
            orig = rec.get("original_output")
            if not isinstance(orig, str) or not orig.strip():
                raise ValueError(
                    f"{self.source}: record {idx}: field 'original_output' missing or empty; "
                    "mixed_sft_dataset reads the merged file written by recipes/generate_teacher.py "
                    "(use kd.data.alpaca.alpaca_kd_dataset for a plain alpaca file)."
                )
            by_sid[int(rec.get("id", idx))] = rec
        usable = {
            sid: not (r.get("teacher_empty", False) or (truncated == "original" and r.get("teacher_truncated", False)))
            for sid, r in by_sid.items()
        }
        self.mix_seed = seed if mix_seed is None else mix_seed
        self.choice = choose_targets(sorted(by_sid), teacher_fraction, self.mix_seed, usable)
        self.teacher_fraction = teacher_fraction
        n = max(1, len(self.choice))
        self.teacher_fraction_realised = sum(v == "teacher" for v in self.choice.values()) / n
        self._file_index = {int(self.records[i].get("id", i)): i for i in self.ids}
        for sid, idx in self._file_index.items():
            rec = self.records[idx]
            target = rec["output"] if self.choice[sid] == "teacher" else rec["original_output"]
            self.records[idx] = dict(rec, output=target, target_source=self.choice[sid])
        n_bad = sum(not u for u in usable.values())
        log.info(
            f"{self.source} ({self.split}): {len(self.ids)} samples, teacher answers for "
            f"{self.teacher_fraction_realised:.1%} (requested {teacher_fraction:.0%}; {n_bad} unusable teacher answers)"
        )

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = super().__getitem__(i)
        rec = self.records[self.ids[i]]
        item["sample_id"] = int(rec.get("id", self.ids[i]))
        return item


def mixed_sft_dataset(
    tokenizer,
    source: str,
    *,
    teacher_fraction: float = 0.7,
    seed: int = 0,
    mix_seed: Optional[int] = None,
    truncated: str = "original",
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    split: str = "train",
    val_size: Union[float, int] = 0.0,
    max_seq_len: Optional[int] = None,
    train_on_input: bool = False,
    packed: bool = False,
    packing: str = "best_fit",
    on_bad_record: str = "error",
):
    """torchtune dataset builder: ``_component_: kd.data.offline.mixed_sft_dataset`` (see the module docstring)."""
    ds = MixedSFTDataset(
        tokenizer, source, teacher_fraction=teacher_fraction, seed=seed, mix_seed=mix_seed, truncated=truncated,
        system_prompt=system_prompt, split=split, val_size=val_size, max_seq_len=max_seq_len,
        train_on_input=train_on_input, on_bad_record=on_bad_record,
    )
    return maybe_pack(ds, tokenizer, packed, packing)
