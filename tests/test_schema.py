"""kd.ops.schema: the one table of keys per recipe, the "did you mean" derived from it, and the generated docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kd.core.config import ConfigError
from kd.ops import schema

REPO = Path(__file__).resolve().parents[1]


def test_docs_key_table_is_up_to_date():
    doc = REPO / "docs" / "config_keys.md"
    assert doc.read_text(encoding="utf-8") == schema.markdown(), (
        "docs/config_keys.md is stale: run `python -m kd.ops.schema --write`")


def test_every_key_the_kd_recipe_reads_is_in_its_schema():
    """A key read by recipes/kd_lora.py but missing from the table would be rejected as unknown (and
    undocumented); a table key nothing reads would be accepted and ignored."""
    src = (REPO / "recipes" / "kd_lora.py").read_text()
    read = set(re.findall(r'cfg\.get\("([a-z_]+)"', src)) | set(re.findall(r'SCHEMA\.get\((?:self\._)?cfg, "([a-z_]+)"', src))
    read |= set(re.findall(r"\bcfg\.([a-z_]+)\b", src)) - {"get"}
    assert read - schema.KD_LORA.names == set()
    everywhere = "".join(p.read_text() for p in [*REPO.glob("recipes/*.py"), *REPO.glob("kd/**/*.py")]
                         if p.name != "schema.py")
    unread = {k for k in schema.KD_LORA.names if f'"{k}"' not in everywhere and f".{k}" not in everywhere}
    assert unread == set()


def test_unknown_key_did_you_mean_and_values_come_from_the_table():
    cfg = OmegaConf.create({"kd_ration": 0.7, "output_dir": "x"})
    with pytest.raises(ConfigError, match="did you mean 'kd_ratio'"):
        schema.KD_LORA.check(cfg)
    cfg = OmegaConf.create({})
    assert schema.KD_LORA.get(cfg, "kd_ratio") == 0.5 and schema.KD_LORA.get(cfg, "fused_chunk_size") == 1024
    with pytest.raises(ConfigError, match=r"kd_ratio must be <= 1.0, got 1.5"):
        schema.KD_LORA.get(OmegaConf.create({"kd_ratio": 1.5}), "kd_ratio")
    with pytest.raises(ConfigError, match="'loss_form' must be one of"):
        schema.KD_LORA.get(OmegaConf.create({"loss_form": "fast"}), "loss_form")
    with pytest.raises(ConfigError, match="batch_size"):
        schema.KD_LORA.get(OmegaConf.create({"batch_size": 0}), "batch_size")


def test_other_recipes_take_their_keys_from_the_table():
    import recipes.evaluate as ev
    import recipes.export as ex
    import recipes.generate_teacher as gen

    assert ev.KEYS == schema.EVALUATE.names and ex.KEYS == schema.EXPORT.names
    assert gen.KEYS == schema.GENERATE_TEACHER.names
