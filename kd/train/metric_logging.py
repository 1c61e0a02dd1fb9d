"""Metric-logger defaults for air-gapped nodes.

``torchtune.training.metric_logging.WandBLogger`` calls ``wandb.init``, which (without a mode) tries to reach
wandb.ai and, on a node without internet, waits on the network before giving up. Unless the user chose a mode
(the logger's ``mode`` key, or ``WANDB_MODE`` in the environment), kd runs WandB **offline**: runs are written
under the log dir and can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

WANDB_COMPONENTS = ("torchtune.training.metric_logging.WandBLogger", "torchtune.utils.metric_logging.WandBLogger")


def kd_logging_cfg(section: DictConfig) -> DictConfig:
    """``section`` with ``mode: offline`` added for WandB when neither the config nor ``WANDB_MODE`` set one."""
    if section is None or str(section.get("_component_", "")) not in WANDB_COMPONENTS:
        return section
    if "mode" in section or os.environ.get("WANDB_MODE"):
        return section
    return OmegaConf.merge(section, {"mode": "offline"})
