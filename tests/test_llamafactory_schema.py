"""The teacher file + dataset_info.json written by generation, read the way LLaMA-Factory reads them.

LLaMA-Factory is not installed here (it pins its own torch/transformers); the reader below follows its
documented schema: data/README.md ("dataset_info.json" entry keys and the alpaca ``columns``: prompt, query,
response, history, system, tools, ...; defaults instruction/input/output, system: None) and what its alpaca
converter does with a record: user turn = the non-empty of (prompt, query) joined by "\\n", system = the
record's ``columns.system`` field or "" when that column is not mapped. The seed's plan A (train the same file
in LLaMA-Factory) needs the system prompt "你是一位精通佛学的大师…" to survive that path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# data/README.md: the keys of one dataset_info.json entry, and of its "columns" for the alpaca format
ENTRY_KEYS = {"hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name", "file_sha1",
              "subset", "folder", "ranking", "formatting", "split", "num_samples", "columns", "tags"}
ALPACA_COLUMNS = {"prompt", "query", "response", "history", "system", "tools", "images", "videos", "audios",
                  "chosen", "rejected", "kto_tag"}
ALPACA_DEFAULTS = {"prompt": "instruction", "query": "input", "response": "output"}


def llamafactory_alpaca_view(dataset_dir: Path, name: str):
    """[(system, user, response)] of dataset ``name`` as LLaMA-Factory would build the conversation."""
    info = json.loads((dataset_dir / "dataset_info.json").read_text())
    entry = info[name]
    unknown = set(entry) - ENTRY_KEYS
    assert not unknown, f"keys LLaMA-Factory does not document: {unknown}"
    assert entry.get("formatting", "alpaca") == "alpaca"
    cols = dict(ALPACA_DEFAULTS)
    if "columns" in entry:
        bad = set(entry["columns"]) - ALPACA_COLUMNS
        assert not bad, f"columns LLaMA-Factory does not read for alpaca: {bad}"
        # an explicit "columns" mapping replaces every column (absent ones become None)
        cols = {k: entry["columns"].get(k) for k in ALPACA_COLUMNS}
    rows = json.loads((dataset_dir / entry["file_name"]).read_text())
    out = []
    for ex in rows:
        query = [ex[cols[k]] for k in ("prompt", "query") if cols.get(k) and ex[cols[k]]]
        system = ex[cols["system"]] if cols.get("system") else ""
        assert isinstance(ex[cols["response"]], str)
        out.append((system, "\n".join(query), ex[cols["response"]]))
    return out


def test_generation_output_keeps_the_system_prompt_in_llamafactory(tmp_path):
    from kd.data.alpaca import DEFAULT_SYSTEM_PROMPT, prompt_messages
    from kd.generate.generation import merge_results

    records = {0: {"instruction": "什么是四圣谛？", "input": "", "output": "苦集灭道。"},
               1: {"instruction": "解释这句话", "input": "色即是空", "output": "原答案"}}
    results = {0: {"id": 0, "output": "四圣谛即苦、集、灭、道。", "finish": "stop"},
               1: {"id": 1, "output": "色不异空。", "finish": "length"}}
    merge_results(records, results, tmp_path, dataset_name="buddhist_kd", system_prompt=DEFAULT_SYSTEM_PROMPT)
    view = llamafactory_alpaca_view(tmp_path, "buddhist_kd")
    assert DEFAULT_SYSTEM_PROMPT.startswith("你是一位精通佛学的大师")
    for (system, user, response), sid in zip(view, (0, 1)):
        assert system == DEFAULT_SYSTEM_PROMPT
        assert response == results[sid]["output"]
        # the same conversation kd's own recipes train on (system, user)
        msgs = prompt_messages(records[sid], DEFAULT_SYSTEM_PROMPT)
        assert [m.role for m in msgs] == ["system", "user"]
        assert msgs[0].text_content == system and msgs[1].text_content == user
    assert view[1][1] == "解释这句话\n色即是空"


def test_reader_is_strict_about_the_schema(tmp_path):
    """The reader can fail: without a system column the prompt is lost (the old dataset_info.json), and an
    undocumented column is rejected."""
    from kd.generate.generation import merge_results

    records = {0: {"instruction": "q", "input": "", "output": "o"}}
    merge_results(records, {0: {"id": 0, "output": "t", "finish": "stop"}}, tmp_path, dataset_name="d")
    assert llamafactory_alpaca_view(tmp_path, "d") == [("", "q", "t")]  # no system_prompt given -> none
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["d"]["columns"]["sys_prompt"] = "system"
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(AssertionError, match="columns LLaMA-Factory does not read"):
        llamafactory_alpaca_view(tmp_path, "d")
