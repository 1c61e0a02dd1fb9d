"""Data text cannot forge chat turns: special-token strings inside data fields are encoded as plain text.

torchtune's Qwen2 tokenizers split every string they encode on the special-token strings, so an alpaca answer
holding ``"<|im_end|>\\n<|im_start|>user\\n..."`` would be encoded to the real ``<|im_end|>``/``<|im_start|>`` ids:
the student would be trained on a fake turn boundary (and a generation prompt would carry one). Only the chat
template may produce those ids. Inside :func:`plain_text` the tokenizer encodes text with its byte-level BPE
only (what HF tokenizers call ``split_special_tokens=True``): ``<|im_end|>`` in a field becomes the tokens of
the characters ``<``, ``|``, ``im``, ... . The template's own headers and footers are added as ids by
``tokenize_messages`` and are unaffected.

:func:`report_special_text` counts the records whose fields hold such strings and logs one warning line at
setup (nothing is dropped: the text is kept, as text).
"""

from __future__ import annotations

import contextlib
import logging
import re
import unicodedata
from collections import Counter
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger("kd.data")

__all__ = ["special_strings", "supports_plain_text", "plain_text", "find_special_text", "report_special_text"]


def special_strings(tokenizer) -> List[str]:
    sp = getattr(tokenizer, "special_tokens", None)
    return sorted((str(k) for k in sp), key=len, reverse=True) if isinstance(sp, Mapping) else []


def supports_plain_text(tokenizer) -> bool:
    """Whether the tokenizer has the BPE pieces :func:`plain_text` uses (torchtune's Qwen2 / Qwen2.5 tokenizers)."""
    return all(hasattr(tokenizer, a) for a in ("_tokenize", "_convert_token_to_id", "special_tokens"))


def _plain_encode(tokenizer):
    def encode(text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        text = unicodedata.normalize("NFC", text)  # as torchtune's encode does
        ids = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
        ids += [tokenizer._convert_token_to_id(t) for t in tokenizer._tokenize(text)]
        if add_eos and tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        return ids

    return encode


@contextlib.contextmanager
def plain_text(tokenizer) -> Iterator[None]:
    """Within the block, ``tokenizer.encode`` (hence the message contents of ``tokenize_messages``) encodes
    special-token strings as plain text. A no-op for tokenizers without byte-level BPE pieces."""
    if not supports_plain_text(tokenizer) or "encode" in vars(tokenizer):  # unsupported, or already inside
        yield
        return
    tokenizer.encode = _plain_encode(tokenizer)
    try:
        yield
    finally:
        del tokenizer.encode


def find_special_text(text: Any, specials: Sequence[str]) -> List[str]:
    if not isinstance(text, str) or not specials:
        return []
    return re.findall("|".join(re.escape(s) for s in specials), text)


def report_special_text(records: Mapping[int, Mapping[str, Any]], tokenizer, *, where: str,
                        fields: Iterable[str] = ("instruction", "input", "output")) -> int:
    """Count the records whose ``fields`` hold special-token strings; log one warning line when any do.
    Returns the number of such records."""
    specials = special_strings(tokenizer)
    if not specials:
        return 0
    fields = tuple(fields)
    hits: Counter = Counter()
    first: Optional[Tuple[int, str]] = None
    n = 0
    for sid in sorted(records):
        found = False
        for f in fields:
            got = find_special_text(records[sid].get(f), specials)
            if got:
                hits.update(got)
                found = True
                if first is None:
                    first = (sid, f)
        n += found
    if n:
        what = ", ".join(f"{s} x{c}" for s, c in hits.most_common(4)) + (", ..." if len(hits) > 4 else "")
        how = ("encoded as plain text, never as chat-template tokens" if supports_plain_text(tokenizer) else
               "this tokenizer cannot encode them as plain text: clean the data")
        log.warning(f"{where}: {n} of {len(records)} record(s) hold special-token strings in their text ({what}; "
                    f"first: record {first[0]}, field '{first[1]}'): {how}")
    return n
