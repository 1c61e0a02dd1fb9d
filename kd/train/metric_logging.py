"""Metric-logger defaults for air-gapped nodes, and :class:`NamedVector` (named metrics in one all-reduce).

``torchtune.training.metric_logging.WandBLogger`` calls ``wandb.init``, which (without a mode) tries to reach
wandb.ai and, on a node without internet, waits on the network before giving up. Unless the user chose a mode
(the logger's ``mode`` key, or ``WANDB_MODE`` in the environment), kd runs WandB **offline**: runs are written
under the log dir and can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import os
from typing import Dict

import torch
from omegaconf import DictConfig, OmegaConf

WANDB_COMPONENTS = ("torchtune.training.metric_logging.WandBLogger", "torchtune.utils.metric_logging.WandBLogger")


def kd_logging_cfg(section: DictConfig) -> DictConfig:
    """``section`` with ``mode: offline`` added for WandB when neither the config nor ``WANDB_MODE`` set one."""
    if section is None or str(section.get("_component_", "")) not in WANDB_COMPONENTS:
        return section
    if "mode" in section or os.environ.get("WANDB_MODE"):
        return section
    return OmegaConf.merge(section, {"mode": "offline"})


class NamedVector:
    """Named 1-D float tensors packed into one vector, so one all-reduce carries them all, and read back by
    name (no caller slices by position): ``v = NamedVector(metrics=sums, guard=flags, stop=t)``;
    ``parts = v.unpack(all_reduce_sum(v.vector))``; ``parts["stop"]``."""

    def __init__(self, **parts: torch.Tensor):
        self.sizes = {k: int(t.numel()) for k, t in parts.items()}
        self.vector = torch.cat([t.reshape(-1).to(torch.float32) for t in parts.values()])

    def unpack(self, vector: torch.Tensor) -> Dict[str, torch.Tensor]:
        return dict(zip(self.sizes, torch.split(vector, list(self.sizes.values()))))
