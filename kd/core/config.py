"""Config validation for the kd recipes.

torchtune's ``config.parse`` accepts any key, so a typo such as ``kd_ration=0.7`` or ``batchsize: 4``
silently trains with the default. Every recipe here declares the top-level keys it reads; anything
else fails before a model is built, with a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping, Optional, Set

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A user-facing configuration mistake (unknown key, bad value, missing section)."""


class DataError(ValueError):
    """A user-facing data problem (missing file, bad record), raised before training starts."""


def suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_INTERP_RE = re.compile(r"\$\{\s*([A-Za-z_][\w-]*)\s*[.\[}]")


def interpolation_sources(cfg: Any) -> Set[str]:
    """Top-level names referenced by OmegaConf interpolations (``${model_root}/x``, ``${paths.data}``)
    anywhere in the (unresolved) config. Resolver calls (``${oc.env:X}``) are not names; their
    arguments are scanned (``${oc.env:X,${root}}`` references ``root``)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    found: Set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, str) and "${" in x:
            for m in _INTERP_RE.finditer(x):
                end = m.end() - 1
                if x[end] == "." and re.match(r"[\w-]+\s*:", x[end + 1:]):
                    continue  # a resolver such as ${oc.env:...}
                found.add(m.group(1))

    walk(cfg)
    return found


def check_keys(
    cfg: Mapping[str, Any] | DictConfig,
    known: Iterable[str],
    *,
    where: str = "config",
    required: Iterable[str] = (),
) -> None:
    """Raise :class:`ConfigError` for keys of ``cfg`` not in ``known`` and for missing ``required`` keys.

    At the top level of a config, a key that is only used as an interpolation source (``model_root: /models``
    with ``${model_root}/Qwen2.5-7B-Instruct`` elsewhere, as torchtune users write) is accepted; an unknown
    key that nothing references is still rejected with a suggestion."""
    known = set(known)
    keys = list(cfg.keys())
    unknown = [k for k in keys if k not in known]
    if unknown and isinstance(cfg, DictConfig) and cfg._get_parent() is None:
        sources = interpolation_sources(cfg)
        unknown = [k for k in unknown if k not in sources]
    if unknown:
        items = ", ".join(f"'{k}'{suggest(str(k), known)}" for k in unknown)
        raise ConfigError(
            f"Unknown key(s) in {where}: {items}. Remove the key (or use '~key' on the command line) or fix "
            f"its spelling. Valid keys are: {', '.join(sorted(known))}."
        )
    missing = [k for k in required if k not in cfg or cfg[k] is None]
    if missing:
        raise ConfigError(f"Missing required key(s) in {where}: {', '.join(missing)}.")


def require_component(cfg: DictConfig, key: str) -> DictConfig:
    """Return section ``key`` and check it has a ``_component_``."""
    section = cfg.get(key)
    if section is None:
        raise ConfigError(f"Config section '{key}' is missing.")
    if not isinstance(section, DictConfig) or "_component_" not in section:
        raise ConfigError(
            f"Config section '{key}' must be a mapping with a '_component_' entry "
            f"(e.g. '{key}._component_=torchtune.models.qwen2_5.lora_qwen2_5_7b_instruct')."
        )
    return section


def choice(cfg: DictConfig, key: str, options: Iterable[Any], default: Any, *, name: Optional[str] = None) -> Any:
    """Read ``cfg[key]`` (or ``default``) and check it is one of ``options`` (``name``: how to call the key in the
    message, e.g. ``teacher_cache.mode``)."""
    options = list(options)
    value = cfg.get(key, default)
    if value not in options:
        raise ConfigError(f"'{name or key}' must be one of {options}, got {value!r}{suggest(str(value), map(str, options))}.")
    return value


def number(
    cfg: DictConfig,
    key: str,
    default: Any,
    *,
    kind: type = float,
    min_value: Optional[float] = None,
    max_value: Optional[float] = None,
    allow_none: bool = False,
    name: Optional[str] = None,
) -> Any:
    """Read a numeric key with range checks and a clear message (``name``: how to call the key in it,
    e.g. ``tokenizer.max_seq_len`` for a nested section)."""
    name = name or key
    value = cfg.get(key, default)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"'{name}' must be a{'n' if kind is int else ''} {'integer' if kind is int else 'number'}, got {value!r}.")
    if kind is int and not float(value).is_integer():
        raise ConfigError(f"'{name}' must be an integer, got {value!r}.")
    value = kind(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"'{name}' must be a finite number, got {value}.")
    if min_value is not None and value < min_value:
        raise ConfigError(f"'{name}' must be >= {min_value}, got {value}.")
    if max_value is not None and value > max_value:
        raise ConfigError(f"'{name}' must be <= {max_value}, got {value}.")
    return value


def to_container(section: Any) -> Any:
    if isinstance(section, (DictConfig, ListConfig)):
        return OmegaConf.to_container(section, resolve=True)
    return section


AC_MODES = ("none", "full", "selective")


def activation_checkpoint_layers(cfg: Mapping[str, Any] | DictConfig, num_layers: int) -> list:
    """Indices of the student's decoder layers whose activations are checkpointed (recomputed in backward).

    The keys are torchtune's own (its distributed recipes read them, ``torchtune.training.activations``):

    - ``enable_activation_checkpointing: True`` with no ``ac_mode``: every layer (torchtune's default);
    - ``ac_mode: full``: every layer; ``ac_mode: none``: no layer;
    - ``ac_mode: selective`` + ``ac_option: x`` (int >= 1): every x-th layer, counted from 1 as torchtune does
      (layers x-1, 2x-1, ...; 28 layers and x=3 -> 9 layers). torchtune applies ``selective`` only with
      ``enable_activation_checkpointing: False``; here the combination with True is an error instead of being
      silently ignored. torchtune's ``ac_option: op`` (per-op selective AC) is not supported.

    The recipe and the planner (``kd plan``) both call this, so the plan counts what the recipe wraps.
    """
    enable = bool(cfg.get("enable_activation_checkpointing", False))
    mode = cfg.get("ac_mode", None)
    if mode is None:
        if cfg.get("ac_option", None) is not None:
            raise ConfigError("ac_option is set but ac_mode is not: set ac_mode: selective (torchtune's keys).")
        return list(range(num_layers)) if enable else []
    if mode not in AC_MODES:
        raise ConfigError(f"'ac_mode' must be one of {list(AC_MODES)}, got {mode!r}{suggest(str(mode), AC_MODES)}.")
    if mode == "none":
        return []
    if mode == "full":
        return list(range(num_layers))
    if enable:
        raise ConfigError(
            "ac_mode: selective needs enable_activation_checkpointing: False (True checkpoints every layer); "
            "torchtune would silently checkpoint nothing for this combination."
        )
    x = cfg.get("ac_option", None)
    if isinstance(x, str) and x.strip().isdigit():
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ConfigError(
            f"ac_mode: selective needs ac_option: an integer x >= 1 (checkpoint every x-th layer), got {x!r}."
        )
    return [i for i in range(num_layers) if (i + 1) % x == 0]
