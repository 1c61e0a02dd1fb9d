"""Tests for kd.train.adapter_io, kd.core.atomic, kd.train.step_checkpoint and kd.train.hf_export: Qwen2 PEFT export (and why torchtune's stock export is wrong for
Qwen2), merged HF export, CheckpointManager round trip / retention / crash safety."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kd.core import atomic, errors
from kd.train import adapter_io, hf_export, step_checkpoint


def _save_adapter(adapter_sd, out_dir, **kw) -> Path:
    """A PEFT adapter dir written the way the checkpoint manager writes its ``adapter/``."""
    with atomic.atomic_write_dir(out_dir) as tmp:
        adapter_io.write_peft_adapter_files(tmp, adapter_sd, use_dora=kw.pop("use_dora", False), **kw)
    return Path(out_dir)

VOCAB, DIM, LAYERS, HEADS, KV_HEADS, INTER = 1024, 128, 2, 4, 2, 256
RANK, ALPHA = 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3", "output"]
META = dict(rank=RANK, alpha=ALPHA, target_modules=TARGETS, base_model_name_or_path="tiny-qwen2")
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("tiny_qwen2")
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTER,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    m = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # non-zero q/k/v biases so the bias mapping is exercised too
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    m.save_pretrained(d, safe_serialization=True)
    # pretend tokenizer files, to check they are copied by save_merged_hf
    (d / "vocab.json").write_text(json.dumps({"a": 0}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return d


def _rope_theta(base: Path) -> float:
    cfg = json.loads((base / "config.json").read_text())
    return float(cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))


@pytest.fixture(scope="module")
def tt_model(base_dir, tmp_path_factory):
    """torchtune LoRA Qwen2 with base weights from base_dir and random non-trivial LoRA weights."""
    from torchtune.models.qwen2 import lora_qwen2
    from torchtune.training import FullModelHFCheckpointer

    model = lora_qwen2(
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        apply_lora_to_output=True,
        vocab_size=VOCAB,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        embed_dim=DIM,
        intermediate_dim=INTER,
        max_seq_len=128,
        norm_eps=1e-6,
        rope_base=_rope_theta(base_dir),
        tie_word_embeddings=False,
        lora_rank=RANK,
        lora_alpha=ALPHA,
    )
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(base_dir),
        checkpoint_files=["model.safetensors"],
        model_type="QWEN2",
        output_dir=str(tmp_path_factory.mktemp("tt_out")),
    )
    sd = ckpt.load_checkpoint()["model"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected
    assert all("lora" in k for k in missing)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_a" in n or "lora_b" in n:
                # random everywhere: B != 0, and q/k rows differ across heads / rotary halves
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def tt_logits(tt_model, tokens):
    with torch.no_grad():
        return tt_model(tokens).float()


def _hf_logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _peft_logits(base_dir, adapter_dir, tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return _hf_logits(PeftModel.from_pretrained(base, adapter_dir), tokens)


# ------------------------------------------------------------------------------------------------
# PEFT adapter export
# ------------------------------------------------------------------------------------------------


def test_peft_adapter_matches_torchtune_and_stock_export_is_wrong(base_dir, tt_model, tt_logits, tokens, tmp_path):
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_peft_adapter_config, tune_to_peft_adapter_weights

    sd = adapter_io.lora_state_dict(tt_model)
    assert sd and all(v.device.type == "cpu" for v in sd.values())
    assert any(k.startswith("output.") for k in sd) and any(".mlp.w2." in k for k in sd)

    ours = _save_adapter(sd, tmp_path / "ours", rank=RANK, alpha=ALPHA, target_modules=TARGETS,
                                base_model_name_or_path=str(base_dir))
    cfg = json.loads((ours / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == RANK and cfg["lora_alpha"] == ALPHA
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj", "lm_head"])
    from safetensors.torch import load_file
    keys = set(load_file(str(ours / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    # base alone differs from the LoRA model (so the comparison below is meaningful)
    from transformers import AutoModelForCausalLM
    base_only = _hf_logits(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), tokens)
    assert (base_only - tt_logits).abs().max() > 0.1

    ours_logits = _peft_logits(base_dir, ours, tokens)
    ours_diff = (ours_logits - tt_logits).abs().max().item()

    # torchtune's stock exporter (what its checkpointers' save_checkpoint(adapter) writes)
    stock = tmp_path / "stock"
    stock.mkdir()
    save_file(tune_to_peft_adapter_weights(sd, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM),
              str(stock / "adapter_model.safetensors"))
    scfg = tune_to_peft_adapter_config({"r": RANK, "lora_alpha": ALPHA, "target_modules": TARGETS},
                                       base_model_name_or_path=str(base_dir))
    (stock / "adapter_config.json").write_text(json.dumps({**scfg, "peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    stock_diff = (_peft_logits(base_dir, stock, tokens) - tt_logits).abs().max().item()
    print(f"\nmax |logit diff| vs torchtune: ours={ours_diff:.3e} torchtune-stock={stock_diff:.3e}")
    assert ours_diff < 1e-4, ours_diff
    assert stock_diff > 1e-2, stock_diff  # the Llama q/k permutation is wrong for Qwen2

    # round trip back to torchtune names
    back, _ = adapter_io.load_peft_adapter(ours)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_name_mapping_roundtrip_and_errors():
    for k in ["layers.0.attn.q_proj.lora_a.weight", "layers.11.attn.output_proj.lora_b.weight",
              "layers.3.mlp.w1.lora_a.weight", "layers.3.mlp.w2.magnitude", "output.lora_b.weight",
              "layers.2._checkpoint_wrapped_module.mlp.w3.lora_a.weight"]:
        assert adapter_io.peft_to_tune_key(adapter_io.tune_to_peft_key(k)) == k.replace("_checkpoint_wrapped_module.", "")
    assert adapter_io.tune_to_peft_key("layers.3.mlp.w2.magnitude").endswith("mlp.down_proj.lora_magnitude_vector")
    with pytest.raises(KeyError):
        adapter_io.tune_to_peft_key("tok_embeddings.weight")
    with pytest.raises(ValueError, match="not in target_modules"):
        adapter_io.write_peft_adapter_files(  # checked before anything is written
            Path("/nonexistent/never"), {"output.lora_a.weight": torch.zeros(8, 4), "output.lora_b.weight": torch.zeros(4, 8)},
            rank=8, alpha=16, target_modules=["q_proj"], base_model_name_or_path="x", use_dora=False)


# ------------------------------------------------------------------------------------------------
# merged HF export
# ------------------------------------------------------------------------------------------------


def test_save_merged_hf(base_dir, tt_model, tt_logits, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    before = {k: v.clone() for k, v in tt_model.state_dict().items()}
    out = hf_export.save_merged_hf(tt_model, base_dir, tmp_path / "merged", rank=RANK, alpha=ALPHA,
                            max_shard_size_bytes=300_000)
    # model untouched (get_merged_lora_ckpt works in place: we must have copied)
    after = tt_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((out / s).is_file() for s in shards)
    assert "lm_head.weight" in index["weight_map"]
    assert not any("lora" in k for k in index["weight_map"])
    for f in ("config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg["tie_word_embeddings"] is False

    merged = _hf_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tokens)
    diff = (merged - tt_logits).abs().max().item()
    print(f"\nmerged HF vs torchtune LoRA max |logit diff| = {diff:.3e}")
    assert diff < 1e-4, diff

    # bf16 export
    out16 = hf_export.save_merged_hf(tt_model, base_dir, tmp_path / "merged16", rank=RANK, alpha=ALPHA, dtype=torch.bfloat16)
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # re-export over an existing dir replaces it atomically
    hf_export.save_merged_hf(tt_model, base_dir, out16, rank=RANK, alpha=ALPHA, max_shard_size_bytes=300_000)
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "float32"
    assert len(set(json.loads((out16 / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_merged_hf_tied(tmp_path):
    from torchtune.models.qwen2 import lora_qwen2
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    base = tmp_path / "tied_base"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
                                 rms_norm_eps=1e-6)).save_pretrained(base)
    from safetensors.torch import load_file
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    m = lora_qwen2(["q_proj", "v_proj"], vocab_size=256, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=64,
                   intermediate_dim=128, max_seq_len=64, norm_eps=1e-6, rope_base=_rope_theta(base),
                   tie_word_embeddings=True, lora_rank=4, lora_alpha=8)
    m.load_state_dict(qwen2_hf_to_tune(load_file(str(base / "model.safetensors")), num_heads=4, num_kv_heads=2,
                                       dim=64, tie_word_embeddings=True), strict=False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora" in n:
                p.normal_(0, 0.2)
    m.eval()
    out = hf_export.save_merged_hf(m, base, tmp_path / "tied_out", rank=4, alpha=8)
    wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in wm
    t = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = m(t)
    got = _hf_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), t)
    assert (got - ref).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------------
# CheckpointManager
# ------------------------------------------------------------------------------------------------


def _recipe_state(model, step):
    params = [p for n, p in model.named_parameters() if "lora" in n]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    for p in params:
        p.grad = None
    return {
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "dataloader": {"epoch": 0, "batch_idx": step},
        "counters": {"tokens_seen": torch.tensor(1234 * step)},
    }


def test_manager_roundtrip_latest_retention(tt_model, tmp_path):
    out = tmp_path / "run"
    mgr = step_checkpoint.CheckpointManager(out, keep_last_n=2)
    with pytest.raises(errors.NoCheckpointFoundError, match=str(out.absolute())):
        mgr.load()
    assert mgr.latest() is None

    sd = adapter_io.lora_state_dict(tt_model)
    states = {}
    for step in (10, 20, 30, 40):
        states[step] = _recipe_state(tt_model, step)
        p = mgr.save(step, epoch=step // 20, adapter_sd=sd, adapter_meta=META, recipe_state=states[step])
        assert p.name == f"step_{step:07d}" and mgr.latest() == p
    assert (out / "latest").read_text().strip() == "step_0000040"
    assert [p.name for p in mgr.list_checkpoints()] == ["step_0000030", "step_0000040"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    meta, state = mgr.load()
    assert meta["step"] == 40 and meta["epoch"] == 2 and meta["versions"]["torch"]
    assert torch.equal(state["rng"]["torch"], states[40]["rng"]["torch"])
    assert state["rng"]["python"] == states[40]["rng"]["python"]
    assert state["lr_scheduler"] == states[40]["lr_scheduler"]
    assert state["dataloader"] == {"epoch": 0, "batch_idx": 40}
    o1, o2 = state["optimizer"], states[40]["optimizer"]
    assert o1["param_groups"] == o2["param_groups"]
    for i in o2["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(o1["state"][i][k], o2["state"][i][k])
    # optimizer state loads back into a fresh optimizer
    params = [p for n, p in tt_model.named_parameters() if "lora" in n]
    torch.optim.AdamW(params, lr=1e-3).load_state_dict(state["optimizer"])

    # adapter comes back in torchtune names and loads into the model
    ad = mgr.load_adapter(mgr.latest(), expected_adapter_meta=META)
    assert ad.keys() == sd.keys() and all(torch.equal(ad[k], sd[k]) for k in sd)
    res = tt_model.load_state_dict(ad, strict=False)
    assert not res.unexpected_keys
    # load by explicit path, by run dir, and by adapter dir
    assert mgr.load(out / "step_0000030")[0]["step"] == 30
    assert step_checkpoint.CheckpointManager(tmp_path / "elsewhere").load(out)[0]["step"] == 40
    assert mgr.load_adapter(out / "step_0000030" / "adapter").keys() == sd.keys()

    # incompatible config: say which setting differs
    with pytest.raises(errors.IncompatibleCheckpointError, match=r"rank: checkpoint=8 vs config=16"):
        mgr.load(expected_adapter_meta={**META, "rank": 16})
    with pytest.raises(errors.IncompatibleCheckpointError, match="target_modules"):
        mgr.load_adapter(expected_adapter_meta={**META, "target_modules": ["q_proj", "v_proj"]})
    mgr.load(expected_adapter_meta={**META, "target_modules": list(reversed(TARGETS))})  # order-insensitive

    # retention never deletes the checkpoint `latest` points to (even if it isn't the highest step)
    mgr1 = step_checkpoint.CheckpointManager(out, keep_last_n=1)
    mgr1.save(5, 0, adapter_sd=sd, adapter_meta=META, recipe_state={"x": 5})
    assert mgr1.latest().name == "step_0000005"
    assert [p.name for p in mgr1.list_checkpoints()] == ["step_0000005", "step_0000040"]
    # re-saving an existing step replaces it atomically
    mgr1.save(5, 0, adapter_sd=sd, adapter_meta=META, recipe_state={"x": 55})
    assert mgr1.load()[1] == {"x": 55}

    # broken/missing pointer: fall back to the highest complete step dir
    (out / "latest").unlink()
    assert mgr1.latest().name == "step_0000040"


def test_crash_exception_mid_save(tt_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    mgr = step_checkpoint.CheckpointManager(out)
    sd = adapter_io.lora_state_dict(tt_model)
    mgr.save(1, 0, adapter_sd=sd, adapter_meta=META, recipe_state={"step": 1})

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    # adapter files get written, then recipe_state.pt fails
    monkeypatch.setattr(step_checkpoint.torch, "save", boom)
    with pytest.raises(OSError, match="simulated"):
        mgr.save(2, 0, adapter_sd=sd, adapter_meta=META, recipe_state={"step": 2})
    # failure while re-writing an existing step leaves the old one intact
    with pytest.raises(OSError, match="simulated"):
        mgr.save(1, 0, adapter_sd=sd, adapter_meta=META, recipe_state={"step": 111})
    monkeypatch.undo()
    assert mgr.latest().name == "step_0000001"
    assert mgr.load()[1] == {"step": 1}
    assert [p.name for p in out.iterdir()] and not (out / "step_0000002").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temp dirs removed

    # failure writing the pointer: new dir exists, pointer still the old complete one
    monkeypatch.setattr(step_checkpoint, "atomic_write_text", boom)
    with pytest.raises(OSError):
        mgr.save(3, 0, adapter_sd=sd, adapter_meta=META, recipe_state={"step": 3})
    monkeypatch.undo()
    assert mgr.load()[1] == {"step": 1}

    # the atomic file primitive itself: a writer failing half-way leaves the old file and no temp file
    f = tmp_path / "f.bin"
    atomic.atomic_write_bytes(f, b"v1")
    with pytest.raises(OSError, match="simulated"):
        with atomic.atomic_path(f) as t:
            t.write_bytes(b"partial")
            boom()
    assert f.read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["f.bin"]


_CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    from pathlib import Path
    from kd.train import step_checkpoint
    out, mode = Path(sys.argv[1]), sys.argv[2]
    meta = dict(rank=4, alpha=8, target_modules=["q_proj"], base_model_name_or_path="x")
    def sd(v):
        return {"layers.0.attn.q_proj.lora_a.weight": torch.full((4, 64), float(v)),
                "layers.0.attn.q_proj.lora_b.weight": torch.full((64, 4), float(v))}
    mgr = step_checkpoint.CheckpointManager(out, keep_last_n=2)
    if mode == "hang":
        mgr.save(1, 0, adapter_sd=sd(1), adapter_meta=meta, recipe_state={"v": 1})
        real = torch.save
        def hang(obj, f):
            real(obj, f)
            f.flush()
            (out.parent / "in_save").write_text("1")
            time.sleep(600)
        torch.save = hang
        mgr.save(2, 0, adapter_sd=sd(2), adapter_meta=meta, recipe_state={"v": 2})
    else:  # loop: steps 1,1,2,2,3,3,... so existing dirs get replaced, retention deletes too
        big = torch.randn(1_000_000)
        i = 0
        while True:
            i += 1
            step = (i + 1) // 2
            mgr.save(step, 0, adapter_sd=sd(i), adapter_meta=meta, recipe_state={"v": i, "big": big})
            (out.parent / "progress").write_text(str(i))
    """
)


def _spawn(out, mode):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(out), mode], env=env, cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(path, proc, timeout=60):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child died: {proc.stderr.read().decode()[-2000:]}")
        assert time.time() - t0 < timeout, f"timeout waiting for {path}"
        time.sleep(0.02)


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _check_consistent(out):
    mgr = step_checkpoint.CheckpointManager(out)
    p = mgr.latest()
    assert p is not None and not p.name.startswith(".")
    meta, state = mgr.load()
    ad = mgr.load_adapter()
    v = state["v"]
    assert meta["step"] == (v + 1) // 2
    assert torch.all(ad["layers.0.attn.q_proj.lora_a.weight"] == v)
    assert torch.all(ad["layers.0.attn.q_proj.lora_b.weight"] == v)
    for q in mgr.list_checkpoints():  # every visible dir is complete and self-consistent
        m2, s2 = mgr.load(q)
        assert m2["step"] == (s2["v"] + 1) // 2
    return v


def test_crash_sigkill_mid_save(tmp_path):
    # deterministic: killed while recipe_state.pt of step 2 is half written
    out = tmp_path / "run"
    proc = _spawn(out, "hang")
    try:
        _wait_for(tmp_path / "in_save", proc)
    finally:
        _kill(proc)
    mgr = step_checkpoint.CheckpointManager(out)
    assert mgr.latest().name == "step_0000001"
    assert [p.name for p in mgr.list_checkpoints()] == ["step_0000001"]
    assert mgr.load()[1] == {"v": 1}
    assert torch.all(mgr.load_adapter()["layers.0.attn.q_proj.lora_a.weight"] == 1)
    leftovers = [p for p in out.iterdir() if p.name.startswith(".step_0000002.tmp-")]
    assert len(leftovers) == 1  # the partial write is only ever under a hidden temp name
    # the next save (new process, writer dead) cleans it up
    mgr.save(2, 0, adapter_sd=adapter_io.load_peft_adapter(out / "step_0000001" / "adapter")[0],
             adapter_meta=dict(rank=4, alpha=8, target_modules=["q_proj"], base_model_name_or_path="x"),
             recipe_state={"v": 3})
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert mgr.load()[1] == {"v": 3}

    # random timing: kill a tight save loop (with dir replacement and retention) at random moments
    rng = random.Random(0)
    for trial in range(3):
        out = tmp_path / f"loop{trial}"
        (tmp_path / "progress").unlink(missing_ok=True)
        proc = _spawn(out, "loop")
        try:
            _wait_for(tmp_path / "progress", proc)
            time.sleep(rng.uniform(0.0, 0.6))
        finally:
            _kill(proc)
        v = _check_consistent(out)
        assert v >= 1


def test_atomic_dir_rename_fallback_and_recovery(tmp_path, monkeypatch):
    final = tmp_path / "d"
    with atomic.atomic_write_dir(final) as t:
        (t / "a.txt").write_text("v1")
    # filesystems without RENAME_EXCHANGE: rename-aside fallback
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic.atomic_write_dir(final) as t:
        (t / "a.txt").write_text("v2")
    assert (final / "a.txt").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]

    # exception between the two renames: old version is put back
    real_rename = os.rename
    calls = []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("simulated")
        return real_rename(a, b)

    monkeypatch.setattr(atomic.os, "rename", flaky)
    with pytest.raises(OSError, match="simulated"):
        with atomic.atomic_write_dir(final) as t:
            (t / "a.txt").write_text("v3")
    monkeypatch.undo()
    assert (final / "a.txt").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]

    # kill -9 between the two renames (writer dead): readers restore the aside
    aside = tmp_path / ".d.old-000000-999999999-deadbeef"  # foreign-looking, dead writer
    os.rename(final, aside)
    assert atomic.recover_atomic_dir(final) and (final / "a.txt").read_text() == "v2"

    # same through the manager: step dir moved aside by a crashed writer
    run = tmp_path / "run"
    mgr = step_checkpoint.CheckpointManager(run)
    sd = {"layers.0.attn.q_proj.lora_a.weight": torch.ones(4, 8), "layers.0.attn.q_proj.lora_b.weight": torch.ones(8, 4)}
    meta = dict(rank=4, alpha=8, target_modules=["q_proj"], base_model_name_or_path="x")
    mgr.save(7, 0, adapter_sd=sd, adapter_meta=meta, recipe_state={"v": 7})
    os.rename(run / "step_0000007", run / ".step_0000007.old-000000-999999999-deadbeef")
    assert mgr.latest().name == "step_0000007" and mgr.load()[1] == {"v": 7}


def test_fsdp2_dtensor_gather(tmp_path):
    """lora_state_dict / save_merged_hf on an FSDP2 (DTensor) model == on the plain model."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtune.models.qwen2 import lora_qwen2
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    base = tmp_path / "base"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False,
                                 rms_norm_eps=1e-6)).save_pretrained(base)
    torch.manual_seed(4)
    plain = lora_qwen2(["q_proj", "k_proj"], apply_lora_to_output=True, vocab_size=256, num_layers=1, num_heads=4,
                       num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=64, norm_eps=1e-6,
                       lora_rank=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora" in n:
                p.normal_(0, 0.2)
    sharded = copy.deepcopy(plain)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in sharded.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        assert any(hasattr(p, "full_tensor") for p in sharded.parameters())
        a, b = adapter_io.lora_state_dict(sharded), adapter_io.lora_state_dict(plain)
        assert a.keys() == b.keys()
        assert all(type(v) is torch.Tensor and torch.equal(v, b[k]) for k, v in a.items())
        o1 = hf_export.save_merged_hf(sharded, base, tmp_path / "m1", rank=4, alpha=8)
    finally:
        dist.destroy_process_group()
    o2 = hf_export.save_merged_hf(plain, base, tmp_path / "m2", rank=4, alpha=8)
    from safetensors.torch import load_file

    f = "model-00001-of-00001.safetensors"
    s1, s2 = load_file(str(o1 / f)), load_file(str(o2 / f))
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_dora_export_peft_and_merged(tmp_path):
    from safetensors.torch import load_file
    from torchtune.models.qwen2 import lora_qwen2
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    base = tmp_path / "b"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False,
                                 rms_norm_eps=1e-6)).save_pretrained(base)
    targets = ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"]
    m = lora_qwen2(targets[:4], apply_lora_to_mlp=True, vocab_size=256, num_layers=1, num_heads=4, num_kv_heads=2,
                   embed_dim=64, intermediate_dim=128, max_seq_len=64, norm_eps=1e-6, rope_base=_rope_theta(base),
                   lora_rank=4, lora_alpha=8, use_dora=True)
    m.load_state_dict(qwen2_hf_to_tune(load_file(str(base / "model.safetensors")), num_heads=4, num_kv_heads=2,
                                       dim=64), strict=False)
    for mod in m.modules():
        if hasattr(mod, "initialize_dora_magnitude"):
            mod.initialize_dora_magnitude()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora" in n:
                p.normal_(0, 0.2)
            if "magnitude" in n:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    m.eval()
    t = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = m(t)
    sd = adapter_io.lora_state_dict(m)
    assert any(k.endswith("magnitude") for k in sd)
    a = _save_adapter(sd, tmp_path / "a", rank=4, alpha=8, target_modules=targets,
                             base_model_name_or_path=str(base), use_dora=True)
    assert (_peft_logits(base, a, t) - ref).abs().max().item() < 1e-4
    back, cfg = adapter_io.load_peft_adapter(a)
    assert cfg["use_dora"] is True and back.keys() == sd.keys()
    o = hf_export.save_merged_hf(m, base, tmp_path / "m", rank=4, alpha=8)
    assert (_hf_logits(AutoModelForCausalLM.from_pretrained(o), t) - ref).abs().max().item() < 1e-4
