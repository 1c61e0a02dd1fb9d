"""Config-key tables: :class:`Key` and :class:`Schema`, the one mechanism behind every unknown-key check, value
default and range, ``kd plan``'s validation and ``docs/config_keys.md``.

Owns: the table types. May import: :mod:`kd.core.config` only. The tables themselves live with their owners: the
recipes' in :mod:`kd.ops.schema` (kd_lora's in
:mod:`kd.train.schema`, with its ``teacher_cache`` section), the ``on_policy`` section's in :mod:`kd.train.on_policy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

from kd.core.config import ConfigError, check_keys, choice, number

TORCHTUNE = "torchtune"
KD = "kd"


@dataclass(frozen=True)
class Key:
    """One config key. ``kind``: int | float | bool | choice | section | value (anything, read as is);
    ``lo``/``hi``: numeric range; ``nullable``: null is allowed; ``check``: the key's own validator
    (ValueError -> ConfigError), used instead of the range; ``origin``: torchtune's key or kd's."""

    name: str
    doc: str
    kind: str = "value"
    default: Any = None
    lo: Optional[float] = None
    hi: Optional[float] = None
    choices: Tuple[Any, ...] = ()
    nullable: bool = False
    required: bool = False
    origin: str = KD
    check: Optional[Callable[[Any], Any]] = None

    def describe_default(self) -> str:
        if self.required:
            return "required"
        return "null" if self.default is None else repr(self.default) if isinstance(self.default, str) else str(self.default)

    def describe_values(self) -> str:
        if self.kind == "choice":
            return " \\| ".join(str(c) for c in self.choices)
        if self.kind in ("int", "float"):
            if self.check is not None:
                return f"{self.kind} (see `{self.check.__module__}.{self.check.__name__}`)"
            rng = ""
            if self.lo is not None or self.hi is not None:
                rng = f" in [{'-inf' if self.lo is None else self.lo}, {'inf' if self.hi is None else self.hi}]"
            return f"{self.kind}{rng}" + (" or null" if self.nullable else "")
        return {"bool": "bool", "section": "section", "value": "value"}[self.kind]


class Schema:
    """The keys of one recipe's config (or of one section of it)."""

    def __init__(self, name: str, where: str, keys: Sequence[Key], doc: str = "", prefix: str = ""):
        """``prefix``: how messages name this table's keys in the config (``"teacher_cache."`` for a section)."""
        self.name, self.where, self.doc, self.prefix = name, where, doc, prefix
        self.keys: Dict[str, Key] = {}
        for k in keys:
            if k.name in self.keys:
                raise AssertionError(f"{name}: key {k.name!r} listed twice")
            self.keys[k.name] = k

    @property
    def names(self) -> frozenset:
        return frozenset(self.keys)

    @property
    def required(self) -> Tuple[str, ...]:
        return tuple(k.name for k in self.keys.values() if k.required)

    def check(self, cfg: Any, where: Optional[str] = None, required: Optional[Iterable[str]] = None) -> None:
        """Unknown keys ("did you mean") and missing required keys -> ConfigError."""
        check_keys(cfg, self.names, where=where or self.where, required=self.required if required is None else required)

    def get(self, cfg: Any, name: str) -> Any:
        """The value of ``name`` in ``cfg`` (its default when absent), checked by the key's kind and range."""
        k = self.keys[name]
        if k.check is not None:
            value = cfg.get(name, k.default)
            if value is None and k.nullable:
                return None
            try:
                return k.check(value)
            except ValueError as e:
                raise ConfigError(f"{e} (config key '{self.prefix}{name}').") from None
        if k.kind in ("int", "float"):
            return number(cfg, name, k.default, kind=int if k.kind == "int" else float, min_value=k.lo,
                          max_value=k.hi, allow_none=k.nullable, name=self.prefix + name)
        if k.kind == "choice":
            return choice(cfg, name, k.choices, k.default, name=self.prefix + name)
        if k.kind == "bool":
            return bool(cfg.get(name, k.default))
        return cfg.get(name, k.default)

    def markdown(self) -> str:
        rows = [f"### {self.name}", "", self.doc, "", "| key | default | values | from | meaning |",
                "|---|---|---|---|---|"]
        for k in self.keys.values():
            rows.append(f"| `{k.name}` | {k.describe_default()} | {k.describe_values()} | {k.origin} | {k.doc} |")
        return "\n".join(rows) + "\n"


def kd_key(name, doc, kind="value", default=None, **kw) -> Key:
    """A key of kd's own."""
    return Key(name, doc, kind, default, **kw)


def tt_key(name, doc, kind="value", default=None, **kw) -> Key:
    """A key of torchtune's recipes, read with the same meaning."""
    return Key(name, doc, kind, default, origin=TORCHTUNE, **kw)




def top_p_value(v) -> float:
    """A nucleus-sampling ``top_p`` in (0, 1]."""
    v = float(v)
    if not 0.0 < v <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {v}")
    return v
