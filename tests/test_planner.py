"""kd.ops.planner: exact parameter counts, NF4 bytes, the H200 measurements, and estimate vs a measured peak.

The measured peak comes from a real training step of the tiny models through the recipe's own code
(``KDLoRARecipe.setup`` + ``_loss_step`` + backward + clip + AdamW), in a fresh subprocess:

- glibc is told to serve every allocation >= 64 KiB with its own mmap (``MALLOC_MMAP_THRESHOLD_=65536``, which
  also disables the dynamic threshold), so freed tensors leave the RSS at once and RSS tracks live bytes;
- a warm-up run of the same code on a 1 x 32-token batch first touches the code pages, kernels and lazy
  initialisation of torch (hundreds of MB of libtorch that are *not* training memory), then is deleted;
- the baseline is the RSS after the warm-up and *before* the measured models are built; the peak RSS
  (VmHWM, reset through /proc/self/clear_refs) minus that baseline is compared with the plan's peak.

Run by hand: ``python tests/test_planner.py measure --batch-size 8 --seq-len 512 [key=value ...]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = REPO / "configs" / "tiny" / "kd_lora.yaml"
BENCH_CFG = {
    "model": {"_component_": "torchtune.models.qwen2_5.lora_qwen2_5_7b_instruct",
              "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
              "lora_rank": 64, "lora_alpha": 128},
    "teacher_model": {"_component_": "torchtune.models.qwen2_5.qwen2_5_72b_instruct"},
    "tokenizer": {"max_seq_len": 2048}, "batch_size": 4, "dtype": "bf16", "device": "cuda",
    "teacher_quantization": "nf4", "loss_form": "fused", "fused_chunk_size": 256,
    "optimizer": {"_component_": "torch.optim.AdamW"},
}


# --------------------------------------------------------------------------------------------------
# measurement subprocess
# --------------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _run_steps(cfg, batch_size: int, seq_len: int, steps: int = 2):
    import torch

    from recipes.kd_lora import KDLoRARecipe

    recipe = KDLoRARecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, 1000, (batch_size, seq_len), generator=g)
        batch = {"tokens": tokens, "labels": tokens.clone()}
        out = recipe._loss_step(batch, recipe._kd_ratio)
        (out.loss_sum / out.n_valid.clamp_min(1)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in recipe._model.parameters() if p.requires_grad], 1.0)
        recipe._optimizer.step()
        recipe._optimizer.zero_grad(set_to_none=True)
    return recipe


def measure(argv) -> dict:
    import argparse
    import gc

    import torch

    sys.path.insert(0, str(REPO))
    from omegaconf import OmegaConf

    from kd.ops.planner import plan_from_config
    from kd.ops.preflight import load_config

    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(TINY_CFG))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    args, overrides = p.parse_known_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, overrides)
    for k in ("eval_every_n_steps", "save_every_n_steps", "metric_logger"):
        cfg.pop(k, None)
    # warm-up: same code, tiny batch (code pages, kernels, lazy init); then free it all
    w = _run_steps(OmegaConf.merge(cfg, {"batch_size": 1}), 1, 32, steps=2)
    w.cleanup() if hasattr(w, "_metrics_file") else None
    del w
    gc.collect()
    base = _rss()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    hwm0 = _hwm()
    _recipe = _run_steps(OmegaConf.merge(cfg, {"batch_size": args.batch_size}), args.batch_size, args.seq_len)  # alive at the peak
    peak = _hwm()
    plan = plan_from_config(cfg, 1, batch_size=args.batch_size, seq_len=args.seq_len)
    return {"baseline": base, "hwm_after_reset": hwm0, "peak_rss": peak, "measured": peak - base,
            "estimate": plan.peak_bytes, "phase": plan.peak_phase, "table": plan.table(),
            "ratio": plan.peak_bytes / (peak - base)}


def run_measure(testbed, tmp_path, *extra, batch_size=8, seq_len=512) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", KD_TESTBED_DIR=str(testbed.root),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(Path(__file__).resolve()), "measure", "--batch-size", str(batch_size),
           "--seq-len", str(seq_len), f"output_dir={tmp_path}", *extra]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("MEASURE ")][-1]
    return json.loads(line[len("MEASURE "):])


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------
def test_counts_exact_on_tiny_models():
    """Meta-device counts equal the parameters of the really built tiny models."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from kd.ops.planner import build_and_count

    cfg = OmegaConf.load(TINY_CFG)
    for key in ("model", "teacher_model"):
        c = build_and_count(cfg[key], torch.float32)
        real = tt_config.instantiate(cfg[key])
        assert c.total == sum(p.numel() for p in real.parameters())
        assert c.adapter == sum(p.numel() for n, p in real.named_parameters() if "lora" in n)
        assert c.linear + c.other_layer + c.embedding + c.output + c.final_norm + c.adapter == c.total
    s = build_and_count(cfg.model, torch.float32)
    assert s.lora_per_layer == 7 and s.lora_on_output and s.lora_rank == 16 and s.intermediate_dim == 256


def test_nf4_bytes_match_torchao():
    import torch
    from torchao.dtypes.nf4tensor import to_nf4

    from kd.ops.planner import NF4_BYTES_PER_ELEM, NF4_FACTOR_BLOCK

    w = torch.randn(512, 1024, dtype=torch.bfloat16)
    n = to_nf4(w, 64, 256)
    real = sum(getattr(n, a).numel() * getattr(n, a).element_size() for a in n.__tensor_flatten__()[0])
    est = w.numel() * NF4_BYTES_PER_ELEM + w.numel() / NF4_FACTOR_BLOCK * 2
    assert abs(real - est) <= 64  # scaler_mean + 16-entry lookup table


def test_full_size_counts_and_h200_measurements():
    """72B / 7B counts (docs/benchmarks.md FLOP table) and the measured H200 peaks within 5%."""
    from kd.ops.planner import plan_from_config

    p = plan_from_config(BENCH_CFG, 1, ac_layers=0, device_memory_gib=119.2)
    t, s = p.inputs.teacher, p.inputs.student
    assert t.total == 72_706_203_648
    assert s.adapter == 161_480_704  # "161.5 M" LoRA params
    assert abs(t.linear / 1e9 - 70.21) < 0.01  # "70.21 B" teacher decoder linears
    # measured peaks (GiB) on the H200, docs/benchmarks.md: (ac layers, loss chunk) -> peak
    measured = {(0, 256): 103.7, (8, 256): 90.6, (12, 256): 83.9, (0, 1024): 108.1, (28, 1024): 61.8}
    for (ac, chunk), gib in measured.items():
        cfg = dict(BENCH_CFG, fused_chunk_size=chunk)
        est = plan_from_config(cfg, 1, ac_layers=ac).peak_gib
        assert abs(est / gib - 1) < 0.05, (ac, chunk, est, gib)
    assert "teacher weights" in p.table() and "PEAK" in p.table()


def test_two_node_sharding_halves_weights():
    from kd.ops.planner import plan_from_config

    one = plan_from_config(BENCH_CFG, 1)
    two = plan_from_config(BENCH_CFG, 2, local_world_size=1)
    assert abs(two.row("student base weights") * 2 - one.row("student base weights")) < 1e6
    hyb = plan_from_config(dict(BENCH_CFG, fsdp_strategy="hybrid"), 2, local_world_size=1)
    assert hyb.row("teacher weights") == one.row("teacher weights")  # replicated across nodes


@pytest.mark.parametrize("variant", ["fused", "chunked_ac"])
def test_estimate_within_25pct_of_measured_tiny_peak(testbed, tmp_path, variant):
    extra = [] if variant == "fused" else ["loss_form=chunked", "loss._component_=kd.losses.distillation.ChunkedCrossEntropyLoss",
                                           "enable_activation_checkpointing=True"]
    m = run_measure(testbed, tmp_path, *extra)
    print(f"\n[{variant}] measured {m['measured'] / 2**20:.1f} MiB (peak RSS {m['peak_rss'] / 2**20:.1f} - "
          f"baseline {m['baseline'] / 2**20:.1f}), estimate {m['estimate'] / 2**20:.1f} MiB "
          f"({m['phase']}), ratio {m['ratio']:.3f}")
    assert 0.75 <= m["ratio"] <= 1.25, m["table"]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        out = measure(sys.argv[2:])
        print("MEASURE " + json.dumps(out), flush=True)
