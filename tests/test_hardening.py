"""Unit tests of the hardening pieces (issue 13): label handling like torch, the tensors+JSON recipe state,
the non-finite guard, corrupt-checkpoint fallback, disk-full saves, interpolation-source keys, shared plan
validation, packaging pins and the kernel fallback."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# 8. CE with a non-default ignore_index, plain and fused, like torch
# --------------------------------------------------------------------------------------------------
def _ce_case(ignore_index, with_minus100=False):
    g = torch.Generator().manual_seed(0)
    N, V, H = 13, 11, 6
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, V, (N,), generator=g)
    lab[[1, 4, 9]] = ignore_index
    if with_minus100:
        lab[6] = -100
    return h, w, lab


@pytest.mark.parametrize("ignore_index", [-1, -100, 3])
def test_ce_sum_ignore_index_matches_torch(ignore_index):
    from kd.losses.distillation import cross_entropy_sum

    h, w, lab = _ce_case(ignore_index)
    logits = h @ w.T
    got = cross_entropy_sum(logits, lab, ignore_index=ignore_index)
    ref = F.cross_entropy(logits, lab, ignore_index=ignore_index, reduction="sum")
    assert int(got.n_valid) == int((lab != ignore_index).sum())
    assert torch.allclose(got.loss_sum.double(), ref, rtol=1e-6)
    g1 = torch.autograd.grad(got.loss_sum, w)[0]
    g2 = torch.autograd.grad(F.cross_entropy(h @ w.T, lab, ignore_index=ignore_index, reduction="sum"), w)[0]
    assert torch.allclose(g1.double(), g2, rtol=1e-5, atol=1e-7)


def test_ce_minus100_with_other_ignore_index_is_an_error_like_torch():
    """Today -100 labels count as valid with zero loss (plain) or give an unclear gather error (fused)."""
    from kd.losses.distillation import DistillationLoss, cross_entropy_sum, fused_linear_kd_ce

    h, w, lab = _ce_case(-1, with_minus100=True)
    with pytest.raises(IndexError, match="out of bounds"):
        F.cross_entropy(h @ w.T, lab, ignore_index=-1)  # torch's behaviour
    with pytest.raises(IndexError, match=r"Target -100 is out of bounds.*ignore_index=-1"):
        cross_entropy_sum(h @ w.T, lab, ignore_index=-1)
    with pytest.raises(IndexError, match=r"Target -100 is out of bounds.*ignore_index=-1"):
        fused_linear_kd_ce(h.float(), w.float(), lab, kd_ratio=0.0, loss=DistillationLoss(ignore_index=-1),
                           chunk_size=4)


def test_fused_ce_non_default_ignore_index_matches_torch():
    from kd.losses.distillation import DistillationLoss, fused_linear_kd_ce

    h, w, lab = _ce_case(-1)
    out = fused_linear_kd_ce(h, w, lab, kd_ratio=0.0, loss=DistillationLoss(ignore_index=-1), chunk_size=4)
    ref = F.cross_entropy(h @ w.T, lab, ignore_index=-1, reduction="sum")
    assert int(out.n_valid) == 10
    assert torch.allclose(out.ce_sum.double(), ref, rtol=1e-6)
    gw = torch.autograd.grad(out.loss_sum, w)[0]
    gr = torch.autograd.grad(F.cross_entropy(h @ w.T, lab, ignore_index=-1, reduction="sum"), w)[0]
    assert torch.allclose(gw, gr, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# 2. recipe state: tensors + JSON, loaded with weights_only=True; no pickle ever runs
# --------------------------------------------------------------------------------------------------
def test_statecodec_roundtrip_exact():
    import random

    from kd.core import statecodec

    random.seed(3)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3, betas=(0.9, 0.95))
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    opt.step()
    obj = {"optimizer": opt.state_dict(), "python": random.getstate(), "nan": float("nan"), "inf": float("-inf"),
           "b": b"\x00\xff", "nested": {1: (2, [3.5, None])}, "dtype": torch.bfloat16, "s": "x"}
    blob = statecodec.pack(obj)
    back = statecodec.unpack(blob)
    assert back["python"] == obj["python"] and isinstance(back["python"], tuple)
    assert back["nested"] == {1: (2, [3.5, None])} and back["b"] == b"\x00\xff" and back["dtype"] is torch.bfloat16
    assert math.isnan(back["nan"]) and back["inf"] == float("-inf")
    st, st2 = obj["optimizer"], back["optimizer"]
    assert st2["param_groups"][0]["betas"] == (0.9, 0.95)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(st["state"][0][k], st2["state"][0][k])
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3)
    opt2.load_state_dict(st2)
    with pytest.raises(TypeError, match="cannot store object"):
        statecodec.encode({"x": object()})


def _save_ckpt(mgr, step, value=0.0):
    sd = {"layers.0.attn.q_proj.lora_a.weight": torch.full((2, 4), value),
          "layers.0.attn.q_proj.lora_b.weight": torch.zeros(4, 2)}
    meta = {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj"], "base_model_name_or_path": "base"}
    state = {"global_step": step, "rng": [{"torch": torch.get_rng_state(), "python": (3, (1, 2), None)}]}
    return mgr.save(step, 0, adapter_sd=sd, adapter_meta=meta, recipe_state=state, run_info={"batch_size": 4})


def test_recipe_state_loads_weights_only_and_a_crafted_pickle_never_runs(tmp_path):
    from kd.train.step_checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path / "ck")
    p1 = _save_ckpt(mgr, 1)
    p2 = _save_ckpt(mgr, 2)
    torch.load(p2 / "recipe_state.pt", weights_only=True)  # tensors + JSON only
    assert json.loads((p2 / "meta.json").read_text())["run"] == {"batch_size": 4}
    # a crafted pickle in the newest checkpoint: on resume it must not run, and resume falls back
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"global_step": 2, "x": Evil()}, p2 / "recipe_state.pt")
    warnings = []
    path, meta, state, adapter = mgr.load_latest_valid(warn=warnings.append)
    assert not marker.exists()
    assert path == p1 and state["global_step"] == 1 and state["rng"][0]["python"] == (3, (1, 2), None)
    assert len(warnings) == 1 and str(p2 / "recipe_state.pt") in warnings[0] and "step_0000001" in warnings[0]


def test_truncated_recipe_state_falls_back_with_a_warning(tmp_path):
    from kd.core.errors import CorruptCheckpointError
    from kd.train.step_checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path / "ck")
    _save_ckpt(mgr, 1)
    p2 = _save_ckpt(mgr, 2)
    data = (p2 / "recipe_state.pt").read_bytes()
    (p2 / "recipe_state.pt").write_bytes(data[: len(data) // 2])
    warnings = []
    path, _, state, _ = mgr.load_latest_valid(warn=warnings.append)
    assert path.name == "step_0000001" and state["global_step"] == 1
    assert "recipe_state.pt" in warnings[0] and "cannot be loaded safely" in warnings[0]
    # nothing readable at all: a clear error naming the files
    (path / "recipe_state.pt").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="no readable checkpoint"):
        mgr.load_latest_valid(warn=warnings.append)


def test_non_finite_adapter_is_never_saved_and_retention_keeps_the_last_finite(tmp_path):
    from kd.core.errors import NonFiniteCheckpointError
    from kd.train.step_checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path / "ck", keep_last_n=1)
    _save_ckpt(mgr, 1)
    with pytest.raises(NonFiniteCheckpointError, match="NaN/Inf.*step_0000001 is kept"):
        _save_ckpt(mgr, 2, value=float("nan"))
    assert [p.name for p in mgr.list_checkpoints()] == ["step_0000001"] and mgr.latest().name == "step_0000001"


def test_disk_full_during_save_names_dir_and_size_and_keeps_old(tmp_path, monkeypatch):
    from kd.core.errors import CheckpointError
    from kd.train.step_checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path / "ck")
    _save_ckpt(mgr, 1)
    real = torch.save

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as ei:
        _save_ckpt(mgr, 2)
    msg = str(ei.value)
    assert "no space left" in msg and str(tmp_path / "ck") in msg and "MiB" in msg and "step_0000001 is intact" in msg
    monkeypatch.setattr(torch, "save", real)
    assert [p.name for p in mgr.list_checkpoints()] == ["step_0000001"]
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]  # no temp dir left


# --------------------------------------------------------------------------------------------------
# 1. non-finite guard: device-side flags, classification, first step
# --------------------------------------------------------------------------------------------------
def test_guard_classifies_and_names_the_step():
    from kd.train.guard import NonFiniteError, NonFiniteGuard

    g = NonFiniteGuard(torch.device("cpu"), last_checkpoint=lambda: "/x/step_0000002")
    fin = torch.tensor(1.0)
    g.observe(ce=fin, kd_terms=torch.tensor([1.0, 2.0]), grad_norm=fin, step=1)
    g.check(g.flags().clone(), 1)  # finite: no error
    g.observe(ce=fin, kd_terms=torch.tensor([float("nan"), 1.0]), grad_norm=torch.tensor(float("nan")), step=2)
    g.observe(ce=torch.tensor(float("inf")), kd_terms=torch.tensor([1.0, 1.0]), grad_norm=fin, step=3)
    with pytest.raises(NonFiniteError) as ei:
        g.check(g.flags().clone(), 3)
    msg = str(ei.value)
    assert "at step 2 (detected at step 3)" in msg and "student" in msg and "/x/step_0000002" in msg
    g2 = NonFiniteGuard(torch.device("cpu"))
    g2.observe(ce=fin, kd_terms=torch.tensor([float("inf"), 1.0]), grad_norm=fin, step=5)
    with pytest.raises(NonFiniteError, match="at step 5: the KD/KL terms .* teacher"):
        g2.check(g2.flags().clone(), 5)
    g3 = NonFiniteGuard(torch.device("cpu"))
    g3.observe(ce=fin, kd_terms=torch.tensor([1.0, 1.0]), grad_norm=torch.tensor(float("inf")), step=7)
    with pytest.raises(NonFiniteError, match="gradient norm"):
        g3.check_before_save(7)


# --------------------------------------------------------------------------------------------------
# configs torchtune users write: interpolation-source keys
# --------------------------------------------------------------------------------------------------
def test_interpolation_source_keys_are_accepted_misspellings_are_not():
    from kd.core.config import ConfigError, check_keys

    cfg = OmegaConf.create({"model_root": "/models", "paths": {"data": "/d"},
                            "checkpointer": {"checkpoint_dir": "${model_root}/Qwen2.5-7B-Instruct"},
                            "dataset": {"source": "${oc.env:DATA,${paths.data}}/qa.json"}, "home": "${oc.env:HOME}"})
    check_keys(cfg, {"checkpointer", "dataset", "home"})
    cfg.kd_ration = 0.7
    with pytest.raises(ConfigError, match="'kd_ration' \\(did you mean 'kd_ratio'\\?\\)"):
        check_keys(cfg, {"checkpointer", "dataset", "home", "kd_ratio"})
    cfg2 = OmegaConf.create({"oc": 1, "x": "${oc.env:HOME}"})  # a resolver is not a reference to key 'oc'
    with pytest.raises(ConfigError, match="'oc'"):
        check_keys(cfg2, {"x"})


# --------------------------------------------------------------------------------------------------
# air-gapped defaults and packaging
# --------------------------------------------------------------------------------------------------
def test_wandb_defaults_to_offline(monkeypatch):
    from kd.train.metric_logging import kd_logging_cfg

    monkeypatch.delenv("WANDB_MODE", raising=False)
    c = OmegaConf.create({"_component_": "torchtune.training.metric_logging.WandBLogger", "project": "p"})
    assert kd_logging_cfg(c).mode == "offline"
    assert kd_logging_cfg(OmegaConf.merge(c, {"mode": "online"})).mode == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert "mode" not in kd_logging_cfg(c)
    disk = OmegaConf.create({"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": "x"})
    assert kd_logging_cfg(disk) == disk


def test_pins_torch_2_11_and_bitsandbytes_is_optional():
    import tomllib

    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = proj["dependencies"]
    torch_dep = next(d for d in deps if d.replace(" ", "").startswith("torch>") or d.startswith("torch="))
    assert ">=2.11" in torch_dep.replace(" ", ""), torch_dep
    assert not any(d.startswith("bitsandbytes") for d in deps)
    assert any(d.startswith("bitsandbytes") for d in proj["optional-dependencies"]["bnb"])
    out = subprocess.run(["bash", "launch/wheelhouse.sh", "requirements"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}, check=True).stdout.split()
    assert "bitsandbytes" not in " ".join(out) and "torch==2.11.0" in out
    # kd never needs bitsandbytes: no module imports it (only bench/decode_bench.py's transformers anchor loads it)
    import re

    for f in list((REPO / "kd").rglob("*.py")) + list((REPO / "recipes").glob("*.py")):
        assert not re.search(r"^(import|from) bitsandbytes", f.read_text(), re.M), f


# --------------------------------------------------------------------------------------------------
# Triton kernels never crash a run
# --------------------------------------------------------------------------------------------------
def test_nf4_kernel_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    from kd.core import kernels
    from kd.teacher import nf4

    monkeypatch.setattr(kernels, "_BROKEN", {})
    w = nf4.to_nf4(torch.randn(256, 256, dtype=torch.bfloat16))
    calls = []

    def bad_kernel(*a, **k):
        calls.append(1)
        raise RuntimeError("triton: PTX for sm_121 not supported")

    monkeypatch.setattr(nf4, "uses_triton", lambda w: True)
    monkeypatch.setattr(nf4, "_dequant_triton", bad_kernel)
    ref = w.get_original_weight()
    with caplog.at_level("WARNING", logger="kd.core.kernels"):
        a = nf4.dequantize_nf4(w)
        b = nf4.dequantize_nf4(w)
    assert torch.equal(a, ref) and torch.equal(b, ref)
    assert len(calls) == 1  # not retried after the first failure
    warns = [r for r in caplog.records if "nf4 dequant" in r.getMessage()]
    assert len(warns) == 1 and "eager" in warns[0].getMessage()


def test_kernel_switch_and_cpu_report(monkeypatch):
    from kd.core import kernels
    from kd.ops.kernel_check import kernel_report
    from kd.teacher import nf4

    monkeypatch.setattr(kernels, "_BROKEN", {})
    monkeypatch.setattr(nf4, "uses_triton", lambda w: True)
    monkeypatch.setattr(nf4, "_dequant_triton", lambda *a, **k: pytest.fail("kernel used despite KD_TRITON=0"))
    monkeypatch.setenv("KD_TRITON", "0")
    w = nf4.to_nf4(torch.randn(256, 256, dtype=torch.bfloat16))
    assert torch.equal(nf4.dequantize_nf4(w), w.get_original_weight())
    assert kernel_report(torch.device("cuda")) == [("all kernels", "eager (KD_TRITON=0)")]
    monkeypatch.delenv("KD_TRITON")
    assert "no CUDA" in kernel_report(torch.device("cpu"))[0][1]
