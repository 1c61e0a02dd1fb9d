"""Data-parallel scaling of the KD step at full Qwen2.5 shapes (72B NF4 teacher + 7B LoRA r64 student).

What the two-node config (configs/qwen2_5/72B_to_7B_kd_lora.yaml: teacher_sharding=replicate,
fsdp_strategy=hybrid with one GPU per node) does per step, measured on 1 or 2 GPUs:
each rank holds a whole NF4 teacher (fast dequant) and a whole bf16 student, runs the fused KD+CE step on
its own micro-batch, and only the LoRA gradients (161M bf16 values) cross the link: one all-reduce.

    torchrun --nproc_per_node 1 bench/kd_step_dp.py --steps 4
    torchrun --nproc_per_node 2 bench/kd_step_dp.py --steps 4
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 torchrun --nproc_per_node 2 bench/kd_step_dp.py --steps 4

Prints per-rank and global tokens/s; the global figure over the 1-GPU one is the scaling factor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--ac", type=int, default=8, help="student layers with activation checkpointing")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    import bench.kd_step as ks
    from kd.losses.distillation import DistillationLoss, fused_linear_kd_ce

    ks.DEV = torch.device("cuda", local)
    torch.manual_seed(0)  # same weights on every rank (replicated models)
    teacher = ks.build_teacher(fast=True)
    student = ks.build_student()
    for i in range(args.ac):
        student.layers[i] = checkpoint_wrapper(student.layers[i])
    teacher.unembed = lambda h: teacher.norm(h)
    student.unembed = lambda h: student.norm(h)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    dl = DistillationLoss(kind="forward_kl")
    B, S = args.batch, args.seq
    N = B * S
    g = torch.Generator(device=ks.DEV).manual_seed(1000 + rank)  # each rank its own data
    batches = []
    for _ in range(args.warmup + args.steps):
        tok = torch.randint(0, 151000, (B, S), device=ks.DEV, generator=g)
        lab = tok.clone()
        lab[:, :512] = -100
        lab = torch.hstack((lab[:, 1:], torch.full((B, 1), -100, device=ks.DEV)))
        batches.append((tok, lab))

    flat = torch.empty(sum(p.numel() for p in params), dtype=torch.bfloat16, device=ks.DEV)
    comm_ms = []

    def step(tok, lab):
        with torch.no_grad():
            th = teacher(tok)
        sh = student(tok)
        o = fused_linear_kd_ce(sh.view(N, -1), student.output.weight, lab.view(N),
                               teacher_hidden=th.view(N, -1), teacher_weight=teacher.output.weight,
                               kd_ratio=0.5, loss=dl, chunk_size=args.chunk)
        n = o.n_valid.float()
        dist.all_reduce(n)
        (o.loss_sum * world / n).backward()
        if world > 1:  # DDP-style: one all-reduce of the LoRA gradients (== FSDP2 HSDP, shard size 1)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            off = 0
            for p in params:
                k = p.numel()
                flat[off:off + k].copy_(p.grad.view(-1))
                off += k
            dist.all_reduce(flat)
            flat.div_(world)
            off = 0
            for p in params:
                k = p.numel()
                p.grad.view(-1).copy_(flat[off:off + k])
                off += k
            e1.record()
            comm_ms.append((e0, e1))
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    for i, (tok, lab) in enumerate(batches):
        if i == args.warmup:
            torch.cuda.synchronize()
            dist.barrier()
            comm_ms.clear()
            t0 = time.perf_counter()
        step(tok, lab)
    torch.cuda.synchronize()
    dist.barrier()
    dt = (time.perf_counter() - t0) / args.steps
    comm = sum(a.elapsed_time(b) for a, b in comm_ms) / max(1, len(comm_ms))
    res = dict(world=world, tokens_per_step_per_rank=N, step_ms=dt * 1e3, tok_s_per_rank=N / dt,
               tok_s_global=N * world / dt, lora_allreduce_ms=comm, lora_grad_mb=flat.numel() * 2 / 1e6,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               nccl_p2p_disable=os.environ.get("NCCL_P2P_DISABLE"), nccl_shm_disable=os.environ.get("NCCL_SHM_DISABLE"))
    if rank == 0:
        print("[dp] " + json.dumps(res), flush=True)
        tag = f"w{world}" + ("_nop2p" if os.environ.get("NCCL_P2P_DISABLE") else "")
        Path(args.out, f"dp_{tag}.json").write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
