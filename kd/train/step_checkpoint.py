"""Step checkpoints of a LoRA run (:class:`CheckpointManager`): ``output_dir/step_NNNNNNN/{adapter/, recipe_state.pt,
meta.json}`` plus a ``latest`` pointer, each written atomically (:mod:`kd.core.atomic`), read back with
``weights_only=True`` (:func:`read_recipe_state`), with retention, fall-back to the previous complete checkpoint and
a LoRA-settings compatibility check. Imports :mod:`kd.train.adapter_io`, :mod:`kd.core.atomic`, :mod:`kd.core.errors` and
:mod:`kd.core.statecodec`.

Distributed use: the manager does plain file IO. Call ``save`` on rank 0 only (after gathering the adapter with
:func:`kd.train.adapter_io.lora_state_dict` on all ranks); ``latest``/``load``/``load_adapter`` are read-only and may be
called on every rank. The full fine-tune (:mod:`kd.train.full`) reuses the layout, ``step_meta`` and retention.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from kd.core import statecodec
from kd.core.atomic import (
    atomic_write_dir,
    atomic_write_text,
    cleanup_stale_temps,
    delete_dir,
    no_space_reason,
    recover_atomic_dir,
)
from kd.core.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NoCheckpointFoundError,
    NonFiniteCheckpointError,
)
from kd.train.adapter_io import load_peft_adapter, write_peft_adapter_files

__all__ = ["CheckpointManager", "read_recipe_state", "check_adapter_compatible", "step_meta"]

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{7,})$")


def read_recipe_state(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a ``recipe_state.pt`` with ``weights_only=True`` (no code runs, whatever the file holds) and
    decode it (:mod:`kd.core.statecodec`). Raises :class:`CorruptCheckpointError` naming the file otherwise."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptCheckpointError(
            f"{path} cannot be loaded safely (weights_only=True: tensors + JSON only): {type(e).__name__}: {first}"
        ) from None
    if isinstance(blob, dict) and blob.get("format") == statecodec.FORMAT:
        try:
            return statecodec.unpack(blob)
        except Exception as e:
            raise CorruptCheckpointError(f"{path} is damaged ({type(e).__name__}: {e})") from None
    if isinstance(blob, dict) and "global_step" in blob:  # written before kd-state-v1, plain containers
        return blob
    raise CorruptCheckpointError(f"{path} is not a kd recipe state")



def _versions() -> Dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out: Dict[str, Optional[str]] = {}
    for pkg in ("torch", "torchtune", "transformers", "peft", "safetensors", "kd"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def step_meta(fmt: str, step: int, epoch: int) -> Dict[str, Any]:
    """The common part of a step dir's ``meta.json``: format, step, epoch, time and package versions."""
    return {
        "format": fmt,
        "step": int(step),
        "epoch": int(epoch),
        "time": time.time(),
        "time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }

def _norm_meta(m: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(m)
    if "target_modules" in out and out["target_modules"] is not None:
        out["target_modules"] = sorted(out["target_modules"])
    return out


_COMPAT_KEYS = ("rank", "alpha", "target_modules", "use_dora")


def check_adapter_compatible(saved: Mapping[str, Any], expected: Mapping[str, Any], where: str = "") -> None:
    """Raise :class:`IncompatibleCheckpointError` naming every differing LoRA setting
    (rank, alpha, target_modules, use_dora) between a checkpoint and the current config."""
    s, e = _norm_meta(saved), _norm_meta(expected)
    diffs = []
    for k in _COMPAT_KEYS:
        if k not in e:
            continue
        sv = s.get(k, False if k == "use_dora" else None)
        ev = e[k]
        if k == "alpha" and sv is not None and ev is not None:
            same = float(sv) == float(ev)
        else:
            same = sv == ev
        if not same:
            diffs.append(f"{k}: checkpoint={sv!r} vs config={ev!r}")
    if diffs:
        raise IncompatibleCheckpointError(
            f"checkpoint {where} was written with an incompatible LoRA config: " + "; ".join(diffs)
        )


class CheckpointManager:
    """Step checkpoints under ``output_dir``::

        output_dir/
          latest                      # text: "step_0000100"
          step_0000100/
            adapter/                  # PEFT format (adapter_config.json, adapter_model.safetensors)
            recipe_state.pt           # optimizer / lr scheduler / RNG / dataloader / counters
            meta.json                 # step, epoch, time, versions, adapter meta

    Each step dir is written atomically, then ``latest`` is atomically replaced. Call ``save``
    on rank 0 only; reads are safe on all ranks.
    """

    LATEST = "latest"

    def __init__(self, output_dir: PathLike, keep_last_n: Optional[int] = None):
        if keep_last_n is not None and keep_last_n < 1:
            raise ValueError(f"keep_last_n must be >= 1 or None, got {keep_last_n}")
        self.output_dir = Path(output_dir)
        self.keep_last_n = keep_last_n

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{int(step):07d}"

    # -- writing -------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        epoch: int,
        *,
        adapter_sd: Mapping[str, torch.Tensor],
        adapter_meta: Mapping[str, Any],
        recipe_state: Mapping[str, Any],
        run_info: Optional[Mapping[str, Any]] = None,
    ) -> Path:
        """Write ``step_{step:07d}/`` atomically, then point ``latest`` at it; apply retention.
        ``adapter_meta`` needs rank, alpha, target_modules (torchtune names),
        base_model_name_or_path (optionally use_dora). ``run_info`` (JSON) is stored in meta.json as
        ``run`` (what a resume must match: data set, batch size, ...). ``recipe_state`` is stored as
        tensors + JSON (:mod:`kd.core.statecodec`). Adapter weights with NaN/Inf are refused
        (:class:`NonFiniteCheckpointError`); a full disk raises :class:`CheckpointError` naming the
        space needed, leaving the previous checkpoint intact. Returns the step dir."""
        missing = [k for k in ("rank", "alpha", "target_modules", "base_model_name_or_path") if k not in adapter_meta]
        if missing:
            raise ValueError(f"adapter_meta is missing {missing}")
        bad = [k for k, v in adapter_sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteCheckpointError(
                f"refusing to save step {step}: adapter weights hold NaN/Inf ({len(bad)} tensors, e.g. {bad[0]}); "
                f"the previous checkpoint {self.latest() or '(none)'} is kept."
            )
        final = self.output_dir / self.step_dir_name(step)
        a_meta = {
            "rank": int(adapter_meta["rank"]),
            "alpha": adapter_meta["alpha"],
            "target_modules": list(adapter_meta["target_modules"]),
            "base_model_name_or_path": str(adapter_meta["base_model_name_or_path"]),
            "use_dora": bool(adapter_meta.get("use_dora", False)),
        }
        meta = {**step_meta("kd-checkpoint-v1", step, epoch), "adapter": a_meta,
                "recipe_state_format": statecodec.FORMAT}
        if run_info is not None:
            meta["run"] = dict(run_info)
        blob = statecodec.pack(dict(recipe_state))
        try:
            return self.commit(step, meta, partial(self._write_adapter_files, blob=blob, adapter_sd=adapter_sd,
                                                   a_meta=a_meta))
        except Exception as e:
            reason = no_space_reason(e)
            if reason is None:
                raise
            need = sum(v.numel() * v.element_size() for v in adapter_sd.values())
            need += sum(t.numel() * t.element_size() for t in blob["tensors"]) + len(blob["json"])
            free = shutil.disk_usage(self.output_dir).free
            prev = self.latest()
            raise CheckpointError(
                f"no space left while writing checkpoint {final} ({reason}): it needs about "
                f"{need / 2**20:.1f} MiB and {self.output_dir} has {free / 2**20:.1f} MiB free; "
                f"{'the previous checkpoint ' + str(prev) + ' is intact' if prev else 'no earlier checkpoint exists'}. "
                "Free space (or lower keep_last_n_checkpoints / move output_dir), then resume_from_checkpoint=True."
            ) from None

    def commit(self, step: int, meta: Mapping[str, Any], write: Callable[[Path], None]) -> Path:
        """Make step ``step`` visible, whatever its format: ``write(tmp)`` fills a temporary step dir, ``meta``
        becomes its meta.json, the dir is renamed into place atomically (every file fsynced), ``latest`` is
        pointed at it and retention applied. Rank 0 only. :meth:`save` (LoRA) and kd.train.full (sharded full
        fine-tune) both commit through here. Returns the step dir."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        cleanup_stale_temps(self.output_dir)
        name = self.step_dir_name(step)
        with atomic_write_dir(self.output_dir / name) as tmp:
            write(tmp)
            (tmp / "meta.json").write_text(json.dumps(dict(meta), indent=2, sort_keys=True))
        atomic_write_text(self.output_dir / self.LATEST, name + "\n")
        self.apply_retention()
        return self.output_dir / name

    @staticmethod
    def _write_adapter_files(tmp: Path, *, blob, adapter_sd, a_meta) -> None:
        adir = tmp / "adapter"
        adir.mkdir()
        write_peft_adapter_files(
            adir,
            adapter_sd,
            rank=a_meta["rank"],
            alpha=a_meta["alpha"],
            target_modules=a_meta["target_modules"],
            base_model_name_or_path=a_meta["base_model_name_or_path"],
            use_dora=a_meta["use_dora"],
        )
        with open(tmp / "recipe_state.pt", "wb") as f:
            torch.save(blob, f)  # tensors + JSON only: torch.load(weights_only=True) reads it

    def apply_retention(self) -> None:
        """Delete step dirs beyond the newest ``keep_last_n`` (never the one ``latest`` names)."""
        if self.keep_last_n is None:
            return
        ckpts = self.list_checkpoints()
        keep = set(ckpts[-self.keep_last_n :])
        cur = self.latest()
        if cur is not None:
            keep.add(cur)
        for p in ckpts:
            if p not in keep:
                with contextlib.suppress(OSError):  # a concurrent reader/deleter: try again next save
                    delete_dir(p)

    # -- reading -------------------------------------------------------------------------------
    def list_checkpoints(self) -> List[Path]:
        """Complete step dirs (visible name + meta.json), sorted by step."""
        if not self.output_dir.is_dir():
            return []
        out = []
        for p in self.output_dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (p / "meta.json").is_file():
                out.append((int(m.group(1)), p))
        return [p for _, p in sorted(out)]

    def latest(self) -> Optional[Path]:
        """Step dir named by ``latest`` (if it is complete); if the pointer is missing or broken,
        the highest complete step dir; None if there is none."""
        ptr = self.output_dir / self.LATEST
        if ptr.is_file():
            name = ptr.read_text().strip()
            if _STEP_RE.match(name):
                p = self.output_dir / name
                recover_atomic_dir(p)
                if (p / "meta.json").is_file():
                    return p
        ckpts = self.list_checkpoints()
        return ckpts[-1] if ckpts else None

    def _resolve(self, path: Optional[PathLike]) -> Path:
        if path is None:
            p = self.latest()
            if p is None:
                ptr = self.output_dir / self.LATEST
                state = (
                    f"'latest' pointer {'exists (' + repr(ptr.read_text().strip()) + ') but its dir is missing/incomplete' if ptr.is_file() else 'does not exist'}"
                )
                raise NoCheckpointFoundError(
                    f"resume requested but no complete checkpoint found in {self.output_dir.absolute()} "
                    f"(looked for {self.LATEST!r} and step_NNNNNNN/meta.json; {state})"
                )
            return p
        p = Path(path)
        if p.name == "adapter" and (p.parent / "meta.json").is_file():
            p = p.parent
        if (p / self.LATEST).is_file() and not (p / "meta.json").is_file():
            sub = CheckpointManager(p).latest()
            if sub is None:
                raise NoCheckpointFoundError(f"no complete checkpoint found in {p.absolute()}")
            p = sub
        if not (p / "meta.json").is_file():
            raise NoCheckpointFoundError(
                f"{p.absolute()} is not a complete checkpoint dir (no meta.json)"
            )
        return p

    def load(
        self,
        path: Optional[PathLike] = None,
        *,
        expected_adapter_meta: Optional[Mapping[str, Any]] = None,
        map_location: Any = "cpu",
    ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(meta, recipe_state) of ``path`` (a step dir, or a dir with ``latest``) or of the
        latest checkpoint. With ``expected_adapter_meta`` (rank, alpha, target_modules, ...)
        raise :class:`IncompatibleCheckpointError` naming the differing settings."""
        p = self._resolve(path)
        meta = json.loads((p / "meta.json").read_text())
        meta["path"] = str(p)
        if expected_adapter_meta is not None:
            check_adapter_compatible(meta.get("adapter", {}), expected_adapter_meta, where=str(p))
        state = read_recipe_state(p / "recipe_state.pt", map_location=map_location)
        return meta, state

    def load_latest_valid(
        self,
        *,
        expected_adapter_meta: Optional[Mapping[str, Any]] = None,
        warn=None,
    ) -> Tuple[Path, Dict[str, Any], Dict[str, Any], Dict[str, torch.Tensor]]:
        """(path, meta, recipe_state, adapter) of the newest checkpoint that reads back completely.

        A checkpoint whose ``recipe_state.pt`` / adapter / meta.json cannot be read safely is skipped with a
        warning naming the file (``warn(msg)``; default: ``logging``), falling back to the previous
        complete one. Incompatible LoRA settings are still an error (not a reason to fall back)."""
        warn = warn or log.warning
        latest = self.latest()
        if latest is None:
            self._resolve(None)  # raises NoCheckpointFoundError with the details
        cands = [latest] + [p for p in reversed(self.list_checkpoints()) if p != latest]
        problems = []
        for p in cands:
            try:
                meta = json.loads((p / "meta.json").read_text())
            except (OSError, ValueError) as e:
                problems.append(f"{p / 'meta.json'}: {e}")
                warn(f"checkpoint {p / 'meta.json'} is unreadable ({e}); trying the previous checkpoint")
                continue
            meta["path"] = str(p)
            if expected_adapter_meta is not None:
                check_adapter_compatible(meta.get("adapter", {}), expected_adapter_meta, where=str(p))
            try:
                state = read_recipe_state(p / "recipe_state.pt")
                adapter, _ = load_peft_adapter(p / "adapter")
            except CheckpointError as e:
                problems.append(str(e))
                nxt = next((c for c in cands[cands.index(p) + 1:]), None)
                warn(f"{e}; falling back to the previous complete checkpoint {nxt if nxt else '(none left)'}")
                continue
            except Exception as e:  # safetensors / JSON errors of a damaged adapter
                problems.append(f"{p / 'adapter'}: {type(e).__name__}: {e}")
                nxt = next((c for c in cands[cands.index(p) + 1:]), None)
                warn(f"adapter of checkpoint {p} is unreadable ({type(e).__name__}: {e}); falling back to "
                     f"{nxt if nxt else '(none left)'}")
                continue
            return p, meta, state, adapter
        raise CorruptCheckpointError(
            f"no readable checkpoint in {self.output_dir.absolute()}: " + "; ".join(problems)
        )

    def load_adapter(
        self,
        path: Optional[PathLike] = None,
        *,
        expected_adapter_meta: Optional[Mapping[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Adapter weights of a checkpoint in torchtune names (``model.load_state_dict(sd,
        strict=False)``-ready)."""
        p = self._resolve(path)
        if expected_adapter_meta is not None:
            meta = json.loads((p / "meta.json").read_text())
            check_adapter_compatible(meta.get("adapter", {}), expected_adapter_meta, where=str(p))
        sd, _cfg = load_peft_adapter(p / "adapter")
        return sd


