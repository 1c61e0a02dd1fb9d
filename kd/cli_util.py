"""Shared entry-point plumbing for the recipes: config parsing and user-facing errors.

torchtune's ``config.parse`` is used for ``--config <yaml> key=value ~key`` handling. Mistakes a user can
fix (bad config, missing/mismatched checkpoint, bad data) end with a one-paragraph message and exit
code 2 instead of a stack trace from deep inside torch; ``KD_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

from omegaconf import DictConfig


def user_error_types() -> tuple:
    from kd.checkpoint import CheckpointError as SaveError
    from kd.config import ConfigError, DataError
    from kd.models import CheckpointError

    return (ConfigError, DataError, CheckpointError, SaveError)


def parse_config() -> DictConfig:
    from omegaconf import OmegaConf
    from torchtune.config._parse import TuneRecipeArgumentParser
    from torchtune.config._utils import _merge_yaml_and_cli_args

    from kd.config import ConfigError

    parser = TuneRecipeArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter)
    yaml_args, cli_args = parser.parse_known_args()
    bad = [a for a in cli_args if "=" not in a and not a.startswith("~")]
    if bad:
        raise ConfigError(f"overrides must look like key=value or ~key, got: {' '.join(bad)}")
    # `~key` removals are applied to the YAML before the key=value overrides (so `~a a=1` sets a): torchtune
    # 0.6.1 cannot remove a whole section (e.g. ~teacher_model) and reports any failure with a traceback.
    removals = [a[1:].split("=")[0] for a in cli_args if a.startswith("~")]
    overrides = [a for a in cli_args if not a.startswith("~")]
    yaml_cfg = OmegaConf.create(vars(yaml_args))
    for dotpath in removals:
        *parents, leaf = dotpath.split(".")
        node = yaml_cfg
        for p in parents:
            node = node.get(p) if hasattr(node, "get") else None
        if node is None or not hasattr(node, "keys") or leaf not in node:
            raise ConfigError(f"~{dotpath}: there is no key '{dotpath}' in the config to remove.")
        del node[leaf]
    try:
        cfg = _merge_yaml_and_cli_args(
            argparse.Namespace(**OmegaConf.to_container(yaml_cfg, resolve=False)), overrides
        )
    except ValueError as e:
        raise ConfigError(f"bad command-line override: {e}") from None
    return cfg


def run_recipe(recipe_main: Callable[[DictConfig], None]) -> int:
    """Parse the config and run ``recipe_main``; turn user errors into a clear message (exit 2)."""
    import logging
    import warnings

    logging.getLogger("torchao").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    try:
        cfg = parse_config()
        recipe_main(cfg)
    except user_error_types() as e:
        if os.environ.get("KD_DEBUG"):
            traceback.print_exc()
        rank = os.environ.get("RANK", "0")
        print(f"\nkd: error (rank {rank}): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkd: interrupted; resume with resume_from_checkpoint=True", file=sys.stderr)
        return 130
    return 0
