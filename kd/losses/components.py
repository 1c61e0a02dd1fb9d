"""Which loss components a KD config may name, and the check that they can run in its ``loss_form``.

A ``_component_`` in ``loss:`` / ``kd_loss:`` is instantiated exactly as written
(``torchtune.config.instantiate``) and that object computes the loss; nothing is remapped. What each form
can run:

===========  ===================================================  ================================================
loss_form    ``loss:`` (the CE term)                              ``kd_loss:`` (the divergence)
===========  ===================================================  ================================================
fused        ``kd.losses.distillation.FusedKDCELoss`` (CE + KD mix from        ``kd.losses.distillation.DistillationLoss``
             hidden states, never [N, V] logits)
chunked      ``kd.losses.distillation.ChunkedCrossEntropyLoss``,               ``kd.losses.distillation.DistillationLoss``,
             ``torchtune.modules.loss.CEWithChunkedOutputLoss``   torchtune's ``*WithChunkedOutputLoss`` KD losses
===========  ===================================================  ================================================

A component the form cannot run is a one-line :class:`~kd.core.config.ConfigError` that names the kd equivalent.
An absent section means the kd default of the form (first entry of each cell). torchtune's chunked losses named
with ``loss_form=fused`` run in the chunked form, with one log line (:func:`effective_loss_form`).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple

from omegaconf import DictConfig
from torchtune import config as tt_config

from kd.core.config import ConfigError, check_keys, to_container
from kd.losses.distillation import ChunkedCrossEntropyLoss, DistillationLoss, FusedKDCELoss

FUSED_CE = "kd.losses.distillation.FusedKDCELoss"
CHUNKED_CE = ("kd.losses.distillation.ChunkedCrossEntropyLoss", "torchtune.modules.loss.CEWithChunkedOutputLoss")
KD_LOSS = "kd.losses.distillation.DistillationLoss"
# torchtune's KD losses that take chunk lists (loss_form=chunked), and the kd.losses.distillation.DistillationLoss options
# that give the same per-token value (quoted when they are named with loss_form=fused)
TORCHTUNE_CHUNKED_KD = {
    "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss": "kind: forward_kl, soft_ce: true",
    "torchtune.modules.loss.ReverseKLWithChunkedOutputLoss": "kind: reverse_kl",
    "torchtune.modules.loss.SymmetricKLWithChunkedOutputLoss": None,  # no kd equivalent (sym_kd_ratio mix)
}
# torchtune's losses on whole [N, V] logits: neither form passes them whole logits
TORCHTUNE_WHOLE_LOGITS = {
    "torch.nn.CrossEntropyLoss": "the CE term",
    "torchtune.modules.loss.ForwardKLLoss": "kind: forward_kl, soft_ce: true",
    "torchtune.modules.loss.ReverseKLLoss": "kind: reverse_kl",
    "torchtune.modules.loss.SymmetricKLLoss": None,
}
LOSS_FORMS = ("fused", "chunked")


def _component(section: Optional[DictConfig]) -> Optional[str]:
    if section is None:
        return None
    comp = section.get("_component_", None) if isinstance(section, DictConfig) else None
    if not comp:
        raise ConfigError("the loss section must be a mapping with a '_component_' entry.")
    return str(comp)


def effective_loss_form(cfg: DictConfig, loss_form: str) -> Tuple[str, Optional[str]]:
    """The form the named components run in, and why when that is not ``loss_form``.

    A torchtune config names torchtune's chunked losses (``CEWithChunkedOutputLoss``, ``*KLWithChunkedOutputLoss``);
    they need materialised logits, so with ``loss_form=fused`` (the kd default) they run in the chunked form
    instead of being refused. Only a config naming losses of both forms, or losses neither form runs, is refused
    (by :func:`check_loss_components`)."""
    if loss_form != "fused":
        return loss_form, None
    try:
        ce, kd = _component(cfg.get("loss", None)), _component(cfg.get("kd_loss", None))
    except ConfigError:
        return loss_form, None
    needs_logits = [f"{k}._component_={c}" for k, c in (("loss", ce), ("kd_loss", kd))
                    if c in CHUNKED_CE or c in TORCHTUNE_CHUNKED_KD]
    chunked_ok = (ce is None or ce in CHUNKED_CE) and (kd is None or kd == KD_LOSS or kd in TORCHTUNE_CHUNKED_KD)
    if not needs_logits or not chunked_ok:
        return loss_form, None
    same = TORCHTUNE_CHUNKED_KD.get(kd or "", None)
    avoid = f"loss._component_={FUSED_CE} with kd_loss._component_={KD_LOSS}" + (f" ({same})" if same else "")
    return "chunked", (f"{' and '.join(needs_logits)} need materialised logits: running loss_form=chunked, which "
                       "materialises the student's and the teacher's [tokens, vocab] logits chunk by chunk (slower "
                       f"than the fused head, docs/benchmarks.md); {avoid} gives the same loss without them")


def check_loss_components(cfg: DictConfig, loss_form: str) -> Tuple[str, str]:
    """The ``_component_`` paths of ``loss`` and ``kd_loss`` that will run (the form's kd defaults where a
    section is absent); ConfigError for one the form cannot run. No object is built (``kd plan`` calls this)."""
    ce = _component(cfg.get("loss", None))
    kd = _component(cfg.get("kd_loss", None))
    fused = loss_form == "fused"
    if ce is None:
        ce = FUSED_CE if fused else CHUNKED_CE[0]
    elif fused and ce != FUSED_CE:
        raise ConfigError(
            f"loss._component_={ce} cannot run with loss_form=fused (it needs materialised logits): use "
            f"loss._component_={FUSED_CE} (the same CE, fused with the KD term)"
            + (", or set loss_form=chunked." if ce in CHUNKED_CE else "."))
    elif not fused and ce not in CHUNKED_CE:
        why = "it needs hidden states, not logits" if ce == FUSED_CE else "it is not a CE over chunked logits"
        raise ConfigError(
            f"loss._component_={ce} cannot run with loss_form=chunked ({why}): use one of {', '.join(CHUNKED_CE)}"
            + (", or set loss_form=fused." if ce == FUSED_CE else "."))
    if kd is None:
        kd = KD_LOSS
    elif kd != KD_LOSS:
        if kd in TORCHTUNE_CHUNKED_KD and not fused:
            return ce, kd
        same = TORCHTUNE_CHUNKED_KD.get(kd, TORCHTUNE_WHOLE_LOGITS.get(kd, ""))
        hint = f" with {same}" if same else ""
        why = "loss_form=fused (it needs materialised logits)" if kd in TORCHTUNE_CHUNKED_KD else \
            f"loss_form={loss_form} (it is not a KD loss over chunked or fused outputs)"
        raise ConfigError(
            f"kd_loss._component_={kd} cannot run with {why}: use kd_loss._component_={KD_LOSS}{hint}"
            + (" or loss_form=chunked." if kd in TORCHTUNE_CHUNKED_KD else "."))
    return ce, kd


def check_kd_loss(cfg: DictConfig, key: str = "kd_loss") -> None:
    """The one config check of kd's divergence (``kd_loss: kd.losses.distillation.DistillationLoss``): unknown
    options fail with "did you mean", bad values with the constructor's own check, one line naming the key.
    torchtune's losses are checked by instantiating them (:func:`build_losses`)."""
    section = cfg.get(key, None)
    if section is None or _component(section) != KD_LOSS:
        return
    params = [n for n in inspect.signature(DistillationLoss.__init__).parameters if n != "self"]
    check_keys(section, ["_component_", *params], where=f"'{key}'")
    try:
        DistillationLoss(**{k: v for k, v in to_container(section).items() if k != "_component_"})
    except ValueError as e:
        raise ConfigError(f"{key}.{e}.") from None


def _instantiate(section: Optional[DictConfig], default: Any, key: str) -> Any:
    if section is None:
        return default()
    if key == "kd_loss":
        check_kd_loss({key: section}, key)
    try:
        return tt_config.instantiate(section)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad {key} options: {e}") from None


def build_losses(cfg: DictConfig, loss_form: str) -> Tuple[Any, Any]:
    """``(ce_loss, kd_loss)`` objects, instantiated as ``loss:`` / ``kd_loss:`` name them (the form's kd
    defaults where a section is absent), after :func:`check_loss_components`."""
    ce_path, _ = check_loss_components(cfg, loss_form)
    ce_default = FusedKDCELoss if ce_path == FUSED_CE else ChunkedCrossEntropyLoss
    ce = _instantiate(cfg.get("loss", None), ce_default, "loss")
    kd = _instantiate(cfg.get("kd_loss", None), DistillationLoss, "kd_loss")
    if loss_form == "chunked":
        n_ce = getattr(ce, "num_output_chunks", None)
        n_kd = getattr(kd, "num_output_chunks", None)
        if n_ce is not None and n_kd is not None and n_ce != n_kd:
            raise ConfigError(
                f"loss.num_output_chunks={n_ce} and kd_loss.num_output_chunks={n_kd} differ: torchtune's chunked "
                "losses split the labels into that many chunks, so both must match the model's output chunks.")
    return ce, kd


def num_output_chunks(ce_loss: Any, kd_loss: Any, default: int = 8) -> int:
    """How many logit chunks the chunked form asks the models for: the torchtune loss's own
    ``num_output_chunks`` when one is named (its labels are split that way), else ``default``."""
    for obj in (ce_loss, kd_loss):
        n = getattr(obj, "num_output_chunks", None)
        if n is not None:
            return int(n)
    return default


def describe(ce_loss: Any, kd_loss: Any) -> Dict[str, str]:
    """The classes that run (logged at setup)."""
    return {k: f"{type(v).__module__}.{type(v).__qualname__}" for k, v in (("loss", ce_loss), ("kd_loss", kd_loss))}
