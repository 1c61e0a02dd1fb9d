"""Every shipped config runs what it names.

- every ``_component_`` in every file under configs/ resolves (as ``torchtune.config.instantiate`` resolves it)
  to an importable callable;
- every kd_lora config names loss components its ``loss_form`` can run (kd.losses.components), unchanged;
- the recipe's setup, run in-process on the tiny configs with ``torchtune.config.instantiate`` spied on,
  instantiates exactly the paths the config names for its model, tokenizer, dataset, optimizer, lr_scheduler,
  loss and kd_loss sections -- and the loss objects it then calls are of those classes;
- loss_form=chunked runs torchtune's own chunked CE and forward-KL losses as named (same numbers as kd's fused
  form with soft_ce=True), and the fused form refuses them with one line naming the kd equivalent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config as tt_config
from torchtune.config._utils import _get_component_from_path

from kd.core.config import ConfigError
from kd.losses import components as loss_components

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
SECTIONS = ("model", "teacher_model", "tokenizer", "dataset", "optimizer", "lr_scheduler", "loss", "kd_loss")


def _components(node: Any, where: str = "") -> List[tuple]:
    out = []
    if isinstance(node, dict):
        if "_component_" in node:
            out.append((where or "<root>", node["_component_"]))
        for k, v in node.items():
            out += _components(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _components(v, f"{where}[{i}]")
    return out


def _is_kd_lora(cfg: DictConfig) -> bool:
    return "optimizer" in cfg  # the training recipe's configs (KD, full, SFT); the others have none


def test_configs_found():
    assert len(CONFIGS) >= 10 and any("kd_lora" in p.name for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_component_resolves(path):
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    comps = _components(raw)
    for where, comp in comps:
        obj = _get_component_from_path(comp)
        assert callable(obj), f"{path.name}: {where}._component_={comp} is not callable"
    cfg = OmegaConf.load(path)
    if _is_kd_lora(cfg):
        assert comps, path
        form = cfg.get("loss_form", "fused")
        ce, kd = loss_components.check_loss_components(cfg, form)
        # what the config names is exactly what the checks accept (no remapping)
        for key, got in (("loss", ce), ("kd_loss", kd)):
            if cfg.get(key) is not None:
                assert got == cfg[key]["_component_"], (path.name, key)


def test_fused_form_refuses_torchtune_losses_with_the_kd_equivalent():
    base = {"loss_form": "fused"}
    cfg = OmegaConf.create({**base, "kd_loss": {"_component_": "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss"}})
    with pytest.raises(ConfigError) as e:
        loss_components.check_loss_components(cfg, "fused")
    msg = str(e.value)
    assert "\n" not in msg and "kd.losses.distillation.DistillationLoss" in msg and "soft_ce: true" in msg and "chunked" in msg
    cfg = OmegaConf.create({**base, "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"}})
    with pytest.raises(ConfigError, match="kd.losses.distillation.FusedKDCELoss"):
        loss_components.check_loss_components(cfg, "fused")
    cfg = OmegaConf.create({"loss": {"_component_": "kd.losses.distillation.FusedKDCELoss"}})
    with pytest.raises(ConfigError, match="ChunkedCrossEntropyLoss"):
        loss_components.check_loss_components(cfg, "chunked")
    # torchtune's chunked losses are accepted as written in the chunked form
    cfg = OmegaConf.create({"loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
                            "kd_loss": {"_component_": "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss"}})
    assert loss_components.check_loss_components(cfg, "chunked") == (
        "torchtune.modules.loss.CEWithChunkedOutputLoss", "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss")


def _setup(monkeypatch, testbed, tmp_path: Path, config: str, overrides=()):
    """KDLoRARecipe(cfg).setup(cfg) in this process, with every torchtune.config.instantiate call recorded."""
    from recipes.kd_lora import KDLoRARecipe

    monkeypatch.setenv("KD_TESTBED_DIR", str(testbed.root))
    cfg = OmegaConf.merge(OmegaConf.load(REPO / config),
                          OmegaConf.from_dotlist([f"output_dir={tmp_path}", "progress_bar=False"]))
    cfg = _override(cfg, overrides)
    seen: List[str] = []
    real = tt_config.instantiate

    def spy(section, *args, **kwargs):
        if isinstance(section, (DictConfig, dict)) and section.get("_component_"):
            seen.append(str(section.get("_component_")))
        return real(section, *args, **kwargs)

    monkeypatch.setattr(tt_config, "instantiate", spy)
    recipe = KDLoRARecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    return recipe, cfg, seen


def _override(cfg: DictConfig, overrides) -> DictConfig:
    """``key=value`` / ``~key`` / ``+key=value`` as ``tune run`` applies them."""
    for o in overrides:
        if o.startswith("~"):
            cfg.pop(o[1:])
        else:
            k, v = o.lstrip("+").split("=", 1)
            OmegaConf.update(cfg, k, OmegaConf.from_dotlist([f"x={v}"]).x, force_add=True)
    return cfg


def _named(cfg: DictConfig) -> Dict[str, List[str]]:
    out = {}
    for key in SECTIONS:
        sec = cfg.get(key, None)
        if sec is None:
            continue
        secs = list(sec) if isinstance(sec, ListConfig) else [sec]
        out[key] = [str(s["_component_"]) for s in secs]
    return out


def _path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# sft_lora.yaml's data is generated by the offline pipeline first; its SFT path (no teacher) is the third case
@pytest.mark.parametrize("config,overrides", [
    ("configs/tiny/kd_lora.yaml", ()), ("configs/tiny/kd_full.yaml", ()),
    ("configs/tiny/kd_lora.yaml", ("~teacher_model", "~teacher_checkpointer", "kd_ratio=0")),
], ids=["kd_lora", "kd_full", "sft"])
def test_recipe_setup_instantiates_what_the_config_names(monkeypatch, testbed, tmp_path, config, overrides):
    recipe, cfg, seen = _setup(monkeypatch, testbed, tmp_path, config, overrides)
    try:
        for key, paths in _named(cfg).items():
            for p in paths:
                assert p in seen, f"{config}: {key}._component_={p} was never instantiated (instantiated: {seen})"
        # and the loss objects the loss step calls are exactly those classes
        for key, obj in (("loss", recipe._ce_loss), ("kd_loss", recipe._kd_loss)):
            if cfg.get(key) is not None:
                assert _path(obj) == cfg[key]["_component_"], (config, key, _path(obj))
    finally:
        recipe.cleanup()


def test_chunked_form_runs_torchtune_losses_as_named(monkeypatch, testbed, tmp_path):
    """Stock torchtune losses in loss_form=chunked: the objects are torchtune's, and their numbers (means times
    the token count) equal kd's fused form with the same objective (forward KL as soft CE)."""
    stock = ["loss_form=chunked", "loss._component_=torchtune.modules.loss.CEWithChunkedOutputLoss",
             "~kd_loss", "+kd_loss._component_=torchtune.modules.loss.ForwardKLWithChunkedOutputLoss"]
    r1, _, seen = _setup(monkeypatch, testbed, tmp_path / "stock", "configs/tiny/kd_lora.yaml", stock)
    try:
        assert "torchtune.modules.loss.CEWithChunkedOutputLoss" in seen
        assert "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss" in seen
        assert _path(r1._kd_loss) == "torchtune.modules.loss.kd_losses.ForwardKLWithChunkedOutputLoss"
        batch = next(iter(r1._train_loader))
        a = r1._loss_step(batch, 0.5)
    finally:
        r1.cleanup()
    r2, _, _ = _setup(monkeypatch, testbed, tmp_path / "fused", "configs/tiny/kd_lora.yaml",
                      ["+kd_loss.soft_ce=True"])
    try:
        b = r2._loss_step(batch, 0.5)
    finally:
        r2.cleanup()
    assert int(a.n_valid) == int(b.n_valid) > 0
    for k in ("loss_sum", "ce_sum", "kd_sum", "kl_sum"):
        assert float(getattr(a, k).detach()) == pytest.approx(float(getattr(b, k).detach()), rel=1e-4), k
    assert int(a.n_agree) == int(b.n_agree)
    assert a.loss_sum.requires_grad
