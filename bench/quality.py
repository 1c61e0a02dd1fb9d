"""Quality benchmark: how close does each distillation method bring the student to its teacher? (CPU)

    python bench/quality.py                       # full: 3 seeds x every method, writes docs/quality.md
    python bench/quality.py --seeds 1 --methods ce,fkl,op_best --epochs 1 --doc /tmp/q.md   # reduced

Steps:
1. The tiny test bed (kd.testing.testbed: trained 4-layer teacher, 2-layer prompt-pretrained student, demo data).
2. A WARM student base, close to its teacher as Qwen2.5-7B-Instruct is to 72B-Instruct: the test-bed student,
   full-parameter SFT on the train split's answers (``--warm-steps``). Its held-out KL to the teacher is reported.
3. Every method x seed trains a LoRA on the warm base through the real ``tune run`` (``recipes/kd_lora.py`` with
   ``configs/tiny/kd_lora.yaml`` + overrides; stock = torchtune's ``knowledge_distillation_single_device`` on the same
   HF checkpoints, data and hyper-parameters), same steps / batch / LR schedule.
4. The saved PEFT adapters are evaluated with transformers + peft (not the recipe's code) on the held-out split
   (val_size 0.1, seed 0; neither teacher nor student trained on it): KL(teacher || student) per answer token, CE on
   the held-out answers, top-1 agreement with the teacher.
5. Teacher fidelity: KL(fp32 teacher || bf16 / NF4 / FP8 / NF4-FP8 teacher) on the same tokens (``TEACHER_VARIANTS``).
6. A Markdown table (mean +- sample std over seeds), the command, wall time and teacher-forward count per method,
   into ``--doc`` (default docs/quality.md), and every number into ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")
BATCH = 4  # configs/tiny/kd_lora.yaml batch_size (grad accumulation 1): one teacher forward = 4 sequences
STEPS_PER_EPOCH = 27  # 108 train samples / 4

# The LoRA every method trains (ours and stock): the rank and alpha configs/qwen2_5/72B_to_7B_kd_lora*.yaml ship (r64,
# alpha 2r; configs/tiny/kd_lora.yaml itself has r16), on the tiny config's modules (attention, MLP and output).
LORA = {"lora_rank": 64, "lora_alpha": 128}
EPOCHS = 3  # the shipped 72B->7B configs' epochs (the user trains 2-3)
CACHE = ["teacher_cache.mode=online_then_cache", "teacher_cache.k=12"]  # the shipped teacher cache
FKL = ["kd_ratio=1", "kd_loss.kind=forward_kl"]
OP = ["kd_ratio=1", "on_policy.max_new_tokens=64"]

# name -> (description, overrides of configs/tiny/kd_lora.yaml). "stock" is torchtune's own recipe (see _stock_cmd);
# a method's own ``epochs=`` / ``optimizer.lr=`` win over --epochs / --lr (OWN).
METHODS: Dict[str, tuple] = {
    "ce": ("CE only (LoRA SFT on the labels, no teacher)", ["kd_ratio=0", "~teacher_model", "~teacher_checkpointer"]),
    "fkl_r05": ("forward KL, kd_ratio 0.5", ["kd_ratio=0.5", "kd_loss.kind=forward_kl"]),
    "fkl": ("forward KL, kd_ratio 1, online every epoch", FKL),
    "fkl_e1": ("forward KL, kd_ratio 1, online, 1 epoch", [*FKL, "epochs=1"]),
    "rkl": ("reverse KL, kd_ratio 1", ["kd_ratio=1", "kd_loss.kind=reverse_kl"]),
    "jsd": ("JSD beta 0.5, kd_ratio 1", ["kd_ratio=1", "kd_loss.kind=jsd", "kd_loss.beta=0.5"]),
    "skew_fkl": ("skew forward KL alpha 0.1, kd_ratio 1",
                 ["kd_ratio=1", "kd_loss.kind=skew_forward_kl", "kd_loss.alpha=0.1"]),
    "op_trl": ("on-policy, TRL GKD defaults: lmbda 0.5, JSD beta 0.5, T 0.9, kd_ratio 1",
               [*OP, "kd_loss.kind=jsd", "kd_loss.beta=0.5", "on_policy.lmbda=0.5", "on_policy.temperature=0.9"]),
    "op_l1_fkl": ("on-policy: lmbda 1, forward KL, T 1, kd_ratio 1",
                  [*OP, "kd_loss.kind=forward_kl", "on_policy.lmbda=1", "on_policy.temperature=1.0"]),
    "op_fkl_l05": ("on-policy: lmbda 0.5, forward KL, T 1, kd_ratio 1",
                   [*OP, "kd_loss.kind=forward_kl", "on_policy.lmbda=0.5", "on_policy.temperature=1.0"]),
    "op_fkl_l025": ("on-policy: lmbda 0.25, forward KL, T 1, kd_ratio 1",
                    [*OP, "kd_loss.kind=forward_kl", "on_policy.lmbda=0.25", "on_policy.temperature=1.0"]),
    "fkl_t2": ("forward KL at temperature 2 (T^2-scaled), kd_ratio 1", [*FKL, "kd_loss.temperature=2.0"]),
    "fkl_all": ("forward KL on every position (prompt too: dataset.train_on_input), kd_ratio 1",
                [*FKL, "dataset.train_on_input=True"]),
    "cache": ("forward KL, kd_ratio 1, teacher cache online_then_cache K=12: epoch 1 online, later epochs from the "
              "cache (shipped)", [*FKL, *CACHE]),
    "stock_r05": ("stock torchtune KD recipe, kd_ratio 0.5 (its default)", ["kd_ratio=0.5"]),
    "stock": ("stock torchtune KD recipe, kd_ratio 1", ["kd_ratio=1"]),
    "stock_e1": ("stock torchtune KD recipe, kd_ratio 1, 1 epoch", ["kd_ratio=1", "epochs=1"]),
}
# left out of the default list (seed-0 pilots: worse than the listed ones, or superseded); run them by name
DEFAULT_METHODS = [m for m in METHODS if m not in ("stock_r05", "rkl", "fkl_t2", "fkl_all", "op_l1_fkl",
                                                   "op_fkl_l05")]
RECOMMENDED = "cache"  # what configs/qwen2_5/72B_to_7B_kd_lora*.yaml ship: forward KL, kd_ratio 1, online_then_cache


# ------------------------------------------------------------------------------------------------------------
# test bed and warm student
# ------------------------------------------------------------------------------------------------------------
def warm_student(tb, out: Path, steps: int, lr: float) -> Path:
    """Full-parameter SFT of the test-bed student on the train split's answers (cached by its settings)."""
    from transformers import AutoModelForCausalLM

    from kd.testing import testbed as T

    d = out / f"student_warm_s{steps}_lr{lr:g}"
    if (d / "config.json").is_file() and list(d.glob("*.safetensors")):
        return d
    model = AutoModelForCausalLM.from_pretrained(tb.student_dir, dtype=torch.float32)
    if steps > 0:
        cfg = dict(steps=steps, batch_size=16, lr=lr, warmup=max(1, steps // 10), weight_decay=0.0,
                   train_on_input=False, seed=0, val_size=0.1, split_seed=0)
        torch.manual_seed(0)
        T._train_teacher(model, tb.data_json, cfg, verbose=False)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    T._save_hf_model(model, tmp, None, _tok_files(tb))
    os.replace(tmp, d)
    return d


def _tok_files(tb):
    from kd.testing.tokenizer import tiny_tokenizer_files

    return tiny_tokenizer_files(tb.tokenizer_dir)


# ------------------------------------------------------------------------------------------------------------
# training runs
# ------------------------------------------------------------------------------------------------------------
def _env(tb) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(KD_TESTBED_DIR=str(tb.root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


OWN = ("optimizer.lr", "epochs")  # a method's own value of these wins over the benchmark's --lr / --epochs


def _method_value(name: str, key: str, default: float) -> float:
    """The method's own ``key=`` override (``OWN``), else the benchmark's value."""
    own = [o.split("=", 1)[1] for o in METHODS[name][1] if o.split("=", 1)[0] == key]
    return type(default)(float(own[0])) if own else default


def _teacher_forwards(name: str, steps: int) -> int:
    """Teacher forward passes of a run (one per micro-batch of BATCH sequences): none for CE; with
    ``teacher_cache.mode=online_then_cache`` only epoch 1's (later epochs read the cache)."""
    over = METHODS[name][1]
    if "kd_ratio=0" in over:
        return 0
    if "teacher_cache.mode=online_then_cache" in over:
        return min(steps, STEPS_PER_EPOCH)
    return steps


def _kd_cmd(name: str, seed: int, warm: Path, out: Path, epochs: int, lr: float) -> List[str]:
    over = [o for o in METHODS[name][1] if o.split("=", 1)[0] not in OWN]
    return [TUNE, "run", "recipes/kd_lora.py", "--config", "configs/tiny/kd_lora.yaml",
            *(f"model.{k}={v}" for k, v in LORA.items()), *over,
            f"checkpointer.checkpoint_dir={warm}", f"seed={seed}", f"epochs={epochs}",
            f"max_steps_per_epoch={STEPS_PER_EPOCH}", f"optimizer.lr={lr}", "~eval_every_n_steps",
            "save_every_n_steps=100000", "keep_last_n_checkpoints=1", "progress_bar=False", f"output_dir={out}"]


STOCK_YAML = """# written by bench/quality.py: torchtune's knowledge_distillation_single_device on the kd test bed
output_dir: {out}
model:
  _component_: torchtune.models.qwen2.lora_qwen2
  lora_attn_modules: [q_proj, k_proj, v_proj, output_proj]
  apply_lora_to_mlp: True
  apply_lora_to_output: True
  lora_rank: {lora_rank}
  lora_alpha: {lora_alpha}
  lora_dropout: 0.0
  vocab_size: 1024
  num_layers: 2
  num_heads: 4
  num_kv_heads: 4
  embed_dim: 128
  intermediate_dim: 256
  max_seq_len: 4096
  norm_eps: 1.0e-6
  rope_base: 1000000.0
  tie_word_embeddings: False
teacher_model:
  _component_: torchtune.models.qwen2.qwen2
  vocab_size: 1024
  num_layers: 4
  num_heads: 4
  num_kv_heads: 2
  embed_dim: 256
  intermediate_dim: 512
  max_seq_len: 4096
  norm_eps: 1.0e-6
  rope_base: 1000000.0
  tie_word_embeddings: False
tokenizer:
  _component_: torchtune.models.qwen2_5.qwen2_5_tokenizer
  path: {tb}/tokenizer/vocab.json
  merges_file: {tb}/tokenizer/merges.txt
  special_tokens_path: {tb}/tokenizer/tokenizer.json
  max_seq_len: 256
checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: {warm}
  checkpoint_files: [model.safetensors]
  recipe_checkpoint: null
  output_dir: {out}
  model_type: QWEN2
teacher_checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: {tb}/teacher
  checkpoint_files: {teacher_files}
  recipe_checkpoint: null
  output_dir: {out}/teacher_unused
  model_type: QWEN2
resume_from_checkpoint: False
save_adapter_weights_only: True
dataset:
  _component_: kd.data.alpaca.alpaca_kd_dataset
  source: {tb}/demo_buddhist_qa.json
  val_size: 0.1
  seed: 0
  packed: False
seed: {seed}
shuffle: True
batch_size: 4
optimizer:
  _component_: torch.optim.AdamW
  lr: {lr}
  weight_decay: 0.0
lr_scheduler:
  _component_: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup
  num_warmup_steps: 4
loss:
  _component_: torchtune.modules.loss.CEWithChunkedOutputLoss
kd_loss:
  _component_: torchtune.modules.loss.ForwardKLWithChunkedOutputLoss
kd_ratio: {kd_ratio}
epochs: {epochs}
max_steps_per_epoch: {steps}
gradient_accumulation_steps: 1
clip_grad_norm: 1.0
compile: False
metric_logger:
  _component_: torchtune.training.metric_logging.DiskLogger
  log_dir: {out}/logs
log_every_n_steps: 1
log_peak_memory_stats: False
device: cpu
dtype: fp32
enable_activation_checkpointing: False
enable_activation_offloading: False
"""


def _stock_cmd(name: str, seed: int, warm: Path, out: Path, epochs: int, lr: float, tb) -> List[str]:
    kd_ratio = [o.split("=")[1] for o in METHODS[name][1] if o.startswith("kd_ratio=")][0]
    lora = dict(LORA)  # unless the method overrides them
    for o in METHODS[name][1]:
        k, _, v = o.partition("=")
        if k in ("model.lora_rank", "model.lora_alpha"):
            lora[k.split(".")[1]] = int(v)
        elif k not in ("kd_ratio", *OWN):
            raise ValueError(f"stock method {name}: override {o!r} has no stock equivalent here")
    out.mkdir(parents=True, exist_ok=True)
    y = out / "stock.yaml"
    y.write_text(STOCK_YAML.format(out=out, tb=tb.root, warm=warm, teacher_files=json.dumps(tb.teacher_checkpoint_files),
                                   seed=seed, lr=lr, kd_ratio=kd_ratio, epochs=epochs, steps=STEPS_PER_EPOCH,
                                   **lora))
    return [TUNE, "run", "knowledge_distillation_single_device", "--config", str(y)]


def _adapter_dir(name: str, out: Path) -> Path:
    if name.startswith("stock"):
        eps = sorted(out.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
        if not eps:
            raise FileNotFoundError(f"{out}: stock recipe wrote no epoch_* folder")
        return eps[-1]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return out / "checkpoints" / latest / "adapter"


def _run_stats(name: str, out: Path, epochs: int) -> Dict[str, float]:
    steps = epochs * STEPS_PER_EPOCH
    st: Dict[str, float] = {"steps": steps, "teacher_forwards": _teacher_forwards(name, steps)}
    m = out / "metrics.jsonl"
    if m.is_file():
        rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()]
        rows = [r for r in rows if r.get("kind") == "train"]
        op = [r for r in rows if r.get("on_policy") == 1.0]
        if rows and "on_policy" in rows[-1]:
            st["on_policy_fraction"] = rows[-1]["on_policy_fraction"]
        if op:
            st["gen_tokens_per_second"] = statistics.mean(r["gen_tokens_per_second"] for r in op)
            st["gen_mean_length"] = statistics.mean(r["gen_mean_length"] for r in op)
    return st


def train_one(name: str, seed: int, warm: Path, root: Path, epochs: int, lr: float, tb) -> Dict[str, Any]:
    out = root / "runs" / f"{name}_seed{seed}"
    done = out / "DONE.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    epochs, lr = _method_value(name, "epochs", epochs), _method_value(name, "optimizer.lr", lr)
    cmd = (_stock_cmd(name, seed, warm, out, epochs, lr, tb) if name.startswith("stock")
           else _kd_cmd(name, seed, warm, out, epochs, lr))
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=_env(tb), capture_output=True, text=True)
    wall = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.log").write_text(p.stdout[-20000:] + "\n--- stderr ---\n" + p.stderr[-20000:])
    if p.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed ({p.returncode}); see {out / 'run.log'}:\n{p.stderr[-3000:]}")
    rec = {"method": name, "seed": seed, "wall_s": wall, "adapter": str(_adapter_dir(name, out)),
           **_run_stats(name, out, epochs)}
    done.write_text(json.dumps(rec, indent=1))
    return rec


# ------------------------------------------------------------------------------------------------------------
# evaluation with transformers + peft
# ------------------------------------------------------------------------------------------------------------
def heldout_batches(tb):
    """The held-out split (val_size 0.1, seed 0) as (tokens [1, S], shifted labels [1, S]) pairs (no padding)."""
    from kd.data.alpaca import alpaca_kd_dataset

    ds = alpaca_kd_dataset(tb.tokenizer(256), str(tb.data_json), split="val", val_size=0.1, seed=0)
    out = []
    for i in range(len(ds)):
        it = ds[i]
        tok = torch.tensor([it["tokens"]])
        lab = torch.tensor([it["labels"][1:] + [-100]])
        out.append((tok, lab))
    return out


@torch.no_grad()
def logits_of(model, batches) -> List[torch.Tensor]:
    return [model(input_ids=t).logits[0].double() for t, _ in batches]


def compare(t_logits: List[torch.Tensor], s_logits: List[torch.Tensor], batches) -> Dict[str, float]:
    """Mean over held-out answer tokens of KL(p_t || p_s), CE of the student on the answers, top-1 agreement."""
    kl = ce = agree = 0.0
    n = 0
    for zt, zs, (_, lab) in zip(t_logits, s_logits, batches):
        v = lab[0] != -100
        zt, zs, y = zt[v], zs[v], lab[0][v]
        lp, lq = zt.log_softmax(-1), zs.log_softmax(-1)
        kl += float((lp.exp() * (lp - lq)).sum())
        ce += float(-lq.gather(1, y[:, None]).sum())
        agree += float((zt.argmax(-1) == zs.argmax(-1)).sum())
        n += int(v.sum())
    return {"kl": kl / n, "ce": ce / n, "top1": agree / n, "tokens": n}


@torch.no_grad()
def own_answer_kl(model, teacher, batches, max_new_tokens: int = 64) -> float:
    """KL(teacher || student) per token on the student's OWN greedy answers to the held-out prompts (stop token
    included): the contexts the student meets when it answers, which teacher-forced KL does not see."""
    kl, n = 0.0, 0
    for tok, lab in batches:
        j = int((lab[0] != -100).nonzero()[0]) + 1  # first answer position (labels are shifted)
        prompt = tok[:, :j]
        seq = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=[1000, 1002], pad_token_id=1000)
        zs = model(input_ids=seq).logits[0, j - 1:-1].double()
        zt = teacher(input_ids=seq).logits[0, j - 1:-1].double()
        lp, lq = zt.log_softmax(-1), zs.log_softmax(-1)
        kl += float((lp.exp() * (lp - lq)).sum())
        n += seq.shape[1] - j
    return kl / max(n, 1)


def eval_adapter(base_dir: Path, adapter: Path, t_logits, batches, teacher=None) -> Dict[str, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    r = compare(t_logits, logits_of(model, batches), batches)
    if teacher is not None:
        r["kl_own"] = own_answer_kl(model, teacher, batches)
    return r


def _nf4_dequant(model):
    """NF4 round trip of the decoder-layer linear weights (what recipes/kd_lora.py quantizes: kd.train.models
    _is_nf4_target, torchao NF4 with blocks 64 / scalers 256), computed in bf16."""
    from torchao.dtypes.nf4tensor import to_nf4

    model = model.to(torch.bfloat16)
    for layer in model.model.layers:
        for mod in layer.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.data
                mod.weight.data = to_nf4(w, block_size=64, scaler_block_size=256).get_original_weight().to(w.dtype)
    return model


def _kd_precision(precision: str) -> Callable[[Any], Any]:
    """The decoder layers' linears through kd.teacher.precision.quantize_layer_ (the modules the recipe's
    ``teacher_quantization`` ends in; on CPU the FP8 GEMM is the exact emulation of the GPU's), bf16 elsewhere."""

    def make(model):
        from kd.teacher.precision import quantize_layer_

        model = model.to(torch.bfloat16)
        for layer in model.model.layers:
            quantize_layer_(layer, precision)
        return model

    return make


# Teacher fidelity rows: name -> function(fp32 HF teacher) -> quantized/cast teacher: a row of
# KL(fp32 teacher || variant) each.
TEACHER_VARIANTS: Dict[str, Callable[[Any], Any]] = {
    "bf16": lambda m: m.to(torch.bfloat16),
    "nf4 (bf16 compute)": _nf4_dequant,
    "fp8 (rowwise FP8 weights and activations, FP8 GEMM emulated)": _kd_precision("fp8"),
    "nf4_fp8 (NF4 storage, FP8 GEMM emulated)": _kd_precision("nf4_fp8"),
}


def teacher_fidelity(tb, batches, t_logits) -> Dict[str, Dict[str, float]]:
    from transformers import AutoModelForCausalLM

    out = {}
    for name, fn in TEACHER_VARIANTS.items():
        m = fn(AutoModelForCausalLM.from_pretrained(tb.teacher_dir, dtype=torch.float32)).eval()
        r = compare(t_logits, [z.double() for z in logits_of(m, batches)], batches)
        out[name] = r
    return out


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------
def _ms(xs: List[float], fmt: str = "{:.3f}") -> str:
    if not xs:
        return "—"
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return (fmt + " ± " + fmt).format(m, s) if len(xs) > 1 else fmt.format(m)


def write_doc(path: Path, res: Dict[str, Any], command: str) -> None:
    from kd.core.atomic import atomic_write_text

    methods = res["methods"]
    by = {m: [r for r in res["runs"] if r["method"] == m] for m in methods}
    ce_kl = statistics.mean(r["kl"] for r in by["ce"]) if by.get("ce") else None
    stock_names = [m for m in methods if m.startswith("stock") and by[m]]
    mean_kl = {m: statistics.mean(r["kl"] for r in by[m]) for m in methods if by[m]}
    stock_kl = min(mean_kl[m] for m in stock_names) if stock_names else None  # best stock at any cost

    def stock_at(forwards: int) -> Optional[float]:
        """Best stock KL among stock runs with at least ``forwards`` teacher forwards (equal or more cost)."""
        ks = [mean_kl[m] for m in stock_names if by[m][0]["teacher_forwards"] >= forwards]
        return min(ks) if ks else None
    w = res["warm"]
    lines = [
        "# Distillation quality benchmark (tiny test bed, CPU)", "",
        "Generated by `bench/quality.py`; every number below comes from that run (`results.json` beside the runs; "
        "this run's is committed as bench/results_quality.json).",
        "", f"Command: `{command}`", "",
        f"- {res['seeds_n']} seed(s) per method ({', '.join(map(str, res['seeds']))}; seed 0 was the pilots' "
        f"seed); {res['steps']} optimizer steps ({res.get('epochs', 2)} epochs of {STEPS_PER_EPOCH}) of batch {BATCH} "
        f"unless the method says otherwise (LoRA r{res.get('lora', LORA)['lora_rank']} alpha "
        f"{res.get('lora', LORA)['lora_alpha']}, the rank and alpha the 72B→7B configs ship, on attention, MLP and "
        f"output as in configs/tiny/kd_lora.yaml; AdamW lr "
        f"{res['lr']}, cosine, 4 warm-up steps; every method, ours and stock, the same); "
        f"{len(res['runs'])} training runs, {sum(r['wall_s'] for r in res['runs']) / 60:.1f} min of run wall time "
        f"(with --jobs {res.get('jobs', 1)} in parallel) on {res['cpus']} CPU core(s)"
        + (" shared with other jobs" if res.get("shared") else "")
        + f"; this invocation took {res['wall_s'] / 60:.1f} min (finished runs under --out are reused, not retrained).",
        f"- Student base: the test-bed student warm-started by {res['warm_steps']} steps of full-parameter SFT on the "
        f"train split's answers (lr {res['warm_lr']}). Held-out KL(teacher‖student) "
        f"{res['cold']['kl']:.3f} → **{w['kl']:.3f}** nats/token (top-1 agreement {res['cold']['top1']:.1%} → "
        f"{w['top1']:.1%}; answer CE {res['cold']['ce']:.3f} → {w['ce']:.3f}; the teacher's own answer CE "
        f"{res['teacher']['ce']:.3f}).",
        f"- Held-out: the val split (val_size 0.1, seed 0: {res['heldout_samples']} samples, {w['tokens']} answer "
        "tokens incl. `<|im_end|>`), never trained on by teacher or student. Measured with **transformers + peft on "
        "the saved adapters** (`PeftModel.from_pretrained`), not with the recipe's code.",
        "- Teacher forwards: teacher forward passes of the run (each on a batch of 4 sequences: the dataset's "
        "answers, or on on-policy steps the student's own answers). Wall time: the whole `tune run` (start-up, "
        "generation, saving) per seed.",
        "- KL on own answers: KL(teacher‖student) per token on the student's own greedy answers to the held-out "
        "prompts (≤ 64 tokens, transformers `generate`): the contexts it meets when it answers.",
        "", "| method | held-out KL(teacher‖student) | closes CE-only KL | vs stock at ≥ its teacher forwards "
        "| vs best stock | answer CE | top-1 agreement | KL on own answers | steps | teacher forwards | wall s / run "
        "| on-policy steps | gen tokens/s | mean gen length |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| warm base (no LoRA training) | {w['kl']:.3f} | — | — | — | {w['ce']:.3f} | {w['top1']:.1%} "
        f"| {w.get('kl_own', float('nan')):.3f} | 0 | 0 | — | — | — | — |",
    ]
    for m in methods:
        rs = by[m]
        if not rs:
            continue
        kl = statistics.mean(r["kl"] for r in rs)
        close = f"{(ce_kl - kl) / ce_kl:+.1%}" if ce_kl and m != "ce" else "—"
        vs = f"{(kl - stock_kl) / stock_kl:+.1%}" if stock_kl and not m.startswith("stock") else "—"
        sk = stock_at(rs[0]["teacher_forwards"])
        vs_eq = f"{(kl - sk) / sk:+.1%}" if sk and not m.startswith("stock") and m != "ce" else "—"
        opf = rs[0].get("on_policy_fraction")
        gts = [r["gen_tokens_per_second"] for r in rs if "gen_tokens_per_second" in r]
        gl = [r["gen_mean_length"] for r in rs if "gen_mean_length" in r]
        lines.append(
            f"| `{m}`: {METHODS[m][0]} | {_ms([r['kl'] for r in rs])} | {close} | {vs_eq} | {vs} "
            f"| {_ms([r['ce'] for r in rs])} "
            f"| {_ms([100 * r['top1'] for r in rs], '{:.1f}')}% | {_ms([r['kl_own'] for r in rs if 'kl_own' in r])} "
            f"| {rs[0].get('steps', res['steps'])} | {rs[0]['teacher_forwards']} "
            f"| {_ms([r['wall_s'] for r in rs], '{:.0f}')} | {'—' if opf is None else f'{opf:.0%}'} "
            f"| {_ms(gts, '{:.0f}') if gts else '—'} | {_ms(gl, '{:.1f}') if gl else '—'} |")
    lines += ["", "Closes CE-only KL = (KL_CE − KL_method) / KL_CE (target ≥ 30% for the recommended setting); "
              "vs stock at ≥ its teacher forwards = (KL_method − KL_stock) / KL_stock against the best stock run that "
              "used at least as many teacher forwards (equal or higher cost; target ≤ −15% for the recommended "
              "setting); vs best stock: against the best stock run at any cost. ± = sample standard deviation over "
              "seeds.", "",
              "## Teacher fidelity", "",
              "Held-out KL(fp32 teacher ‖ variant), same tokens (`TEACHER_VARIANTS` in bench/quality.py; the FP8 "
              "rows run kd.teacher.precision's modules, whose CPU emulation of the FP8 GEMM tests/test_precision.py "
              "checks against the GPU path).", "", "| teacher | KL(fp32‖variant) | top-1 agreement with fp32 | answer CE |",
              "|---|---|---|---|", f"| fp32 (reference) | 0 | 100% | {res['teacher']['ce']:.4f} |"]
    for name, r in res["fidelity"].items():
        lines.append(f"| {name} | {r['kl']:.2e} | {r['top1']:.2%} | {r['ce']:.4f} |")
    lines += ["", "Per-run numbers (method, seed, KL, CE, top-1, wall s):", "", "```"]
    for r in res["runs"]:
        lines.append(f"{r['method']:10s} seed {r['seed']}: kl {r['kl']:.4f} ce {r['ce']:.4f} top1 {r['top1']:.4f} "
                     f"kl_own {r.get('kl_own', float('nan')):.4f} "
                     f"wall {r['wall_s']:.0f}s")
    lines += ["```", ""]
    rec = res.get("recommended")
    if rec in by and by[rec] and ce_kl and stock_at(by[rec][0]["teacher_forwards"]):
        kl = statistics.mean(r["kl"] for r in by[rec])
        sk = stock_at(by[rec][0]["teacher_forwards"])
        close, vs, vs_best = (ce_kl - kl) / ce_kl, (kl - sk) / sk, (kl - stock_kl) / stock_kl
        lines += ["## Targets", "",
                  f"Recommended setting `{rec}` ({METHODS[rec][0]}), shipped in configs/qwen2_5/72B_to_7B_kd_lora*.yaml:",
                  f"- closes {close:.1%} of the CE-only student's held-out KL (target ≥ 30%): "
                  f"**{'met' if close >= 0.30 else 'NOT met'}**;",
                  f"- {-vs:.1%} lower held-out KL than the best stock torchtune run with at least its teacher-forward "
                  f"count ({by[rec][0]['teacher_forwards']}) (target ≥ 15%): **{'met' if -vs >= 0.15 else 'NOT met'}**"
                  f"; {-vs_best:.1%} lower than the best stock run at any cost.", ""]
    if res.get("notes"):
        lines += ["## Notes", "", *res["notes"], ""]
    atomic_write_text(path, "\n".join(lines))


# ------------------------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / ".cache" / "quality"), help="work dir (runs are cached there)")
    ap.add_argument("--testbed", default=os.environ.get("KD_TESTBED_DIR", str(REPO / ".cache" / "testbed")))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=1,
                    help="seeds first..first+seeds-1 (seed 0 was the pilots' seed that chose LoRA, lr and epochs)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--epochs", type=int, default=EPOCHS, help=f"epochs of {STEPS_PER_EPOCH} steps per run")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warm-steps", type=int, default=120, help="full SFT steps of the warm student base (0 = cold)")
    ap.add_argument("--warm-lr", type=float, default=1e-3)
    ap.add_argument("--jobs", type=int, default=1, help="training runs in parallel (1 thread each)")
    ap.add_argument("--doc", default=str(REPO / "docs" / "quality.md"))
    ap.add_argument("--recommended", default=RECOMMENDED, help="the method the targets are checked for")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=OVERRIDE[,OVERRIDE...]",
                    help="an ad-hoc method (pilots): overrides of configs/tiny/kd_lora.yaml after NAME=")
    ap.add_argument("--note", action="append", default=[], help="a line for the report's Notes section")
    ap.add_argument("--shared", action="store_true", help="say in the report that the machine was shared")
    a = ap.parse_args(argv)

    from kd.testing.testbed import build_testbed

    for d in a.define:
        name, _, over = d.partition("=")
        if not name or not over:
            ap.error(f"--define {d!r}: expected NAME=OVERRIDE[,OVERRIDE...]")
        METHODS[name] = (f"ad hoc: {over}", over.split(","))
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    t_start = time.time()
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    tb = build_testbed(a.testbed, verbose=True)
    warm = warm_student(tb, root, a.warm_steps, a.warm_lr)
    print(f"[quality] warm student: {warm}", flush=True)

    from transformers import AutoModelForCausalLM

    batches = heldout_batches(tb)
    teacher = AutoModelForCausalLM.from_pretrained(tb.teacher_dir, dtype=torch.float32).eval()
    t_logits = logits_of(teacher, batches)
    res: Dict[str, Any] = {
        "methods": methods, "seeds": seeds, "seeds_n": a.seeds, "steps": a.epochs * STEPS_PER_EPOCH,
        "epochs": a.epochs, "lora": LORA,
        "lr": a.lr, "warm_steps": a.warm_steps, "warm_lr": a.warm_lr, "cpus": os.cpu_count(), "shared": a.shared,
        "heldout_samples": len(batches), "notes": a.note, "recommended": a.recommended, "jobs": a.jobs,
        "teacher": compare(t_logits, t_logits, batches),
        "cold": compare(t_logits, logits_of(AutoModelForCausalLM.from_pretrained(tb.student_dir, dtype=torch.float32)
                                            .eval(), batches), batches),
        "warm": compare(t_logits, logits_of(AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32).eval(),
                                            batches), batches),
    }
    res["warm"]["kl_own"] = own_answer_kl(AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32).eval(),
                                          teacher, batches)
    print(f"[quality] held-out KL(teacher||student): cold {res['cold']['kl']:.3f}, warm {res['warm']['kl']:.3f}",
          flush=True)
    res["fidelity"] = teacher_fidelity(tb, batches, t_logits)
    jobs = [(m, s) for s in seeds for m in methods]
    runs: List[Dict[str, Any]] = []

    def work(job):
        m, s = job
        rec = train_one(m, s, warm, root, a.epochs, a.lr, tb)
        rec.update(eval_adapter(warm, Path(rec["adapter"]), t_logits, batches, teacher))
        print(f"[quality] {m:9s} seed {s}: kl {rec['kl']:.4f} ce {rec['ce']:.4f} top1 {rec['top1']:.3f} "
              f"({rec['wall_s']:.0f}s) [{time.time() - t_start:.0f}s]", flush=True)
        return rec

    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        for rec in ex.map(work, jobs):
            runs.append(rec)
    res["runs"] = runs
    res["wall_s"] = time.time() - t_start
    (root / "results.json").write_text(json.dumps(res, indent=1))
    args = list(argv if argv is not None else sys.argv[1:])
    shown = [x for i, x in enumerate(args) if x != "--note" and (i == 0 or args[i - 1] != "--note")]
    cmd = "python bench/quality.py " + " ".join(shown) + (" --note ..." if len(shown) < len(args) else "")
    write_doc(Path(a.doc), res, cmd.strip())
    print(f"[quality] wrote {a.doc} and {root / 'results.json'} in {res['wall_s'] / 60:.1f} min", flush=True)
    return res


if __name__ == "__main__":
    main()
