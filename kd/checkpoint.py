"""Checkpointing for ``kd``: correct Qwen2 PEFT adapter export, atomic checkpoint dirs,
resumable recipe state and merged HF export.

Why this module exists
----------------------
torchtune 0.6.1 exports LoRA adapters with
``torchtune.models.convert_weights.tune_to_peft_adapter_weights``, which permutes the rows of
the ``q_proj``/``k_proj`` ``lora_B`` matrices the Llama way (HF Llama checkpoints use a
different RoPE row layout than torchtune's). Qwen2 HF checkpoints use the *same* layout as
torchtune (``qwen2_tune_to_hf`` does not permute), so torchtune's adapters for Qwen2 are wrong
when loaded with peft on transformers' Qwen2. :func:`save_peft_adapter` maps names only.

Distributed use
---------------
:func:`lora_state_dict` and :func:`save_merged_hf` call ``DTensor.full_tensor()`` on sharded
parameters, which is a *collective*: every rank must call them (in the same order), even though
only rank 0 needs / writes the result. :func:`save_merged_hf` writes on rank 0 only.
:class:`CheckpointManager` does plain file IO: call ``save`` on rank 0 only (after gathering the
adapter with :func:`lora_state_dict` on all ranks); ``latest``/``load``/``load_adapter`` are
read-only and may be called on every rank.

Crash safety
------------
Every directory is written into a hidden sibling temp dir (``.NAME.tmp-XXXX``), every file in it
is fsynced, and only then is it renamed into place (an atomic ``renameat2(RENAME_EXCHANGE)``
swap if the destination exists, with a recoverable two-rename fallback). Files are written to a
temp file, fsynced and ``os.replace``-d. Readers never look at hidden temp names, so a crash
(exception or ``kill -9``) at any moment leaves either the old complete version or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from kd import statecodec

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "NonFiniteCheckpointError",
    "read_recipe_state",
    "NoCheckpointFoundError",
    "IncompatibleCheckpointError",
    "TUNE_TO_HF_MODULE",
    "lora_state_dict",
    "tune_to_peft_key",
    "peft_to_tune_key",
    "tune_to_peft_adapter_sd",
    "peft_to_tune_adapter_sd",
    "peft_adapter_config",
    "save_peft_adapter",
    "load_peft_adapter",
    "atomic_write_dir",
    "atomic_torch_save",
    "atomic_write_text",
    "atomic_write_bytes",
    "recover_atomic_dir",
    "cleanup_stale_temps",
    "check_adapter_compatible",
    "CheckpointManager",
    "save_merged_hf",
    "write_hf_checkpoint",
]

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """Base class for checkpoint errors."""


class NoCheckpointFoundError(CheckpointError, FileNotFoundError):
    """Resume requested but no complete checkpoint exists."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """Checkpoint was written with an incompatible config (e.g. other LoRA rank / targets)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file exists but cannot be read safely (truncated, not tensors + JSON, ...)."""


class NonFiniteCheckpointError(CheckpointError):
    """Refused to save adapter weights holding NaN/Inf."""


_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG)


def _no_space_errno(e: BaseException) -> Optional[int]:
    """ENOSPC / EDQUOT / EFBIG of an OSError, or of safetensors' SafetensorError ("... (os error 28)")."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return e.errno
    m = re.search(r"os error (\d+)", str(e))
    if m and int(m.group(1)) in _NO_SPACE:
        return int(m.group(1))
    return None


def _is_no_space(e: BaseException) -> bool:
    return _no_space_errno(e) is not None


def _no_space_reason(e: BaseException) -> str:
    return os.strerror(_no_space_errno(e))


# ----------------------------------------------------------------------------------------------
# tensor helpers
# ----------------------------------------------------------------------------------------------

# prefixes added by activation checkpointing / torch.compile / FSDP1 wrappers
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.", "module.")


def _strip_wrappers(key: str) -> str:
    for p in _WRAPPER_PREFIXES:
        key = key.replace(p, "")
    return key


def _full_cpu(t: torch.Tensor) -> torch.Tensor:
    """Full (unsharded) detached CPU copy. ``full_tensor`` is collective for DTensors."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone()
    return t.to("cpu")


def _is_rank0() -> bool:
    return (
        not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
        or torch.distributed.get_rank() == 0
    )


def lora_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Trainable adapter params (``lora_a``/``lora_b``/``magnitude``) of a torchtune LoRA model,
    in torchtune names (e.g. ``layers.0.attn.q_proj.lora_a.weight``), as full fp tensors on CPU
    (detached copies, safe to keep while training continues).

    DTensor params (FSDP2) are gathered with ``full_tensor()``, a collective: EVERY rank must
    call this function, even if only rank 0 uses the result.
    """
    from torchtune.modules.peft import get_adapter_params

    params = get_adapter_params(model)
    if not params:
        raise CheckpointError("model has no adapter params (is it a torchtune LoRA model?)")
    return {_strip_wrappers(k): _full_cpu(v) for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# name mapping torchtune <-> HF/peft (Qwen2). No q/k permutation: Qwen2's HF layout == torchtune's.
# ----------------------------------------------------------------------------------------------

TUNE_TO_HF_MODULE: Dict[str, str] = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "output_proj": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "output": "lm_head",
}
_HF_TO_TUNE_MODULE = {v: k for k, v in TUNE_TO_HF_MODULE.items()}
_ATTN = {"q_proj", "k_proj", "v_proj", "output_proj"}
_MLP = {"w1", "w2", "w3"}
_PARAM_TO_PEFT = {"lora_a.weight": "lora_A.weight", "lora_b.weight": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_PARAM_TO_TUNE = {v: k for k, v in _PARAM_TO_PEFT.items()}
_PEFT_PREFIX = "base_model.model."

_TUNE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(\w+)\.(lora_a\.weight|lora_b\.weight|magnitude)$")
_TUNE_OUT_RE = re.compile(r"^output\.(lora_a\.weight|lora_b\.weight|magnitude)$")
_PEFT_LAYER_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)
_PEFT_OUT_RE = re.compile(r"^base_model\.model\.lm_head\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


def tune_to_peft_key(key: str) -> str:
    """``layers.3.attn.q_proj.lora_a.weight`` -> ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``."""
    k = _strip_wrappers(key)
    m = _TUNE_LAYER_RE.match(k)
    if m:
        i, block, mod, param = m.groups()
        if (block == "attn" and mod not in _ATTN) or (block == "mlp" and mod not in _MLP):
            raise KeyError(f"unknown torchtune LoRA module in key {key!r}")
        hf_block = "self_attn" if block == "attn" else "mlp"
        return f"{_PEFT_PREFIX}model.layers.{i}.{hf_block}.{TUNE_TO_HF_MODULE[mod]}.{_PARAM_TO_PEFT[param]}"
    m = _TUNE_OUT_RE.match(k)
    if m:
        return f"{_PEFT_PREFIX}lm_head.{_PARAM_TO_PEFT[m.group(1)]}"
    raise KeyError(f"cannot map torchtune adapter key {key!r} to a peft key")


def peft_to_tune_key(key: str) -> str:
    """Inverse of :func:`tune_to_peft_key` (also accepts peft's in-memory ``.default`` adapter names)."""
    k = key.replace(".default.", ".").replace("lora_magnitude_vector.default", "lora_magnitude_vector")
    if k.endswith("lora_magnitude_vector.weight"):
        k = k[: -len(".weight")]
    m = _PEFT_LAYER_RE.match(k)
    if m:
        i, hf_block, hf_mod, param = m.groups()
        mod = _HF_TO_TUNE_MODULE.get(hf_mod)
        if mod is None or mod == "output":
            raise KeyError(f"unknown peft module in key {key!r}")
        block = "attn" if hf_block == "self_attn" else "mlp"
        return f"layers.{i}.{block}.{mod}.{_PARAM_TO_TUNE[param]}"
    m = _PEFT_OUT_RE.match(k)
    if m:
        return f"output.{_PARAM_TO_TUNE[m.group(1)]}"
    raise KeyError(f"cannot map peft adapter key {key!r} to a torchtune key")


def tune_to_peft_adapter_sd(adapter_sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a torchtune adapter state dict to peft's saved names. Values are NOT permuted."""
    out = {}
    for k, v in adapter_sd.items():
        out[tune_to_peft_key(k)] = _full_cpu(v).contiguous()
    return out


def peft_to_tune_adapter_sd(peft_sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {peft_to_tune_key(k): v for k, v in peft_sd.items()}


def _modules_in_adapter_sd(adapter_sd: Mapping[str, Any]) -> set:
    mods = set()
    for k in adapter_sd:
        k = _strip_wrappers(k)
        m = _TUNE_LAYER_RE.match(k)
        if m:
            mods.add(m.group(3))
        elif _TUNE_OUT_RE.match(k):
            mods.add("output")
        else:
            raise KeyError(f"not a torchtune LoRA adapter key: {k!r}")
    return mods


def peft_adapter_config(
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    base_model_name_or_path: str,
    use_dora: bool = False,
) -> Dict[str, Any]:
    """adapter_config.json content (peft LoraConfig) for torchtune target module names."""
    unknown = [m for m in target_modules if m not in TUNE_TO_HF_MODULE]
    if unknown:
        raise ValueError(f"unknown torchtune target modules {unknown}; known: {sorted(TUNE_TO_HF_MODULE)}")
    hf_targets = sorted({TUNE_TO_HF_MODULE[m] for m in target_modules})
    # Plain dict (no peft import needed to write it); peft fills any other field with its default.
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": alpha,
        "target_modules": hf_targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": bool(use_dora),
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "base_model_name_or_path": str(base_model_name_or_path),
        "revision": None,
    }


def _write_peft_adapter_files(
    d: Path,
    adapter_sd: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    base_model_name_or_path: str,
    use_dora: bool,
) -> None:
    from safetensors.torch import save_file

    present = _modules_in_adapter_sd(adapter_sd)
    missing_targets = sorted(present - set(target_modules))
    if missing_targets:
        raise ValueError(
            f"adapter_sd has LoRA weights for modules {missing_targets} that are not in target_modules={list(target_modules)}"
        )
    has_mag = any(_strip_wrappers(k).endswith("magnitude") for k in adapter_sd)
    if has_mag != bool(use_dora):
        raise ValueError(f"use_dora={use_dora} but adapter_sd {'has' if has_mag else 'has no'} DoRA magnitudes")
    for k, v in adapter_sd.items():
        if k.endswith("lora_a.weight") and v.shape[0] != rank:
            raise ValueError(f"rank={rank} but {k} has shape {tuple(v.shape)}")
    cfg = peft_adapter_config(
        rank=rank,
        alpha=alpha,
        target_modules=target_modules,
        base_model_name_or_path=base_model_name_or_path,
        use_dora=use_dora,
    )
    save_file(tune_to_peft_adapter_sd(adapter_sd), str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def save_peft_adapter(
    adapter_sd: Mapping[str, torch.Tensor],
    out_dir: PathLike,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    base_model_name_or_path: str,
    use_dora: bool = False,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (atomically) so that
    ``peft.PeftModel.from_pretrained(Qwen2ForCausalLM, out_dir)`` reproduces the torchtune LoRA
    model. ``adapter_sd`` and ``target_modules`` use torchtune names. No q/k permutation."""
    out_dir = Path(out_dir)
    with atomic_write_dir(out_dir) as tmp:
        _write_peft_adapter_files(
            tmp,
            adapter_sd,
            rank=rank,
            alpha=alpha,
            target_modules=target_modules,
            base_model_name_or_path=base_model_name_or_path,
            use_dora=use_dora,
        )
    return out_dir


def read_recipe_state(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a ``recipe_state.pt`` with ``weights_only=True`` (no code runs, whatever the file holds) and
    decode it (:mod:`kd.statecodec`). Raises :class:`CorruptCheckpointError` naming the file otherwise."""
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


def load_peft_adapter(adapter_dir: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a PEFT adapter dir -> (adapter state dict in torchtune names, adapter_config dict)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        sd = load_file(str(st))
    elif (adapter_dir / "adapter_model.bin").exists():
        sd = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise NoCheckpointFoundError(f"no adapter_model.safetensors in {adapter_dir}")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return peft_to_tune_adapter_sd(sd), cfg


# ----------------------------------------------------------------------------------------------
# atomic file system primitives
# ----------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
try:  # Linux >= 3.15, glibc >= 2.28
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
except Exception:  # pragma: no cover
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths. False if unsupported here (fallback needed)."""
    if _renameat2 is None:
        return False
    r = _renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if r == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(e, os.strerror(e), str(a))


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. platforms without dir fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


_HOST = _host_tag()


def _tmp_name(final: Path, kind: str) -> Path:
    # .NAME.KIND-HOST-PID-RAND: hidden (readers ignore it) and attributable to a writer process
    return final.parent / f".{final.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer_alive(p: Path) -> bool:
    """True unless ``p`` is a temp name of a dead process on this host."""
    try:
        host, pid = p.name.rsplit("-", 3)[-3:-1]
        pid = int(pid)
    except ValueError:
        return True
    if host != _HOST:
        return True  # another host: cannot tell, leave it
    return pid == os.getpid() or _pid_alive(pid)


def recover_atomic_dir(final_dir: PathLike) -> bool:
    """Repair the (only) non-atomic window of the rename fallback used where
    ``RENAME_EXCHANGE`` is unavailable: if ``final_dir`` is missing but an old version was
    moved aside (``.NAME.old-*``), move it back. Returns True if something was restored."""
    final = Path(final_dir)
    if final.exists():
        return False
    asides = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for a in asides:
        host = a.name.rsplit("-", 3)[-3] if a.name.count("-") >= 3 else ""
        if host == _HOST and _writer_alive(a):
            continue  # a live local writer is between its two renames: not a crash
        try:
            os.rename(a, final)
            _fsync_dir(final.parent)
            return True
        except OSError:
            if final.exists():  # someone else restored it concurrently
                return False
    return False


def _cleanup_stale(final: Path) -> None:
    """Remove leftover temp/aside dirs of ``final`` from crashed writers (only if final exists)."""
    if not final.exists():
        return
    for pat in (f".{final.name}.tmp-*", f".{final.name}.old-*", f".{final.name}.del-*"):
        for p in final.parent.glob(pat):
            if not _writer_alive(p):
                _rm(p)


def cleanup_stale_temps(parent: PathLike) -> List[Path]:
    """Delete hidden temp dirs/files (``.X.tmp-*``, ``.X.del-*``) left in ``parent`` by crashed
    writers on this host. ``.X.old-*`` asides are only removed once X exists again."""
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = re.match(r"^\.(.+)\.(tmp|del|old)-[0-9a-f]+-\d+-[0-9a-f]+$", p.name)
        if not m or _writer_alive(p):
            continue
        if m.group(2) == "old" and not (parent / m.group(1)).exists():
            continue  # needed by recover_atomic_dir
        _rm(p)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rm(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.contextmanager
def atomic_write_dir(final_dir: PathLike) -> Iterator[Path]:
    """Context manager yielding a fresh temp dir (hidden sibling of ``final_dir``). On clean exit
    all files are fsynced and the dir is moved to ``final_dir``, atomically replacing an existing
    one (``renameat2(RENAME_EXCHANGE)``; fallback: rename old aside, move new in, delete old, with
    :func:`recover_atomic_dir` fixing a crash in between). On exception the temp dir is removed
    and ``final_dir`` is untouched. After ``kill -9`` only a hidden ``.NAME.tmp-*`` dir can remain,
    which readers ignore and later writers clean up."""
    final = Path(final_dir).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_atomic_dir(final)
    tmp = _tmp_name(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists() or final.is_symlink():
            if _exchange(tmp, final):
                _fsync_dir(final.parent)
                _rm(tmp)  # now holds the old version
            else:
                aside = _tmp_name(final, "old")
                os.rename(final, aside)
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(aside, final)  # put the old version back
                    raise
                _fsync_dir(final.parent)
                _rm(aside)
        else:
            os.rename(tmp, final)
            _fsync_dir(final.parent)
    except BaseException:
        _rm(tmp)
        raise
    _cleanup_stale(final)


@contextlib.contextmanager
def _atomic_file(path: PathLike, mode: str = "wb") -> Iterator[Any]:
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, "tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temp file, fsync, then ``os.replace`` onto ``path``."""
    with _atomic_file(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write a text file atomically (temp file + fsync + ``os.replace``)."""
    with _atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write a binary file atomically (temp file + fsync + ``os.replace``)."""
    with _atomic_file(path, "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------------------------
# CheckpointManager
# ----------------------------------------------------------------------------------------------

_STEP_RE = re.compile(r"^step_(\d{7,})$")


def _versions() -> Dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out: Dict[str, Optional[str]] = {}
    for pkg in ("torch", "torchtune", "transformers", "peft", "safetensors", "kd"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


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
            <extra files>

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
        extra_files: Optional[Mapping[str, PathLike]] = None,
        run_info: Optional[Mapping[str, Any]] = None,
    ) -> Path:
        """Write ``step_{step:07d}/`` atomically, then point ``latest`` at it; apply retention.
        ``adapter_meta`` needs rank, alpha, target_modules (torchtune names),
        base_model_name_or_path (optionally use_dora). ``run_info`` (JSON) is stored in meta.json as
        ``run`` (what a resume must match: data set, batch size, ...). ``recipe_state`` is stored as
        tensors + JSON (:mod:`kd.statecodec`). Adapter weights with NaN/Inf are refused
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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        cleanup_stale_temps(self.output_dir)
        name = self.step_dir_name(step)
        final = self.output_dir / name
        a_meta = {
            "rank": int(adapter_meta["rank"]),
            "alpha": adapter_meta["alpha"],
            "target_modules": list(adapter_meta["target_modules"]),
            "base_model_name_or_path": str(adapter_meta["base_model_name_or_path"]),
            "use_dora": bool(adapter_meta.get("use_dora", False)),
        }
        meta = {
            "format": "kd-checkpoint-v1",
            "step": int(step),
            "epoch": int(epoch),
            "time": time.time(),
            "time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": _versions(),
            "adapter": a_meta,
            "extra_files": sorted(extra_files or {}),
            "recipe_state_format": statecodec.FORMAT,
        }
        if run_info is not None:
            meta["run"] = dict(run_info)
        blob = statecodec.pack(dict(recipe_state))
        try:
            self._write_step_dir(final, meta, blob, adapter_sd, a_meta, extra_files)
        except Exception as e:
            if not _is_no_space(e):
                raise
            need = sum(v.numel() * v.element_size() for v in adapter_sd.values())
            need += sum(t.numel() * t.element_size() for t in blob["tensors"]) + len(blob["json"])
            free = shutil.disk_usage(self.output_dir).free
            prev = self.latest()
            raise CheckpointError(
                f"no space left while writing checkpoint {final} ({_no_space_reason(e)}): it needs about "
                f"{need / 2**20:.1f} MiB and {self.output_dir} has {free / 2**20:.1f} MiB free; "
                f"{'the previous checkpoint ' + str(prev) + ' is intact' if prev else 'no earlier checkpoint exists'}. "
                "Free space (or lower keep_last_n_checkpoints / move output_dir), then resume_from_checkpoint=True."
            ) from None
        atomic_write_text(self.output_dir / self.LATEST, name + "\n")
        self._apply_retention()
        return final

    def _write_step_dir(self, final, meta, blob, adapter_sd, a_meta, extra_files) -> None:
        with atomic_write_dir(final) as tmp:
            adir = tmp / "adapter"
            adir.mkdir()
            _write_peft_adapter_files(
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
            for fname, src in (extra_files or {}).items():
                if "/" in fname or fname in ("adapter", "recipe_state.pt", "meta.json") or fname.startswith("."):
                    raise ValueError(f"invalid extra file name {fname!r}")
                src = Path(src)
                if src.is_dir():
                    shutil.copytree(src, tmp / fname)
                else:
                    shutil.copy2(src, tmp / fname)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    def _apply_retention(self) -> None:
        if self.keep_last_n is None:
            return
        ckpts = self.list_checkpoints()
        keep = set(ckpts[-self.keep_last_n :])
        cur = self.latest()
        if cur is not None:
            keep.add(cur)
        for p in ckpts:
            if p not in keep:
                # rename to a hidden name first so a crash mid-delete never leaves a half dir
                doomed = _tmp_name(p, "del")
                try:
                    os.rename(p, doomed)
                except OSError:
                    continue
                shutil.rmtree(doomed, ignore_errors=True)

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
        import logging

        warn = warn or logging.getLogger("kd.checkpoint").warning
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


# ----------------------------------------------------------------------------------------------
# merged HF export
# ----------------------------------------------------------------------------------------------

_COPY_FILES = (
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def _decoder_dims(model: torch.nn.Module) -> Tuple[int, int, int, int]:
    for mod in model.modules():
        if all(hasattr(mod, a) for a in ("num_heads", "num_kv_heads", "embed_dim", "head_dim")):
            return int(mod.num_heads), int(mod.num_kv_heads), int(mod.embed_dim), int(mod.head_dim)
    raise CheckpointError("could not find attention dims (num_heads/num_kv_heads/embed_dim) on the model")


def _shard(sd: Mapping[str, torch.Tensor], max_bytes: int) -> List[Dict[str, torch.Tensor]]:
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


def save_merged_hf(
    model: torch.nn.Module,
    base_checkpoint_dir: PathLike,
    out_dir: PathLike,
    *,
    rank: int,
    alpha: float,
    max_shard_size_bytes: float = 5e9,
    dtype: Optional[torch.dtype] = None,
) -> Optional[Path]:
    """Merge LoRA into the base weights and write an HF Qwen2 checkpoint dir (safetensors
    shards + ``model.safetensors.index.json`` + config/tokenizer/generation files copied from
    ``base_checkpoint_dir``), atomically. ``dtype`` defaults to the dtype of the model's base
    weights; the merge itself is done in fp32. Tied-embedding models get no ``lm_head``.

    Collective under FSDP2 (``full_tensor``): every rank must call it; rank 0 writes and
    returns ``out_dir``, other ranks return None."""
    from torchtune.modules.peft import get_merged_lora_ckpt

    num_heads, num_kv_heads, dim, head_dim = _decoder_dims(model)
    rank0 = _is_rank0()
    sd: Dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        # every rank iterates and gathers (full_tensor is collective); only rank 0 keeps a CPU copy
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        if rank0:
            sd[_strip_wrappers(k)] = _full_cpu(v)
        del v
    if not rank0:
        return None

    base_dir = Path(base_checkpoint_dir)
    if dtype is None:
        ref = sd.get("tok_embeddings.weight")
        dtype = ref.dtype if ref is not None else torch.float32

    # merge module by module (fp32 math, torchtune's get_merged_lora_ckpt) to keep peak memory low
    from kd.progress import progress

    lora_modules = sorted({k[: -len(".lora_a.weight")] for k in sd if k.endswith(".lora_a.weight")})
    for mod in progress(lora_modules, desc="export: merge LoRA", unit="module", enabled=bool(lora_modules)):
        sub = {
            f"{mod}.{n}": sd.pop(f"{mod}.{n}").float()
            for n in ("weight", "lora_a.weight", "lora_b.weight", "magnitude")
            if f"{mod}.{n}" in sd
        }
        if f"{mod}.weight" not in sub:
            raise CheckpointError(f"LoRA module {mod} has no base weight in the state dict (quantized base?)")
        merged = get_merged_lora_ckpt(sub, rank=rank, alpha=alpha)
        sd[f"{mod}.weight"] = merged[f"{mod}.weight"].to(dtype)
    leftover = [k for k in sd if "lora" in k or k.endswith("magnitude")]
    if leftover:
        raise CheckpointError(f"unmerged adapter keys remain: {leftover[:5]}")
    return write_hf_checkpoint(sd, base_dir, out_dir, dims=(num_heads, num_kv_heads, dim, head_dim), dtype=dtype,
                               max_shard_size_bytes=max_shard_size_bytes)


def write_hf_checkpoint(
    sd: Dict[str, torch.Tensor],
    base_checkpoint_dir: PathLike,
    out_dir: PathLike,
    *,
    dims: Tuple[int, int, int, int],
    dtype: Optional[torch.dtype] = None,
    max_shard_size_bytes: float = 5e9,
) -> Path:
    """Write a full torchtune Qwen2 state dict (``sd``, no adapter keys; consumed) as an HF checkpoint dir
    (safetensors shards + index + config/tokenizer files copied from ``base_checkpoint_dir``), atomically.
    ``dims`` = (num_heads, num_kv_heads, embed_dim, head_dim)."""
    from safetensors.torch import save_file
    from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

    from kd.progress import progress

    num_heads, num_kv_heads, dim, head_dim = dims
    base_dir = Path(base_checkpoint_dir)
    cfg = json.loads((base_dir / "config.json").read_text())
    tied = bool(cfg.get("tie_word_embeddings", False))
    if dtype is None:
        ref = sd.get("tok_embeddings.weight")
        dtype = ref.dtype if ref is not None else torch.float32
    for k in list(sd):
        if sd[k].is_floating_point() and sd[k].dtype != dtype:
            sd[k] = sd[k].to(dtype)
    hf = qwen2_tune_to_hf(
        sd, num_heads=num_heads, num_kv_heads=num_kv_heads, dim=dim, head_dim=head_dim, tie_word_embeddings=tied
    )
    if tied:
        hf.pop("lm_head.weight", None)
    elif "lm_head.weight" not in hf:
        raise CheckpointError("config has tie_word_embeddings=false but the model has no output.weight")
    hf = {k: v.contiguous() for k, v in hf.items()}

    out_dir = Path(out_dir)
    with atomic_write_dir(out_dir) as tmp:
        shards = _shard(hf, int(max_shard_size_bytes))
        n = len(shards)
        weight_map = {}
        total = 0
        for i, shard in enumerate(progress(shards, desc="export: write shards", unit="shard"), 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        dtype_name = str(dtype).replace("torch.", "")
        if "dtype" in cfg or "torch_dtype" not in cfg:
            cfg["dtype"] = dtype_name
        cfg["torch_dtype"] = dtype_name
        cfg["tie_word_embeddings"] = tied
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        for f in _COPY_FILES:
            if (base_dir / f).is_file():
                shutil.copy2(base_dir / f, tmp / f)
    return out_dir
