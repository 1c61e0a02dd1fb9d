"""Quality of distillation from a teacher cache vs online KD, on the tiny test bed (CPU, ~10 min on 2 cores).

    python bench/cache_quality.py [--seeds 42 43 44] [--epochs 3] [--kd-ratio 1.0] [--k 12] \
        [--variants online cache_rs online_then_cache cache_topk ce] \
        [--out bench/results_cache_quality.json] [--work /tmp/kd_cache_quality]

For every seed it trains the test bed's LoRA student with ``recipes/kd_lora.py`` (``configs/tiny/kd_lora.yaml``:
27 steps per epoch, same learning rate and schedule everywhere) in up to five ways (the default leaves out
online_then_cache: 12 runs + 4 cache builds, ~10 min on 2 idle cores, ~20 min on 2 cores shared with other jobs):

    online            live teacher every epoch (full forward KL)
    cache_rs          teacher_cache mode=use, Random-Sampling KD, K samples per token (cache seed = run index)
    online_then_cache epoch 1 online (writing the cache), later epochs from the cache
    cache_topk        teacher_cache mode=use, renormalised top-K probabilities (BIASED; DistillKit-style)
    ce                kd_ratio=0 (labels only)

and measures the held-out KL(teacher || student) per answer token on the validation split (never trained on
by teacher or student) with transformers + peft on the saved adapters (not with the recipe's own code).
Prints a table (mean +- sample std over seeds, min..max) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny/kd_lora.yaml"
VARIANTS = ("online", "cache_rs", "online_then_cache", "cache_topk", "ce")
DEFAULT_VARIANTS = ("online", "cache_rs", "cache_topk", "ce")  # + online_then_cache with --variants


def _env(testbed: Path):
    env = dict(os.environ)
    env.update(KD_TESTBED_DIR=str(testbed), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), WANDB_MODE="offline",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE"):
        env.pop(k, None)
    return env


def _tune(testbed: Path, overrides, log: Path) -> None:
    tune = str(Path(sys.executable).parent / "tune")
    cmd = [tune, "run", "recipes/kd_lora.py", "--config", CONFIG, *overrides]
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=REPO, env=_env(testbed), stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\nsee {log}:\n" + log.read_text()[-3000:])


def _adapter_dir(out: Path) -> Path:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return out / "checkpoints" / latest / "adapter"


def heldout_kl(testbed: Path, adapter_dir: Path, batches) -> float:
    """Token-mean KL(teacher || student) over the answer tokens of the validation split, with HF models."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(testbed / "teacher"), torch_dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(testbed / "student"), torch_dtype=torch.float32)
    student = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for tokens, labels in batches:
            valid = labels[:, 1:] != -100
            lp = torch.log_softmax(teacher(tokens).logits[:, :-1].double(), -1)
            lq = torch.log_softmax(student(tokens).logits[:, :-1].double(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            tot += float(kl[valid].sum())
            n += int(valid.sum())
    return tot / n


def val_batches(testbed: Path):
    """The validation split exactly as the recipe's config defines it (val_size 0.1, seed 0), unpadded rows."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    os.environ["KD_TESTBED_DIR"] = str(testbed)
    cfg = OmegaConf.load(REPO / CONFIG)
    tok = tt_config.instantiate(cfg.tokenizer)
    from kd.data.alpaca import alpaca_kd_dataset

    ds = alpaca_kd_dataset(tok, source=str(testbed / "demo_buddhist_qa.json"), split="val",
                           val_size=cfg.dataset.val_size, seed=cfg.dataset.seed)
    return [(torch.tensor([it["tokens"]]), torch.tensor([it["labels"]])) for it in (ds[i] for i in range(len(ds)))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--kd-ratio", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    ap.add_argument("--work", default="/tmp/kd_cache_quality")
    ap.add_argument("--out", default=str(REPO / "bench" / "results_cache_quality.json"))
    ap.add_argument("--testbed", default=os.environ.get("KD_TESTBED_DIR", str(REPO / ".cache" / "testbed")))
    a = ap.parse_args(argv)
    from kd.testing.testbed import build_testbed

    testbed = build_testbed(Path(a.testbed)).root
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    common = [f"epochs={a.epochs}", "max_steps_per_epoch=27", "~eval_every_n_steps", "save_every_n_steps=1000",
              "keep_last_n_checkpoints=1", "progress_bar=False", "log_every_n_steps=9"]
    kd = f"kd_ratio={a.kd_ratio}"
    vb = val_batches(testbed)
    results = {v: [] for v in a.variants}
    t_start = time.time()
    topk_cache = work / "cache_topk"
    for i, seed in enumerate(a.seeds):
        rs_cache = work / f"cache_rs_{i}"
        for v in a.variants:
            out = work / f"{v}_s{seed}"
            if (out / "checkpoints" / "latest").is_file():
                print(f"[{time.time() - t_start:6.0f}s] seed {seed} {v}: reusing {out}", flush=True)
            else:
                over = [*common, f"seed={seed}", f"output_dir={out}"]
                if v == "online":
                    over.append(kd)
                elif v == "ce":
                    over.append("kd_ratio=0")
                elif v == "online_then_cache":
                    over += [kd, "teacher_cache.mode=online_then_cache", f"teacher_cache.k={a.k}",
                             f"teacher_cache.seed={i}"]
                else:
                    cache, sampling, cseed = (rs_cache, "random", i) if v == "cache_rs" else (topk_cache, "topk", 0)
                    cache_opts = [f"teacher_cache.dir={cache}", f"teacher_cache.k={a.k}",
                                  f"teacher_cache.sampling={sampling}", f"teacher_cache.seed={cseed}"]
                    if not (cache / "cache.json").is_file() or v == "cache_rs":
                        _tune(testbed, [*common, f"output_dir={work}/build_{v}_{i}", "teacher_cache.mode=build",
                                        *cache_opts], work / f"build_{v}_{i}.log")
                    over += [kd, "teacher_cache.mode=use", *cache_opts]
                _tune(testbed, over, work / f"{v}_s{seed}.log")
            kl = heldout_kl(testbed, _adapter_dir(out), vb)
            results[v].append(kl)
            print(f"[{time.time() - t_start:6.0f}s] seed {seed} {v}: held-out KL {kl:.4f}", flush=True)

    ref = statistics.mean(results["online"]) if "online" in results else None
    rows = []
    print(f"\nheld-out KL(teacher || student) per answer token, {len(a.seeds)} seeds, {a.epochs} epochs x 27 steps, "
          f"kd_ratio={a.kd_ratio}, K={a.k}")
    print(f"{'variant':<20}{'mean':>8}{'std':>8}{'min':>8}{'max':>8}{'vs online':>11}")
    for v in a.variants:
        xs = results[v]
        m, sd = statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
        rel = (m / ref - 1) * 100 if ref else float("nan")
        rows.append({"variant": v, "kl": xs, "mean": m, "std": sd, "min": min(xs), "max": max(xs),
                     "vs_online_pct": rel})
        print(f"{v:<20}{m:>8.4f}{sd:>8.4f}{min(xs):>8.4f}{max(xs):>8.4f}{rel:>+10.1f}%")
    res = {"seeds": a.seeds, "epochs": a.epochs, "steps_per_epoch": 27, "kd_ratio": a.kd_ratio, "k": a.k,
           "metric": "held-out KL(teacher||student) per answer token, transformers + peft on the saved adapters",
           "command": "python bench/cache_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "seconds": time.time() - t_start, "rows": rows}
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwritten {a.out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
