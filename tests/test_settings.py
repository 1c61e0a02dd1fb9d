"""kd.train.settings: a kd_lora config is checked and parsed once; the recipe and `kd plan` reject the same values
with the same line; the teacher cache's key records the precision that runs."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from kd.core.config import ConfigError
from kd.core.layout import RunLayout
from kd.ops import cli
from kd.ops.preflight import load_config
from kd.train.cli_util import one_line
from kd.train.settings import kd_lora_settings

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "configs" / "tiny" / "kd_lora.yaml")

BAD = [
    ("teacher_cache={mode: bogus}", "teacher_cache.mode"),
    ("teacher_cache={mode: use, kk: 3}", "did you mean 'k'"),
    ("teacher_cache={mode: use, k: 0}", "teacher_cache.k"),
    ("kd_ratio=1.5", "kd_ratio"),
    ("kd_ratio=high", "kd_ratio"),
    ("teacher_quantization=nf5", "did you mean 'nf4'"),
    ("kd_loss.kind=forward_kll", "did you mean 'forward_kl'"),
    ("kd_loss.temperature=0", "kd_loss.temperature"),
    ("kd_loss.kindd=jsd", "did you mean 'kind'"),
    ("loss._component_=kd.losses.distillation.CrossEntropyLos", "loss._component_"),
    ("kd_loss._component_=torchtune.modules.loss.ForwardKLLoss", "kd_loss._component_"),
    ("kd_ration=0.7", "did you mean 'kd_ratio'"),
    ("on_policy={lmbda: 2}", "lmbda"),
]


def _recipe_module():
    spec = importlib.util.spec_from_file_location("_kd_lora_recipe_under_test", REPO / "recipes" / "kd_lora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recipe():
    return _recipe_module()


def _plan_error(override: str, capsys) -> str:
    capsys.readouterr()
    rc = cli.main(["plan", "--config", CFG, override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    prefix = "kd plan: error: "
    assert err[0].startswith(prefix), err
    return err[0][len(prefix):]


@pytest.mark.parametrize("override,expect", BAD, ids=[b[0] for b in BAD])
def test_plan_rejects_what_the_recipe_rejects_with_the_same_line(override, expect, recipe, capsys):
    with pytest.raises(ConfigError) as e:
        recipe.KDLoRARecipe(load_config(CFG, [override]))  # the recipe's first act: kd_lora_settings(cfg)
    from_recipe = one_line(e.value)
    assert expect in from_recipe, from_recipe
    assert _plan_error(override, capsys) == from_recipe


def test_good_config_parses_into_frozen_settings():
    st = kd_lora_settings(load_config(CFG, ["teacher_cache={mode: online_then_cache}"]))
    assert st.layout == RunLayout(Path("outputs/tiny_kd_lora"))
    assert st.layout.checkpoints.name == "checkpoints" and st.layout.metrics.name == "metrics.jsonl"
    assert st.cache.mode == "online_then_cache" and st.cache.k == 12 and st.cache.dir == st.layout.teacher_cache
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.kd_ratio = 0.1


def test_cache_key_uses_the_resolved_precision(monkeypatch):
    from kd.cache import session
    from kd.teacher import precision

    monkeypatch.setattr(session, "checkpoint_fingerprint", lambda *a, **k: "teacher")
    monkeypatch.setattr(session, "tokenizer_fingerprint", lambda *a, **k: "tok")
    monkeypatch.setattr(session, "template_fingerprint", lambda *a, **k: "tpl")

    def key(q):
        cfg = load_config(CFG, ["teacher_cache={mode: online_then_cache}", f"teacher_quantization={q}"])
        st = kd_lora_settings(cfg).resolve_teacher("cpu", torch.float32)
        return session.make_key(cfg, st, temperature=1.0, tokenizer=None, dataset=object())

    assert key("null") == key("bf16") and key("bf16").precision == "bf16/fp32"
    assert key("nf4_fp8").precision == "nf4_fp8/fp32"
    # a device without FP8: nf4_fp8 falls back to nf4, and the key says nf4 (the numerics that wrote the cache)
    spec = precision.REGISTRY["nf4_fp8"]
    monkeypatch.setitem(precision.REGISTRY, "nf4_fp8",
                        dataclasses.replace(spec, probe=lambda device, dtype: (None, "no FP8 here")))
    assert key("nf4_fp8").precision == "nf4/fp32" == key("nf4").precision


def test_precision_key_needs_the_device():
    st = kd_lora_settings(load_config(CFG, []))
    with pytest.raises(RuntimeError):
        st.precision_key
