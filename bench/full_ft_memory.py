"""Measured peak memory of a FULL fine-tune KD step of the student on one GPU, vs kd.ops.planner.

Builds Qwen2.5-7B-Instruct (torchtune builder, random weights on the GPU, bf16), swaps its head for kd's fused
KD+CE head, activation checkpointing on every layer, and trains it against random teacher hidden states
through a replicated teacher head ([152064, 8192] bf16, as the recipe keeps it) -- the teacher model itself is
left out (its memory is the planner's 'teacher weights' row, unchanged by the student's mode). For each
optimizer it runs --steps optimizer steps at --batch x --seq tokens and prints the peak allocated memory next to
the planner's estimate of the same items (student weights + gradients + optimizer state + activations + head +
teacher head/hidden). One process = the world-size-1 numbers; halve weights/grads/states for two FSDP2 ranks.

    python bench/full_ft_memory.py --optimizers adamw,adamw8bit --batch 2 --seq 2048 --steps 3     (H200)
    python bench/full_ft_memory.py --device cpu --tiny --steps 2                                     (CPU check)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

GiB = 2**30


def build(tiny: bool, device, dtype):
    from torchtune import training
    from torchtune.models.qwen2 import qwen2
    from torchtune.models.qwen2_5 import qwen2_5_7b_instruct

    from kd.losses.heads import FusedKDHead

    with training.set_default_dtype(dtype), torch.device(device):
        m = (qwen2(vocab_size=1024, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=128, intermediate_dim=256,
                   max_seq_len=4096) if tiny else qwen2_5_7b_instruct())
    from torchtune import modules

    training.set_activation_checkpointing(m, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    m.output = FusedKDHead(m.output, chunk_size=256)
    return m


def make_optimizer(name: str, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=torch.cuda.is_available())
    if name == "adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=1e-5, weight_decay=0.01)
    raise SystemExit(f"unknown optimizer {name}")


def planner_student_rows(tiny: bool, batch: int, seq: int, optimizer: str, device_type: str):
    """The planner's rows for the pieces this bench builds (world size 1, AC on all layers, fused head)."""
    from omegaconf import OmegaConf

    from kd.ops import planner

    model = ({"_component_": "torchtune.models.qwen2.qwen2", "vocab_size": 1024, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 4, "embed_dim": 128, "intermediate_dim": 256, "max_seq_len": 4096} if tiny else
             {"_component_": "torchtune.models.qwen2_5.qwen2_5_7b_instruct"})
    cfg = OmegaConf.create({
        "model": model, "teacher_model": {"_component_": "torchtune.models.qwen2_5.qwen2_5_72b_instruct"},
        "tokenizer": {"max_seq_len": seq}, "batch_size": batch, "dtype": "bf16", "device": device_type,
        "enable_activation_checkpointing": True, "loss_form": "fused", "fused_chunk_size": 256,
        "teacher_quantization": "nf4", "teacher_sharding": "replicate",
        "optimizer": {"_component_": "torchao.optim.AdamW8bit" if optimizer == "adamw8bit" else "torch.optim.AdamW"},
    })
    plan = planner.plan_from_config(cfg, 1)
    keep = ("student weights (trainable)", "optimizer state", "gradients", "activations (student)", "loss head",
            "teacher hidden states", "AC recompute", "backward working set")
    rows = {n: b for n, b, _ in plan.rows if n in keep}
    t = plan.inputs.teacher
    teacher_head = t.vocab_size * t.embed_dim * 2
    return rows, teacher_head


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizers", default="adamw,adamw8bit")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16
    results = {}
    for opt_name in a.optimizers.split(","):
        torch.manual_seed(0)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        m = build(a.tiny, dev, dtype)
        vocab = m.tok_embeddings.num_embeddings
        Ht = 256 if a.tiny else 8192
        t_w = torch.randn(vocab, Ht, device=dev, dtype=dtype) * 0.02
        opt = make_optimizer(opt_name, [p for p in m.parameters()])
        from kd.losses.distillation import DistillationLoss, FusedKDCELoss
        from kd.losses.heads import FusedTargets

        loss_fn = DistillationLoss(kind="forward_kl")
        times = []
        for step in range(a.steps):
            tok = torch.randint(0, vocab, (a.batch, a.seq), device=dev)
            labels = torch.cat([tok[:, 1:], torch.full_like(tok[:, :1], -100)], 1)
            t_h = torch.randn(a.batch, a.seq, Ht, device=dev, dtype=dtype)
            t0 = time.perf_counter()
            targets = FusedTargets(labels=labels, loss=FusedKDCELoss(), kd_loss=loss_fn, kd_ratio=0.5,
                                   teacher_hidden=t_h, teacher_weight=t_w)
            with m.output.fused(targets):
                loss = m(tok) / (labels != -100).sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
            print(f"[{opt_name}] step {step + 1}: loss {float(loss):.4f} {times[-1]:.2f}s", flush=True)
        peak = torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else float("nan")
        rows, _ = planner_student_rows(a.tiny, a.batch, a.seq, opt_name, dev.type)
        t_head = vocab * Ht * 2  # the replicated teacher head this bench allocates (bf16)
        state_b = sum(v.numel() * v.element_size() if type(v) is torch.Tensor else
                      sum(x.numel() * x.element_size() for x in (getattr(v, "codes", v), getattr(v, "scale", v)))
                      for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
        n_params = sum(p.numel() for p in m.parameters())
        plan_peak = (rows["student weights (trainable)"] + rows["optimizer state"] + rows["gradients"] + t_head
                     + max(rows["activations (student)"] + rows["loss head"] + rows["teacher hidden states"],
                           rows["activations (student)"] + rows["AC recompute"] + rows["backward working set"]))
        results[opt_name] = {
            "params": n_params, "optimizer_state_bytes_per_param": state_b / n_params,
            "measured_peak_gib": peak, "planner_student_peak_gib": plan_peak / GiB,
            "planner_rows_gib": {k: v / GiB for k, v in rows.items()}, "teacher_head_gib": t_head / GiB,
            "step_s": times[1:] or times,
        }
        print(f"[{opt_name}] {n_params:,} params, optimizer state {state_b / n_params:.3f} B/param, measured peak "
              f"{peak:.2f} GiB, planner (same items) {plan_peak / GiB:.2f} GiB", flush=True)
        del m, opt, t_w
    print(json.dumps(results, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
