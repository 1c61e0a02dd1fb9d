"""State-dict helpers shared by model loading (:mod:`kd.train.models`), adapter I/O (:mod:`kd.train.adapter_io`), the
merged export (:mod:`kd.train.hf_export`) and the full fine-tune checkpoints (:mod:`kd.train.full`). Imports only torch."""

from __future__ import annotations

import torch

__all__ = ["strip_wrappers", "full_cpu"]

# prefixes added by activation checkpointing / torch.compile / FSDP1 wrappers
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.", "module.")


def strip_wrappers(key: str) -> str:
    """A parameter name without the prefixes wrappers add: ``layers.0._checkpoint_wrapped_module.attn.q_proj.weight``
    -> ``layers.0.attn.q_proj.weight`` (the name in the checkpoint)."""
    for p in _WRAPPER_PREFIXES:
        key = key.replace(p, "")
    return key


def full_cpu(t: torch.Tensor) -> torch.Tensor:
    """Full (unsharded) detached CPU copy. ``full_tensor`` is a collective for DTensors: every rank must call it."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone()
    return t.to("cpu")
