"""Offline distillation: mixed SFT data (fraction honoured, deterministic), SFT through the KD recipe,
evaluation report (distilled student closer to the teacher than the base), export round trip via transformers."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from kd.data.offline import choose_targets, mixed_sft_dataset
from kd.generate.generation import merge_results

REPO = Path(__file__).resolve().parents[1]


def _merged(testbed, out: Path, *, teacher_prefix="T", flags=True) -> Path:
    """A merged teacher file from the demo data: teacher answer = '<prefix>' + original (ids 3 and 5 flagged)."""
    from kd.data.alpaca import load_alpaca_records

    recs, _ = load_alpaca_records(testbed.data_json)
    res = {i: {"id": i, "output": f"{teacher_prefix}{r['output']}" if teacher_prefix else r["output"], "finish": "stop"}
           for i, r in recs.items()}
    if flags:
        res[3]["finish"] = "length"
        res[5]["output"] = ""
    return merge_results(recs, res, out, dataset_name="merged")


def _env(testbed):
    return dict(os.environ, KD_TESTBED_DIR=str(testbed.root), OMP_NUM_THREADS="1")


def _tune(testbed, recipe, config, *overrides):
    cmd = ["tune", "run", recipe, "--config", config, *overrides]
    r = subprocess.run(cmd, cwd=REPO, env=_env(testbed), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_choose_targets_fraction_and_seed():
    ids = list(range(1000))
    a = choose_targets(ids, 0.7, seed=0)
    assert sum(v == "teacher" for v in a.values()) == 700
    assert a == choose_targets(list(reversed(ids)), 0.7, seed=0)  # order-independent
    b = choose_targets(ids, 0.7, seed=1)
    assert a != b and sum(v == "teacher" for v in b.values()) == 700
    assert all(v == "original" for v in choose_targets(ids, 0.0, 0).values())
    c = choose_targets(ids, 1.0, 0, usable={7: False})
    assert c[7] == "original" and sum(v == "teacher" for v in c.values()) == 999


def test_mixed_sft_dataset(testbed, tiny_tokenizer, tmp_path):
    src = _merged(testbed, tmp_path)
    tr = mixed_sft_dataset(tiny_tokenizer, str(src), teacher_fraction=0.7, seed=0, split="train", val_size=0.1)
    va = mixed_sft_dataset(tiny_tokenizer, str(src), teacher_fraction=0.7, seed=0, split="val", val_size=0.1)
    assert len(tr) == 108 and len(va) == 12 and not set(tr.ids) & set(va.ids)
    n_teacher = sum(v == "teacher" for v in tr.choice.values())
    expected = round(0.7 * len(tr))
    # exactly round(0.7 n) candidates; the two unusable answers (ids 3: truncated, 5: empty) may drop out
    assert expected - 2 <= n_teacher <= expected
    assert tr.choice.get(3, "original") == "original" and tr.choice.get(5, "original") == "original"
    again = mixed_sft_dataset(tiny_tokenizer, str(src), teacher_fraction=0.7, seed=0, split="train", val_size=0.1)
    assert again.choice == tr.choice
    # the target of each item is the chosen one ("T" prefix = teacher answer)
    for i in range(0, len(tr), 9):
        item = tr[i]
        ans = tiny_tokenizer.decode([t for t in item["labels"] if t != -100], skip_special_tokens=True)
        assert ans.startswith("T") == (tr.choice[item["sample_id"]] == "teacher"), ans
    with pytest.raises(ValueError, match="original_output"):
        mixed_sft_dataset(tiny_tokenizer, str(testbed.data_json))


def test_sft_run_through_kd_recipe(testbed, tmp_path):
    src = _merged(testbed, tmp_path)
    out = tmp_path / "sft"
    _tune(testbed, "recipes/kd_lora.py", "configs/tiny/sft_lora.yaml", f"dataset.source={src}",
              f"output_dir={out}", "max_steps_per_epoch=6", "eval_every_n_steps=3", "save_every_n_steps=null",
              "progress_bar=False")
    assert (out / "checkpoints" / "step_0000006" / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x["kind"] == "train"]
    assert len(train) == 6 and all(x["kd_loss"] == 0 for x in train)
    assert any(x["kind"] == "val" for x in rows)


@pytest.fixture(scope="module")
def kd_adapter(testbed, tmp_path_factory):
    """A distilled adapter: a short online-KD run with kd_ratio=1 (pure distillation)."""
    out = tmp_path_factory.mktemp("kd") / "run"
    _tune(testbed, "recipes/kd_lora.py", "configs/tiny/kd_lora.yaml", f"output_dir={out}", "kd_ratio=1", "epochs=2",
          "max_steps_per_epoch=20", "save_every_n_steps=null", "eval_every_n_steps=null", "progress_bar=False")
    steps = sorted((out / "checkpoints").glob("step_*"))
    assert steps, "the KD run wrote no checkpoint"
    return steps[-1] / "adapter"


def test_evaluate_report(testbed, kd_adapter, tmp_path):
    src = _merged(testbed, tmp_path, teacher_prefix="", flags=False)
    out = tmp_path / "eval"
    _tune(testbed, "recipes/evaluate.py", "configs/tiny/evaluate.yaml", f"output_dir={out}",
          f"dataset.source={src}", f"adapters.distilled={kd_adapter}", "max_new_tokens=16")
    m = json.loads((out / "eval_metrics.json").read_text())["metrics"]
    assert set(m) == {"base", "distilled", "teacher"}
    assert m["teacher"]["kl"] == pytest.approx(0.0, abs=1e-5) and m["teacher"]["top1"] == 1.0
    assert m["distilled"]["kl"] < 0.95 * m["base"]["kl"]
    assert m["distilled"]["top1"] > m["base"]["top1"]
    assert m["distilled"]["ce_teacher"] < m["base"]["ce_teacher"]
    # (the test-bed teacher is trained on the train split only: its held-out CE is not asserted)
    assert m["distilled"]["ce_original"] < m["base"]["ce_original"]
    assert all(math.isfinite(v) for mm in m.values() for v in mm.values())
    rep = (out / "eval_report.md").read_text()
    assert "| distilled |" in rep and "四圣谛" in rep and "金刚经" in rep and rep.count("**teacher**") == 5
    # the pictures: next to the report, embedded in it, drawn from this run's data
    full = json.loads((out / "eval_metrics.json").read_text())
    assert full["figures"] == ["eval_curves.png", "eval_heldout.png", "eval_lengths.png"]
    for f in full["figures"]:
        assert (out / f).read_bytes()[:4] == b"\x89PNG" and f"]({f})" in rep
    n_len = min(16, full["n_samples"])
    assert {k: len(v) for k, v in full["answer_lengths"].items()} == {"base": n_len, "distilled": n_len,
                                                                        "teacher": n_len}
    assert all(0 <= x <= 16 for v in full["answer_lengths"].values() for x in v)


def test_export_round_trip_transformers(testbed, kd_adapter, tmp_path):
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from kd.train.models import build_on_meta, load_adapter_dir, load_hf_into_model

    out = tmp_path / "export"
    _tune(testbed, "recipes/export.py", "configs/tiny/export.yaml", f"output_dir={out}", f"adapter_dir={kd_adapter}")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "model.safetensors.index.json").is_file()
    cfg = OmegaConf.load(REPO / "configs" / "tiny" / "export.yaml")
    tune = build_on_meta(cfg.model, torch.float32)
    load_hf_into_model(tune, testbed.student_dir, device=torch.device("cpu"), dtype=torch.float32)
    load_adapter_dir(tune, kd_adapter, cfg.model)
    tune.eval()
    hf = AutoModelForCausalLM.from_pretrained(str(out / "merged"), torch_dtype=torch.float32).eval()
    tok = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = tune(tok).float()
        b = hf(tok).logits.float()
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_generate_teacher_old_quantization_key_is_a_clear_error():
    from omegaconf import OmegaConf

    from kd.core.config import ConfigError
    from recipes.generate_teacher import _settings

    cfg = OmegaConf.load(REPO / "configs" / "tiny" / "generate.yaml")
    cfg.quantization = "nf4"
    with pytest.raises(ConfigError, match="'quantization' is now 'teacher_quantization'"):
        _settings(cfg)
