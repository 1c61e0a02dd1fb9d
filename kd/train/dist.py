"""Process-group and device-mesh helpers shared by every recipe, for every world size.

A recipe launched by plain ``tune run`` (no launcher environment) runs as one process without a
process group; under ``torchrun`` / ``tune run --nnodes N --nproc_per_node M`` it initialises one with
the backend that fits the device: NCCL for CUDA, gloo for CPU (torchtune's stock distributed KD
recipe hard-codes NCCL and cannot run on CPU).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from kd.core import statecodec
from kd.core.config import ConfigError
from kd.train.cli_util import one_line, user_error_types


@dataclass(frozen=True)
class DistInfo:
    world_size: int
    rank: int
    local_rank: int
    local_world_size: int

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def resolve_device(name: Optional[str]) -> torch.device:
    """``cuda`` / ``cpu`` / ``auto`` -> device; under a launcher, CUDA ranks get ``cuda:LOCAL_RANK``."""
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={name!r} was requested but CUDA is not available on this machine; "
                "use device=cpu (or device=auto)."
            )
        if name == "cuda":
            idx = int(os.environ.get("LOCAL_RANK", 0))
            name = f"cuda:{idx}"
        dev = torch.device(name)
        torch.cuda.set_device(dev)
        return dev
    if name != "cpu":
        raise ConfigError(f"device={name!r} is not supported: use cpu, cuda or auto.")
    return torch.device("cpu")


def set_cpu_threads(device: torch.device) -> None:
    """On CPU, give each local rank its share of the cores (unless OMP_NUM_THREADS says otherwise).

    Several ranks each running torch's default of one thread per core oversubscribe the machine, and
    OpenMP's spin-waiting then makes every op 10-20x slower (measured on the 2-core CI machine).
    """
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def init_distributed(device: torch.device, timeout_s: int = 1800) -> DistInfo:
    """Initialise the process group when launched by torchrun; pick NCCL for CUDA, gloo for CPU."""
    set_cpu_threads(device)
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
        )
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            world_size=dist.get_world_size(),
            rank=dist.get_rank(),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
        )
    return DistInfo(world_size=1, rank=0, local_rank=0, local_world_size=1)


def build_mesh(info: DistInfo, device: torch.device, strategy: str):
    """Device mesh for FSDP2.

    ``shard``: one dimension over all ranks (FULL_SHARD across nodes).
    ``hybrid``: 2-D (replicate across nodes, shard within a node) = HSDP; the inter-node link then
    carries only the gradient all-reduce of the (small) LoRA parameters, never the weight gathers.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if info.world_size == 1:
        return None
    if strategy == "shard":
        return init_device_mesh(device.type, (info.world_size,), mesh_dim_names=("shard",))
    if strategy == "hybrid":
        n_rep = info.num_nodes
        n_shard = info.world_size // n_rep
        if n_rep * n_shard != info.world_size:
            raise ValueError(
                f"fsdp_strategy=hybrid needs the same number of processes on every node "
                f"(world_size={info.world_size}, local_world_size={info.local_world_size})."
            )
        return init_device_mesh(
            device.type, (n_rep, n_shard), mesh_dim_names=("replicate", "shard")
        )
    raise ValueError(f"fsdp_strategy must be 'shard' or 'hybrid', got {strategy!r}.")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM all-reduce when distributed; identity otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    """Tear the process group down on every rank together: a rank that destroys its gloo group while another is
    still finishing rank-0-only work (the merged export) can abort the process ("terminate called without an
    active exception", seen once in CI on the full fine-tune resume test)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _bcast_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj, src: int = 0):
    """Broadcast a tree of tensors / JSON-able values from ``src`` to every rank, without pickle
    (:mod:`kd.core.statecodec`: the JSON text travels as a uint8 tensor, then every tensor by shape and dtype).
    Identity when not distributed. Tensors come back on the CPU."""

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    dev = _bcast_device()
    me = dist.get_rank()
    if me == src:
        text, tensors = statecodec.encode(obj)
        header = statecodec.encode({"json": text, "specs": [[list(t.shape), str(t.dtype).replace("torch.", "")]
                                                              for t in tensors]})[0].encode()
        n = torch.tensor([len(header)], dtype=torch.int64, device=dev)
    else:
        n = torch.zeros(1, dtype=torch.int64, device=dev)
    dist.broadcast(n, src)
    buf = (torch.frombuffer(bytearray(header), dtype=torch.uint8).to(dev) if me == src
           else torch.empty(int(n.item()), dtype=torch.uint8, device=dev))
    dist.broadcast(buf, src)
    hdr = statecodec.decode(bytes(buf.cpu().tolist()).decode(), [])
    out = []
    for i, (shape, dtype) in enumerate(hdr["specs"]):
        if me == src:
            t = tensors[i].contiguous().to(dev)
        else:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=dev)
        dist.broadcast(t, src)
        out.append(t.cpu())
    return obj if me == src else statecodec.decode(hdr["json"], out)


def rank0_then_broadcast(fn, error_type=RuntimeError):
    """Run ``fn()`` on rank 0 only (e.g. read a checkpoint that only node 0's disk holds) and give its result
    to every rank. A user error raised by ``fn`` on rank 0 is re-raised on every rank (as ``error_type`` with
    the same message elsewhere), so no rank is left waiting in a collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()

    err, res, exc = None, None, None
    if dist.get_rank() == 0:
        try:
            res = fn()
        except user_error_types() as e:
            err, exc = one_line(e), e
    msg = broadcast_object({"error": err, "result": res if err is None else None})
    if msg["error"] is not None:
        if exc is not None:
            raise exc
        raise error_type(msg["error"])
    return msg["result"]


# --------------------------------------------------------------------------------------------------
# Same config and software on every rank (issue 27): one exchange right after init
# --------------------------------------------------------------------------------------------------
# Each node may write to its own disk: output_dir (only rank 0 writes; values under it too) and the teacher cache's
# dir (every node keeps its own copy of the cache, docs/teacher_cache.md).
PER_NODE_KEYS = ("output_dir", "teacher_cache.dir")


def package_versions() -> dict:
    """The versions that must agree across nodes (the ones kd preflight compares)."""
    import platform
    import sys

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for mod in ("torchtune", "torchao", "kd"):
        try:
            m = sys.modules.get(mod) or __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception as e:  # pragma: no cover
            out[mod] = f"missing ({type(e).__name__})"
    return out


def flatten(obj, prefix: str = "") -> dict:
    """Nested dicts/lists -> {dotted.key: leaf value}."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (dict, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def run_fingerprint(cfg) -> dict:
    """{"config <key>": value, ..., "version <package>": version} of the resolved config and the software;
    the per-node paths (:data:`PER_NODE_KEYS`: ``output_dir`` and every value under it, ``teacher_cache.dir``) are left
    out (each node may use its own disk)."""
    from omegaconf import OmegaConf

    conf = flatten(OmegaConf.to_container(cfg, resolve=True))
    out_dir = str(conf.get("output_dir", "") or "")
    fp = {}
    for k, v in conf.items():
        if k in PER_NODE_KEYS or (out_dir and isinstance(v, str) and v.startswith(out_dir)):
            continue
        fp[f"config {k}"] = v
    fp.update({f"version {k}": v for k, v in package_versions().items()})
    return fp


def fingerprint_differences(ref: dict, other: dict) -> list:
    """Sorted keys whose values differ between two fingerprints ("config ..." before "version ...")."""
    missing = "<unset>"
    return [k for k in sorted(set(ref) | set(other)) if ref.get(k, missing) != other.get(k, missing)]


def _all_gather_text(text: str) -> list:
    """Every rank's ``text`` (JSON travels as uint8 tensors, no pickle): two small collectives."""
    dev = _bcast_device()
    data = text.encode()
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    size = max(int(s.item()) for s in sizes)
    buf = torch.zeros(size, dtype=torch.uint8, device=dev)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    bufs = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(bufs, buf)
    return [bytes(b[: int(s.item())].cpu().tolist()).decode() for b, s in zip(bufs, sizes)]


def check_same_run(cfg) -> None:
    """Every rank runs the same resolved config (``output_dir`` excepted) and the same package versions, or every
    rank raises one ConfigError naming the first differing key, instead of hanging later in a collective that the
    ranks call with different shapes. Call it right after init, before any other collective; no-op for one process.
    ``kd preflight`` (launch/run_node.sh) checks the same and more before training; this covers ``KD_PREFLIGHT=0``
    and a bare ``tune run --nnodes N``."""
    import json
    import socket

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = {"host": socket.gethostname(), "fp": run_fingerprint(cfg)}
    texts = _all_gather_text(json.dumps(mine, sort_keys=True, default=str))
    allfp = [json.loads(t) for t in texts]
    ref = allfp[0]
    ref_fp = json.loads(json.dumps(ref["fp"], default=str))  # the same JSON round trip as the others
    for r, other in enumerate(allfp[1:], start=1):
        keys = fingerprint_differences(ref_fp, other["fp"])
        if not keys:
            continue
        k = keys[0]
        kind, _, name = k.partition(" ")
        a, b = ref_fp.get(k, "<unset>"), other["fp"].get(k, "<unset>")
        more = f" ({len(keys)} keys differ: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})" if len(keys) > 1 else ""
        fix = ("install the same wheelhouse on every node (launch/wheelhouse.sh install)" if kind == "version" else
               "pass the same config file and key=value overrides on every node")
        raise ConfigError(
            f"the nodes do not run the same {'software' if kind == 'version' else 'config'}: {name} is {b!r} on rank {r} "
            f"({other['host']}) but {a!r} on rank 0 ({ref['host']}){more}; fix: {fix} (launch/run_node.sh's "
            "preflight checks this before training unless KD_PREFLIGHT=0)."
        )
