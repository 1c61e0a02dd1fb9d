"""The recipe benchmark: `tune run recipes/kd_lora.py` with the user's config at full width, stock torchtune's KD
recipe on the same job in the same call, and the job-time planner's prediction beside both.

What it does (one GPU machine, one process per run):
1. ``data``: a synthetic Buddhist-QA alpaca set with a stated length distribution (``LENGTHS`` below), made of
   real Qwen2.5 tokens (Chinese characters), so the token counts are the ones the recipe sees. Made on CPU
   (``python bench/recipe_bench.py data --out .bench_assets``) and carried, or made on the spot.
2. Random-weight HF checkpoints at the real widths: a full Qwen2.5-7B student (4 shards + index) and a
   Qwen2.5-72B-shaped teacher cut to the largest depth asked for (one shard per decoder layer + one for the
   embeddings/head, with ``model.safetensors.index.json``). Shallower teachers are directories of symlinks to the
   first layers' shards with their own ``config.json`` and index (nothing is copied).
3. For every teacher depth N: ``tune run recipes/kd_lora.py --config configs/qwen2_5/72B_to_7B_kd_lora_1node.yaml``
   overriding only paths, the teacher depth, the run length and the logger (list in ``_ours_overrides``).
4. Stock torchtune's ``knowledge_distillation_single_device`` recipe on the same data, model sizes, LoRA, batch,
   gradient accumulation, activation checkpointing, optimizer and losses (``bench/stock_kd_nf4.py``: the stock
   recipe class, with its teacher's decoder linears converted to torchao NF4 after loading, as stock QLoRA stores
   its base weights; stock itself has no quantized-teacher option).
5. Extrapolation from N teacher layers to 80 with the per-layer cost measured between the two depths of the same
   run (for ours: the recipe's own teacher-forward phase time; for stock: its step time), and the check of that
   line against a third point when three depths are given.
6. ``kd plan --time`` (``kd.ops.jobtime``) for the same job, printed beside the measurement.
7. ``--cache`` (issue 11, teacher cache): at one depth, the online_then_cache epoch-1 step (writes the cache),
   a ``mode=build`` pass over the samples the next run needs (teacher tokens/s), a ``mode=use`` step from that
   cache, the write overhead, cache-step ratio and the projected 3-epoch ratio (``cache_bench``), written to
   ``recipe_bench.json["teacher_cache"]``.

Usage on the GPU machine (see docs/benchmarks.md for the exact call)::

    python bench/recipe_bench.py run --work /tmp/kdb --assets .bench_assets --depths 16,8 --steps 4

CPU smoke test (tiny widths, same code path): ``python bench/recipe_bench.py run --small --work /tmp/kdb_small``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
USER_CONFIG = "configs/qwen2_5/72B_to_7B_kd_lora_1node.yaml"

# Synthetic Buddhist-QA length distribution (tokens, Qwen2.5 tokenizer). Source: the user's description of the
# data set (23,683 alpaca samples: the fixed system prompt + a question, and answers "of a few hundred to ~1,500
# tokens"); turned into numbers as stated in issue 9: prompt (system prompt + question, template included) uniform
# 60-150 tokens, answers log-normal with median 400 and 5% above 1,500, the whole sample cut at 2,048.
LENGTHS = {
    "prompt_min": 60, "prompt_max": 150,
    "answer_median": 400, "answer_p95": 1500, "max_seq_len": 2048,
}
SYSTEM_PROMPT = "你是一位精通佛学的大师，对佛经有深入的理解和研究。请用准确、专业且易懂的方式回答问题。"

QWEN2_5_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064)
QWEN2_5_72B = dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, vocab_size=152064)
SMALL_STUDENT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=152064)
SMALL_TEACHER = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=152064)


def log(msg: str) -> None:
    print(f"[recipe_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# 1. synthetic data
# --------------------------------------------------------------------------------------------------
def answer_sigma() -> float:
    """Log-normal sigma such that P(answer > p95) = 5% for the stated median (z_0.95 = 1.6449)."""
    return math.log(LENGTHS["answer_p95"] / LENGTHS["answer_median"]) / 1.6448536


def _cjk_tokens(tok) -> List[str]:
    """Single Chinese characters that are one token each in the Qwen2.5 vocabulary."""
    out = []
    for cp in range(0x4E00, 0x9FA6):
        ch = chr(cp)
        if len(tok.encode(ch)) == 1:
            out.append(ch)
    return out


def _clauses(chars: List[str], n: int, rng: random.Random) -> str:
    """About ``n`` characters in clauses of 6-20 characters ended by Chinese punctuation, as prose is (a
    punctuation mark splits the tokenizer's pre-tokens; one 1,000-character run would be both unrealistic
    and quadratic for torchtune's Python BPE)."""
    out, k = [], 0
    while k < n:
        m = min(n - k, rng.randint(6, 20))
        out.append("".join(rng.choice(chars) for _ in range(m)) + rng.choice("，，，。；、"))
        k += m + 1
    return "".join(out)


def _text_of_tokens(tok, chars: List[str], n: int, rng: random.Random, prefix: str = "") -> str:
    """A string of random characters that tokenizes to ``n`` tokens (after ``prefix``) within +-1."""
    text = prefix + _clauses(chars, n, rng)
    for _ in range(6):  # BPE merges some neighbours: top up until the count matches
        got = len(tok.encode(text))
        if abs(got - n) <= 1:
            break
        if got < n:
            text += _clauses(chars, n - got, rng)
        else:
            text = text[: len(text) - (got - n)]
    return text


def make_data(tok, n_samples: int, seed: int = 0) -> List[dict]:
    """Alpaca records whose chat-templated prompt and answer lengths follow ``LENGTHS``."""
    rng = random.Random(seed)
    chars = _cjk_tokens(tok)
    sys_len = len(tok.encode(SYSTEM_PROMPT))
    template = 12  # <|im_start|>system\n ... <|im_end|>\n<|im_start|>user\n ... <|im_start|>assistant\n
    mu, sigma = math.log(LENGTHS["answer_median"]), answer_sigma()
    recs = []
    for i in range(n_samples):
        p_len = rng.randint(LENGTHS["prompt_min"], LENGTHS["prompt_max"])
        q_len = max(4, p_len - sys_len - template)
        a_len = max(8, int(round(rng.lognormvariate(mu, sigma))))
        a_len = min(a_len, LENGTHS["max_seq_len"] + 200)  # the recipe cuts the sample at max_seq_len
        recs.append({
            "instruction": _text_of_tokens(tok, chars, q_len, rng, prefix="请解释"),
            "input": "",
            "output": _text_of_tokens(tok, chars, a_len, rng),
        })
    return recs


class _FastCounter:
    """Token counts with the Rust ``tokenizers`` BPE on the same vocab.json/merges.txt (byte-level, the same
    pre-tokenizer split for runs of Chinese characters): torchtune's pure-Python BPE makes the data set slowly.
    ``data_cmd`` checks the counts against torchtune's tokenizer on a sample of the records."""

    def __init__(self, vocab: str, merges: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self.tok = Tokenizer(models.BPE.from_file(vocab, merges))
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self.tok.decoder = decoders.ByteLevel()

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


def data_cmd(a) -> None:
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    from kd.data.qwen_tokenizer import qwen2_5_tokenizer_files

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = qwen2_5_tokenizer_files()
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    for k in ("vocab", "merges", "special_tokens", "tokenizer_config"):
        shutil.copyfile(files[k], tok_dir / Path(files[k]).name)
    slow = qwen2_5_tokenizer(path=str(files["vocab"]), merges_file=str(files["merges"]),
                             special_tokens_path=str(files["special_tokens"]))
    fast = _FastCounter(str(files["vocab"]), str(files["merges"]))
    t0 = time.time()
    recs = make_data(fast, a.samples, a.seed)
    for r in recs[:: max(1, len(recs) // 8)]:  # the fast counts are torchtune's counts
        for field in ("instruction", "output"):
            assert len(slow.encode(r[field], add_bos=False, add_eos=False)) == len(fast.encode(r[field])), field
    with gzip.open(out / "buddhist_qa_synth.json.gz", "wt", encoding="utf-8") as f:
        json.dump(recs, f, ensure_ascii=False)
    log(f"{len(recs)} records -> {out / 'buddhist_qa_synth.json.gz'} in {time.time() - t0:.0f}s")


# --------------------------------------------------------------------------------------------------
# 2. checkpoints
# --------------------------------------------------------------------------------------------------
def hf_config(dims: dict) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "attention_dropout": 0.0, **dims,
    }


def _layer_tensors(i: int, d: dict, dev, dtype, gen) -> Dict[str, object]:
    import torch

    h, f = d["hidden_size"], d["intermediate_size"]
    hd = h // d["num_attention_heads"]
    kv = d["num_key_value_heads"] * hd
    p = f"model.layers.{i}."

    def w(*shape):
        return (torch.randn(*shape, device=dev, dtype=torch.float32, generator=gen) * 0.02).to(dtype)

    return {
        p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.q_proj.bias": w(h),
        p + "self_attn.k_proj.weight": w(kv, h), p + "self_attn.k_proj.bias": w(kv),
        p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.v_proj.bias": w(kv),
        p + "self_attn.o_proj.weight": w(h, h),
        p + "mlp.gate_proj.weight": w(f, h), p + "mlp.up_proj.weight": w(f, h), p + "mlp.down_proj.weight": w(h, f),
        p + "input_layernorm.weight": torch.ones(h, device=dev, dtype=dtype),
        p + "post_attention_layernorm.weight": torch.ones(h, device=dev, dtype=dtype),
    }


def _root_tensors(d: dict, dev, dtype, gen):
    import torch

    h, v = d["hidden_size"], d["vocab_size"]
    return {
        "model.embed_tokens.weight": (torch.randn(v, h, device=dev, generator=gen) * 0.02).to(dtype),
        "model.norm.weight": torch.ones(h, device=dev, dtype=dtype),
        "lm_head.weight": (torch.randn(v, h, device=dev, generator=gen) * 0.02).to(dtype),
    }


def _copy_tokenizer(assets: Path, dest: Path) -> None:
    for p in (assets / "tokenizer").iterdir():
        shutil.copyfile(p, dest / p.name)


def write_checkpoint(dest: Path, dims: dict, assets: Path, seed: int, layers_per_shard: int) -> Dict[str, str]:
    """Random-weight HF checkpoint, ``layers_per_shard`` decoder layers per shard, root tensors in the last."""
    import torch
    from safetensors.torch import save_file

    if (dest / "model.safetensors.index.json").is_file():
        return json.loads((dest / "model.safetensors.index.json").read_text())["weight_map"]
    dest.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    L = dims["num_hidden_layers"]
    groups = [list(range(s, min(L, s + layers_per_shard))) for s in range(0, L, layers_per_shard)]
    n = len(groups) + 1
    weight_map, total = {}, 0
    t0 = time.time()
    for k, g in enumerate(groups + [None]):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        sd = _root_tensors(dims, dev, torch.bfloat16, gen) if g is None else {}
        for i in g or []:
            sd.update(_layer_tensors(i, dims, dev, torch.bfloat16, gen))
        sd = {k2: v.cpu().contiguous() for k2, v in sd.items()}
        total += sum(v.numel() * v.element_size() for v in sd.values())
        save_file(sd, str(dest / name), metadata={"format": "pt"})
        weight_map.update({k2: name for k2 in sd})
        del sd
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (dest / "config.json").write_text(json.dumps(hf_config(dims), indent=1))
    _copy_tokenizer(assets, dest)
    log(f"wrote {dest} ({total / 1e9:.1f} GB, {n} shards) in {time.time() - t0:.0f}s")
    return weight_map


def cut_teacher(full: Path, dest: Path, dims_full: dict, n_layers: int, assets: Path) -> None:
    """A shallower teacher: symlinks to the shards holding layers < n_layers and the root tensors."""
    wm = json.loads((full / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {}
    for k, f in wm.items():
        if k.startswith("model.layers."):
            if int(k.split(".")[2]) < n_layers:
                keep[k] = f
        else:
            keep[k] = f
    files = set(keep.values())
    # a shard mixing kept and dropped layers cannot be shared by symlink
    for k, f in wm.items():
        if f in files and k not in keep:
            raise SystemExit(f"shard {f} holds layers on both sides of {n_layers}: use one layer per shard")
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = dest / f
        if not link.exists():
            link.symlink_to((full / f).resolve())
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=1))
    (dest / "config.json").write_text(json.dumps(hf_config({**dims_full, "num_hidden_layers": n_layers}), indent=1))
    _copy_tokenizer(assets, dest)


# --------------------------------------------------------------------------------------------------
# 3./4. runs
# --------------------------------------------------------------------------------------------------
def teacher_overrides(dims: dict, n_layers: int) -> List[str]:
    """The teacher builder at the 72B's arguments with N layers (torchtune's own qwen2 builder)."""
    return [
        "teacher_model._component_=torchtune.models.qwen2.qwen2",
        f"teacher_model.vocab_size={dims['vocab_size']}", f"teacher_model.num_layers={n_layers}",
        f"teacher_model.num_heads={dims['num_attention_heads']}",
        f"teacher_model.num_kv_heads={dims['num_key_value_heads']}",
        f"teacher_model.embed_dim={dims['hidden_size']}",
        f"teacher_model.intermediate_dim={dims['intermediate_size']}",
        "teacher_model.max_seq_len=32768", "teacher_model.norm_eps=1e-6", "teacher_model.rope_base=1000000.0",
    ]


def student_overrides(small: bool) -> List[str]:
    if not small:
        return []
    d = SMALL_STUDENT
    return [
        "model._component_=torchtune.models.qwen2.lora_qwen2",
        f"model.vocab_size={d['vocab_size']}", f"model.num_layers={d['num_hidden_layers']}",
        f"model.num_heads={d['num_attention_heads']}", f"model.num_kv_heads={d['num_key_value_heads']}",
        f"model.embed_dim={d['hidden_size']}", f"model.intermediate_dim={d['intermediate_size']}",
        "model.max_seq_len=32768", "model.norm_eps=1e-6", "model.rope_base=1000000.0",
    ]


def common_paths(work: Path, assets: Path) -> List[str]:
    tok = assets / "tokenizer"
    return [
        f"tokenizer.path={tok / 'vocab.json'}", f"tokenizer.merges_file={tok / 'merges.txt'}",
        f"checkpointer.checkpoint_dir={work / 'student'}",
        f"dataset.source={work / 'data.json'}",
    ]


def _env(small: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["WANDB_MODE"] = "offline"
    if small:
        env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _user_has_cache() -> bool:
    """The user's config ships a ``teacher_cache`` section (then the online runs switch it off)."""
    from omegaconf import OmegaConf

    return "teacher_cache" in OmegaConf.load(REPO / USER_CONFIG)


def run_ours(work: Path, assets: Path, n_layers: int, steps: int, small: bool, tag: str, extra: List[str],
             teacher_dims: dict, validate: bool) -> dict:
    out = work / "runs" / f"ours_{tag}"
    if out.exists():
        shutil.rmtree(out)
    overrides = [
        f"output_dir={out}", *common_paths(work, assets),
        f"teacher_checkpointer.checkpoint_dir={work / f'teacher_{n_layers}'}",
        *teacher_overrides(teacher_dims, n_layers), *student_overrides(small),
        "epochs=1", f"max_steps_per_epoch={steps}", "save_merged_model=False",
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger", "~metric_logger.project",
        "progress_bar=False", "log_every_n_steps=1",
        *([] if validate else ["~eval_every_n_steps"]),
        *(["device=cpu", "dtype=fp32", "teacher_quantization=null", "optimizer.fused=False",
           "tokenizer.max_seq_len=256", "batch_size=1", "gradient_accumulation_steps=1", "max_eval_batches=2"]
          if small else []),
        *extra,
    ]
    if _user_has_cache() and not any(x.startswith("teacher_cache.mode=") for x in extra):
        overrides.append("~teacher_cache")  # the shipped config's cache off: the online step is the baseline
    cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", "recipes/kd_lora.py", "--config", USER_CONFIG,
           *overrides]
    # a fresh inductor cache per run: the first step's time is a cold start, as a user's first run (with
    # compile=True it is the compile warm-up; comparing two teacher depths shows it does not grow per layer)
    res = _run(cmd, out, "ours", tag, small, env_extra={"TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache")})
    res["overrides"] = overrides
    try:  # the memory planner's peak for exactly this run's config
        from kd.ops.planner import plan_from_config
        from kd.ops.preflight import load_config

        plan = plan_from_config(load_config(str(REPO / USER_CONFIG), overrides), 1)
        res["planned_peak_gib"] = plan.peak_gib
        res["planned_peak_phase"] = plan.peak_phase
    except Exception as e:
        res["plan_error"] = repr(e)
    return res


def stock_config(work: Path, assets: Path, n_layers: int, steps: int, small: bool, teacher_dims: dict) -> Path:
    """The stock recipe's config for the same job (written next to the run; every value named)."""
    from omegaconf import OmegaConf

    user = OmegaConf.load(REPO / USER_CONFIG)
    tok = assets / "tokenizer"
    sdims = SMALL_STUDENT if small else QWEN2_5_7B
    s_files = sorted(set(json.loads((work / "student" / "model.safetensors.index.json").read_text())["weight_map"].values()))
    t_dir = work / f"teacher_{n_layers}"
    t_files = sorted(set(json.loads((t_dir / "model.safetensors.index.json").read_text())["weight_map"].values()))
    out = work / "runs" / f"stock_L{n_layers}"
    model = OmegaConf.to_container(user.model)
    if small:
        model = {"_component_": "torchtune.models.qwen2.lora_qwen2", **{k: v for k, v in model.items() if k != "_component_"},
                 "vocab_size": sdims["vocab_size"], "num_layers": sdims["num_hidden_layers"],
                 "num_heads": sdims["num_attention_heads"], "num_kv_heads": sdims["num_key_value_heads"],
                 "embed_dim": sdims["hidden_size"], "intermediate_dim": sdims["intermediate_size"],
                 "max_seq_len": 32768, "norm_eps": 1e-6, "rope_base": 1000000.0}
    td = teacher_dims
    cfg = {
        "output_dir": str(out),
        "model": model,
        "teacher_model": {"_component_": "torchtune.models.qwen2.qwen2", "vocab_size": td["vocab_size"],
                          "num_layers": n_layers, "num_heads": td["num_attention_heads"],
                          "num_kv_heads": td["num_key_value_heads"], "embed_dim": td["hidden_size"],
                          "intermediate_dim": td["intermediate_size"], "max_seq_len": 32768, "norm_eps": 1e-6,
                          "rope_base": 1000000.0},
        "tokenizer": {"_component_": "torchtune.models.qwen2_5.qwen2_5_tokenizer", "path": str(tok / "vocab.json"),
                      "merges_file": str(tok / "merges.txt"),
                      "max_seq_len": 256 if small else int(user.tokenizer.max_seq_len)},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": str(work / "student"), "checkpoint_files": s_files,
                         "output_dir": str(out / "ckpt"), "model_type": "QWEN2", "recipe_checkpoint": None},
        "teacher_checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                                 "checkpoint_dir": str(t_dir), "checkpoint_files": t_files,
                                 "output_dir": str(out / "teacher_ckpt"), "model_type": "QWEN2"},
        "resume_from_checkpoint": False, "save_adapter_weights_only": True,
        # the same data component, unpacked as stock configs ship (stock's collate pads each batch)
        "dataset": {"_component_": "kd.data.alpaca.alpaca_kd_dataset", "source": str(work / "data.json"),
                    "system_prompt": SYSTEM_PROMPT, "val_size": float(user.dataset.val_size),
                    "seed": int(user.dataset.seed), "packed": False},
        "seed": int(user.seed), "shuffle": True, "batch_size": 1 if small else int(user.batch_size),
        "optimizer": {**OmegaConf.to_container(user.optimizer), **({"fused": False} if small else {})},
        "lr_scheduler": OmegaConf.to_container(user.lr_scheduler),
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "kd_loss": {"_component_": "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss"},
        "kd_ratio": float(user.kd_ratio), "epochs": 1, "max_steps_per_epoch": steps,
        "gradient_accumulation_steps": 1 if small else int(user.gradient_accumulation_steps),
        "clip_grad_norm": user.clip_grad_norm,
        "compile": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "logs")},
        "log_every_n_steps": 1, "log_peak_memory_stats": not small,
        "device": "cpu" if small else "cuda", "dtype": "fp32" if small else "bf16",
        "enable_activation_checkpointing": True, "enable_activation_offloading": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }
    path = work / "runs" / f"stock_L{n_layers}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def run_stock(work: Path, assets: Path, n_layers: int, steps: int, small: bool, teacher_dims: dict) -> dict:
    cfg = stock_config(work, assets, n_layers, steps, small, teacher_dims)
    out = work / "runs" / f"stock_L{n_layers}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", "bench/stock_kd_nf4.py", "--config", str(cfg),
           f"nf4_teacher={'False' if small else 'True'}", f"timing_file={out / 'timing.jsonl'}"]
    return _run(cmd, out, "stock", f"L{n_layers}", small)


def _run(cmd: List[str], out: Path, who: str, tag: str, small: bool, env_extra: Optional[dict] = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log(f"{who} {tag}: {' '.join(cmd[3:])}")
    t0 = time.time()
    with open(out / "stdout.log", "w") as f:
        p = subprocess.run(cmd, cwd=REPO, env={**_env(small), **(env_extra or {})}, stdout=f,
                           stderr=subprocess.STDOUT)
    wall = time.time() - t0
    tail = (out / "stdout.log").read_text(errors="replace").splitlines()[-15:]
    if p.returncode != 0:
        log(f"{who} {tag} FAILED rc={p.returncode} after {wall:.0f}s:\n" + "\n".join(tail))
        return {"ok": False, "rc": p.returncode, "wall_s": wall, "tail": tail}
    log(f"{who} {tag} done in {wall:.0f}s")
    return {"ok": True, "wall_s": wall, "out": str(out)}


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------
def _median(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def summarize_ours(out: Path, warmup: int) -> dict:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    steady = train[warmup:] or train[-1:]
    res = {
        "steps": len(train),
        "step_s": _median([r["step_seconds"] for r in steady]),
        "tokens": _median([r["tokens_per_second"] * r["step_seconds"] for r in steady]),
        "answer_tokens": _median([r["valid_tokens"] for r in steady]),
        "peak_gib": max((r.get("peak_memory_alloc_gib", 0.0) for r in train), default=None),
        "peak_reserved_gib": max((r.get("peak_memory_reserved_gib", 0.0) for r in train), default=None),
        "phases": {k[5:-2]: _median([r[k] for r in steady]) for k in steady[0] if k.startswith("time_")},
        "first_step_s": train[0]["step_seconds"] if train else None,
    }
    res["tokens_per_s"] = res["tokens"] / res["step_s"]
    res["answer_tokens_per_s"] = res["answer_tokens"] / res["step_s"]
    val = [r for r in rows if r["kind"] == "val"]
    ck = [r for r in rows if r["kind"] == "checkpoint"]
    res["val_s"] = val[0]["seconds"] if val else None
    res["checkpoint_s"] = ck[-1]["seconds"] if ck else None
    return res


def summarize_stock(out: Path, warmup: int) -> dict:
    rows = [json.loads(l) for l in (out / "timing.jsonl").read_text().splitlines() if l.strip()]
    steady = rows[warmup:] or rows[-1:]
    res = {
        "steps": len(rows),
        "step_s": _median([r["step_s"] for r in steady]),
        "tokens": _median([r["tokens"] for r in steady]),
        "answer_tokens": _median([r["answer_tokens"] for r in steady]),
        "peak_gib": max((r.get("peak_alloc_gib") or 0.0 for r in rows), default=None),
        "first_step_s": rows[0]["step_s"] if rows else None,
    }
    res["tokens_per_s"] = res["tokens"] / res["step_s"]
    res["answer_tokens_per_s"] = res["answer_tokens"] / res["step_s"]
    return res


def padding_stats(work: Path, assets: Path, small: bool) -> dict:
    """Share of processed positions that are padding over one epoch: the recipe's packed loader (torchtune's
    greedy packing, 2 packs per batch) and stock's padded one (batches padded to their longest sample); same data,
    batch size and tokenizer as the runs (kd.ops.jobtime's loader model, which the planner uses too)."""
    from omegaconf import OmegaConf

    from kd.ops.jobtime import data_stats, micro_batches
    from kd.ops.preflight import load_config

    ov = [*common_paths(work, assets), *(["tokenizer.max_seq_len=256", "batch_size=1"] if small else [])]
    cfg = load_config(str(REPO / USER_CONFIG), ov)
    st = data_stats(cfg)
    out = {"samples": st.samples, "tokens_mean": statistics.mean(st.lengths),
           "tokens_median": statistics.median(st.lengths), "answer_tokens_mean": statistics.mean(st.answers),
           "answer_p95": sorted(st.answers)[int(0.95 * st.samples)],
           "cut_at_max_seq_len": sum(1 for n in st.lengths if n >= st.max_seq_len)}
    for name, packed, packing in (("unpacked", False, ""), ("packed_greedy", True, "greedy"),
                                  ("packed", True, "best_fit")):
        st.packed, st.packing = packed, packing or "best_fit"
        batches = micro_batches(st)
        real = sum(st.lengths[i] for b in batches for i in b)
        pos = sum((st.max_seq_len * st.batch_size) if packed else len(b) * max(st.lengths[i] for i in b)
                  for b in batches)
        out[f"padding_fraction_{name}"] = 1 - real / pos
        if packed:
            out[f"samples_per_batch_{name}"] = real / len(batches) / statistics.mean(st.lengths)
    del OmegaConf
    return out


def extrapolate(runs: Dict[int, dict], key_per_layer: str, target_layers: int) -> dict:
    """Linear in teacher depth: cost(N) = a + b*N, b from the two deepest runs; checked on a third if present."""
    depths = sorted(runs)
    hi, lo = depths[-1], depths[-2]

    def cost(n):
        r = runs[n]
        return r["phases"]["teacher_fwd"] if key_per_layer == "teacher_fwd" else r["step_s"]

    per_layer = (cost(hi) - cost(lo)) / (hi - lo)
    out = {"per_layer_s": per_layer, "from_depths": [lo, hi]}
    if len(depths) >= 3:
        third = depths[0]
        pred = cost(lo) - per_layer * (lo - third)
        out["check"] = {"depth": third, "predicted_s": pred, "measured_s": cost(third),
                        "rel_error": pred / cost(third) - 1}
    step = runs[hi]["step_s"] + per_layer * (target_layers - hi) if key_per_layer == "teacher_fwd" \
        else cost(hi) + per_layer * (target_layers - hi)
    out["step_s_at_target"] = step
    if runs[hi].get("peak_gib") and runs[lo].get("peak_gib"):  # resident teacher layers grow the peak linearly
        per_layer_gib = (runs[hi]["peak_gib"] - runs[lo]["peak_gib"]) / (hi - lo)
        out["peak_gib_at_target"] = runs[hi]["peak_gib"] + per_layer_gib * (target_layers - hi)
        out["peak_gib_per_layer"] = per_layer_gib
    out["tokens_per_s_at_target"] = runs[hi]["tokens"] / step
    out["answer_tokens_per_s_at_target"] = runs[hi]["answer_tokens"] / step
    return out


def _ours_one(results, ours, work, assets, n, a, small, extra, tdims, validate, variant="") -> None:
    key = f"ours_{variant}_L{n}" if variant else f"ours_L{n}"
    tag = key[len("ours_"):]
    r = run_ours(work, assets, n, a.steps, small, tag, extra, tdims, validate=validate)
    if not r["ok"] and not variant and not any(x.startswith("dataset.packed") for x in extra):
        # keep the measurement alive if packing (flex attention) fails on this stack; recorded as such
        log(f"{key} failed; retrying unpacked")
        results[f"{key}_packed_failure"] = r
        extra = extra + ["dataset.packed=False"]
        r = run_ours(work, assets, n, a.steps, small, tag, extra, tdims, validate=validate)
    results[f"{key}_run"] = r
    if r["ok"]:
        ours[n] = summarize_ours(Path(r["out"]), a.warmup)
        ours[n]["planned_peak_gib"] = r.get("planned_peak_gib")
        results[key] = ours[n]
        log(f"{key}: {json.dumps(ours[n])}")


def cache_samples_needed(results: dict, a, small: bool, recs: List[dict]) -> int:
    """Samples the from-cache run needs for ``--steps`` optimizer steps of packed micro-batches (from the
    loader model's samples per micro-batch, +10%, over the training split), unless ``--cache-samples``."""
    from omegaconf import OmegaConf

    if a.cache_samples:
        return min(len(recs), a.cache_samples)
    user = OmegaConf.load(REPO / USER_CONFIG)
    ga = 1 if small else int(user.gradient_accumulation_steps)
    spb = float(results.get("padding", {}).get("samples_per_batch_packed") or 8.0)
    val = float(user.dataset.val_size)
    return min(len(recs), int(math.ceil(a.steps * ga * spb * 1.1 / (1.0 - val))) + 8)


def _fill_row(out: Path) -> Optional[dict]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    fills = [r for r in rows if r["kind"] == "cache_fill"]
    return fills[-1] if fills else None


def cache_bench(results: dict, work: Path, assets: Path, a, small: bool, extra: List[str], tdims: dict,
                depths: List[int], recs: List[dict], save) -> dict:
    """The teacher cache's speed target (issue 11), at one teacher depth (``--cache-depth``, default the
    shallowest of ``--depths``), next to that depth's online baseline run ``ours_L{n}``:

    (b) ``ours_cache_write_L{n}``: epoch 1 of ``teacher_cache.mode=online_then_cache`` (epochs=1, so no fill):
        the online step that also draws K samples per answer token and writes them, on the same data and
        batches as the baseline -> write overhead;
    (c0) ``cache_build_L{n}``: ``mode=build`` over the first M samples (M: what (c) trains on) -> the
        teacher-only pass's throughput in teacher tokens/s (the recipe's ``cache_fill`` metrics row);
    (c) ``ours_cache_use_L{n}``: ``mode=use`` on those M samples (the teacher is never loaded) -> the step
        from the cache.

    Projection to 80 teacher layers with the baseline's measured per-layer teacher cost (needs 2 depths):
    online80 = the extrapolated online step; write adds the same absolute seconds as at depth n (the sampler
    works on the head's logits, not on the layers); the cache step does not depend on the teacher; the build's
    seconds per teacher token grow by the extra layers' forward seconds per token of the online baseline. The 3-epoch ratio is
    (epoch 1 online + write, + fill of the samples epoch 1 does not see, + 2 epochs from the cache) /
    (3 epochs online), per optimizer step of the user's job (fill share: the validation split when the user's
    config validates; the drop_last remainder is left out)."""
    from omegaconf import OmegaConf

    n = a.cache_depth or min(depths)
    if n not in depths:
        raise SystemExit(f"--cache-depth {n} must be one of --depths {depths}")
    res: dict = {"depth": n}
    # (b)
    if not a.cache_skip_write:
        wdir = work / f"cache_write_L{n}"
        shutil.rmtree(wdir, ignore_errors=True)
        _ours_one(results, {}, work, assets, n, a, small,
                  extra + ["teacher_cache.mode=online_then_cache", f"teacher_cache.dir={wdir}"], tdims,
                  validate=False, variant="cache_write")
        save()
    # (c0)
    m = cache_samples_needed(results, a, small, recs)
    sub = work / "data_cache.json"
    sub.write_text(json.dumps(recs[:m], ensure_ascii=False))
    res["cache_samples"] = m
    bdir = work / f"cache_L{n}"
    shutil.rmtree(bdir, ignore_errors=True)
    data_ov = [f"dataset.source={sub}"]
    r = run_ours(work, assets, n, a.steps, small, f"cache_build_L{n}",
                 extra + ["teacher_cache.mode=build", f"teacher_cache.dir={bdir}", *data_ov], tdims, validate=False)
    results[f"cache_build_L{n}_run"] = r
    fill = _fill_row(Path(r["out"])) if r["ok"] else None
    if fill:
        res["build"] = {"samples": fill["samples"], "seconds": fill["seconds"], "batches": fill.get("batches"),
                        "tokens": fill["tokens_this_rank"], "positions": fill["positions_this_rank"],
                        "answer_tokens": fill["answer_tokens_this_rank"], "wall_s": r["wall_s"],
                        "tokens_per_s": fill["tokens_this_rank"] / max(1e-9, fill["seconds"]),
                        "positions_per_s": fill["positions_this_rank"] / max(1e-9, fill["seconds"])}
        log(f"cache build L{n}: {json.dumps(res['build'])}")
    save()
    # (c)
    if r["ok"]:
        _ours_one(results, {}, work, assets, n, a, small,
                  extra + ["teacher_cache.mode=use", f"teacher_cache.dir={bdir}", *data_ov], tdims,
                  validate=False, variant="cache_use")
    save()
    on, wr, use = (results.get(f"ours{v}_L{n}") for v in ("", "_cache_write", "_cache_use"))
    if on and wr:
        res["write_overhead_pct"] = 100.0 * (wr["step_s"] / on["step_s"] - 1.0)
        res["write_overhead_s"] = wr["step_s"] - on["step_s"]
    if on and use:
        res["cache_step_vs_online"] = use["step_s"] / on["step_s"]
        # per processed token (the subset's packs hold a few more or fewer tokens than the baseline's)
        res["cache_step_vs_online_per_token"] = (use["step_s"] / use["tokens"]) / (on["step_s"] / on["tokens"])
        if use["steps"] < a.steps:
            res["warning"] = f"the from-cache run made {use['steps']} of {a.steps} steps: raise --cache-samples"
    user = OmegaConf.load(REPO / USER_CONFIG)
    fill_share = float(user.dataset.val_size) / (1.0 - float(user.dataset.val_size)) \
        if user.get("eval_every_n_steps", None) else 0.0
    res["fill_share"] = fill_share

    def ratios(online_s, write_extra_s, cache_s, build_tps, tokens_per_step):
        build_s = tokens_per_step / build_tps  # teacher-only seconds per step's worth of samples
        return {"online_step_s": online_s, "write_step_s": online_s + write_extra_s, "cache_step_s": cache_s,
                "build_s_per_step_of_data": build_s,
                "three_epochs_online_then_cache_vs_online":
                    (online_s + write_extra_s + fill_share * build_s + 2 * cache_s) / (3 * online_s),
                "three_epochs_build_then_use_vs_online": ((1 + fill_share) * build_s + 3 * cache_s) / (3 * online_s)}

    if on and wr and use and "build" in res:
        tps = on["tokens"]  # the user's step: the baseline's tokens per optimizer step
        cache_s = use["step_s"] / use["tokens"] * tps
        res[f"at_L{n}"] = ratios(on["step_s"], res["write_overhead_s"], cache_s, res["build"]["tokens_per_s"], tps)
        ex = results.get("ours_extrapolated")
        if ex:
            target = QWEN2_5_72B["num_hidden_layers"] if not small else SMALL_TEACHER["num_hidden_layers"] * 2
            hi = ex["from_depths"][1]
            fwd_n = on["phases"]["teacher_fwd"]
            fwd_t = results[f"ours_L{hi}"]["phases"]["teacher_fwd"] + ex["per_layer_s"] * (target - hi)
            # the build at 80 layers = the measured build + the extra layers' forward per token, as the online
            # baseline measures it (the head and the sampler do not depend on the depth)
            build_tps_t = 1.0 / (1.0 / res["build"]["tokens_per_s"] + (fwd_t - fwd_n) / on["tokens"])
            res[f"at_L{target}"] = {**ratios(ex["step_s_at_target"], res["write_overhead_s"], cache_s, build_tps_t, tps),
                                    "build_tokens_per_s": build_tps_t,
                                    "write_overhead_pct": 100.0 * res["write_overhead_s"] / ex["step_s_at_target"]}
    results["teacher_cache"] = res
    save()
    return res


def run_cmd(a) -> None:
    import torch

    global USER_CONFIG
    USER_CONFIG = a.config  # every run and the planner's prediction read this config
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    assets = Path(a.assets).resolve()
    small = a.small
    out_dir = Path(os.environ.get("OUT", work))
    results: Dict[str, object] = {"args": vars(a), "lengths": LENGTHS,
                                  "torch": torch.__version__,
                                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}

    def save():
        (out_dir / "recipe_bench.json").write_text(json.dumps(results, indent=1, default=str))

    # data
    src = assets / "buddhist_qa_synth.json.gz"
    if not src.is_file():
        a2 = argparse.Namespace(out=str(assets), samples=a.samples, seed=0)
        data_cmd(a2)
    with gzip.open(src, "rt", encoding="utf-8") as f:
        recs = json.load(f)[: a.samples]
    (work / "data.json").write_text(json.dumps(recs, ensure_ascii=False))
    results["padding"] = padding_stats(work, assets, small)
    log(f"data: {results['padding']}")
    save()

    # checkpoints
    depths = sorted({int(x) for x in a.depths.split(",")}, reverse=True)
    stock_depths = sorted({int(x) for x in a.stock_depths.split(",") if x}, reverse=True) if a.stock_depths else []
    tdims = dict(SMALL_TEACHER if small else QWEN2_5_72B)
    sdims = SMALL_STUDENT if small else QWEN2_5_7B
    t0 = time.time()
    write_checkpoint(work / "student", sdims, assets, seed=1, layers_per_shard=max(1, sdims["num_hidden_layers"] // 4))
    full_n = max(depths + stock_depths)
    write_checkpoint(work / "teacher_full", {**tdims, "num_hidden_layers": full_n}, assets, seed=2, layers_per_shard=1)
    for n in set(depths + stock_depths):
        cut_teacher(work / "teacher_full", work / f"teacher_{n}", tdims, n, assets)
    results["checkpoint_write_s"] = time.time() - t0
    save()

    extra = [x for x in (a.extra or "").split() if x]
    variants = [("", [])] + [(v.split(":", 1)[0], v.split(":", 1)[1].split()) for v in a.variants.split(";") if v]
    ours_v: Dict[str, Dict[int, dict]] = {name: {} for name, _ in variants}
    stock: Dict[int, dict] = {}
    for i, n in enumerate(sorted(set(depths) | set(stock_depths), reverse=True)):
        for name, ov in variants:
            if n in depths:
                _ours_one(results, ours_v[name], work, assets, n, a, small, extra + ov, tdims,
                          validate=(i == 0 and a.validate and not name), variant=name)
                save()
        if n in stock_depths:
            r = run_stock(work, assets, n, a.steps, small, tdims)
            results[f"stock_L{n}_run"] = r
            if r["ok"]:
                stock[n] = summarize_stock(Path(r["out"]), a.warmup)
                results[f"stock_L{n}"] = stock[n]
                log(f"stock L{n}: {json.dumps(stock[n])}")
            save()
    target = QWEN2_5_72B["num_hidden_layers"] if not small else SMALL_TEACHER["num_hidden_layers"] * 2
    if len(ours_v[""]) >= 2:  # the cache projection below needs the baseline's per-layer teacher cost
        results["ours_extrapolated"] = extrapolate(ours_v[""], "teacher_fwd", target)
    if a.cache:
        cache_bench(results, work, assets, a, small, extra, tdims, depths, recs, save)
    # activation checkpointing: measured peak against the planner, at the shallowest depth
    for j, ac in enumerate(a.ac_variants.split(";") if a.ac_variants else []):
        n = depths[-1]
        ov = [x for x in ac.split() if x]
        r = run_ours(work, assets, n, 2, small, f"L{n}_ac{j}", extra + ov, tdims, validate=False)
        if r["ok"]:
            sm = summarize_ours(Path(r["out"]), 1)
            results[f"ac_variant_{j}"] = {"overrides": ov, "peak_gib": sm["peak_gib"], "step_s": sm["step_s"],
                                          "planned_peak_gib": r.get("planned_peak_gib")}
        else:
            results[f"ac_variant_{j}"] = {"overrides": ov, "failed": r}
        save()
    target = QWEN2_5_72B["num_hidden_layers"] if not small else SMALL_TEACHER["num_hidden_layers"] * 2
    for name, _ in variants:
        if len(ours_v[name]) >= 2:
            results[f"ours_{name}_extrapolated" if name else "ours_extrapolated"] = extrapolate(
                ours_v[name], "teacher_fwd", target)
    if len(stock) >= 2:
        results["stock_extrapolated"] = extrapolate(stock, "step", target)
    # the job-time planner's prediction for the same job, at the deepest measured depth and at 80 layers
    try:
        results["planner"] = predict(work, assets, depths + [target], small, a.hardware, extra)
    except Exception as e:  # the measurement stands without it
        results["planner_error"] = repr(e)
    save()
    import tarfile

    with tarfile.open(out_dir / "runs.tar.gz", "w:gz") as tf:
        for f in sorted((work / "runs").rglob("*")):
            if f.is_file() and f.name in ("stdout.log", "metrics.jsonl", "timing.jsonl") or f.suffix == ".yaml":
                tf.add(f, arcname=str(f.relative_to(work)))
    print_table(results, depths, stock_depths, target, [name for name, _ in variants])


def predict(work: Path, assets: Path, depths: List[int], small: bool, hardware: str,
            extra: Sequence[str] = ()) -> dict:
    """``kd plan --time``'s step time (kd.ops.jobtime) for the benchmark's own job, per teacher depth: the
    overrides of the baseline recipe runs (``--extra``, and the teacher cache off as ``run_ours`` does)."""
    from kd.ops.jobtime import estimate_job, load_hardware
    from kd.ops.preflight import load_config

    hw = load_hardware(hardware)
    out = {}
    for n in depths:
        ov = [*common_paths(work, assets), *teacher_overrides(SMALL_TEACHER if small else QWEN2_5_72B, n),
              *student_overrides(small), "epochs=1"]
        if small:
            ov += ["tokenizer.max_seq_len=256", "batch_size=1", "gradient_accumulation_steps=1"]
        ov += list(extra)
        if _user_has_cache() and not any(x.startswith("teacher_cache.mode=") for x in extra):
            ov.append("~teacher_cache")
        est = estimate_job(load_config(str(REPO / USER_CONFIG), ov), hw)
        out[f"L{n}"] = {"step_s": est.step_s,
                        "per_step": {c.name: c.seconds / max(1, est.steps_per_epoch) for c in est.components}}
    return out


def print_table(results: dict, depths: List[int], stock_depths: List[int], target: int,
                variants: Sequence[str] = ("",)) -> None:
    print("\n=== recipe benchmark ===")
    pad = results.get("padding", {})
    print(f"data: {pad.get('samples')} samples, mean {pad.get('tokens_mean', 0):.0f} tokens; padding "
          f"unpacked {pad.get('padding_fraction_unpacked', 0):.1%}, packed next-fit (torchtune) "
          f"{pad.get('padding_fraction_packed_greedy', 0):.1%}, packed best-fit (kd) {pad.get('padding_fraction_packed', 0):.1%}")
    print(f"{'run':<16}{'step s':>9}{'tok/s':>9}{'ans tok/s':>11}{'peak GiB':>10}{'1st step s':>11}  phases (s/step)")
    rows = [(f"ours_{v}" if v else "ours", depths) for v in variants] + [("stock", stock_depths)]
    for who, ds in rows:
        for n in ds:
            r = results.get(f"{who}_L{n}")
            if not r:
                print(f"{who + ' L' + str(n):<16} FAILED")
                continue
            ph = " ".join(f"{k}={v:.3f}" for k, v in (r.get("phases") or {}).items())
            print(f"{who + ' L' + str(n):<16}{r['step_s']:>9.2f}{r['tokens_per_s']:>9.0f}"
                  f"{r['answer_tokens_per_s']:>11.0f}{(r['peak_gib'] or 0):>10.1f}{(r.get('first_step_s') or 0):>11.1f}  {ph}")
    for who, _ in rows:
        e = results.get(f"{who}_extrapolated")
        if e:
            print(f"{who} @ {target} teacher layers (extrapolated, {e['per_layer_s'] * 1e3:.1f} ms/layer/step): "
                  f"step {e['step_s_at_target']:.2f} s, {e['tokens_per_s_at_target']:.0f} tok/s, "
                  f"{e['answer_tokens_per_s_at_target']:.0f} answer tok/s, peak "
                  f"{e.get('peak_gib_at_target', float('nan')):.1f} GiB" +
                  (f"; check at L{e['check']['depth']}: {e['check']['rel_error']:+.1%}" if "check" in e else ""))
    for k in sorted(x for x in results if x.startswith("ac_variant_")):
        v = results[k]
        if "peak_gib" in v:
            print(f"AC {' '.join(v['overrides'])}: measured peak {v['peak_gib']:.2f} GiB, planned "
                  f"{(v.get('planned_peak_gib') or 0):.2f} GiB, step {v['step_s']:.2f} s")
    for n in depths:
        r = results.get(f"ours_L{n}")
        if r and r.get("planned_peak_gib"):
            print(f"ours L{n}: measured peak {r['peak_gib']:.2f} GiB, planned {r['planned_peak_gib']:.2f} GiB")
    tc = results.get("teacher_cache")
    if tc:
        n = tc["depth"]
        print(f"teacher cache (teacher L{n}; issue 11 targets: write <= 3%, 3 epochs <= 0.55x):")
        for who in ("ours", "ours_cache_write", "ours_cache_use"):
            r = results.get(f"{who}_L{n}")
            skipped = who == "ours_cache_write" and results.get("args", {}).get("cache_skip_write")
            print(f"  {who + ' L' + str(n):<24}" + (f"step {r['step_s']:.3f} s, {r['tokens_per_s']:.0f} tok/s"
                                                     if r else "skipped (--cache-skip-write)" if skipped
                                                     else "FAILED"))
        b = tc.get("build")
        print("  build pass: " + (f"{b['samples']} samples, {b['tokens']:,} tokens in {b['seconds']:.2f} s = "
                                  f"{b['tokens_per_s']:.0f} teacher tokens/s ({b['positions_per_s']:.0f} padded)"
                                  if b else "FAILED"))
        if "write_overhead_pct" in tc:
            print(f"  write overhead: {tc['write_overhead_pct']:+.2f}% of the online step at L{n}")
        if "cache_step_vs_online" in tc:
            print(f"  step from the cache vs online at L{n}: {tc['cache_step_vs_online']:.3f}x "
                  f"({tc['cache_step_vs_online_per_token']:.3f}x per token)")
        for k in sorted(x for x in tc if x.startswith("at_L")):
            v = tc[k]
            print(f"  {k[3:]}: 3 epochs online_then_cache / online = {v['three_epochs_online_then_cache_vs_online']:.3f}, "
                  f"build then use = {v['three_epochs_build_then_use_vs_online']:.3f} (online step {v['online_step_s']:.2f} s, "
                  f"cache step {v['cache_step_s']:.2f} s" + (f", write {v['write_overhead_pct']:+.2f}%" if "write_overhead_pct" in v else "")
                  + ")")
        if tc.get("warning"):
            print(f"  WARNING: {tc['warning']}")
    if "planner" in results:
        print(f"planner: {json.dumps(results['planner'])}")
        for n in depths:  # the planner's optimizer step against the measured one (same config, same overrides)
            pr, me = results["planner"].get(f"L{n}"), results.get(f"ours_L{n}")
            if pr and me:
                print(f"planner vs measured, L{n}: {pr['step_s']:.2f} s predicted, {me['step_s']:.2f} s measured "
                      f"({100 * (pr['step_s'] / me['step_s'] - 1):+.1f}%)")
    elif "planner_error" in results:
        print(f"planner error: {results['planner_error']}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the synthetic data set and the Qwen2.5 tokenizer files (CPU)")
    d.add_argument("--out", default=".bench_assets")
    d.add_argument("--samples", type=int, default=2400)
    d.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="checkpoints + runs (GPU; --small for a CPU smoke test)")
    r.add_argument("--work", default="/tmp/kd_recipe_bench")
    r.add_argument("--assets", default=".bench_assets")
    r.add_argument("--samples", type=int, default=600)
    r.add_argument("--depths", default="16,8", help="teacher depths for the recipe runs")
    r.add_argument("--stock-depths", default="16,8", help="teacher depths for the stock runs ('' = none)")
    r.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is warm-up)")
    r.add_argument("--warmup", type=int, default=1, help="steps left out of the steady-state median")
    r.add_argument("--validate", action="store_true", help="run the step-0 validation in the deepest run")
    r.add_argument("--extra", default="", help="extra overrides for the recipe runs (space separated)")
    r.add_argument("--variants", default="",
                   help="more recipe runs per depth: 'name:overrides;...', e.g. 'fp8:teacher_quantization=nf4_fp8'")
    r.add_argument("--config", default=USER_CONFIG,
                   help="the kd_lora config the recipe runs use (default: the 1-node config); stock runs copy its "
                        "model, batch and optimizer settings")
    r.add_argument("--hardware", default="h200",
                   help="profile of the planner's prediction: h200, gb10 or a YAML file (kd calibrate --out ...)")
    r.add_argument("--ac-variants", default="",
                   help="';'-separated override sets run at the shallowest depth to compare peak memory with the "
                        "planner, e.g. 'ac_mode=full;ac_mode=selective ac_option=2'")
    r.add_argument("--cache", action="store_true",
                   help="teacher cache (issue 11): online_then_cache write step, build pass, step from the cache, "
                        "and the 3-epoch projection, at --cache-depth")
    r.add_argument("--cache-skip-write", action="store_true",
                   help="leave out the online_then_cache write run (b): only the build and the step from the cache")
    r.add_argument("--cache-depth", type=int, default=None, help="teacher depth of the cache runs (default: the "
                                                                  "shallowest of --depths)")
    r.add_argument("--cache-samples", type=int, default=None,
                   help="samples of the build pass and of the from-cache run (default: what --steps need)")
    r.add_argument("--small", action="store_true", help="tiny widths on CPU (smoke test of the whole path)")
    a = p.parse_args(argv)
    (data_cmd if a.cmd == "data" else run_cmd)(a)


if __name__ == "__main__":
    main()
