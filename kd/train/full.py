"""Full fine-tuning of the student in the KD recipe: sharded checkpoints, exact resume, HF export.

The recipe trains a full student when ``model`` is a non-LoRA builder (e.g.
``torchtune.models.qwen2_5.qwen2_5_7b_instruct``): every parameter is trainable, FSDP2 shards weights,
gradients and optimizer state over the ranks exactly as for the LoRA path (one code path, see
recipes/kd_lora.py). This module holds what differs: the checkpoint.

Checkpoint layout (``<output_dir>/checkpoints``)::

    latest                                 text: "step_0000100" (rank 0)
    step_0000100/meta.json                 format kd-full-checkpoint-v1, step, epoch, world size, mesh (rank 0)
    step_0000100/recipe_state.pt           LR scheduler, counters, dataloader position, RNG of every rank (rank 0)
    shards/step_0000100/rank-00000.safetensors   this rank's FSDP2 shards of the weights + optimizer states
    shards/step_0000100/rank-00000.json          per tensor: global shape and offset of the shard; param_groups

Why per-rank safetensors and not ``torch.distributed.checkpoint`` (DCP): the two DGX Sparks share no file
system, and DCP (torch 2.13) writes its ``.metadata`` on the coordinator only and de-duplicates replicated
tensors (the optimizer's ``step`` counters) onto the lowest rank, so the second node could not load; DCP's
metadata is also a pickle, and kd unpickles nothing it did not write itself. Here every rank writes and reads
only its own shard (no pickle, ``safetensors``), atomically, before rank 0 commits the step directory, so a
checkpoint is complete exactly when ``step_N/meta.json`` exists. Resume needs the same world size and mesh
(checked, with a clear error). :func:`assemble_full_state_dict` stitches all ranks' shards into full tensors
(copy every node's ``shards/step_N`` into one directory first) for an offline HF export.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from kd.core import statecodec
from kd.core.atomic import atomic_path, atomic_write_text
from kd.core.config import ConfigError
from kd.core.state_dict import strip_wrappers
from kd.train import dist as kdist
from kd.train.step_checkpoint import read_recipe_state, step_meta

FORMAT = "kd-full-checkpoint-v1"
SHARDS = "shards"


def is_full_finetune(model_cfg) -> bool:
    """A model section without LoRA settings is a full fine-tune (a plain torchtune builder)."""
    return "lora_rank" not in model_cfg


def all_trainable(name: str) -> bool:
    return True


def check_config(cfg) -> None:
    """Full fine-tune settings the recipe cannot honour fail before anything is loaded."""

    if cfg.get("student_quantization", None) is not None:
        raise ConfigError(
            "student_quantization=nf4 (QLoRA) needs a LoRA builder (e.g. lora_qwen2_5_7b_instruct); with a "
            "plain builder (full fine-tune, kd.train.full) every student weight trains in dtype."
        )
    comp = str(cfg.optimizer.get("_component_", ""))
    if comp.startswith("torchao."):
        raise ConfigError(
            f"optimizer {comp}: its low-bit states are tensor subclasses that the full fine-tune's sharded "
            "checkpoints (kd.train.full, plain safetensors) cannot store. Use torch.optim.AdamW (bf16 states, "
            "4 B/param; `kd plan --gb10 --world-size 2` shows it fits two Sparks)."
        )


def _shard_layout(p: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """(local tensor, {"shape": global shape, "offset": global offset of the local block})."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        assert tuple(shape) == tuple(local.shape), (shape, local.shape)
        return local, {"shape": list(p.shape), "offset": [int(o) for o in offset]}
    return p, {"shape": list(p.shape), "offset": [0] * p.dim()}


def _param_names(model: nn.Module, optimizer) -> List[str]:
    """Clean parameter names in the optimizer's parameter order."""
    by_id = {id(p): strip_wrappers(n) for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _save_tensors_atomic(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT})


def save_shard(shard_dir: Path, model: nn.Module, optimizer, *, rank: int, world_size: int, mesh_shape) -> Path:
    """Write this rank's shard of the weights and optimizer state (``rank-RRRRR.safetensors`` + ``.json``)."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    layout: Dict[str, Any] = {}
    for name, p in model.named_parameters():
        local, lay = _shard_layout(p.detach())
        tensors[f"model/{strip_wrappers(name)}"] = local
        layout[strip_wrappers(name)] = lay
    names = _param_names(model, optimizer)
    sd = optimizer.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if not torch.is_tensor(v):
                raise TypeError(f"optimizer state {k!r} of {names[idx]} is not a tensor ({type(v).__name__})")
            if hasattr(v, "device_mesh"):
                v = v.to_local()
            if type(v) is not torch.Tensor:  # e.g. torchao's OptimState8bit: not storable as one tensor
                raise TypeError(f"optimizer state {k!r} is a {type(v).__name__}; sharded checkpoints support "
                                "optimizers whose states are plain tensors (torch.optim.AdamW).")
            tensors[f"optim/{names[idx]}/{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    p = shard_dir / f"rank-{rank:05d}.safetensors"
    _save_tensors_atomic(tensors, p)
    atomic_write_text(shard_dir / f"rank-{rank:05d}.json", json.dumps(
        {"format": FORMAT, "rank": rank, "world_size": world_size, "mesh_shape": list(mesh_shape),
         "layout": layout, "param_names": names, "param_groups": groups}, indent=1, sort_keys=True))
    return p


def load_shard(shard_dir: Path, model: nn.Module, optimizer, *, rank: int, world_size: int, mesh_shape) -> None:
    """Inverse of :func:`save_shard` for the same world size and mesh (checked)."""
    from safetensors.torch import load_file

    jp, sp = shard_dir / f"rank-{rank:05d}.json", shard_dir / f"rank-{rank:05d}.safetensors"
    if not (jp.is_file() and sp.is_file()):
        raise ConfigError(f"rank {rank}: shard {sp} is missing. Each node keeps its own ranks' shards under "
                          "<output_dir>/checkpoints/shards/: resume on the same nodes (or copy the shards back).")
    meta = json.loads(jp.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{jp}: not a {FORMAT} shard.")
    if meta["world_size"] != world_size or list(meta["mesh_shape"]) != list(mesh_shape):
        raise ConfigError(f"the checkpoint was written by {meta['world_size']} ranks (mesh {meta['mesh_shape']}); "
                          f"this run has {world_size} (mesh {list(mesh_shape)}). Resume with the same launch "
                          "layout, or export it (recipes/export.py full_checkpoint=...) and start a new run from it.")
    saved = load_file(str(sp))
    params = {strip_wrappers(n): p for n, p in model.named_parameters()}
    missing = sorted(set(params) - {k[len("model/"):] for k in saved if k.startswith("model/")})
    if missing:
        raise ConfigError(f"{sp} has no weights for {missing[:3]}: the model config differs from the saved run.")
    with torch.no_grad():
        for name, p in params.items():
            src = saved[f"model/{name}"]
            dst = p.to_local() if hasattr(p, "device_mesh") else p
            if tuple(src.shape) != tuple(dst.shape):
                raise ConfigError(f"{name}: saved shard {tuple(src.shape)} vs model {tuple(dst.shape)}.")
            dst.copy_(src.to(dst.dtype))
    names = _param_names(model, optimizer)
    if names != meta["param_names"]:
        raise ConfigError("the optimizer's parameters differ from the saved run's (another model config?).")
    by_name = {n: p for n, p in zip(names, [p for g in optimizer.param_groups for p in g["params"]])}
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, v in saved.items():
        if not key.startswith("optim/"):
            continue
        pname, k = key[len("optim/"):].rsplit("/", 1)
        p = by_name[pname]
        if hasattr(p, "device_mesh") and k != "step" and tuple(v.shape) == tuple(p.to_local().shape):
            from torch.distributed.tensor import DTensor

            v = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                   shape=p.shape, stride=p.stride())
        state.setdefault(names.index(pname), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _broadcast(obj, rank: int):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_STEP_RE = re.compile(r"^step_(\d{7,})$")


def _prune_shards(root: Path, keep: int, protect: str) -> None:
    """Delete this rank's shard dirs beyond the newest ``keep`` (never ``protect``)."""
    base = root / SHARDS
    if not base.is_dir():
        return
    steps = sorted((int(m.group(1)), d) for d in base.iterdir() if (m := _STEP_RE.match(d.name)) and d.is_dir())
    for _, d in steps[:-keep]:
        if d.name != protect:
            shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(ckpt, step: int, epoch: int, model: nn.Module, optimizer, recipe_state: Optional[Mapping],
                    *, rank: int, world_size: int, mesh_shape) -> Optional[Path]:
    """Collective: every rank writes its shard, then (after a barrier) rank 0 commits ``step_N`` and
    ``latest``; retention applies to step dirs (rank 0) and to every rank's own shards."""

    name = ckpt.step_dir_name(step)
    save_shard(ckpt.output_dir / SHARDS / name, model, optimizer, rank=rank, world_size=world_size,
               mesh_shape=mesh_shape)
    kdist.barrier()  # every shard is on disk before the step becomes visible
    path = None
    if rank == 0:
        # the manager's commit: atomic step dir (every file fsynced), then ``latest``, then retention
        meta = {**step_meta(FORMAT, step, epoch), "world_size": world_size, "mesh_shape": list(mesh_shape),
                "shards": f"{SHARDS}/{name}"}
        # tensors + JSON (kd.core.statecodec), so resume loads it with weights_only=True: no pickle runs
        path = ckpt.commit(step, meta, lambda tmp: torch.save(statecodec.pack(dict(recipe_state)),
                                                              tmp / "recipe_state.pt"))
    if ckpt.keep_last_n is not None:
        _prune_shards(ckpt.output_dir, ckpt.keep_last_n, protect=name)
    kdist.barrier()
    return path


def load_checkpoint(ckpt, model: nn.Module, optimizer, *, rank: int, world_size: int, mesh_shape):
    """Resume: rank 0 finds the latest complete step and reads its recipe state, every rank loads its own
    shard. Returns (step dir name, recipe_state)."""

    info = None
    if rank == 0:
        latest = ckpt.latest()
        if latest is None:
            info = ("missing", str(ckpt.output_dir))
        else:
            meta = json.loads((latest / "meta.json").read_text())
            if meta.get("format") != FORMAT:
                info = ("format", f"{latest} is a {meta.get('format')!r} checkpoint (a LoRA run?), not {FORMAT}")
            else:
                state = read_recipe_state(latest / "recipe_state.pt")  # weights_only=True, named on damage
                info = ("ok", latest.name, state)
    info = _broadcast(info, rank)
    if info[0] == "missing":
        raise ConfigError(f"resume_from_checkpoint=True but no checkpoint was found under {info[1]}.")
    if info[0] == "format":
        raise ConfigError(info[1] + ": resume it with the config that wrote it.")
    _, name, state = info
    load_shard(ckpt.output_dir / SHARDS / name, model, optimizer, rank=rank, world_size=world_size,
               mesh_shape=mesh_shape)
    return name, state


def assemble_full_state_dict(shard_dir: str | Path) -> Dict[str, torch.Tensor]:
    """Full model tensors (torchtune names) from every rank's shard in ``shard_dir`` (offline, one process)."""
    from safetensors import safe_open

    d = Path(shard_dir)
    metas = sorted(d.glob("rank-*.json"))
    if not metas:
        raise ConfigError(f"no rank-*.json shards in {d}.")
    world = json.loads(metas[0].read_text())["world_size"]
    have = {json.loads(m.read_text())["rank"] for m in metas}
    if have != set(range(world)):
        raise ConfigError(f"{d} has shards of ranks {sorted(have)} but the run had {world}: copy the shards/ "
                          "folder of every node into it first.")
    full: Dict[str, torch.Tensor] = {}
    filled: Dict[str, int] = {}
    for m in metas:
        meta = json.loads(m.read_text())
        with safe_open(str(m.with_suffix(".safetensors")), framework="pt") as h:
            for name, lay in meta["layout"].items():
                t = h.get_tensor(f"model/{name}")
                if name not in full:
                    full[name] = torch.zeros(lay["shape"], dtype=t.dtype)
                    filled[name] = 0
                if t.numel() == 0:
                    continue
                sl = tuple(slice(o, o + s) for o, s in zip(lay["offset"], t.shape))
                full[name][sl] = t
                filled[name] += t.numel()
    short = [n for n, t in full.items() if filled[n] < t.numel()]
    if short:
        raise ConfigError(f"shards in {d} do not cover {short[:3]}.")
    return full
