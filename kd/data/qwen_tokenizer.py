"""The real Qwen2.5 tokenizer, derived offline from ``dashscope``'s ``qwen.tiktoken`` (no hub access): the
GPT-2/Qwen2-format ``vocab.json`` + ``merges.txt`` + special tokens that torchtune's ``qwen2_5_tokenizer`` reads.

- ``qwen2_5_tokenizer_files(cache_dir=None)`` -> dict of paths, derived once and cached under
  ``~/.cache/kd/qwen2_5_tokenizer/<sha of qwen.tiktoken>/`` (``kd plan --time`` counts tokens with it when the
  config's tokenizer files are absent; the benchmarks' synthetic data is made of its tokens);
- ``tiktoken_to_vocab_merges(tiktoken_path, out_dir)`` the converter;
- ``write_special_tokens_json`` / ``write_tokenizer_config``: the special-token files (also used by the tiny test
  tokenizer of kd.testing.tokenizer).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

QWEN2_5_NUM_REGULAR = 151643


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2 byte -> printable unicode char table (same as torchtune/transformers)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def qwen2_5_special_tokens() -> List[str]:
    """Qwen2.5 special token names in torchtune's order."""
    from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

    return list(QWEN2_5_SPECIAL_TOKENS)


def write_special_tokens_json(
    path: Union[str, Path],
    first_id: int,
    vocab_path: Optional[Union[str, Path]] = None,
    merges_path: Optional[Union[str, Path]] = None,
) -> Path:
    """Write a ``tokenizer.json`` whose ``added_tokens`` are Qwen2.5's special tokens at
    ``first_id, first_id+1, ...`` (readable by torchtune's ``parse_hf_tokenizer_json``).

    With ``vocab_path``/``merges_path`` it is a complete Hugging Face ``tokenizer.json`` (byte-level
    BPE with the Qwen2 pre-tokenizer regex), also loadable by ``tokenizers``/``transformers``;
    without them it only holds ``added_tokens``.
    """
    path = Path(path)
    names = qwen2_5_special_tokens()
    if vocab_path is not None and merges_path is not None:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
        from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX

        tok = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
        if tok.get_vocab_size() != first_id:
            raise ValueError(f"vocab has {tok.get_vocab_size()} tokens; special tokens must start at {first_id}")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
        tmp = path.with_name(path.name + ".tmp")
        tok.save(str(tmp))
        got = {a["content"]: a["id"] for a in json.loads(tmp.read_text(encoding="utf-8"))["added_tokens"]}
        if got != {t: first_id + i for i, t in enumerate(names)}:
            raise RuntimeError(f"unexpected special token ids: {got}")
        os.replace(tmp, path)
        return path
    added = [
        {"id": first_id + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(names)
    ]
    path.write_text(json.dumps({"version": "1.0", "added_tokens": added}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def write_tokenizer_config(path: Path, special_first_id: int) -> None:
    names = qwen2_5_special_tokens()
    cfg = {
        "added_tokens_decoder": {
            str(special_first_id + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
            for i, t in enumerate(names)
        },
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "tokenizer_class": "Qwen2Tokenizer",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    path.write_text(json.dumps(cfg, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Real Qwen2.5 tokenizer from qwen.tiktoken
# ----------------------------------------------------------------------------------------------
def default_tiktoken_path() -> Path:
    """``qwen.tiktoken`` shipped in the ``dashscope`` package (no import of dashscope itself)."""
    import importlib.util

    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'dashscope' (which ships qwen.tiktoken) is not installed")
    p = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not p.is_file():
        raise FileNotFoundError(p)
    return p


def _read_tiktoken(path: Union[str, Path]) -> Dict[bytes, int]:
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _recover_merges(ranks: Dict[bytes, int]) -> List[Tuple[bytes, bytes]]:
    """For every multi-byte token (in rank order), the pair of tokens it was merged from.

    The pair is found by running tiktoken's BPE on the token's bytes with only lower ranks
    allowed; it must stop at exactly two parts. Each token is merged once from its byte list,
    using a heap-free greedy loop over at most len(token) parts (tokens are short), which is
    fast enough (~10 s for 151k tokens in pure Python).
    """
    merges: List[Tuple[bytes, bytes]] = []
    get = ranks.get
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_i, best_r = -1, rank
            for i in range(len(parts) - 1):
                r = get(parts[i] + parts[i + 1])
                if r is not None and r < best_r:
                    best_i, best_r = i, r
            if best_i < 0:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) != 2:
            raise ValueError(f"cannot recover the merge of token rank {rank}: {token!r} -> {parts}")
        merges.append((parts[0], parts[1]))
    return merges


def tiktoken_to_vocab_merges(tiktoken_path: Union[str, Path], out_dir: Union[str, Path]) -> Tuple[Path, Path]:
    """Convert a tiktoken BPE rank file to GPT-2 byte-level ``vocab.json`` + ``merges.txt``."""
    ranks = _read_tiktoken(tiktoken_path)
    b2u = bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {enc(tok): r for tok, r in ranks.items()}
    merges = _recover_merges(ranks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_v, tmp_m = out / "vocab.json.tmp", out / "merges.txt.tmp"
    tmp_v.write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp_m.write_text("#version: 0.2\n" + "\n".join(f"{enc(a)} {enc(b)}" for a, b in merges) + "\n", encoding="utf-8")
    os.replace(tmp_v, out / "vocab.json")
    os.replace(tmp_m, out / "merges.txt")
    return out / "vocab.json", out / "merges.txt"


def _sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def qwen2_5_tokenizer_files(
    cache_dir: Optional[Union[str, Path]] = None, tiktoken_path: Optional[Union[str, Path]] = None
) -> Dict[str, Path]:
    """Paths of the real Qwen2.5 tokenizer (vocab, merges, special_tokens json, tokenizer_config),
    derived from ``qwen.tiktoken`` once and cached (keyed by the file's sha256).

    ``cache_dir`` defaults to ``$KD_CACHE_DIR`` or ``~/.cache/kd``; files go under
    ``<cache_dir>/qwen2_5_tokenizer/<sha16>/``. Special tokens are at 151643.. (Qwen2.5's ids).
    """
    tiktoken_path = Path(tiktoken_path) if tiktoken_path else default_tiktoken_path()
    base = Path(cache_dir) if cache_dir else Path(os.environ.get("KD_CACHE_DIR", Path.home() / ".cache" / "kd"))
    d = base / "qwen2_5_tokenizer" / _sha256(tiktoken_path)[:16]
    files = {
        "dir": d,
        "vocab": d / "vocab.json",
        "merges": d / "merges.txt",
        "special_tokens": d / "tokenizer.json",
        "tokenizer_config": d / "tokenizer_config.json",
    }
    stamp = d / "DONE"
    if not stamp.is_file():
        d.mkdir(parents=True, exist_ok=True)
        tiktoken_to_vocab_merges(tiktoken_path, d)
        write_special_tokens_json(files["special_tokens"], QWEN2_5_NUM_REGULAR, files["vocab"], files["merges"])
        write_tokenizer_config(files["tokenizer_config"], QWEN2_5_NUM_REGULAR)
        stamp.write_text(str(tiktoken_path) + "\n")
    return files


def load_qwen2_5_tokenizer(max_seq_len: Optional[int] = None, cache_dir=None):
    """torchtune ``Qwen2_5Tokenizer`` on the derived real vocabulary (default special tokens)."""
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    f = qwen2_5_tokenizer_files(cache_dir)
    return qwen2_5_tokenizer(path=str(f["vocab"]), merges_file=str(f["merges"]), max_seq_len=max_seq_len)
