import json

import pytest

from kd.testing.tokenizer import (
    TINY_NUM_REGULAR,
    TINY_VOCAB_SIZE,
    load_qwen2_5_tokenizer,
    load_tiny_tokenizer,
    qwen2_5_special_tokens,
    qwen2_5_tokenizer_files,
    tiny_tokenizer_files,
)

TEXTS = [
    "色即是空，空即是色",
    "观自在菩萨，行深般若波罗蜜多时，照见五蕴皆空，度一切苦厄。",
    "Hello, world! The Heart Sutra (心经) has 260 characters.\n\n  indented\ttab",
    "生僻字：龘靐 emoji 🙏 accents éàü",
]


@pytest.fixture(scope="module")
def real_tok(tmp_path_factory):
    # derived once per user into ~/.cache/kd (a few seconds the first time)
    return load_qwen2_5_tokenizer()


def test_real_qwen25_hello_world(real_tok):
    assert real_tok.encode("Hello, world!", add_bos=False, add_eos=False) == [9707, 11, 1879, 0]


def test_real_qwen25_roundtrip_and_special(real_tok):
    for s in TEXTS:
        ids = real_tok.encode(s, add_bos=False, add_eos=False)
        assert real_tok.decode(ids) == s
        assert max(ids) < 151643
    assert real_tok.special_tokens["<|im_start|>"] == 151644
    assert real_tok.eos_id == 151645


def test_real_qwen25_files_cached_and_json():
    f = qwen2_5_tokenizer_files()
    assert f["vocab"].is_file() and f["merges"].is_file()
    vocab = json.loads(f["vocab"].read_text(encoding="utf-8"))
    assert len(vocab) == 151643 and sorted(vocab.values()) == list(range(151643))
    added = json.loads(f["special_tokens"].read_text(encoding="utf-8"))["added_tokens"]
    assert [a["id"] for a in added] == list(range(151643, 151643 + len(added)))


def test_tiny_tokenizer_roundtrip_and_ids():
    tok = load_tiny_tokenizer()
    for s in TEXTS:
        ids = tok.encode(s, add_bos=False, add_eos=False)
        assert tok.decode(ids) == s
        assert all(0 <= i < TINY_NUM_REGULAR for i in ids)
    names = qwen2_5_special_tokens()
    assert list(tok.special_tokens) == names
    assert [tok.special_tokens[n] for n in names] == list(range(1000, 1000 + len(names)))
    assert all(TINY_NUM_REGULAR <= i < TINY_VOCAB_SIZE for i in tok.special_tokens.values())
    assert tok.eos_id == tok.special_tokens["<|im_end|>"] == 1002
    assert tok.pad_id == tok.special_tokens["<|endoftext|>"] == 1000
    vocab = json.loads(tiny_tokenizer_files()["vocab"].read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(TINY_NUM_REGULAR))


def test_tiny_tokenizer_agrees_with_hf_tokenizers():
    """torchtune's regex + BPE and the HF tokenizers library give the same ids (incl. specials)."""
    from tokenizers import Tokenizer

    from kd.data.alpaca import demo_records

    tok = load_tiny_tokenizer()
    hf = Tokenizer.from_file(str(tiny_tokenizer_files()["special_tokens"]))
    texts = TEXTS + [v for r in demo_records()[:30] for v in r.values() if v]
    texts.append("<|im_start|>user\n色即是空<|im_end|>\n")
    for s in texts:
        assert tok.encode(s, add_bos=False, add_eos=False) == hf.encode(s).ids, s


def test_tiny_tokenizer_chat_template():
    from torchtune.data import Message

    tok = load_tiny_tokenizer()
    msgs = [Message("system", "系统"), Message("user", "问"), Message("assistant", "答")]
    ids, _ = tok.tokenize_messages(msgs)
    assert tok.decode(ids) == "<|im_start|>system\n系统<|im_end|>\n<|im_start|>user\n问<|im_end|>\n<|im_start|>assistant\n答<|im_end|>"
