"""Preflight checks for a (multi-node) KD run, executed under the same launcher as the training run.

    torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
        -m kd.ops.preflight --config configs/qwen2_5/72B_to_7B_kd_lora.yaml [key=value ...]
    kd preflight --config ... [key=value ...]          # one process, this node only

Every rank checks its own node and the results are exchanged with ``all_gather_object``:

- world size, ranks, hostnames; torch / torchtune / torchao / CUDA / Python versions identical everywhere;
- a hash of the code (git tracked + untracked-not-ignored files, or the package sources) and of the resolved
  config identical everywhere (nodes with different code or config refuse to start);
- GPU arch supported by the installed torch (GB10 = sm_121 needs a CUDA >= 12.8 build);
- an all-reduce bandwidth test through the real process group with a bounded payload (``--bw-mb``, at most
  ``MAX_BW_MB``: a 16 GB test has frozen a DGX Spark through unified-memory exhaustion), compared with the bytes
  the planner says cross the link per optimizer step (:func:`kd.ops.planner.cross_node_bytes_per_step`): one
  ``link:`` line, and a WARNING with the expected slowdown per step when NCCL's rate is below half the nominal;
- the NCCL / RoCE environment of every node (:mod:`kd.ops.netcheck`: both halves of the ConnectX-7 port in
  NCCL_IB_HCA, MTU 9000, GID index, socket interfaces, GPUDirect facts) when the run spans several processes;
- both checkpoints complete (every shard in model.safetensors.index.json present, with the size its
  safetensors header implies; index total_size consistent) and matching the configured builders
  (layers, hidden size, heads, vocab; teacher vocab == student vocab);
- free memory vs the planner's estimate, free disk in output_dir vs the checkpoints to be written;
- the teacher precision path (``kd.teacher.precision``: e.g. ``fp8 [fp8:torchao]``, or the fallback and why).

Each problem is printed as one line naming the node (hostname + rank), what is wrong and how to fix it;
the exit code is 1 on every rank when any rank found a problem (2 for a config error).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from kd.core.config import ConfigError
from kd.core.errors import CheckpointError
from kd.ops.kernel_check import kernel_report
from kd.ops.netcheck import cuda_dmabuf_supported, nccl_report
from kd.ops.planner import GiB, checkpoint_bytes, cross_node_bytes_per_step, plan_from_config
from kd.teacher.precision import check_sharding, resolve_precision
from kd.train import dist as kdist
from kd.train.cli_util import load_yaml_file, merge_overrides, user_error_types
from kd.train.models import check_matches_hf_config, read_hf_config, resolve_checkpoint_files
from kd.train.run_checks import unwritable_reason

REPO_ROOT = Path(__file__).resolve().parents[2]
# What NCCL reaches between two DGX Sparks over one 200 Gb/s RoCE port (ConnectX-7, line rate 25 GB/s) with both
# PCIe halves in NCCL_IB_HCA and MTU 9000: ~24 GB/s bus bandwidth (23.74 GB/s in dgx-spark-playbooks PR 103).
DEFAULT_NOMINAL_GBPS = 24.0
MAX_BW_MB = 512.0  # the bandwidth test's payload cap, whatever --bw-mb says (unified memory: see run())
CODE_DIRS = ("kd", "recipes", "configs", "launch")
SAFETENSORS_HEADER_LIMIT = 100 * 2**20


# --------------------------------------------------------------------------------------------------
# Local facts
# --------------------------------------------------------------------------------------------------
def versions() -> Dict[str, str]:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for mod in ("torchtune", "torchao"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # pragma: no cover
            out[mod] = f"missing ({type(e).__name__})"
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = "none"
    if torch.cuda.is_available():
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
    return out


def _code_files(root: Path) -> List[Path]:
    try:
        res = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, check=True, timeout=60,
        )
        names = sorted(set(n for n in res.stdout.decode().split("\0") if n))
        files = [root / n for n in names]
        return [f for f in files if f.is_file()]
    except (OSError, subprocess.SubprocessError):
        files = []
        for d in CODE_DIRS:
            files += [p for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        for n in ("pyproject.toml", "kd_recipes_hook.py"):
            if (root / n).is_file():
                files.append(root / n)
        return sorted(files)


def code_hash(root: Path = REPO_ROOT) -> Tuple[str, int]:
    """sha256 over (path, content) of the repository's source files; (hex digest, number of files)."""
    h = hashlib.sha256()
    files = _code_files(root)
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest(), len(files)


def config_text(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True)


def config_hash(cfg) -> str:
    return hashlib.sha256(config_text(cfg).encode()).hexdigest()


def mem_available_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _existing_parent(p: Path) -> Path:
    p = p.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


# --------------------------------------------------------------------------------------------------
# Checkpoint checks
# --------------------------------------------------------------------------------------------------
def _safetensors_expected_size(path: Path) -> Tuple[int, int, List[str]]:
    """(file size implied by the header, sum of tensor bytes, tensor names) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("file shorter than the 8-byte safetensors header length")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > SAFETENSORS_HEADER_LIMIT:
            raise ValueError(f"implausible safetensors header length {n}")
        header = f.read(n)
        if len(header) < n:
            raise ValueError("file truncated inside the safetensors header")
    meta = json.loads(header)
    end, data = 0, 0
    names = []
    for k, v in meta.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        end = max(end, b)
        data += b - a
        names.append(k)
    return 8 + n + end, data, names


def _check_shards(which: str, files: List[Path], ckdir: Path, fix_copy: str, problems: List[str]) -> int:
    """Shard sizes vs their headers, the index's tensors vs their shards, index ``total_size`` vs the shards'
    tensor bytes; appends to ``problems``. Returns the shards' tensor bytes."""
    total_data = 0
    index = ckdir / "model.safetensors.index.json"
    weight_map: Dict[str, str] = {}
    idx_total = None
    if index.is_file():
        try:
            idx = json.loads(index.read_text())
            weight_map = idx.get("weight_map", {})
            idx_total = (idx.get("metadata") or {}).get("total_size")
        except ValueError as e:
            problems.append(f"{which} checkpoint: {index} is not valid JSON ({e}); fix: {fix_copy}.")
    shard_names: Dict[str, set] = {}
    for f in files:
        try:
            expected, data, names = _safetensors_expected_size(f)
        except (OSError, ValueError) as e:
            problems.append(f"{which} checkpoint: shard {f} is unreadable ({e}); fix: {fix_copy}.")
            continue
        actual = f.stat().st_size
        if actual != expected:
            problems.append(
                f"{which} checkpoint: shard {f} has {actual:,} bytes but its header describes {expected:,} "
                f"({'truncated' if actual < expected else 'trailing data'}: incomplete download/copy?); "
                f"fix: {fix_copy}."
            )
        total_data += data
        shard_names[f.name] = set(names)
    if files and weight_map and len(shard_names) == len(files):
        lost = [t for t, fn in weight_map.items() if fn in shard_names and t not in shard_names[fn]]
        if lost:
            problems.append(f"{which} checkpoint: {len(lost)} tensor(s) listed in {index} are not in their "
                            f"shard (e.g. {lost[0]!r} in {weight_map[lost[0]]}); fix: {fix_copy}.")
    if idx_total is not None and files and len(shard_names) == len(files) and not problems:
        # HF writes total_size = sum of tensor bytes (some tools include headers: allow 1%)
        if abs(int(idx_total) - total_data) > 0.01 * max(total_data, 1):
            problems.append(
                f"{which} checkpoint: index metadata.total_size={int(idx_total):,} bytes but the shards hold "
                f"{total_data:,} bytes of tensors; fix: {fix_copy}."
            )
    return total_data


def check_checkpoint(which: str, section, model_cfg, dtype) -> Tuple[List[str], Dict[str, Any]]:
    """Problems (fix included) with one checkpoint directory, and facts (vocab, total bytes)."""

    problems: List[str] = []
    facts: Dict[str, Any] = {}
    key = "checkpointer" if which == "student" else "teacher_checkpointer"
    ckdir = Path(str(section.get("checkpoint_dir")))
    fix_copy = (f"copy the complete checkpoint to {ckdir} on this node (e.g. rsync -a --partial from the node "
                f"where it is complete) or fix {key}.checkpoint_dir")
    try:
        files = resolve_checkpoint_files(ckdir, section.get("checkpoint_files", None))
    except CheckpointError as e:
        index = ckdir / "model.safetensors.index.json"
        missing = []
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                missing = [n for n in names if not (ckdir / n).is_file()]
            except (ValueError, KeyError):
                pass
        if missing:
            problems.append(f"{which} checkpoint: {len(missing)} shard(s) named in {index} are missing: "
                            f"{', '.join(missing)}; fix: {fix_copy}.")
        else:
            problems.append(f"{which} checkpoint: {e} Fix: {fix_copy}.")
        files = []
    total_data = _check_shards(which, files, ckdir, fix_copy, problems)
    facts["bytes"] = total_data
    # config.json vs the configured builder
    try:
        hf = read_hf_config(ckdir)
        facts["hf_vocab"] = hf.get("vocab_size")
    except CheckpointError as e:
        problems.append(f"{which} checkpoint: {e} Fix: {fix_copy}.")
        hf = None
    try:
        from kd.train.models import build_on_meta, model_dims

        model = build_on_meta(model_cfg, dtype)
        facts["vocab"] = model_dims(model)["vocab_size"]
        if hf is not None:
            try:
                check_matches_hf_config(model, hf, which=which, path=str(ckdir))
            except CheckpointError as e:
                problems.append(" ".join(str(e).split()))
    except Exception as e:
        problems.append(f"{which} model builder {model_cfg.get('_component_')!r} failed on the meta device: {e}; "
                        f"fix the '{'model' if which == 'student' else 'teacher_model'}' section.")
    return problems, facts


def check_gpu_arch() -> List[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    major, minor = torch.cuda.get_device_capability()
    archs = torch.cuda.get_arch_list()
    name = torch.cuda.get_device_name()
    problems = []
    cuda = torch.version.cuda or "0"
    cv = tuple(int(x) for x in cuda.split(".")[:2])
    if major >= 12 and cv < (12, 8):
        problems.append(
            f"GPU {name} is sm_{major}{minor} but torch {torch.__version__} was built with CUDA {cuda}; "
            "Blackwell (GB10 = sm_121) needs a CUDA >= 12.8 build: install a cu128/cu130 torch wheel "
            "(aarch64: https://download.pytorch.org/whl/cu130) or use NVIDIA's PyTorch container."
        )
    cc = major * 10 + minor
    ok = False
    for a in archs:
        kind, _, num = a.partition("_")
        if not num.isdigit():
            continue
        v = int(num)
        if kind == "sm" and v // 10 == major and v <= cc:  # cubins run on later minor revisions
            ok = True
        if kind == "compute" and v <= cc:  # PTX is JIT-compiled forward
            ok = True
    if not ok:
        problems.append(
            f"GPU {name} is sm_{major}{minor} but this torch build only has kernels for {' '.join(archs)}; "
            "install a torch build that includes this architecture (CUDA >= 12.8 for Blackwell)."
        )
    return problems


# --------------------------------------------------------------------------------------------------
# Bandwidth
# --------------------------------------------------------------------------------------------------
def allreduce_bandwidth(device, size_mb: float, iters: int = 5, warmup: int = 2) -> Tuple[float, float]:
    """(bus GB/s, seconds per all-reduce) through the default process group (nccl-tests convention:
    busbw = bytes * 2(n-1)/n / time)."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size()
    numel = max(1, int(size_mb * 2**20 / 4))
    t = torch.ones(numel, dtype=torch.float32, device=device)
    for _ in range(warmup):
        dist.all_reduce(t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / iters
    busbw = numel * 4 * 2 * (n - 1) / n / dt / 1e9
    return busbw, dt


def bw_payload_mb(requested: Optional[float], device_type: str) -> Tuple[float, Optional[str]]:
    """(MiB to all-reduce, a one-line notice when ``requested`` was clamped). Default 256 MiB on GPUs, 16 on CPU;
    never above ``MAX_BW_MB``: the test tensor and NCCL's buffers live in the GB10's unified memory, and a 16 GB
    nccl-tests run has frozen a Spark (dgx-spark-playbooks issue 102); a few hundred MB measure the bus rate as well."""
    size = (256.0 if device_type == "cuda" else 16.0) if requested is None else float(requested)
    if not size > 0:
        raise ConfigError(f"--bw-mb must be > 0 (MiB), got {requested}")
    if size > MAX_BW_MB:
        return MAX_BW_MB, (f"--bw-mb {requested:g} clamped to {MAX_BW_MB:g} MiB (a larger all-reduce payload can "
                           "exhaust a GB10's unified memory and freeze the node; this size measures the bus rate as well)")
    return size, None


def link_report(bus_gbps: float, traffic, nominal_gbps: float, *, step_s: Optional[float] = None,
                step_src: str = "", slow: bool = False) -> Tuple[str, Optional[str]]:
    """The ``link:`` line (measured bus rate vs the bytes this config moves across nodes per optimizer step) and,
    when ``slow``, a warning with the expected slowdown: seconds per step beyond the nominal rate, and their share of
    the planner's step time ``step_s`` (kd.ops.jobtime, profile ``step_src``) when known."""
    y = traffic.total / 1e9
    if traffic.nodes <= 1 or traffic.total <= 0:
        line = (f"link: {bus_gbps:.2f} GB/s measured; this config moves nothing across nodes per optimizer step "
                f"({'one node' if traffic.nodes <= 1 else traffic.describe()})")
        return line, None
    z, w = traffic.seconds(bus_gbps), traffic.seconds(nominal_gbps)

    def secs(x: float) -> str:
        return f"{x:.2f}" if x >= 0.01 else f"{x:.2g}"

    line = (f"link: {bus_gbps:.2f} GB/s measured; this config moves {y:.3g} GB per optimizer step across nodes = "
            f"{secs(z)} s per step at this rate ({secs(w)} s at the nominal {nominal_gbps:g} GB/s) "
            f"[{traffic.describe()}]")
    if not slow:
        return line, None
    extra = z - w
    share = (f" = +{100 * extra / step_s:.0f}% of the planner's {step_s:.2f} s step ({step_src})"
             if step_s and step_s > 0 else "")
    warning = (f"inter-node bus bandwidth {bus_gbps:.2f} GB/s is {100 * bus_gbps / nominal_gbps:.0f}% of the nominal "
               f"{nominal_gbps:g} GB/s: this config's {y:.3g} GB per optimizer step across nodes take {z:.2f} s instead "
               f"of {w:.2f} s, expected slowdown +{extra:.2f} s per step{share} (less where FSDP overlaps it with "
               "compute). NCCL probably uses TCP sockets or one half of the ConnectX-7 port: see the NCCL environment "
               "lines (NCCL_IB_HCA naming both halves, MTU 9000), rerun with NCCL_DEBUG=INFO and look for 'NET/IB' "
               "(good) vs 'NET/Socket'.")
    return line, warning


def planner_step_s(cfg, world_size: int, hardware: str) -> Tuple[Optional[float], str]:
    """kd.ops.jobtime's optimizer-step time for ``cfg`` on the ``hardware`` profile, from a 200-record sample of
    the data set (about a second); (None, why) when it cannot be estimated here."""
    try:
        from kd.ops.jobtime import data_stats, estimate_job, load_hardware

        hw = load_hardware(hardware)
        est = estimate_job(cfg, hw, stats=data_stats(cfg, sample_records=200), world_size=world_size)
        return est.step_s, f"kd plan --time, {hw.name} profile"
    except Exception as e:  # advice only: never fail the preflight on it
        return None, f"no step-time estimate: {type(e).__name__}"


# --------------------------------------------------------------------------------------------------
# Main check
# --------------------------------------------------------------------------------------------------
@dataclass
class NodeReport:
    rank: int
    local_rank: int
    hostname: str
    node_rank_env: str
    versions: Dict[str, str]
    code: str
    code_files: int
    config: str
    gpu: str
    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    info: List[str] = field(default_factory=list)
    vocab: Dict[str, Any] = field(default_factory=dict)
    config_text: str = ""

    @property
    def where(self) -> str:
        return f"{self.hostname} rank {self.rank}"


def _memory_and_disk_checks(cfg, rep: NodeReport, device, world_size: int, rank: int) -> None:
    """The memory plan (kd.ops.planner) against this node's free memory, and (global rank 0) the checkpoints' size
    against output_dir's free disk; adds to ``rep``."""
    import torch

    try:
        plan = plan_from_config(cfg, world_size)
        need = plan.peak_bytes + plan.inputs.reserve_bytes
        avail = mem_available_bytes()
        src = "MemAvailable"
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            integrated = bool(getattr(torch.cuda.get_device_properties(device), "is_integrated", False))
            if integrated and avail is not None:
                free, src = max(free, avail), "unified memory (max of cudaMemGetInfo, MemAvailable)"
            else:
                avail, src = free, "cudaMemGetInfo free"
            avail = free
        rep.info.append(f"memory: plan peak {plan.peak_gib:.2f} GiB + reserve {plan.inputs.reserve_bytes / GiB:.1f} "
                        f"GiB, available {avail / GiB if avail else float('nan'):.1f} GiB ({src})")
        if avail is not None and need > avail:
            rep.problems.append(
                f"memory: the plan needs {need / GiB:.1f} GiB (peak {plan.peak_gib:.1f} + reserve) but only "
                f"{avail / GiB:.1f} GiB is available ({src}); fix: stop other processes (on GB10 also "
                "'sync; echo 3 | sudo tee /proc/sys/vm/drop_caches'), lower batch_size, set "
                "enable_activation_checkpointing=True or a smaller fused_chunk_size (see `kd plan`)."
            )
        # disk (only global rank 0 writes checkpoints)
        if rank == 0:
            disk = checkpoint_bytes(cfg, plan)
            out = _existing_parent(Path(str(cfg.get("output_dir", "."))))
            why = unwritable_reason(cfg.get("output_dir", "."))
            if why:  # a read-only mount reports 0 free bytes: name the real cause, not the free space
                rep.problems.append(f"disk: output_dir {cfg.get('output_dir')} is not writable ({why}); fix: point "
                                    "output_dir at a directory you can write to.")
                return
            free_disk = shutil.disk_usage(out).free
            rep.info.append(f"disk: {free_disk / GiB:.1f} GiB free at {out}, checkpoints need "
                            f"{disk['total'] / GiB:.2f} GiB")
            if disk["total"] > free_disk:
                rep.problems.append(
                    f"disk: output_dir {cfg.get('output_dir')} ({out}) has {free_disk / GiB:.1f} GiB free but the "
                    f"run writes ~{disk['total'] / GiB:.1f} GiB of checkpoints; fix: free space, point output_dir "
                    "elsewhere, lower keep_last_n_checkpoints or disable save_merged_model."
                )
    except Exception as e:
        from kd.core.config import ConfigError

        if isinstance(e, ConfigError):
            rep.problems.append(f"memory plan: {e}")
        else:
            rep.warnings.append(f"memory plan failed ({type(e).__name__}: {e}); memory not checked")


def local_checks(cfg, *, world_size: int, rank: int, local_rank: int, device) -> NodeReport:
    import torch

    ch, nfiles = code_hash()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rep = NodeReport(
        rank=rank, local_rank=local_rank, hostname=socket.gethostname(),
        node_rank_env=os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "?")),
        versions=versions(), code=ch, code_files=nfiles, config=config_hash(cfg), gpu=gpu,
        config_text=config_text(cfg),
    )
    rep.problems += check_gpu_arch()

    for name, verdict in kernel_report(device):  # compiled and checked on this node's GPU
        rep.info.append(f"kernel {name}: {verdict}")
        if verdict.startswith(("FAILED", "MISMATCH")):
            rep.warnings.append(f"kernel {name} {verdict} (the run stays correct, on the slower eager path)")
    if cfg.get("fsdp_cpu_offload", False):
        unified = device.type == "cuda" and (
            bool(getattr(torch.cuda.get_device_properties(device), "is_integrated", False)) or "GB10" in gpu)
        if unified:
            rep.warnings.append("fsdp_cpu_offload=True on a unified-memory GPU (GB10): CPU and GPU share the same "
                                "memory, offloading saves nothing and adds copies; set fsdp_cpu_offload=False.")
    dtype_name = str(cfg.get("dtype", "bf16"))
    dtype = torch.float32 if dtype_name in ("fp32", "float32") else torch.bfloat16
    rep.problems += _precision_check(cfg, rep, device, dtype, world_size)
    for which, key, mkey in (("student", "checkpointer", "model"), ("teacher", "teacher_checkpointer", "teacher_model")):
        if cfg.get(key) is None or cfg.get(mkey) is None:
            rep.problems.append(f"config has no '{key}'/'{mkey}' section; fix the config.")
            continue
        probs, facts = check_checkpoint(which, cfg[key], cfg[mkey], dtype)
        rep.problems += probs
        rep.vocab[which] = facts.get("vocab")
        rep.vocab[which + "_hf"] = facts.get("hf_vocab")
    sv, tv = rep.vocab.get("student"), rep.vocab.get("teacher")
    if sv is not None and tv is not None and sv != tv:
        rep.problems.append(
            f"vocab size mismatch: teacher {tv} vs student {sv} (model.vocab_size / teacher_model.vocab_size "
            f"and the checkpoints' config.json {rep.vocab.get('teacher_hf')} / {rep.vocab.get('student_hf')}); "
            "fix: pair models of the same vocabulary (Qwen2.5 7B/14B/32B/72B: 152,064; 0.5B-3B: 151,936)."
        )
    _memory_and_disk_checks(cfg, rep, device, world_size, rank)
    # the NCCL / RoCE environment of this node (both halves, MTU, GID index, interfaces, GPUDirect): for a run over
    # several processes, and for a single `kd preflight` on a machine with RDMA devices (checking a Spark alone)
    nodes = world_size // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    net = nccl_report(expect_rdma=device.type == "cuda" and nodes > 1,
                      cuda_dmabuf=cuda_dmabuf_supported() if device.type == "cuda" else None)
    if world_size > 1 or net.hcas:
        rep.info += [f"net: {l}" for l in net.info]
        rep.warnings += [f"net: {w}" for w in net.warnings]
    return rep


def _precision_check(cfg, rep: NodeReport, device, dtype, world_size: int) -> List[str]:
    """The teacher precision path this node will run (kd.teacher.precision: probes its kernels, applies fallbacks)."""

    if cfg.get("teacher_model") is None:
        return []
    try:
        prec = resolve_precision(cfg.get("teacher_quantization", None), device, dtype, warn=False)
        check_sharding(prec, str(cfg.get("teacher_sharding", "shard")), world_size > 1)
    except ConfigError as e:
        return [f"teacher precision: {e}"]
    rep.info.append(f"teacher precision: {prec.describe()}")
    if prec.name != prec.requested:
        rep.warnings.append(f"teacher_quantization={prec.requested} falls back to {prec.name} on this node "
                            f"({prec.fallback_reason}): slower than planned, and nodes may differ.")
    return []


def _config_flat(text: str) -> Dict[str, Any]:
    """The resolved config (YAML text) as {dotted.key: value}, less the per-node paths (kdist.PER_NODE_KEYS and the
    values under output_dir: each node may write to its own disk; only global rank 0 writes)."""
    import yaml

    try:
        flat = kdist.flatten(yaml.safe_load(text) or {})
    except Exception:
        return {}
    out_dir = str(flat.get("output_dir", "") or "")
    return {k: v for k, v in flat.items()
            if k not in kdist.PER_NODE_KEYS and not (out_dir and isinstance(v, str) and v.startswith(out_dir))}


def compare_reports(reports: List[NodeReport]) -> List[str]:
    """Cross-node problems: versions, code and config must be identical everywhere. One line per rank that differs
    from rank 0, naming the differing packages and config keys (values: rank 0's vs this rank's)."""
    problems = []
    full = [r for r in reports if r.code]  # stubs of ranks that stopped on a user error carry only that error
    if len(full) < 2:
        return problems
    ref = full[0]
    ref_flat = _config_flat(ref.config_text)
    for r in full[1:]:
        parts, fixes = [], []
        diff = {k: (ref.versions.get(k), r.versions.get(k)) for k in set(ref.versions) | set(r.versions)
                if ref.versions.get(k) != r.versions.get(k)}
        if diff:
            d = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(diff.items()))
            parts.append(f"software differs: {d}")
            fixes.append("install the same wheelhouse on every node (launch/wheelhouse.sh install)")
        if r.code != ref.code:
            parts.append(f"code differs (hash {ref.code[:12]} over {ref.code_files} files vs {r.code[:12]} over "
                         f"{r.code_files})")
            fixes.append("sync the repository (same commit, no local edits) to every node, e.g. git pull or "
                         "rsync -a --delete")
        if r.config != ref.config:
            flat = _config_flat(r.config_text)
            keys = kdist.fingerprint_differences(ref_flat, flat)
            if keys:
                shown = "; ".join(f"{k}: {ref_flat.get(k, '<unset>')} vs {flat.get(k, '<unset>')}" for k in keys[:4])
                more = f" (and {len(keys) - 4} more: {', '.join(keys[4:8])})" if len(keys) > 4 else ""
                parts.append(f"resolved config differs: {shown}{more}")
                fixes.append("pass the same config file and key=value overrides (and environment variables it "
                             "references) on every node")
        if parts:
            problems.append(f"[{r.where}] differs from {ref.where} ({ref.where}'s value first): {'; '.join(parts)}; "
                            f"fix: {'; '.join(fixes)}.")
    return problems


def run(cfg, *, nominal_gbps: float = DEFAULT_NOMINAL_GBPS, bw_mb: Optional[float] = None,
        warn_fraction: float = 0.5, hardware: str = "gb10") -> int:
    import torch
    import torch.distributed as dist

    device = kdist.resolve_device(cfg.get("device", "auto"))
    size, clamp_notice = bw_payload_mb(bw_mb, device.type)
    info = kdist.init_distributed(device, timeout_s=600)
    if clamp_notice and info.local_rank == 0:
        print(f"kd preflight: {clamp_notice}", flush=True)
    rep = local_checks(cfg, world_size=info.world_size, rank=info.rank, local_rank=info.local_rank, device=device)
    # the reports first: nodes with other code / config / versions stop here, before any collective whose shape
    # depends on them (the bandwidth test's size comes from each node's own --bw-mb)
    reports = _gather_reports(info, rep)
    cross = compare_reports(reports)
    bw_line, link_warning = None, None
    if info.distributed and info.world_size > 1 and not cross and not any(r.problems for r in reports):
        agreed = torch.tensor([size], dtype=torch.float64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # the same payload on every rank
        size = float(agreed.item())
        try:
            bus, dt = allreduce_bandwidth(device, size)
            backend = dist.get_backend()
            bw_line = (f"all-reduce {size:g} MiB over {info.world_size} ranks ({backend}): bus {bus:.2f} GB/s "
                       f"({dt * 1e3:.1f} ms) vs nominal {nominal_gbps:g} GB/s ({100 * bus / nominal_gbps:.0f}%)")
            slow = backend == "nccl" and bus < warn_fraction * nominal_gbps
            try:
                traffic = cross_node_bytes_per_step(cfg, info.world_size, local_world_size=info.local_world_size)
                step_s, src = planner_step_s(cfg, info.world_size, hardware) if slow else (None, "")
                line, link_warning = link_report(bus, traffic, nominal_gbps, step_s=step_s, step_src=src, slow=slow)
                bw_line += "\n  " + line
            except Exception as e:  # the planner is advice: the measured rate is still reported
                bw_line += f"\n  link: {bus:.2f} GB/s measured; bytes per step unknown ({type(e).__name__}: {e})"
                if slow:
                    link_warning = (f"inter-node bus bandwidth {bus:.2f} GB/s is far below the nominal {nominal_gbps:g} "
                                    "GB/s: NCCL probably fell back to TCP sockets or uses one half of the port; see the "
                                    "NCCL environment lines, rerun with NCCL_DEBUG=INFO ('NET/IB' vs 'NET/Socket').")
        except Exception as e:
            rep.problems.append(f"all-reduce through the process group failed: {e}; check the network "
                                "interfaces (NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME) and firewalls.")
            reports[info.rank] = rep
    return _report_and_finish(info, reports, cross, bw_line=bw_line, link_warning=link_warning, rep=rep)


_GATHERED = False  # this process has taken part in the report exchange (see main())


def _gather_reports(info, rep: NodeReport) -> List[NodeReport]:
    global _GATHERED
    import torch.distributed as dist

    if not info.distributed:
        return [rep]
    gathered: List[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, rep)
    _GATHERED = True
    return gathered


def _report_and_finish(info, reports: List[NodeReport], cross: List[str], *, bw_line: Optional[str] = None,
                       link_warning: Optional[str] = None, rep: NodeReport) -> int:
    failed = bool(cross) or any(r.problems for r in reports)
    if info.local_rank == 0:  # full report in every node's log
        lines = [f"kd preflight: world size {info.world_size}, {len({r.hostname for r in reports})} host(s)"]
        for r in reports:
            v = r.versions
            if not r.code:  # a rank that stopped on a user error before its checks (see share_early_failure)
                lines.append(f"  rank {r.rank} (NODE_RANK {r.node_rank_env}) on {r.hostname}: stopped before its checks")
                continue
            lines.append(
                f"  rank {r.rank} (local {r.local_rank}, NODE_RANK {r.node_rank_env}) on {r.hostname}: {r.gpu}; "
                f"torch {v['torch']} cuda {v['cuda']} torchtune {v['torchtune']} torchao {v['torchao']} "
                f"python {v['python']}; code {r.code[:12]} ({r.code_files} files), config {r.config[:12]}"
            )
            for i in r.info:
                lines.append(f"    {i}")
        if bw_line:
            lines.append(f"  {bw_line}")
        print("\n".join(lines), flush=True)
        for r in reports:
            for w in r.warnings:
                print(f"kd preflight: WARNING [{r.where}] {w}", flush=True)
        if link_warning:
            print(f"kd preflight: WARNING [{rep.where}] {link_warning}", flush=True)
        for r in reports:
            for p in r.problems:
                print(f"kd preflight: FAIL [{r.where}] {p}", file=sys.stderr, flush=True)
        for p in cross:
            print(f"kd preflight: FAIL {p}", file=sys.stderr, flush=True)
        print(f"kd preflight: {'FAILED' if failed else 'OK'}", file=sys.stderr if failed else sys.stdout, flush=True)
    kdist.barrier()
    kdist.destroy()
    status_dir = os.environ.get("KD_PREFLIGHT_STATUS_DIR")
    if status_dir:
        # launcher mode (launch/run_node.sh): the verdict goes to a file and the process exits 0, so that
        # torchrun does not print its own failure report on top of the clean lines above
        Path(status_dir, f"rank{info.rank}.status").write_text("FAIL\n" if failed else "OK\n")
        return 0
    return 1 if failed else 0


def share_early_failure(message: str) -> Optional[int]:
    """A user error on this rank before its report existed (a bad config file or override on this node only):
    under the launcher, join the other ranks' report exchange with a report that carries only this problem, so that
    every node prints it and stops at once instead of waiting in the rendezvous / first collective until its timeout.
    Returns the exit code once the report is printed, None when there is nobody to tell (the caller prints it)."""
    import torch

    if _GATHERED or not kdist.launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    try:
        if torch.cuda.is_available():  # the backend the other ranks' device=auto picks
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        info = kdist.init_distributed(device, timeout_s=600)
        rep = NodeReport(rank=info.rank, local_rank=info.local_rank, hostname=socket.gethostname(),
                         node_rank_env=os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "?")),
                         versions=versions(), code="", code_files=0, config="", gpu="?", problems=[message])
        reports = _gather_reports(info, rep)
        return _report_and_finish(info, reports, compare_reports(reports), rep=rep)
    except Exception:  # the exchange is a courtesy: the caller prints this rank's line
        return None


def add_args(p) -> None:
    p.add_argument("--nominal-gbps", type=float, default=float(os.environ.get("KD_NOMINAL_GBPS", DEFAULT_NOMINAL_GBPS)),
                   help="inter-node bus rate to expect in GB/s (default 24: NCCL over a 200 Gb/s port, both halves)")
    p.add_argument("--bw-mb", type=float, default=None,
                   help=f"all-reduce test size in MiB (default 256 GPU / 16 CPU; clamped to {MAX_BW_MB:g})")
    p.add_argument("--hardware", default=os.environ.get("KD_HARDWARE", "gb10"),
                   help="kd plan --time profile (gb10, h200 or a YAML) for the slowdown estimate of a slow link")


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="kd preflight", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    add_args(p)
    args, overrides = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
        from kd.ops.planner import validate_recipe_config

        validate_recipe_config(cfg)  # the recipe's own key/value checks
        return run(cfg, nominal_gbps=args.nominal_gbps, bw_mb=args.bw_mb, hardware=args.hardware)
    except user_error_types() as e:
        from kd.train.cli_util import one_line

        rc = share_early_failure(one_line(e))  # under the launcher: every node prints it, nobody waits
        if rc is None:
            print(f"kd preflight: FAIL [{socket.gethostname()} rank {os.environ.get('RANK', '0')}] {one_line(e)}",
                  file=sys.stderr, flush=True)
            return 2
        return rc


def load_config(path: str, overrides: List[str]):
    """YAML + key=value / ~key overrides, as torchtune's ``tune run`` merges them."""
    from omegaconf import OmegaConf

    cfg = merge_overrides(load_yaml_file(path), list(overrides))
    try:
        OmegaConf.to_container(cfg, resolve=True)  # surface interpolation errors now
    except Exception as e:
        raise ConfigError(f"cannot resolve config {path!r} with overrides {overrides}: {e}") from None
    return cfg


if __name__ == "__main__":
    sys.exit(main())
