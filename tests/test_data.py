import json
import logging

import pytest
import torch
from torchtune.data import padded_collate_sft

from kd.data.alpaca import (
    DEFAULT_SYSTEM_PROMPT,
    DEMO_DATA_PATH,
    alpaca_kd_dataset,
    demo_records,
    load_alpaca_records,
    prompt_messages,
    user_content,
)
from kd.testing.tokenizer import load_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def _write(tmp_path, name, obj_or_text):
    p = tmp_path / name
    if isinstance(obj_or_text, str):
        p.write_text(obj_or_text, encoding="utf-8")
    else:
        p.write_text(json.dumps(obj_or_text, ensure_ascii=False), encoding="utf-8")
    return p


def test_demo_data_shipped_and_deterministic():
    data = json.loads(DEMO_DATA_PATH.read_text(encoding="utf-8"))
    assert data == demo_records()
    assert 100 <= len(data) <= 150
    assert any(r["input"] for r in data) and any(not r["input"] for r in data)
    assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in data)


def test_chat_template_and_masking(tok):
    ds = alpaca_kd_dataset(tok, str(DEMO_DATA_PATH), split="all")
    rec = ds.record(4)
    assert rec["input"]
    item = ds[4]
    assert item["sample_id"] == 4 and len(item["tokens"]) == len(item["labels"])
    text = tok.decode(item["tokens"])
    expected = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{rec['instruction']}\n{rec['input']}<|im_end|>\n"
        f"<|im_start|>assistant\n{rec['output']}<|im_end|>"
    )
    assert text == expected
    # labels: -100 everywhere except the answer tokens and the final <|im_end|>
    labels = item["labels"]
    first = next(i for i, lab in enumerate(labels) if lab != -100)
    assert all(lab == -100 for lab in labels[:first])
    assert labels[first:] == item["tokens"][first:]
    assert tok.decode(item["tokens"][first:]) == rec["output"] + "<|im_end|>"
    assert item["tokens"][first - 1] == tok.encode("\n", add_bos=False, add_eos=False)[-1]


def test_user_content_join():
    assert user_content({"instruction": "问", "input": "经文"}) == "问\n经文"
    assert user_content({"instruction": "问", "input": ""}) == "问"
    assert user_content({"instruction": "问"}) == "问"
    msgs = prompt_messages({"instruction": "问", "input": "经文", "output": "答"}, "系统")
    assert [m.role for m in msgs] == ["system", "user"]
    assert msgs[1].text_content == "问\n经文"
    assert [m.role for m in prompt_messages({"instruction": "问"}, None)] == ["user"]


def test_train_on_input(tok):
    ds = alpaca_kd_dataset(tok, str(DEMO_DATA_PATH), split="all", train_on_input=True, system_prompt=None)
    item = ds[0]
    assert item["labels"] == item["tokens"]


def test_train_on_header(tok):
    """train_on_header=True: the assistant header keeps its labels (torchtune's own masking), the prompt stays masked;
    the default masks it."""
    masked = alpaca_kd_dataset(tok, str(DEMO_DATA_PATH), split="all")[4]
    hdr = alpaca_kd_dataset(tok, str(DEMO_DATA_PATH), split="all", train_on_header=True)[4]
    assert hdr["tokens"] == masked["tokens"]
    first = next(i for i, lab in enumerate(masked["labels"]) if lab != -100)
    first_h = next(i for i, lab in enumerate(hdr["labels"]) if lab != -100)
    assert first_h < first and tok.decode(hdr["tokens"][first_h:first]) == "<|im_start|>assistant\n"
    assert hdr["labels"][first_h:] == hdr["tokens"][first_h:] and hdr["labels"][first:] == masked["labels"][first:]


def test_truncation(tok):
    ds = alpaca_kd_dataset(tok, str(DEMO_DATA_PATH), split="all", max_seq_len=40)
    for i in range(5):
        item = ds[i]
        assert len(item["tokens"]) <= 40 and len(item["labels"]) <= 40
    assert ds[0]["tokens"][-1] == tok.eos_id
    # falls back to the tokenizer's max_seq_len
    ds2 = alpaca_kd_dataset(load_tiny_tokenizer(max_seq_len=32), str(DEMO_DATA_PATH), split="all")
    assert ds2.max_seq_len == 32 and max(len(ds2[i]["tokens"]) for i in range(10)) <= 32


def test_split_sizes_and_determinism(tok):
    src = str(DEMO_DATA_PATH)
    n = len(demo_records())
    tr = alpaca_kd_dataset(tok, src, split="train", val_size=0.1, seed=3)
    va = alpaca_kd_dataset(tok, src, split="val", val_size=0.1, seed=3)
    assert len(va) == round(n * 0.1) and len(tr) + len(va) == n
    assert not set(tr.ids) & set(va.ids)
    assert alpaca_kd_dataset(tok, src, split="val", val_size=0.1, seed=3).ids == va.ids
    assert alpaca_kd_dataset(tok, src, split="val", val_size=0.1, seed=4).ids != va.ids
    assert len(alpaca_kd_dataset(tok, src, split="val", val_size=7)) == 7
    assert len(alpaca_kd_dataset(tok, src, split="train")) == n
    assert len(alpaca_kd_dataset(tok, src, split="all", val_size=0.5)) == n
    assert [va[i]["sample_id"] for i in range(len(va))] == va.ids
    with pytest.raises(ValueError):
        alpaca_kd_dataset(tok, src, split="test")


def test_jsonl_source_and_collate(tok, tmp_path):
    recs = demo_records()[:6]
    p = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n")
    ds = alpaca_kd_dataset(tok, str(p), split="all")
    assert len(ds) == 6
    batch = padded_collate_sft([ds[i] for i in range(4)], padding_idx=tok.pad_id, ignore_idx=-100)
    assert batch["tokens"].shape == batch["labels"].shape and batch["tokens"].dtype == torch.long


BAD_CASES = [
    # (records, record number, field, message fragment)
    ([{"instruction": "a", "input": "", "output": "b"}, {"input": "", "output": "b"}], 1, "instruction", "missing"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "a", "input": "", "output": ""}], 1, "output", "empty"),
    ([{"instruction": "a", "output": "b"}] * 2 + [{"instruction": 3, "output": "b"}], 2, "instruction", "string"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "a", "input": ["x"], "output": "b"}], 1, "input", "string"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], 1, "output", "missing"),
    ([{"instruction": "a", "output": "b"}, "not an object"], 1, None, "object"),
]


@pytest.mark.parametrize("recs,idx,field,frag", BAD_CASES)
def test_bad_records_error(tok, tmp_path, recs, idx, field, frag):
    p = _write(tmp_path, "bad.json", recs)
    with pytest.raises(ValueError) as e:
        alpaca_kd_dataset(tok, str(p))
    msg = str(e.value)
    assert str(p) in msg and f"record {idx}" in msg and frag in msg
    if field:
        assert f"'{field}'" in msg


def test_invalid_json_reports_line_and_column(tok, tmp_path):
    p = _write(tmp_path, "broken.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(ValueError, match=r"line 3 column \d+") as e:
        alpaca_kd_dataset(tok, str(p))
    assert str(p) in str(e.value)
    lines = [json.dumps({"instruction": "a", "output": "b"}), '{"instruction": "a", "output": ', json.dumps({"instruction": "c", "output": "d"})]
    q = _write(tmp_path, "broken.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"record 1 \(line 2\).*line 2 column") as e:
        alpaca_kd_dataset(tok, str(q))
    assert str(q) in str(e.value)


def test_skip_mode_counts(tok, tmp_path, caplog):
    good = demo_records()[:5]
    bad = [{"input": "x", "output": "y"}, {"instruction": "a", "output": "  "}, {"instruction": "a", "output": 5}]
    recs = good[:2] + bad[:1] + good[2:4] + bad[1:] + good[4:]
    p = _write(tmp_path, "mixed.json", recs)
    with caplog.at_level(logging.WARNING):
        ds = alpaca_kd_dataset(tok, str(p), split="all", on_bad_record="skip")
    assert ds.n_bad == 3 and len(ds) == 5
    assert ds.ids == [0, 1, 3, 4, 7]
    assert "skipped 3 bad record" in caplog.text
    lines = [json.dumps(r, ensure_ascii=False) for r in good[:3]] + ["{oops"] + [json.dumps(r, ensure_ascii=False) for r in good[3:]]
    q = _write(tmp_path, "mixed.jsonl", "\n".join(lines))
    ds = alpaca_kd_dataset(tok, str(q), split="all", on_bad_record="skip")
    assert ds.n_bad == 1 and ds.ids == [0, 1, 2, 4, 5]
    recs2, n_bad = load_alpaca_records(q, on_bad_record="skip")
    assert n_bad == 1 and sorted(recs2) == [0, 1, 2, 4, 5]


def test_output_field(tok, tmp_path):
    recs = [{"instruction": "问", "input": "", "teacher_output": "老师的答案"}]
    p = _write(tmp_path, "t.json", recs)
    ds = alpaca_kd_dataset(tok, str(p), split="all", output_field="teacher_output")
    assert tok.decode(ds[0]["tokens"]).endswith("老师的答案<|im_end|>")
    with pytest.raises(ValueError, match="'output'"):
        alpaca_kd_dataset(tok, str(p))


def test_packed(tok):
    from torchtune.datasets import PackedDataset

    ds = alpaca_kd_dataset(tok, str(DEMO_DATA_PATH), split="all", max_seq_len=256, packed=True)
    assert isinstance(ds, PackedDataset)
    assert len(ds) < len(demo_records())
    pack = ds[0]
    assert pack["tokens"].shape == (256,) and pack["labels"].shape == (256,)
    assert "input_pos" in pack and "seq_lens" in pack
    n_valid = sum(int((ds[i]["labels"] != -100).sum()) for i in range(len(ds)))
    plain = alpaca_kd_dataset(tok, str(DEMO_DATA_PATH), split="all", max_seq_len=256)
    assert n_valid == sum(sum(lab != -100 for lab in plain[i]["labels"]) for i in range(len(plain)))
