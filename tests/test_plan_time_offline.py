"""``kd plan --time`` without the model files and without the data file (issue 27, part 5): the README's command on a
fresh machine, kd's offline Qwen2.5 tokenizer standing in for the config's, a stated length distribution
(``--lengths``), ``--data FILE``, and the one-line errors."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kd.core.config import ConfigError
from kd.ops import jobtime
from kd.ops.preflight import load_config

REPO = Path(__file__).resolve().parents[1]
KD = str(Path(sys.executable).parent / "kd")
TINY = str(REPO / "configs/tiny/kd_lora.yaml")
ONE_NODE = "configs/qwen2_5/72B_to_7B_kd_lora_1node.yaml"


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _fresh_env(tmp_path: Path) -> dict:
    """A new user's machine: an empty home and kd cache (the offline tokenizer is derived there, not reused)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("KD_CACHE_DIR", "KD_DEBUG")}
    env.update(HOME=str(home), KD_CACHE_DIR=str(home / ".cache" / "kd"), OMP_NUM_THREADS="1")
    return env


def _readme_plan_time_command():
    from test_documented_commands import _split, documented_commands

    cmds = [c for src, c in documented_commands() if src == "README.md" and c.startswith("kd plan --time")]
    assert len(cmds) == 1, cmds
    env, toks = _split(cmds[0])
    return cmds[0], toks


def test_readme_plan_time_command_runs_on_a_fresh_machine(tmp_path):
    """The README's exact ``kd plan --time`` line, as printed, with an empty HOME / KD_CACHE_DIR and no /models."""
    cmd, toks = _readme_plan_time_command()
    assert f"--config {ONE_NODE}" in cmd
    p = subprocess.run([KD, *toks[1:]], capture_output=True, text=True, cwd=REPO, env=_fresh_env(tmp_path),
                       timeout=600)
    assert p.returncode == 0, (cmd, p.stderr[-3000:])
    assert "Traceback" not in p.stderr
    first = p.stdout.splitlines()[0]
    assert first.startswith("tokens counted with: "), p.stdout[:500]
    vocab = Path("/models/Qwen2.5-7B-Instruct/vocab.json")
    if vocab.is_file():
        assert first.endswith("(the config's)"), first
    else:
        assert "kd's offline Qwen2.5 tokenizer" in first and f"the config's {vocab} is absent" in first, first
        assert str(tmp_path / "home") in first  # derived into the fresh cache, not found somewhere else
    assert p.stdout.splitlines()[1].startswith("token counts: from "), p.stdout[:800]
    assert "job time on h200" in p.stdout and "job time on gb10" in p.stdout
    assert "whole run (3 epochs)" in p.stdout


def test_missing_data_and_no_lengths_is_one_error_line(testbed, tmp_path):
    p = subprocess.run([KD, "plan", "--time", "--config", TINY, f"dataset.source={tmp_path / 'absent.json'}"],
                       capture_output=True, text=True, cwd=REPO, env=_fresh_env(tmp_path))
    errors = [l for l in p.stderr.splitlines() if "error" in l]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(errors) == 1 and errors[0].startswith("kd plan: error: "), p.stderr
    assert str(tmp_path / "absent.json") in errors[0] and "--data" in errors[0] and "--lengths" in errors[0]
    assert p.stdout == ""


@pytest.mark.parametrize("bad", ["records=10,prompt=5", "records=x,prompt=5,answer=5", "records=10,prompt=5,answer=p50:9/p95:3",
                                 "records=10,prompt=9-3,answer=5", "records=10,prompt=5,answer=5,colour=red"])
def test_bad_lengths_is_one_error(bad):
    with pytest.raises(ConfigError, match=r"^--lengths "):
        jobtime.parse_lengths(bad)


def test_data_flag_is_the_dataset_source_override(testbed, tmp_path):
    demo = testbed.root / "demo_buddhist_qa.json"
    env = _fresh_env(tmp_path)
    a = subprocess.run([KD, "plan", "--time", "--config", TINY, "--hardware", "h200",
                        f"dataset.source={tmp_path / 'absent.json'}", "--data", str(demo)],
                       capture_output=True, text=True, cwd=REPO, env=env)
    b = subprocess.run([KD, "plan", "--time", "--config", TINY, "--hardware", "h200", f"dataset.source={demo}"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    assert a.stdout == b.stdout
    n = len(json.loads(demo.read_text()))
    assert f"token counts: from {n - round(0.1 * n):,} training records of {demo}" in a.stdout, a.stdout


def test_offline_tokenizer_stands_in_only_for_qwen2_5(testbed, cache):
    cfg = load_config(TINY, ["tokenizer.path=/absent/vocab.json"])
    with pytest.raises(ConfigError, match="not a Qwen2.5 tokenizer"):
        jobtime.resolve_tokenizer(load_config(TINY, ["tokenizer._component_=torchtune.models.llama3.llama3_tokenizer",
                                                     "tokenizer.path=/absent/tokenizer.model"]))
    line = jobtime.resolve_tokenizer(cfg)
    assert line.startswith("tokens counted with: kd's offline Qwen2.5 tokenizer")
    assert "the config's /absent/vocab.json is absent" in line
    assert Path(cfg.tokenizer.path).is_file() and Path(cfg.tokenizer.merges_file).is_file()
    assert str(cache / "cache") in cfg.tokenizer.path
    # the config's own files when they are there
    assert jobtime.resolve_tokenizer(load_config(TINY, [])).endswith("(the config's)")


def _template_overhead_of_a_real_record(cfg):
    """Tokens the template and system prompt add to a record, measured independently: a real record through the
    config's own dataset builder, minus its question's and answer's own tokens."""
    from torchtune import config as tt_config

    tok = tt_config.instantiate(cfg.tokenizer)
    rec = {"instruction": "什么是般若", "input": "", "output": "般若是智慧。"}
    f = Path(os.environ["KD_CACHE_DIR"]) / "one.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps([rec] * 3, ensure_ascii=False))
    dcfg = cfg.dataset.copy()
    dcfg.source, dcfg.packed, dcfg.val_size = str(f), False, 0
    item = tt_config.instantiate(dcfg, tok)[0]
    q, a = (len(tok.encode(rec[k], add_bos=False, add_eos=False)) for k in ("instruction", "output"))
    n_loss = sum(1 for x in item["labels"] if x != -100)
    return len(item["tokens"]) - q - a, n_loss - a


def test_stated_distribution_means_are_the_stated_ones_plus_the_template(testbed, cache):
    cfg = load_config(TINY, ["dataset.source=/absent.json", "tokenizer.max_seq_len=100000"])
    st = jobtime.parse_lengths("records=3000,prompt=40:15,answer=300:200,seed=3")
    stats = jobtime.data_stats(cfg, lengths=st)
    ov, ov_loss = _template_overhead_of_a_real_record(cfg)
    assert ov > 10  # the system prompt and the chat template
    n_val = round(0.1 * 3000)  # the tiny config's val_size
    assert stats.samples == 3000 - n_val and stats.val_samples == n_val
    se = math.sqrt(15 ** 2 + 200 ** 2) / math.sqrt(stats.samples)
    assert abs(statistics.mean(stats.lengths) - (ov + 40 + 300)) < 4 * se, (statistics.mean(stats.lengths), ov)
    assert abs(statistics.mean(stats.answers) - (ov_loss + 300)) < 4 * 200 / math.sqrt(stats.samples)
    assert abs(statistics.stdev(stats.answers) - 200) < 0.15 * 200
    assert "from the stated distribution records=3000,prompt=40:15,answer=300:200,seed=3" in stats.source
    assert f"+ {ov} template and system-prompt tokens" in stats.source
    # seeded: the same again (from a fresh computation, not the cache)
    assert jobtime.stated_stats(cfg, st)[0] == stats.lengths


def test_stated_distribution_is_cut_at_max_seq_len(testbed, cache):
    cfg = load_config(TINY, ["dataset.source=/absent.json", "tokenizer.max_seq_len=256"])
    stats = jobtime.data_stats(cfg, lengths=jobtime.parse_lengths("records=500,prompt=30-60,answer=p50:200/p95:600"))
    assert stats.max_seq_len == 256 and max(stats.lengths) == 256 and min(stats.lengths) < 256
    assert all(0 <= a < n for n, a in zip(stats.lengths, stats.answers))


def test_quantile_and_uniform_forms_draw_what_they_state():
    rng = random.Random(0)
    q = jobtime._length_sampler("p50:400/p95:1500")
    xs = sorted(q(rng) for _ in range(40000))
    assert abs(xs[len(xs) // 2] - 400) < 0.03 * 400 and abs(xs[int(0.95 * len(xs))] - 1500) < 0.05 * 1500
    u = [jobtime._length_sampler("19-109")(rng) for _ in range(20000)]
    assert min(u) == 19 and max(u) == 109 and abs(statistics.mean(u) - 64) < 1
    m = [jobtime._length_sampler("420:300")(rng) for _ in range(40000)]
    assert abs(statistics.mean(m) - 420) < 4 * 300 / 200 and abs(statistics.stdev(m) - 300) < 0.05 * 300
    assert {jobtime._length_sampler("77")(rng) for _ in range(10)} == {77}


def test_data_stats_cache_key_changes_with_lengths(testbed, cache):
    cfg = load_config(TINY, ["dataset.source=/absent.json"])
    a, b = (jobtime.parse_lengths(f"records=200,prompt=30:10,answer={x}:50") for x in (100, 101))
    keys = {jobtime._cache_key(cfg), jobtime._cache_key(cfg, a.spec), jobtime._cache_key(cfg, b.spec)}
    assert len(keys) == 3
    sa, sb = jobtime.data_stats(cfg, lengths=a), jobtime.data_stats(cfg, lengths=b)
    assert sa.lengths != sb.lengths
    assert len(list((cache / "cache" / "jobtime").glob("*.json"))) == 2
    assert jobtime.data_stats(cfg, lengths=a).lengths == sa.lengths  # read back from the cache


def test_generate_config_plans_from_stated_lengths_without_model_files(tmp_path):
    """The generation config (plan A) needs neither /models nor the data file with --lengths."""
    p = subprocess.run([KD, "plan", "--time", "--config", "configs/qwen2_5/72B_generate.yaml", "--hardware", "h200",
                        "--lengths", "records=1000,prompt=19-109,answer=p50:400/p95:1500"],
                       capture_output=True, text=True, cwd=REPO, env=_fresh_env(tmp_path), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("tokens counted with: ") and lines[1].startswith("answer lengths: from the stated")
    assert "1,000 prompts" in p.stdout
