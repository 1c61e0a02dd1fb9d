"""Tokenizer files for kd: a tiny byte-level BPE asset (tests) and the real Qwen2.5 tokenizer
derived offline from ``dashscope``'s ``qwen.tiktoken``.

Both produce GPT-2/Qwen2-format ``vocab.json`` + ``merges.txt`` that torchtune's
``qwen2_5_tokenizer(path=vocab, merges_file=merges, special_tokens_path=...)`` reads.

- ``tiny_tokenizer_files()`` -> dict of paths to the committed tiny asset (1000 regular tokens,
  Qwen2.5 special tokens at ids 1000..1021; model vocab 1024). ``train_tiny_tokenizer(out_dir)``
  regenerates it deterministically (``python -m kd.testing.tokenizer --train-tiny``).
- ``qwen2_5_tokenizer_files(cache_dir=None)`` -> dict of paths to the real Qwen2.5 vocab/merges,
  derived once and cached under ``~/.cache/kd/qwen2_5_tokenizer/<sha of qwen.tiktoken>/``.
- ``tiktoken_to_vocab_merges(tiktoken_path, out_dir)`` the converter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Union

from kd.data import alpaca as data
from kd.data.qwen_tokenizer import (  # re-exported: the real tokenizer lives with the data phase
    QWEN2_5_NUM_REGULAR,
    bytes_to_unicode,
    default_tiktoken_path,
    load_qwen2_5_tokenizer,
    qwen2_5_special_tokens,
    qwen2_5_tokenizer_files,
    tiktoken_to_vocab_merges,
    write_special_tokens_json,
    write_tokenizer_config,
)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER_DIR = ASSETS_DIR / "tiny_tokenizer"
TINY_NUM_REGULAR = 1000  # regular BPE tokens (256 bytes + 744 merges): ids 0..999
TINY_VOCAB_SIZE = 1024  # model embedding rows for tiny models

__all__ = [
    "QWEN2_5_NUM_REGULAR",
    "bytes_to_unicode",
    "qwen2_5_special_tokens",
    "write_special_tokens_json",
    "train_tiny_tokenizer",
    "tiny_tokenizer_files",
    "load_tiny_tokenizer",
    "tiktoken_to_vocab_merges",
    "default_tiktoken_path",
    "qwen2_5_tokenizer_files",
    "load_qwen2_5_tokenizer",
    "copy_tokenizer_files",
]


# ----------------------------------------------------------------------------------------------
# Tiny tokenizer
# ----------------------------------------------------------------------------------------------
def _tiny_corpus() -> List[str]:
    texts = []
    for r in data.demo_records():
        texts += [r["instruction"], r["input"], r["output"]]
    texts.append(data.DEFAULT_SYSTEM_PROMPT)
    texts += ["system\n", "user\n", "assistant\n", "\n"]
    texts += data.ENGLISH.split(". ")
    return [t for t in texts if t]


def train_tiny_tokenizer(out_dir: Union[str, Path] = TINY_TOKENIZER_DIR) -> Dict[str, Path]:
    """Deterministically train the tiny byte-level BPE (1000 regular tokens) on the demo data
    plus some English, with torchtune's Qwen2 pre-tokenizer regex, and write vocab.json,
    merges.txt, tokenizer.json (special tokens at 1000..) and tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_NUM_REGULAR,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: Dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if len(vocab) != TINY_NUM_REGULAR:
        raise RuntimeError(f"tiny BPE has {len(vocab)} tokens, expected {TINY_NUM_REGULAR}")
    # Re-number deterministically: the 256 byte tokens in byte order, then merges in rank order.
    b2u = bytes_to_unicode()
    new_vocab = {b2u[b]: b for b in range(256)}
    for m in merges:
        a, b = m.split(" ")
        if a + b not in new_vocab:
            new_vocab[a + b] = len(new_vocab)
    assert set(new_vocab) == set(vocab), "vocab/merges mismatch"
    (out / "vocab.json").write_text(json.dumps(new_vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    write_special_tokens_json(out / "tokenizer.json", TINY_NUM_REGULAR, out / "vocab.json", out / "merges.txt")
    write_tokenizer_config(out / "tokenizer_config.json", TINY_NUM_REGULAR)
    return tiny_tokenizer_files(out)


def tiny_tokenizer_files(tokenizer_dir: Union[str, Path] = TINY_TOKENIZER_DIR) -> Dict[str, Path]:
    """Paths of the tiny tokenizer asset: keys dir, vocab, merges, special_tokens, tokenizer_config."""
    d = Path(tokenizer_dir)
    return {
        "dir": d,
        "vocab": d / "vocab.json",
        "merges": d / "merges.txt",
        "special_tokens": d / "tokenizer.json",
        "tokenizer_config": d / "tokenizer_config.json",
    }


def load_tiny_tokenizer(max_seq_len: Optional[int] = None, tokenizer_dir: Union[str, Path] = TINY_TOKENIZER_DIR):
    """torchtune ``Qwen2_5Tokenizer`` on the tiny asset."""
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    f = tiny_tokenizer_files(tokenizer_dir)
    return qwen2_5_tokenizer(
        path=str(f["vocab"]), merges_file=str(f["merges"]), special_tokens_path=str(f["special_tokens"]),
        max_seq_len=max_seq_len,
    )


def copy_tokenizer_files(files: Dict[str, Path], dest: Union[str, Path]) -> None:
    """Copy vocab.json, merges.txt, tokenizer.json (special tokens), tokenizer_config.json into ``dest``."""
    import shutil

    dest = Path(dest)
    for key in ("vocab", "merges", "special_tokens", "tokenizer_config"):
        src = files.get(key)
        if src is not None and Path(src).is_file():
            shutil.copyfile(src, dest / Path(src).name)


if __name__ == "__main__":  # pragma: no cover
    import argparse

    p = argparse.ArgumentParser(description="kd tokenizer files")
    p.add_argument("--train-tiny", nargs="?", const=str(TINY_TOKENIZER_DIR), help="(re)train the tiny asset")
    p.add_argument("--qwen", action="store_true", help="derive (or locate) the real Qwen2.5 tokenizer files")
    p.add_argument("--cache-dir", default=None)
    a = p.parse_args()
    if a.train_tiny:
        for k, v in train_tiny_tokenizer(a.train_tiny).items():
            print(f"{k}: {v}")
    if a.qwen:
        for k, v in qwen2_5_tokenizer_files(a.cache_dir).items():
            print(f"{k}: {v}")
