"""Teacher generation: sampling, batched == unbatched, crash-safe result files, kill -9 + resume, merge."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from kd.generate.generation import (
    ResultStore,
    SamplingParams,
    counter_uniform,
    generate_batch,
    install_last_token_head,
    merge_results,
    plan_batches,
    prompt_tokens,
    sample_next,
    sample_seed,
    stop_token_ids,
)

REPO = Path(__file__).resolve().parents[1]


def _teacher(testbed):
    from omegaconf import OmegaConf

    from kd.train.models import build_on_meta, load_hf_into_model

    cfg = OmegaConf.create({"_component_": "torchtune.models.qwen2.qwen2", **testbed.teacher_dims})
    m = build_on_meta(cfg, torch.float32)
    load_hf_into_model(m, testbed.teacher_dir, device=torch.device("cpu"), dtype=torch.float32)
    return install_last_token_head(m.eval())


@pytest.fixture(scope="module")
def teacher(testbed):
    return _teacher(testbed)


def _prompts(testbed, tok, ids):
    from kd.data.alpaca import load_alpaca_records

    recs, _ = load_alpaca_records(testbed.data_json)
    return [prompt_tokens(tok, recs[i], "你是一位佛学老师。") for i in ids]


def test_counter_uniform_deterministic():
    seeds = torch.tensor([sample_seed(0, i) for i in range(1000)], dtype=torch.int64)
    u0, u1 = counter_uniform(seeds, 0), counter_uniform(seeds, 1)
    assert torch.equal(u0, counter_uniform(seeds.clone(), 0))
    assert (u0 > 0).all() and (u0 < 1).all() and not torch.equal(u0, u1)
    assert abs(u0.mean().item() - 0.5) < 0.05 and abs(u1.mean().item() - 0.5) < 0.05
    assert sample_seed(0, 5) != sample_seed(1, 5) and sample_seed(0, 5) == sample_seed(0, 5)


def test_top_p_keeps_the_nucleus_and_matches_frequencies():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4).contiguous()
    seeds = torch.tensor([sample_seed(3, i) for i in range(4000)], dtype=torch.int64)
    tok = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.7), seeds, step=0)
    counts = torch.bincount(tok, minlength=4).float() / 4000
    assert counts[0] == 0 and counts[2] == 0  # outside the 0.7 nucleus {1, 3}
    assert abs(counts[1].item() - 0.5 / 0.8) < 0.03
    tok = sample_next(logits, SamplingParams(temperature=1.0, top_p=1.0, top_k=1), seeds, step=0)
    assert (tok == 1).all()
    assert (sample_next(logits, SamplingParams(temperature=0.0), None, 0) == 1).all()


def test_plan_batches_sorted_and_capped():
    lengths = {i: l for i, l in enumerate([5, 9, 9, 3, 7, 1, 8])}
    plan = plan_batches(lengths, batch_size=3, max_new_tokens=10)
    assert plan == [[1, 2, 6], [4, 0, 3], [5]]
    plan = plan_batches(lengths, batch_size=3, max_new_tokens=10, max_batch_tokens=40)
    assert all(len(b) * (lengths[b[0]] + 10) <= 40 for b in plan if len(b) > 1)
    assert sorted(i for b in plan for i in b) == list(range(7))


def test_batched_equals_unbatched(testbed, teacher, tiny_tokenizer):
    tok = tiny_tokenizer
    ids = [0, 4, 5, 10, 22, 41]  # different prompt lengths -> real left padding
    ps = _prompts(testbed, tok, ids)
    assert len({len(p) for p in ps}) > 1
    assert tok.decode(ps[0][-12:], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    stops = stop_token_ids(tok)
    kw = dict(max_new_tokens=64, stop_ids=stops, pad_id=tok.pad_id)  # some rows stop, some hit the limit
    batched = generate_batch(teacher, ps, **kw)
    single = [generate_batch(teacher, [p], **kw)[0] for p in ps]
    assert [g.tokens for g in batched] == [g.tokens for g in single]
    assert any(g.finish == "stop" for g in batched)  # the trained teacher ends answers with <|im_end|>
    # sampling: per-sample seeds make a row independent of its batch
    sp = SamplingParams(temperature=0.7, top_p=0.9)
    seeds = [sample_seed(0, i) for i in ids]
    b = generate_batch(teacher, ps, params=sp, seeds=seeds, **kw)
    s = [generate_batch(teacher, [p], params=sp, seeds=[sd], **kw)[0] for p, sd in zip(ps, seeds)]
    assert [g.tokens for g in b] == [g.tokens for g in s]


def test_result_store_torn_tail(tmp_path):
    st = ResultStore(tmp_path)
    st.open_for_append(0)
    st.append([{"id": 1, "output": "a"}, {"id": 2, "output": "b"}])
    st.close()
    part = tmp_path / "parts" / "rank-00000.jsonl"
    with open(part, "ab") as f:
        f.write(b'{"id": 3, "outp')  # kill -9 in the middle of a write
    res, bad = st.scan()
    assert sorted(res) == [1, 2] and bad == 1
    st.open_for_append(0)  # truncates the torn tail
    st.append([{"id": 3, "output": "c"}])
    st.close()
    res, bad = st.scan()
    assert sorted(res) == [1, 2, 3] and bad == 0
    assert part.read_bytes().count(b"\n") == 3


def test_merge_writes_alpaca_and_dataset_info(tmp_path):
    records = {0: {"instruction": "q0", "input": "", "output": "o0"}, 2: {"instruction": "q2", "input": "x", "output": "o2"}}
    results = {2: {"id": 2, "output": "t2", "finish": "length"}, 0: {"id": 0, "output": " ", "finish": "stop"}}
    p = merge_results(records, results, tmp_path, dataset_name="dd")
    rows = json.loads(p.read_text())
    assert [r["id"] for r in rows] == [0, 2]
    assert rows[0]["output"] == "o0" and rows[0]["teacher_empty"]  # empty answer -> original label
    assert rows[1] == {"id": 2, "instruction": "q2", "input": "x", "output": "t2", "original_output": "o2",
                       "teacher_truncated": True, "teacher_empty": False}
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["dd"]["file_name"] == "dd.json"
    assert info["dd"]["columns"] == {"prompt": "instruction", "query": "input", "response": "output"}
    from kd.core.config import DataError

    with pytest.raises(DataError, match="no \\(current\\) teacher answer"):
        merge_results(records, {0: results[0]}, tmp_path)


# ------------------------------------------------------------------------------------------------
# End to end through `tune run` (subprocesses)
# ------------------------------------------------------------------------------------------------
def _run(testbed, out, *overrides, env_extra=None, nproc=1):
    env = dict(os.environ, KD_TESTBED_DIR=str(testbed.root), OMP_NUM_THREADS="1", **(env_extra or {}))
    launch = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = ["tune", "run", *launch, "recipes/generate_teacher.py", "--config", "configs/tiny/generate.yaml",
           f"output_dir={out}", "progress_bar=False", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


GREEDY = ("temperature=0", "max_samples=40", "batch_size=8", "max_new_tokens=24")


def test_kill9_resume_is_byte_identical(testbed, tmp_path):
    ref = _run(testbed, tmp_path / "ref", *GREEDY)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    crash = _run(testbed, tmp_path / "run", *GREEDY, env_extra={"KD_GEN_KILL_AFTER_BATCHES": "2"})
    assert crash.returncode == -9, crash.stdout + crash.stderr
    part = tmp_path / "run" / "parts" / "rank-00000.jsonl"
    assert part.read_bytes().count(b"\n") == 16  # two batches of 8 survived, fsynced
    assert not (tmp_path / "run" / "teacher_distill.json").exists()
    with open(part, "ab") as f:  # as if the kill had hit the middle of the third batch's write
        f.write(b'{"finish": "stop", "id": 7, "n_tok')
    res = _run(testbed, tmp_path / "run", *GREEDY)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "16 already done" in res.stdout
    lines = [json.loads(l) for l in part.read_text().splitlines()]
    ids = [r["id"] for r in lines]
    assert sorted(ids) == list(range(40)), "a missing or duplicated id"
    a = (tmp_path / "ref" / "teacher_distill.json").read_bytes()
    b = (tmp_path / "run" / "teacher_distill.json").read_bytes()
    assert a == b
    rows = json.loads(a)
    assert [r["id"] for r in rows] == list(range(40)) and all(r["original_output"] for r in rows)
    # LLaMA-Factory (plan A) sees the system prompt the teacher answered under
    from test_llamafactory_schema import llamafactory_alpaca_view

    from kd.data.alpaca import DEFAULT_SYSTEM_PROMPT

    view = llamafactory_alpaca_view(tmp_path / "run", "teacher_distill")
    assert len(view) == 40 and {v[0] for v in view} == {DEFAULT_SYSTEM_PROMPT}
    summ = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summ["samples"] == 40 and summ["truncated"] + summ["empty"] <= 40
    # nothing left to do: a re-run only re-merges, same bytes
    again = _run(testbed, tmp_path / "run", *GREEDY)
    assert again.returncode == 0 and "0 to generate" in again.stdout
    assert (tmp_path / "run" / "teacher_distill.json").read_bytes() == a
    # a different sampling setting in the same output_dir is refused
    bad = _run(testbed, tmp_path / "run", *GREEDY[1:], "temperature=0.7")
    assert bad.returncode == 2 and "different settings" in bad.stderr


def test_two_ranks_disjoint_shards_same_result(testbed, tmp_path):
    """Data parallel (2 gloo ranks via tune run --nproc_per_node 2): disjoint shards, same merged bytes as 1 rank,
    and a resume with a different world size and batch size has nothing left to do."""
    one = _run(testbed, tmp_path / "one", *GREEDY)
    assert one.returncode == 0, one.stdout + one.stderr
    two = _run(testbed, tmp_path / "two", *GREEDY, nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    parts = sorted((tmp_path / "two" / "parts").glob("rank-*.jsonl"))
    ids = [[json.loads(l)["id"] for l in p.read_text().splitlines()] for p in parts]
    assert len(parts) == 2 and all(ids) and not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == list(range(40))
    assert (tmp_path / "one" / "teacher_distill.json").read_bytes() == (tmp_path / "two" / "teacher_distill.json").read_bytes()
    again = _run(testbed, tmp_path / "two", GREEDY[0], GREEDY[1], GREEDY[3], "batch_size=5")
    assert again.returncode == 0 and "0 to generate" in again.stdout
    # the static decoder (default) and the old per-batch loop write the same file
    eager = _run(testbed, tmp_path / "eager", *GREEDY, "decode_engine=eager")
    assert eager.returncode == 0, eager.stdout + eager.stderr
    assert (tmp_path / "eager" / "teacher_distill.json").read_bytes() == (tmp_path / "one" / "teacher_distill.json").read_bytes()


def test_user_errors_are_one_line(testbed, tmp_path):
    r = _run(testbed, tmp_path / "x", "max_new_token=3")
    assert r.returncode == 2 and "did you mean 'max_new_tokens'" in r.stderr and "Traceback" not in r.stderr
    r = _run(testbed, tmp_path / "x", f"source={tmp_path / 'nope.json'}")
    assert r.returncode == 2 and "data file not found" in r.stderr and "Traceback" not in r.stderr


def test_grouped_decode_attention_matches_torchtune(testbed, teacher, tiny_tokenizer):
    """The copy-free GQA decode path (teacher: 4 query heads on 2 KV heads) gives torchtune's results."""
    from kd.generate.generation import grouped_decode_attention, setup_kv_caches, teardown_kv_caches

    tok = tiny_tokenizer
    ps = _prompts(testbed, tok, [1, 7, 30])
    kw = dict(max_new_tokens=20, stop_ids=stop_token_ids(tok), pad_id=tok.pad_id)
    a = generate_batch(teacher, ps, grouped_attention=True, **kw)
    b = generate_batch(teacher, ps, grouped_attention=False, **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    # logits of one decode step, both paths
    from torchtune.generation import get_causal_mask_from_padding_mask

    x = torch.tensor([ps[0]])
    L = x.shape[1] + 1
    outs = []
    for grouped in (False, True):
        setup_kv_caches(teacher, 1, L, torch.float32, torch.device("cpu"))
        with grouped_decode_attention(teacher, enabled=grouped):
            pm = torch.ones(1, L, dtype=torch.bool)
            teacher(x, mask=get_causal_mask_from_padding_mask(pm[:, :-1], target_seq_len=L),
                    input_pos=torch.arange(L - 1)[None])
            outs.append(teacher(torch.tensor([[5]]), mask=pm[:, None, :], input_pos=torch.tensor([[L - 1]])))
        teardown_kv_caches(teacher)
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_nf4_teacher_generates(testbed, tiny_tokenizer):
    """quantization=nf4 path: NF4 weights while loading + kd.teacher.nf4 fast linear, bf16, batched generation."""
    from omegaconf import OmegaConf

    from kd.teacher.nf4 import FastNF4Linear, use_fast_nf4
    from kd.train.models import build_on_meta, load_hf_into_model

    cfg = OmegaConf.create({"_component_": "torchtune.models.qwen2.qwen2", **testbed.teacher_dims})
    m = build_on_meta(cfg, torch.bfloat16)
    load_hf_into_model(m, testbed.teacher_dir, device=torch.device("cpu"), dtype=torch.bfloat16, nf4=True)
    assert use_fast_nf4(m) == 7 * testbed.teacher_dims["num_layers"]
    assert isinstance(m.layers[0].mlp.w1, FastNF4Linear)
    install_last_token_head(m.eval())
    ps = _prompts(testbed, tiny_tokenizer, [0, 9])
    gens = generate_batch(m, ps, max_new_tokens=12, stop_ids=stop_token_ids(tiny_tokenizer),
                          pad_id=tiny_tokenizer.pad_id, cache_dtype=torch.bfloat16)
    assert all(len(g.tokens) > 0 for g in gens)


def test_changed_source_is_detected(testbed, tmp_path):
    recs = json.loads(Path(testbed.data_json).read_text())[:6]
    src = tmp_path / "src.json"
    src.write_text(json.dumps(recs, ensure_ascii=False))
    opts = (f"source={src}", "temperature=0", "max_new_tokens=4", "batch_size=4")
    assert _run(testbed, tmp_path / "o", *opts).returncode == 0
    recs[1]["instruction"] = "什么是缘起？"
    src.write_text(json.dumps(recs, ensure_ascii=False))
    r = _run(testbed, tmp_path / "o", *opts)
    assert r.returncode == 2 and "different prompt" in r.stderr and "ids [1]" in r.stderr
    r = _run(testbed, tmp_path / "o", *opts, "on_source_change=regenerate")
    assert r.returncode == 0 and "1 to generate" in r.stdout, r.stdout + r.stderr
    rows = json.loads((tmp_path / "o" / "teacher_distill.json").read_text())
    assert [x["id"] for x in rows] == list(range(6)) and rows[1]["instruction"] == "什么是缘起？"


def test_scan_prefers_current_prompt_hash(tmp_path):
    st = ResultStore(tmp_path)
    st.open_for_append(0)
    st.append([{"id": 1, "prompt_hash": "new", "output": "fresh"}])
    st.close()
    st.open_for_append(1)  # the stale line sits in a later file
    st.append([{"id": 1, "prompt_hash": "old", "output": "stale"}])
    st.close()
    assert st.scan()[0][1]["output"] == "stale"
    assert st.scan({1: "new"})[0][1]["output"] == "fresh"


