"""Setup-time checks shared by the recipes: each turns a user mistake into one ``ConfigError`` line that
names the key, *before* any model is loaded (a 72B teacher takes minutes to stream in).

- :func:`writable_dir` -- ``output_dir`` exists or can be created, and a file can be written there;
- :func:`check_run_dir` -- a fresh run refuses an ``output_dir`` holding another run's checkpoints (unless
  ``overwrite=True``); a resume refuses a changed data set / batch size / ``max_seq_len`` / seed / shuffle
  (and a changed world size mid-epoch), since the saved dataloader position would point at other samples;
- :func:`check_optimizer`, :func:`check_dtype`, :func:`check_lora`, :func:`check_tokenizer_section`,
  :func:`build_tokenizer`, :func:`check_tokenizer_fits` -- the values torch / torchtune would otherwise
  reject with a traceback deep inside a builder.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional

from kd.core.atomic import delete_dir
from kd.core.config import ConfigError, number, to_container
from kd.core.layout import CHECKPOINTS
from kd.train import dist as kdist
from kd.train.models import build_on_meta
from kd.train.step_checkpoint import CheckpointManager

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kd.checks")

__all__ = [
    "writable_dir", "run_info", "check_run_dir", "check_optimizer", "check_dtype", "check_lora",
    "check_tokenizer_section", "build_tokenizer", "check_tokenizer_fits", "embedding_rows", "model_max_seq_len",
    "check_seq_len_fits", "unwritable_reason", "check_lr_scheduler", "lock_node_dir",
]

DTYPES = ("bf16", "bfloat16", "fp32", "float32")


def writable_dir(path: Any, key: str = "output_dir") -> Path:
    """Create ``path`` if needed and prove it is writable (a probe file is written and removed)."""
    p = Path(str(path))
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".kd-write-test-{os.getpid()}"
        with open(probe, "w") as f:
            f.write("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"{key}={str(path)!r} is not writable ({e.strerror or e}); pick a directory you can write to."
        ) from None
    return p


def unwritable_reason(path: Any) -> Optional[str]:
    """Why ``path`` (or, when it does not exist yet, its nearest existing parent) cannot take a new file, else None.
    Probes with a temporary file, so a read-only mount is told apart from a full disk, also for root."""
    import tempfile

    p = Path(str(path)).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=p, prefix=".kd-write-test-"):
            pass
    except OSError as e:
        return f"{p} is read-only" if e.errno == errno.EROFS else f"cannot write in {p}: {e.strerror or e}"
    return None


def lock_node_dir(output_dir: Any, info, rank0_lock: Optional[Dict[str, Any]], what: str):
    """Several nodes: each node's local rank 0 (global rank 0 holds the run's lock already) also holds the lock of
    ``output_dir`` as its node sees it -- its own disk without a shared file system, where another run could be
    writing -- or finds rank 0's own lock there (shared file system) and takes nothing. Collective: every rank
    raises the same one-line ConfigError when a node's directory is in use. Returns the held lock or None."""
    import json

    from kd.core import run_lock

    if not (kdist.dist.is_available() and kdist.dist.is_initialized()) or info.world_size == 1:
        return None
    lock, err = None, ""
    if info.local_rank == 0 and info.rank != 0:
        try:
            lock = run_lock.acquire(output_dir, what, shared_with=rank0_lock)
        except ConfigError as e:
            err = f"rank {info.rank}: {e}"
    errs = [json.loads(t) for t in kdist._all_gather_text(json.dumps(err)) if json.loads(t)]
    if errs:
        if lock is not None:
            lock.release()
        raise ConfigError(errs[0])
    return lock


# --------------------------------------------------------------------------------------------------
# fresh run vs resume
# --------------------------------------------------------------------------------------------------
RUN_KEYS_REFUSE = ("dataset", "batch_size", "max_seq_len", "seed", "shuffle")


def run_info(cfg, world_size: int) -> Dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (stored in meta.json)."""
    tok = cfg.get("tokenizer", None)
    return {
        "dataset": to_container(cfg.get("dataset", None)),
        "batch_size": cfg.get("batch_size", 1),
        "max_seq_len": None if tok is None else to_container(tok.get("max_seq_len", None)),
        "seed": cfg.get("seed", None),
        "shuffle": bool(cfg.get("shuffle", True)),
        "world_size": int(world_size),
    }


def _diff(a: Any, b: Any, path: str) -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{path}.{k}")
        return out
    return [] if a == b else [f"{path}: checkpoint={a!r} vs now={b!r}"]


def check_run_dir(output_dir: Any, *, resume: bool, overwrite: bool, info: Mapping[str, Any],
                  ckpt_subdir: str = CHECKPOINTS) -> None:
    """Rank 0, before anything is written to ``output_dir`` (so a refused run changes nothing there)."""

    mgr = CheckpointManager(Path(str(output_dir)) / ckpt_subdir)
    existing = mgr.list_checkpoints()
    if not resume:
        if not existing:
            return
        names = ", ".join(p.name for p in existing[-3:])
        if not overwrite:
            raise ConfigError(
                f"output_dir {str(output_dir)!r} already holds checkpoints of a run ({len(existing)}: ... {names}); "
                "a fresh run would overwrite them. Continue that run with resume_from_checkpoint=True, pick a new "
                "output_dir, or pass overwrite=True to replace them."
            )
        log.warning(f"overwrite=True: deleting {len(existing)} checkpoint(s) of the previous run in {mgr.output_dir}")
        for p in existing:
            delete_dir(p)
        (mgr.output_dir / mgr.LATEST).unlink(missing_ok=True)
        return
    latest = mgr.latest()
    if latest is None:
        return  # the resume itself reports "no checkpoint"
    import json

    try:
        saved = json.loads((latest / "meta.json").read_text()).get("run", None)
    except (OSError, ValueError):
        return  # unreadable meta: the resume falls back to an older checkpoint and reports it
    if not saved:
        log.warning(f"{latest} records no run settings (older kd): cannot check the data set / batch size match")
        return
    diffs, soft = [], []
    mid_epoch = int(saved.get("step_in_epoch", 0) or 0) > 0
    for k in RUN_KEYS_REFUSE + ("world_size",):
        if k in saved:
            d = _diff(saved.get(k), info.get(k), k)
            # at an epoch boundary no dataloader position is restored: only a different data set is refused
            (diffs if (k == "dataset" or mid_epoch) else soft).extend(d)
    if soft and not diffs:
        log.warning(f"resuming {latest} at an epoch boundary with changed settings ({'; '.join(soft)}): no "
                    "dataloader position is restored, the next epoch simply uses the new values")
    if diffs:
        raise ConfigError(
            f"resume_from_checkpoint=True but this run's data settings differ from the checkpoint {latest} "
            f"({'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''}): the saved dataloader position would point "
            "at other samples. Restore those values, or start a fresh run in a new output_dir."
        )


# --------------------------------------------------------------------------------------------------
# values torch / torchtune would reject with a traceback
# --------------------------------------------------------------------------------------------------
def check_dtype(cfg, key: str = "dtype", default: str = "bf16") -> str:
    v = str(cfg.get(key, default))
    if v in ("fp16", "float16", "half"):
        raise ConfigError(f"{key}=fp16 is not supported (no loss scaling); use bf16 or fp32.")
    if v not in DTYPES:
        hint = " (a quantized teacher is teacher_quantization=nf4)" if "8" in v or "4" in v else ""
        raise ConfigError(f"{key}={v!r} is not supported: use bf16 or fp32{hint}.")
    return v


def check_device(cfg, default: str = "auto") -> "torch.device":
    """``cfg.device`` (auto | cpu | cuda | cuda:N, ...) as a torch.device; a bad value is one ConfigError line."""

    try:
        return kdist.resolve_device(cfg.get("device", default))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _component_class(section, key: str):
    from torchtune.config._utils import _get_component_from_path

    comp = section.get("_component_")
    try:
        return _get_component_from_path(comp)
    except Exception as e:
        raise ConfigError(f"{key}._component_={comp!r} cannot be imported ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}).") from None


def check_optimizer(cfg, key: str = "optimizer") -> None:
    """Instantiate the optimizer on one dummy parameter: catches a misspelled argument (with a suggestion)
    and invalid values (``lr=-1``) in seconds instead of after the models are loaded."""
    import torch
    from torchtune import config as tt_config

    section = cfg.get(key)
    cls = _component_class(section, key)
    args = [k for k in section.keys() if k != "_component_"]
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        known = [n for n in params if n not in ("self", "params")]
        bad = [a for a in args if a not in known]
        if bad:
            sugg = difflib.get_close_matches(bad[0], known, n=1, cutoff=0.6)
            raise ConfigError(
                f"{key}.{bad[0]} is not an argument of {section.get('_component_')}"
                f"{' (did you mean ' + key + '.' + sugg[0] + '?)' if sugg else ''}; valid: {', '.join(known)}."
            )
    try:
        tt_config.instantiate(section, [torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as e:  # bad argument names / values
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"bad {key} settings ({section.get('_component_')}): {msg}.") from None
    except Exception as e:  # e.g. a GPU-only optimizer refusing a CPU tensor: judged at the real build
        log.debug(f"{key}: dry build skipped ({type(e).__name__}: {e})")


def check_lr_scheduler(cfg, key: str = "lr_scheduler") -> None:
    """Warm-up / cycle counts in range, and the scheduler built once on a dummy optimizer (a misspelled argument
    fails now, as one line, instead of after the models are loaded)."""
    import torch
    from torchtune import config as tt_config

    section = cfg.get(key, None)
    if section is None or not hasattr(section, "get"):
        return
    for k in ("num_warmup_steps",):
        if k in section:
            number(section, k, 0, kind=int, min_value=0, name=f"{key}.{k}")
    if "num_cycles" in section:
        number(section, "num_cycles", 0.5, min_value=0.0, name=f"{key}.num_cycles")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        tt_config.instantiate(section, opt, num_training_steps=1 + int(section.get("num_warmup_steps", 0) or 0),
                              last_epoch=-1)
    except (TypeError, ValueError) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"bad {key} settings ({section.get('_component_')}): {msg}.") from None
    except Exception as e:  # judged at the real build
        log.debug(f"{key}: dry build skipped ({type(e).__name__}: {e})")


def check_lora(model_cfg, key: str = "model") -> None:
    number(model_cfg, "lora_rank", None, kind=int, min_value=1, name=f"{key}.lora_rank")
    number(model_cfg, "lora_alpha", None, min_value=0.0, name=f"{key}.lora_alpha")
    if "lora_dropout" in model_cfg:
        number(model_cfg, "lora_dropout", 0.0, min_value=0.0, max_value=1.0, name=f"{key}.lora_dropout")


_TOKENIZER_FILES = ("path", "merges_file", "special_tokens_path")


def check_tokenizer_section(cfg, key: str = "tokenizer", files: bool = True) -> None:
    """``max_seq_len`` is a positive integer (or null) and (``files``) every tokenizer file the section names
    exists (``kd plan`` checks the values only: it plans runs whose models are not downloaded yet)."""
    section = cfg.get(key)
    number(section, "max_seq_len", None, kind=int, min_value=1, allow_none=True, name=f"{key}.max_seq_len")
    if not files:
        return
    for k in _TOKENIZER_FILES:
        v = section.get(k, None)
        if isinstance(v, str) and not Path(v).is_file():
            raise ConfigError(f"{key}.{k}={v!r} does not exist (a tokenizer file: vocab.json / merges.txt / "
                              "tokenizer.json of the model's HF checkpoint).")


def build_tokenizer(cfg, key: str = "tokenizer"):
    from torchtune import config as tt_config

    check_tokenizer_section(cfg, key)
    try:
        return tt_config.instantiate(cfg.get(key))
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot build the tokenizer ({cfg.get(key).get('_component_')}): {msg}") from None


def embedding_rows(model_cfg) -> int:
    """Token-embedding rows of a torchtune model builder (``vocab_size`` if given, else a meta-device build)."""
    v = model_cfg.get("vocab_size", None)
    if v is not None:
        return int(v)
    return _meta_dims(model_cfg)[0]


_META_DIMS: Dict[str, tuple] = {}


def _meta_dims(model_cfg) -> tuple:
    """(embedding rows, max_seq_len or None) of a model builder, from one meta-device build per section."""
    import json

    import torch

    key = json.dumps(to_container(model_cfg), sort_keys=True, default=str)
    if key not in _META_DIMS:
        model = build_on_meta(model_cfg, torch.bfloat16)
        msl = getattr(model, "max_seq_len", None)
        _META_DIMS[key] = (int(model.tok_embeddings.num_embeddings), int(msl) if isinstance(msl, int) else None)
    return _META_DIMS[key]


def model_max_seq_len(model_cfg) -> Optional[int]:
    """The longest sequence a torchtune model builder accepts (``max_seq_len`` if given, else a meta-device build)."""
    v = model_cfg.get("max_seq_len", None)
    return int(v) if v is not None else _meta_dims(model_cfg)[1]


def check_seq_len_fits(cfg, models: Iterable[tuple]) -> None:
    """``tokenizer.max_seq_len`` (and a dataset's own ``max_seq_len``) must not exceed any model's ``max_seq_len``:
    the first sample that long would otherwise stop the run with torchtune's traceback. ``models`` as in
    :func:`check_tokenizer_fits`."""
    lens = []
    tok = cfg.get("tokenizer", None)
    if tok is not None and tok.get("max_seq_len", None) is not None:
        lens.append(("tokenizer.max_seq_len", int(tok.max_seq_len)))
    ds = cfg.get("dataset", None)
    many = ds is not None and not hasattr(ds, "keys")  # a list of datasets (ConcatDataset)
    for i, d in enumerate(ds if many else [ds]):
        if hasattr(d, "get") and d.get("max_seq_len", None) is not None:
            lens.append((f"dataset{f'[{i}]' if many else ''}.max_seq_len", int(d.max_seq_len)))
    if not lens:
        return
    for key, section in models:
        if section is None:
            continue
        m = model_max_seq_len(section)
        if m is None:
            continue
        for name, n in lens:
            if n > m:
                raise ConfigError(
                    f"{name}={n} is above {key}'s max_seq_len={m}: a sample that long would stop the run at its "
                    f"first batch; set {name} <= {m} (or use a {key} built for longer sequences)."
                )


def tokenizer_max_id(tokenizer) -> Optional[int]:
    ids: List[int] = []
    enc = getattr(tokenizer, "encoder", None)
    if isinstance(enc, dict) and enc:
        ids.append(max(enc.values()))
    sp = getattr(tokenizer, "special_tokens", None)
    if isinstance(sp, dict) and sp:
        ids.append(max(sp.values()))
    for a in ("pad_id", "eos_id", "bos_id"):
        v = getattr(tokenizer, a, None)
        if isinstance(v, int):
            ids.append(v)
    return max(ids) if ids else None


def check_tokenizer_fits(tokenizer, models: Iterable[tuple]) -> None:
    """Every id the tokenizer can produce (vocabulary + special tokens) has an embedding row in each model.
    ``models``: (config key, model section) pairs, e.g. (("model", cfg.model), ("teacher_model", ...))."""
    top = tokenizer_max_id(tokenizer)
    if top is None:
        return
    for key, section in models:
        if section is None:
            continue
        rows = embedding_rows(section)
        if top >= rows:
            raise ConfigError(
                f"the tokenizer produces token ids up to {top} but {key} has only {rows} embedding rows "
                f"({key}.vocab_size): use the tokenizer of the model's checkpoint, or the matching model builder."
            )


def free_bytes(path: Any) -> int:
    p = Path(str(path)).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_ignore_index(cfg) -> int:
    """kd's datasets (and torchtune's) mask prompt/padding labels with -100; any other ``ignore_index`` would
    count those positions as targets (torch rejects label -100 unless it is the ignore_index)."""
    for key in ("loss", "kd_loss"):
        section = cfg.get(key, None)
        if section is not None and "ignore_index" in section:
            v = section.get("ignore_index")
            if v != -100:
                raise ConfigError(
                    f"{key}.ignore_index={v!r}: the datasets mask prompt and padding labels with -100 "
                    "(torchtune's CROSS_ENTROPY_IGNORE_IDX), so only -100 is supported; remove the key."
                )
    return -100
