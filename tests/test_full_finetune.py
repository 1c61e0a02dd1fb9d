"""Full fine-tuning of the student through the same recipe (recipes/kd_lora.py with a plain builder,
configs/tiny/kd_full.yaml): 1 process == 2 processes (FSDP2, gloo), kill -9 + resume is exact, and the
exported full HF checkpoint gives the recipe's own logits in transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from recipe_utils import REPO, TUNE, env_for, metrics, tune_run

CFG = "configs/tiny/kd_full.yaml"
BASE = ["epochs=1", "log_every_n_steps=1", "~eval_every_n_steps", "progress_bar=False"]


def _run(testbed, out: Path, extra=(), nproc: int = 1):
    launcher = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    tune_run(testbed, [*BASE, f"output_dir={out}", *extra], config=CFG, launcher=launcher)
    return out


@pytest.fixture(scope="module")
def runs(testbed, tmp_path_factory):
    """The same 4 steps at global batch 4: one process x 4 and two processes x 2."""
    tmp = tmp_path_factory.mktemp("full")
    common = ["max_steps_per_epoch=4", "save_every_n_steps=2"]
    one = _run(testbed, tmp / "one", [*common, "batch_size=4"])
    two = _run(testbed, tmp / "two", [*common, "batch_size=2"], nproc=2)
    return one, two


def _weights(d: Path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_one_process_equals_two(runs):
    one, two = runs
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["valid_tokens"] == y["valid_tokens"]
        for k in ("loss", "ce_loss", "kl", "top1_agreement", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (k, x["step"], x[k], y[k])
    assert a[-1]["kl"] < a[0]["kl"]  # every weight trains: the student moves towards the teacher
    # the gathered final weights agree too, and really changed from the initial student
    wa, wb = _weights(one / "merged"), _weights(two / "merged")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), k
    # two ranks wrote two shards, each holding about half of every weight
    shards = sorted((two / "checkpoints" / "shards" / "step_0000004").glob("rank-*.json"))
    assert [p.name for p in shards] == ["rank-00000.json", "rank-00001.json"]
    lay = [json.loads(p.read_text())["layout"]["layers.0.mlp.w1.weight"] for p in shards]
    assert lay[0]["shape"] == [256, 128] and [l["offset"][0] for l in lay] == [0, 128]


def test_export_full_checkpoint_logits_equal(testbed, runs, tmp_path):
    """recipes/export.py full_checkpoint=<step dir> stitches the shards into the same HF checkpoint the recipe
    wrote (save_merged_model), and transformers reproduces the recipe's model's logits from it."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from kd.train.full import assemble_full_state_dict
    from kd.train.models import build_on_meta

    _, two = runs
    out = tmp_path / "exp"
    tune_run(testbed, [f"output_dir={out}", f"full_checkpoint={two}/checkpoints/step_0000004", "dtype=fp32"],
             recipe="recipes/export.py", config="configs/tiny/export_full.yaml")
    wa, wb = _weights(two / "merged"), _weights(out / "merged")
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the recipe's student at step 4 (torchtune model from the shards) vs transformers on the export
    cfg = OmegaConf.load(REPO / CFG)
    tt = build_on_meta(cfg.model, torch.float32)
    sd = assemble_full_state_dict(two / "checkpoints" / "shards" / "step_0000004")
    tt.load_state_dict(sd, assign=True)
    for m in tt.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    hf = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    tok = torch.randint(0, 1000, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = tt.eval()(tok).float(), hf(tok).logits.float()
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_kill9_resume_is_exact(testbed, runs, tmp_path):
    """Two processes, SIGKILL to the whole process group right after the step-2 checkpoint; resuming gives
    the uninterrupted run's steps 3-4 and final weights exactly."""
    _, ref = runs
    out = tmp_path / "killed"
    cmd = [TUNE, "run", "--nproc_per_node", "2", "recipes/kd_lora.py", "--config", CFG, *BASE,
           "max_steps_per_epoch=4", "save_every_n_steps=2", "batch_size=2", f"output_dir={out}"]
    p = subprocess.Popen(cmd, cwd=REPO, env=env_for(testbed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    ptr = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if ptr.is_file() and ptr.read_text().strip() == "step_0000002":
            break
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed:\n" + p.stdout.read()[-3000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert max(r["step"] for r in metrics(out)) < 4
    tune_run(testbed, [*BASE, "max_steps_per_epoch=4", "save_every_n_steps=2", "batch_size=2", f"output_dir={out}",
                       "resume_from_checkpoint=True"], config=CFG, launcher=["--nproc_per_node", "2"])
    resumed = [r for r in metrics(out) if r["step"] > 2][-2:]
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, metrics(ref)[2:]):
        for k in ("loss", "ce_loss", "kl", "grad_norm", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-8), (k, a["step"], a[k], b[k])
    wa, wb = _weights(out / "merged"), _weights(ref / "merged")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_full_finetune_config_errors(testbed, tmp_path):
    p = tune_run(testbed, [f"output_dir={tmp_path}/x", "student_quantization=nf4"], config=CFG, check=False)
    assert p.returncode == 2 and "needs a LoRA builder" in p.stderr and "Traceback" not in p.stderr
    p = tune_run(testbed, [f"output_dir={tmp_path}/y", "optimizer._component_=torchao.optim.AdamW8bit"], config=CFG,
                 check=False)
    assert p.returncode == 2 and "torch.optim.AdamW" in p.stderr and "Traceback" not in p.stderr


def test_planner_full_finetune_two_sparks(capsys):
    """`kd plan --config configs/qwen2_5/72B_to_7B_kd_full_2node.yaml --gb10 --world-size 2`: the full 7B student's
    weights, gradients and AdamW states (bf16: 2 x 2 B/param) are halved by FSDP2 across the two Sparks, next to a
    whole NF4 72B teacher per node; it fits at the config's batch 2 x 2048 with activation checkpointing."""
    from kd.ops import planner
    from kd.ops.cli import main as kd_main
    from kd.ops.preflight import load_config

    cfg_path = str(REPO / "configs/qwen2_5/72B_to_7B_kd_full_2node.yaml")
    assert kd_main(["plan", "--config", cfg_path, "--gb10", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "FULL fine-tune" in out and "-> FITS" in out
    cfg = load_config(cfg_path, [])
    p = planner.plan_from_config(cfg, 2, device_memory_gib=planner.GB10_MEMORY_GIB, reserve_gib=planner.GB10_RESERVE_GIB)
    n = p.inputs.student.total
    assert 7.6e9 < n < 7.7e9 and p.inputs.student.adapter == 0
    assert p.row("student weights (trainable)") == pytest.approx(n * 2 / 2, rel=1e-6)
    assert p.row("gradients") == pytest.approx(n * 2 / 2, rel=1e-6)
    assert p.row("optimizer state") == pytest.approx(2 * n * 2 / 2, rel=1e-6)
    # the config ships no activation checkpointing (compiled nf4_fp8 teacher): 91.3 GiB planned, still >= 10% of
    # the node's memory free beyond the reserve (tests/test_two_spark_plan.py checks every two-node config so)
    assert p.fits and p.peak_gib < 95
    # torchao's 8-bit AdamW halves the state (measured 2.03 B/param); one node alone would be near the limit
    p8 = planner.plan_from_config(load_config(cfg_path, ["optimizer._component_=torchao.optim.AdamW8bit"]), 2)
    assert p8.row("optimizer state") == pytest.approx(2 * n * (1 + 4 / 256) / 2, rel=1e-6)
    one = planner.plan_from_config(cfg, 1, device_memory_gib=planner.GB10_MEMORY_GIB, reserve_gib=8.0)
    assert one.peak_gib > p.peak_gib + 25 and not one.fits  # one GB10 cannot hold it; two can
