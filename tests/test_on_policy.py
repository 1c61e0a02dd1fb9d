"""On-policy distillation (kd.train.on_policy + the recipe's ``on_policy:`` section): unit tests of the pieces, and the
real ``tune run`` on the tiny test bed: an independent transformers reference for the first on-policy step,
fused == chunked == grad-accumulation == two processes (FSDP2), kill-and-resume, config errors."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from recipe_utils import REPO, TUNE, env_for, metrics, tune_run

from kd.train.on_policy import (
    OnPolicyConfig,
    build_on_policy_batch,
    count_on_policy_steps,
    generation_seeds,
    is_on_policy_step,
    parse_on_policy,
    prompts_from_batch,
)

BASE = ["epochs=1", "max_steps_per_epoch=3", "log_every_n_steps=1", "~eval_every_n_steps", "save_every_n_steps=100",
        "progress_bar=False"]
OP = ["on_policy.lmbda=1", "on_policy.max_new_tokens=40"]


# ------------------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------------------
def test_prompts_and_batch_roundtrip():
    tok = torch.tensor([[5, 6, 7, 8, 9, 0], [3, 4, 1, 0, 0, 0], [2, 2, 2, 2, 0, 0]])
    lab = torch.tensor([[-100, -100, -100, 8, 9, -100], [-100, -100, 1, -100, -100, -100], [-100] * 6])
    prompts = prompts_from_batch(tok, lab, -100)
    assert prompts == [[5, 6, 7], [3, 4], None]
    b = build_on_policy_batch(prompts, [[11, 12, 13, 99], [], None], pad_id=0, ignore_index=-100,
                              device=torch.device("cpu"))
    assert b["tokens"].tolist() == [[5, 6, 7, 11, 12, 13, 99], [3, 4, 0, 0, 0, 0, 0], [0] * 7]
    assert b["labels"].tolist() == [[-100, -100, -100, 11, 12, 13, 99], [-100] * 7, [-100] * 7]
    # the round trip: the prompts of the on-policy batch are the same prompts
    assert prompts_from_batch(b["tokens"], b["labels"], -100)[0] == [5, 6, 7]


def test_coin_is_seeded_and_has_the_right_rate():
    cfg = OnPolicyConfig(lmbda=0.3, seed=7)
    a = [is_on_policy_step(cfg, s) for s in range(2000)]
    assert a == [is_on_policy_step(OnPolicyConfig(lmbda=0.3, seed=7), s) for s in range(2000)]
    assert 0.26 < sum(a) / len(a) < 0.34
    assert a != [is_on_policy_step(OnPolicyConfig(lmbda=0.3, seed=8), s) for s in range(2000)]
    assert count_on_policy_steps(cfg, 2000) == sum(a)
    assert not any(is_on_policy_step(OnPolicyConfig(lmbda=0.0), s) for s in range(50))
    assert all(is_on_policy_step(OnPolicyConfig(lmbda=1.0), s) for s in range(50))


def test_generation_seeds_depend_on_the_sample_not_its_place():
    cfg = OnPolicyConfig(lmbda=1.0, seed=3)
    p, q = [1, 2, 3], [4, 5]
    s1 = generation_seeds(cfg, 10, [p, q])
    s2 = generation_seeds(cfg, 10, [q, p])
    assert s1 == s2[::-1]
    assert generation_seeds(cfg, 11, [p])[0] != s1[0]  # a new step draws new samples


def test_parse_errors():
    from kd.core.config import ConfigError

    assert parse_on_policy(None, 1) is None
    c = parse_on_policy({"lmbda": 0.5, "max_new_tokens": 16}, 9)
    assert (c.lmbda, c.max_new_tokens, c.seed, c.temperature) == (0.5, 16, 9, 0.9)
    with pytest.raises(ConfigError, match="did you mean 'lmbda'"):
        parse_on_policy({"lmbda": 0.5, "lambda": 0.5}, 0)
    with pytest.raises(ConfigError, match="lmbda"):
        parse_on_policy({"lmbda": 1.5}, 0)


# ------------------------------------------------------------------------------------------------------------
# recipe
# ------------------------------------------------------------------------------------------------------------
def _run(testbed, tmp_path: Path, name: str, extra=(), **kw):
    out = tmp_path / name
    tune_run(testbed, [*BASE, f"output_dir={out}", *extra], **kw)
    return out


def _first_batch_items(testbed, n: int):
    """The first optimizer step's samples of configs/tiny/kd_lora.yaml (seed 42, DistributedSampler, batch n)."""
    from torch.utils.data import DistributedSampler

    from kd.data.alpaca import alpaca_kd_dataset

    tok = testbed.tokenizer(256)
    ds = alpaca_kd_dataset(tok, str(testbed.data_json), split="train", val_size=0.1, seed=0)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=42, drop_last=True)
    sampler.set_epoch(0)
    return [ds[i] for i in list(sampler)[:n]]


def test_first_on_policy_step_matches_transformers(testbed, tmp_path):
    """Step 1, greedy, kd_ratio=1: LoRA B is 0, so the student IS its base. Reproduce the step independently with
    transformers: greedy answers of the HF student to the step's prompts, then the mean forward KL of the HF
    teacher vs the HF student on those answer tokens (stop token included) must equal the logged kd_loss."""
    from transformers import AutoModelForCausalLM

    out = _run(testbed, tmp_path, "ref", [*OP, "on_policy.temperature=0", "kd_ratio=1", "max_steps_per_epoch=1"])
    got = metrics(out)[0]
    assert got["on_policy"] == 1.0 and got["on_policy_fraction"] == 1.0
    student = AutoModelForCausalLM.from_pretrained(testbed.student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(testbed.teacher_dir, dtype=torch.float32).eval()
    kl_sum, n_tok, n_agree, lengths = 0.0, 0, 0, []
    for item in _first_batch_items(testbed, 4):
        j = next(i for i, l in enumerate(item["labels"]) if l != -100)
        prompt = torch.tensor([item["tokens"][:j]])
        with torch.no_grad():
            seq = student.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=[1000, 1002],
                                   pad_token_id=1000)
            ans = seq[0, j:]
            lengths.append(ans.numel())
            zs = student(seq).logits[0, j - 1:-1].double()
            zt = teacher(seq).logits[0, j - 1:-1].double()
        lp, lq = zt.log_softmax(-1), zs.log_softmax(-1)
        kl_sum += float((lp.exp() * (lp - lq)).sum())
        n_agree += int((zs.argmax(-1) == zt.argmax(-1)).sum())
        n_tok += ans.numel()
    assert got["kd_loss"] == pytest.approx(kl_sum / n_tok, rel=1e-4)
    assert got["kl"] == pytest.approx(kl_sum / n_tok, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(n_agree / n_tok, abs=1e-6)
    assert got["gen_mean_length"] == pytest.approx(sum(lengths) / len(lengths))
    # kd_ratio=1: the logged loss is the on-policy KD term alone; CE is still reported on the dataset's answers
    assert got["loss"] == pytest.approx(got["kd_loss"], rel=1e-6)
    ref = metrics(_run(testbed, tmp_path, "off", ["kd_ratio=1", "max_steps_per_epoch=1"]))[0]
    assert got["ce_loss"] == pytest.approx(ref["ce_loss"], rel=1e-6)
    assert got["kd_loss"] != pytest.approx(ref["kd_loss"], rel=1e-2)  # other tokens than the dataset's answers


def test_on_policy_equivalences(testbed, tmp_path):
    """Sampling (T=0.9), kd_ratio=0.5, JSD: fused == chunked == batch 2 x 2 accumulation == 2 processes x 2 (FSDP2)
    == 2 processes x 2 (HSDP, replicated teacher)."""
    common = [*OP, "kd_loss.kind=jsd", "kd_loss.beta=0.5"]
    ref = metrics(_run(testbed, tmp_path, "fused", common))
    assert [r["on_policy"] for r in ref] == [1.0, 1.0, 1.0]
    for r in ref:
        assert r["loss"] == pytest.approx(0.5 * r["ce_loss"] + 0.5 * r["kd_loss"], rel=1e-5)
        assert 0 < r["gen_mean_length"] <= 41 and r["gen_tokens_per_second"] > 0
    runs = {
        "chunked": metrics(_run(testbed, tmp_path, "chunked", [*common, "loss_form=chunked", "loss._component_=kd.losses.distillation.ChunkedCrossEntropyLoss"])),
        "ga": metrics(_run(testbed, tmp_path, "ga", [*common, "batch_size=2", "gradient_accumulation_steps=2"])),
        "2proc": metrics(_run(testbed, tmp_path, "2proc", [*common, "batch_size=2"], launcher=["--nproc_per_node", "2"])),
        # HSDP with a replicated teacher (the two-node config's layout), here on one host
        "hsdp": metrics(_run(testbed, tmp_path, "hsdp", [*common, "batch_size=2", "fsdp_strategy=hybrid",
                                                         "teacher_sharding=replicate"],
                             launcher=["--nproc_per_node", "2"])),
    }
    for name, run in runs.items():
        assert len(run) == 3, name
        for a, b in zip(run, ref):
            for k in ("loss", "ce_loss", "kd_loss", "kl", "top1_agreement", "grad_norm", "gen_mean_length"):
                assert a[k] == pytest.approx(b[k], rel=2e-4, abs=1e-6), (name, k, a["step"], a[k], b[k])


def test_lmbda_zero_is_off_policy(testbed, tmp_path):
    off = metrics(_run(testbed, tmp_path, "off", ["max_steps_per_epoch=2"]))
    zero = metrics(_run(testbed, tmp_path, "zero", ["max_steps_per_epoch=2", "on_policy.lmbda=0"]))
    for a, b in zip(zero, off):
        assert a["on_policy"] == 0.0 and a["on_policy_fraction"] == 0.0
        for k in ("loss", "kl", "grad_norm"):
            assert a[k] == b[k]


def test_on_policy_kill_and_resume(testbed, tmp_path):
    common = ["max_steps_per_epoch=8", "save_every_n_steps=3", "on_policy.lmbda=0.5", "on_policy.max_new_tokens=40"]
    ref = metrics(_run(testbed, tmp_path, "ref", common))
    assert 0 < sum(r["on_policy"] for r in ref) < 8  # a mix of on- and off-policy steps
    assert ref[-1]["on_policy_fraction"] == pytest.approx(sum(r["on_policy"] for r in ref) / 8)
    out = tmp_path / "killed"
    cmd = [TUNE, "run", "recipes/kd_lora.py", "--config", "configs/tiny/kd_lora.yaml", *BASE, *common,
           f"output_dir={out}"]
    p = subprocess.Popen(cmd, cwd=REPO, env=env_for(testbed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    ptr = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if ptr.is_file() and ptr.read_text().strip() == "step_0000003":
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed:\n" + p.stdout.read()[-3000:]
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=120)
    tune_run(testbed, [*BASE, *common, f"output_dir={out}", "resume_from_checkpoint=True"])
    resumed = [r for r in metrics(out) if r["step"] > 3][-5:]
    assert [r["step"] for r in resumed] == [4, 5, 6, 7, 8]
    for a, b in zip(resumed, ref[3:]):
        for k in ("loss", "kl", "grad_norm", "on_policy", "on_policy_fraction"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a["step"], a[k], b[k])
        if b["on_policy"]:
            assert a["gen_mean_length"] == b["gen_mean_length"]


def test_on_policy_config_errors(testbed, tmp_path):
    p = tune_run(testbed, [f"output_dir={tmp_path}/x", "on_policy.lmbdaa=0.5"], check=False)
    assert p.returncode == 2 and "did you mean 'lmbda'" in p.stderr and "Traceback" not in p.stderr
    p = tune_run(testbed, [f"output_dir={tmp_path}/x", "on_policy.lmbda=0.5", "~teacher_model", "kd_ratio=0"],
                 check=False)
    assert p.returncode == 2 and "on_policy needs a teacher" in p.stderr
    p = tune_run(testbed, [f"output_dir={tmp_path}/x", "on_policy.lmbda=0.5", "dataset.packed=True"], check=False)
    assert p.returncode == 2 and "unpacked" in p.stderr
