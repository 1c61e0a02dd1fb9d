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

from kd.core.config import ConfigError, DataError
from kd.core.errors import CheckpointError
from kd.train.guard import NonFiniteError


def user_error_types() -> tuple:
    return (ConfigError, DataError, CheckpointError, NonFiniteError)


def one_line(e: BaseException) -> str:
    """The message of a user error on one line (multi-line messages are joined with '; ')."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return "; ".join(lines) if lines else type(e).__name__


def _config_path_from_argv(argv) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def load_yaml_file(path: str):
    """OmegaConf.load with one-line errors naming the file (missing file, YAML syntax error, not a mapping)."""
    import os as _os

    from omegaconf import OmegaConf

    if not _os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (paths are relative to {_os.getcwd()}).")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError, UnicodeDecodeError, ...
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path!r} is not valid YAML{where}: {problem}.") from None
    if not hasattr(cfg, "keys"):
        raise ConfigError(f"config file {path!r} must be a YAML mapping of key: value, got {type(cfg).__name__}.")
    if len(cfg) == 0:
        raise ConfigError(f"config file {path!r} is empty (no key: value lines); start from one of the shipped "
                          "configs in configs/ (each config's header gives its command).")
    return cfg


def parse_config() -> DictConfig:
    """``--config <yaml> key=value ~key`` from ``sys.argv`` (the recipe side of ``tune run``)."""
    from torchtune.config._parse import TuneRecipeArgumentParser

    path = _config_path_from_argv(sys.argv[1:])
    if path is not None:
        load_yaml_file(path)  # missing file / YAML syntax errors as one line naming the file
    parser = TuneRecipeArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter)
    yaml_args, cli_args = parser.parse_known_args()
    from omegaconf import OmegaConf

    cfg = merge_overrides(OmegaConf.create(vars(yaml_args)), cli_args)
    try:
        OmegaConf.to_container(cfg, resolve=True)  # an unresolvable ${...} fails now, as one line
    except Exception as e:
        raise ConfigError(f"cannot resolve the config {path!r}: {one_line(e)}") from None
    return cfg


def merge_overrides(yaml_cfg, cli_args) -> DictConfig:
    """Apply ``~key`` removals, then ``key=value`` overrides, to a loaded YAML config (``tune run``'s order).
    Shared by the recipes, ``kd plan`` and ``kd preflight`` so all of them read a command line the same way."""
    from omegaconf import OmegaConf
    from torchtune.config._utils import _merge_yaml_and_cli_args

    bad = [a for a in cli_args if "=" not in a and not a.startswith("~")]
    if bad:
        raise ConfigError(f"overrides must look like key=value or ~key, got: {' '.join(bad)}")
    # `~key` removals are applied to the YAML before the key=value overrides (so `~a a=1` sets a): torchtune
    # 0.6.1 cannot remove a whole section (e.g. ~teacher_model) and reports any failure with a traceback.
    removals = [a[1:].split("=")[0] for a in cli_args if a.startswith("~")]
    overrides = [a for a in cli_args if not a.startswith("~")]
    for dotpath in removals:
        *parents, leaf = dotpath.split(".")
        node = yaml_cfg
        for p in parents:
            node = node.get(p) if hasattr(node, "get") else None
        if node is None or not hasattr(node, "keys") or leaf not in node:
            raise ConfigError(f"~{dotpath}: there is no key '{dotpath}' in the config to remove.")
        del node[leaf]
    # `section=null` (e.g. teacher_model=null, the README's LoRA SFT form): torchtune reads `section=value` as
    # section._component_=value, which leaves a section without a component; set the whole section to null instead
    nulls = [a.split("=", 1)[0] for a in overrides if _is_null(a.split("=", 1)[1]) and _is_section(yaml_cfg, a)]
    overrides = [a for a in overrides if a.split("=", 1)[0] not in nulls]
    try:
        cfg = _merge_yaml_and_cli_args(
            argparse.Namespace(**OmegaConf.to_container(yaml_cfg, resolve=False)), overrides
        )
    except Exception as e:  # ValueError, yaml's ParserError for a value such as `key=...`: a user mistake
        msg = " ".join(str(e).split())
        raise ConfigError(f"bad command-line override ({' '.join(overrides)}): {msg}") from None
    for key in nulls:
        OmegaConf.update(cfg, key, None, merge=False)
    return cfg


def _is_null(value: str) -> bool:
    return value.strip().lower() in ("null", "none", "~")


def _is_section(cfg, override: str) -> bool:
    node = cfg
    for p in override.split("=", 1)[0].split("."):
        node = node.get(p) if hasattr(node, "keys") else None
    return hasattr(node, "keys")


def _finish_wandb() -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish(exit_code=2, quiet=True)
        except Exception:
            pass


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
        _finish_wandb()  # its exit summary would otherwise print after (and bury) the error line
        rank = os.environ.get("RANK", "0")
        print(f"\nkd: error (rank {rank}): {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkd: interrupted; resume with resume_from_checkpoint=True", file=sys.stderr)
        return 130
    return 0
