"""Quantization-aware distillation (QAD) against KD-then-PTQ, per deployment format (CPU, the quality test bed).

    python bench/qad.py --jobs 2                 # bed a, 3 seeds, fp8_dynamic / w4a16 / nvfp4; writes docs/quality.md's
                                                 # QAD section and bench/results_qad.json

For each seed:
1. plain KD, the shipped setting (bench/quality.py's ``cache`` method: forward KL, kd_ratio 1, online_then_cache
   K=12, 3 epochs, LoRA r64), and the same run with ``qad=<format>`` for every format (``recipes/kd_lora.py``);
   the runs live under bench/quality.py's work dir (the plain KD runs are the quality benchmark's own);
2. ``recipes/export.py``: the plain KD adapter with ``quantize=[fp8_dynamic,w4a16,w4a16_rtn,nvfp4]`` (today's export:
   post-training quantization; w4a16 is GPTQ on 32 training prompts), each QAD adapter with no ``quantize`` (it
   writes the format it was trained for);
3. held-out KL(teacher ‖ deployed quantized student): each quantized checkpoint loaded with transformers, which
   decompresses it with compressed-tensors' own code and fake-quantises activations as the format says (bf16),
   against the fp32 teacher, on the bed's held-out split (bench/quality.py's measure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402

REPO = Q.REPO
FORMATS = ("fp8_dynamic", "w4a16", "nvfp4")
PTQ = {"fp8_dynamic": "fp8_dynamic", "w4a16": "w4a16", "nvfp4": "nvfp4"}  # today's export of each format
BEGIN, END = "<!-- qad:begin (bench/qad.py) -->", "<!-- qad:end -->"

for _f in FORMATS:
    Q.METHODS[f"qad_{_f}"] = (f"the shipped setting with qad={_f}", [*Q.FKL, *Q.CACHE, f"qad={_f}"])


def export(adapter: Path, warm: Path, out: Path, tb, quantize: Optional[List[str]], full: bool = False) -> float:
    if (out / "DONE").is_file():
        return float((out / "DONE").read_text())
    src = ([f"full_checkpoint={adapter}"] if full else
           [f"adapter_dir={adapter}", *(f"model.{k}={v}" for k, v in Q.LORA.items())])
    cmd = [Q.TUNE, "run", "recipes/export.py", "--config",
           "configs/tiny/export_full.yaml" if full else "configs/tiny/export.yaml", *src,
           f"output_dir={out}", f"checkpointer.checkpoint_dir={warm}",
           f"calibration.source={tb.data_json}", "overwrite=True",
           f"quantize=[{','.join(quantize)}]" if quantize else "quantize=null"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=Q._env(tb), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"export of {adapter} failed:\n{p.stderr[-3000:]}")
    (out / "export.log").write_text(p.stdout[-20000:] + "\n--- stderr ---\n" + p.stderr[-20000:])
    (out / "DONE").write_text(str(time.time() - t0))
    return time.time() - t0


FULL_LR = 1e-3  # configs/tiny/kd_full.yaml's lr (full fine-tune of every student weight; not tuned here)


def train_full(name: str, seed: int, warm: Path, broot: Path, tb) -> Dict[str, Any]:
    """A full fine-tune KD run (configs/tiny/kd_full.yaml: the shipped setting's loss and cache), plain (``full``) or
    with ``qad=<fmt>`` (``full_qad_<fmt>``); cached like bench/quality.py's runs."""
    out = broot / "runs" / f"{name}_lr{FULL_LR:g}_seed{seed}"
    done = out / "DONE.json"
    if done.is_file():
        return json.loads(done.read_text())
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    qad = [f"qad={name[len('full_qad_'):]}"] if name.startswith("full_qad_") else []
    cmd = [Q.TUNE, "run", "recipes/kd_lora.py", "--config", "configs/tiny/kd_full.yaml", *Q.FKL, *Q.CACHE, *qad,
           f"checkpointer.checkpoint_dir={warm}", f"dataset.source={tb.data_json}", f"seed={seed}",
           f"epochs={Q.EPOCHS}", f"max_steps_per_epoch={Q.STEPS_PER_EPOCH}", f"optimizer.lr={FULL_LR}",
           "~eval_every_n_steps", "save_every_n_steps=100000", "keep_last_n_checkpoints=1", "progress_bar=False",
           "save_merged_model=False", f"output_dir={out}"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=Q._env(tb), capture_output=True, text=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.log").write_text(p.stdout[-20000:] + "\n--- stderr ---\n" + p.stderr[-20000:])
    if p.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed; see {out / 'run.log'}:\n{p.stderr[-3000:]}")
    step = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    rec = {"method": name, "seed": seed, "lr": FULL_LR, "wall_s": time.time() - t0, "out": str(out),
           "adapter": str(step)}
    done.write_text(json.dumps(rec, indent=1))
    return rec


def step_seconds(run_out: Path) -> float:
    rows = [json.loads(l) for l in (run_out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    xs = [r["step_seconds"] for r in rows if r.get("kind") == "train" and "step_seconds" in r]
    return statistics.median(xs)


@torch.no_grad()
def deployed_kl(qdir: Path, t_logits, batches) -> Dict[str, float]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(qdir), dtype=torch.bfloat16).eval()
    return Q.compare(t_logits, Q.logits_of(m, batches), batches)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / ".cache" / "quality"), help="bench/quality.py's work dir")
    ap.add_argument("--testbed", default=os.environ.get("KD_TESTBED_DIR", str(REPO / ".cache" / "testbed")))
    ap.add_argument("--bed", default="a", choices=("a", "b"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="also the full fine-tune (configs/tiny/kd_full.yaml), plain "
                    "and with qad=<format>")
    ap.add_argument("--timing", type=int, default=0, metavar="REPS",
                    help="also time plain KD and each QAD run alone, REPS times interleaved (fresh runs)")
    ap.add_argument("--doc", default=str(REPO / "docs" / "quality.md"))
    ap.add_argument("--results", default=str(REPO / "bench" / "results_qad.json"))
    a = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from kd.testing.testbed import build_testbed

    t_start = time.time()
    torch.set_num_threads(1)
    formats = [f for f in a.formats.split(",") if f]
    root = Path(a.out)
    tb, broot = Q._bed(a.bed, a, root, build_testbed(a.testbed))
    warm = Q.warm_student(tb, broot, 120, 1e-3, Q.WARM_SEED[a.bed])
    batches = Q.heldout_batches(tb)
    teacher = AutoModelForCausalLM.from_pretrained(tb.teacher_dir, dtype=torch.float32).eval()
    t_logits = Q.logits_of(teacher, batches)
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    methods = ["cache", *(f"qad_{f}" for f in formats)]
    if a.full:
        methods += ["full", *(f"full_qad_{f}" for f in formats)]
    jobs = [(m, s) for s in seeds for m in methods]

    def work(job):
        m, s = job
        full = m.startswith("full")
        rec = train_full(m, s, warm, broot, tb) if full else Q.train_one(m, s, warm, broot, Q.EPOCHS, a.lr, tb)
        out = Path(rec["out"]) / "export"
        qs = ([PTQ[f] for f in formats] + (["w4a16_rtn"] if "w4a16" in formats else [])
              if m in ("cache", "full") else None)
        ex_s = export(Path(rec["adapter"]), warm, out, tb, qs, full=full)
        r = {"method": m, "seed": s, "wall_s": rec["wall_s"], "step_s": step_seconds(Path(rec["out"])),
             "export_s": ex_s, "kl": {}}
        for d in sorted(out.glob("quantized-*")):
            r["kl"][d.name[len("quantized-"):]] = deployed_kl(d, t_logits, batches)
            meta = json.loads((d / "kd_quantize.json").read_text())
            r.setdefault("check", {})[d.name[len("quantized-"):]] = meta.get("check")
        r["kl"]["bf16"] = deployed_kl(out / "merged", t_logits, batches)
        print(f"[qad] {m} seed {s}: " + ", ".join(f"{k} {v['kl']:.4f}" for k, v in r["kl"].items())
              + f" ({rec['wall_s']:.0f}s, step {r['step_s'] * 1e3:.0f} ms) [{time.time() - t_start:.0f}s]", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        runs = list(ex.map(work, jobs))
    res = {"bed": a.bed, "seeds": seeds, "lr": a.lr, "formats": formats, "runs": runs, "cpus": os.cpu_count(),
           "jobs": a.jobs, "command": "python bench/qad.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if a.timing:  # cost: each run alone, interleaved, fresh dirs (not the quality runs, which ran beside others)
        tm: Dict[str, Any] = {"reps": a.timing}
        for rep in range(a.timing):
            for m in [x for x in methods if not x.startswith("full")]:
                troot = root / "qad_timing" / f"rep{rep}"
                rec = Q.train_one(m, seeds[0], warm, troot, Q.EPOCHS, a.lr, tb)
                d = tm.setdefault(m, {"wall_s": [], "step_s": []})
                d["wall_s"].append(rec["wall_s"])
                d["step_s"].append(step_seconds(Path(rec["out"])))
                print(f"[qad] timing rep {rep} {m}: wall {rec['wall_s']:.1f}s step "
                      f"{1e3 * d['step_s'][-1]:.1f} ms", flush=True)
        res["timing"] = tm
    res["wall_s"] = time.time() - t_start
    Path(a.results).write_text(json.dumps(res, indent=1))
    write_section(Path(a.doc), res)
    print(f"[qad] wrote {a.results} and the QAD section of {a.doc} in {res['wall_s'] / 60:.1f} min", flush=True)
    return res


def _own(r) -> str:
    return next(k for k in r["kl"] if k != "bf16")  # the one format a QAD run's export wrote


def _table(runs, formats, plain: str, qad_prefix: str) -> List[str]:
    kd = [r for r in runs if r["method"] == plain]
    lines = ["| format | KD, unquantized bf16 | KD-then-PTQ | KD-then-RTN | QAD (deployed) | QAD vs KD-then-PTQ "
             "| verdict | KL the quantization adds over KD bf16: PTQ → QAD |", "|---|---|---|---|---|---|---|---|"]
    bf = statistics.mean(r["kl"]["bf16"]["kl"] for r in kd)
    for f in formats:
        q = [r for r in runs if r["method"] == f"{qad_prefix}{f}"]
        ptq = [r["kl"][PTQ[f]]["kl"] for r in kd]
        qad = [r["kl"][_own(r)]["kl"] for r in q]
        rtn = [r["kl"]["w4a16_rtn"]["kl"] for r in kd] if f == "w4a16" else []
        lines.append(f"| {f} | {Q._ms([r['kl']['bf16']['kl'] for r in kd])} | {Q._ms(ptq)} "
                     f"| {Q._ms(rtn) if rtn else '—'} | {Q._ms(qad)} "
                     f"| {(statistics.mean(qad) - statistics.mean(ptq)) / statistics.mean(ptq):+.1%} "
                     f"| {Q.verdict(qad, ptq)} | {statistics.mean(ptq) - bf:+.4f} → {statistics.mean(qad) - bf:+.4f} |")
    return lines


def _targets(runs, formats, plain: str, qad_prefix: str, label: str) -> List[str]:
    kd = [r for r in runs if r["method"] == plain]
    out = []
    for f in formats:
        q = [r["kl"][_own(r)]["kl"] for r in runs if r["method"] == f"{qad_prefix}{f}"]
        ptq = [r["kl"][PTQ[f]]["kl"] for r in kd]
        d = (statistics.mean(q) - statistics.mean(ptq)) / statistics.mean(ptq)
        ok = (d <= -0.30) if f != "fp8_dynamic" else (Q.verdict(q, ptq) != "higher")
        out.append(f"- {label}, {f}: {d:+.1%} ({Q.verdict(q, ptq)}): **{'met' if ok else 'NOT met'}**.")
    return out


def section(res: Dict[str, Any]) -> List[str]:
    runs = res["runs"]
    kd = [r for r in runs if r["method"] == "cache"]
    full = any(r["method"] == "full" for r in runs)
    lines = [BEGIN, "## Quantization-aware distillation (QAD) against KD-then-PTQ", "",
             f"Generated by `bench/qad.py` (`{res['command'].strip()}`; bench/results_qad.json): bed {res['bed']}, "
             f"seeds {', '.join(map(str, res['seeds']))}, forward KL, kd_ratio 1, online_then_cache with K = 12 (the "
             f"`cache` method above), 3 epochs; LoRA r64 at lr {res['lr']:g}"
             + (f", and the full fine-tune (configs/tiny/kd_full.yaml, every student weight, lr {FULL_LR:g}, not "
                "tuned)" if full else "")
             + "; plain or with `qad=<format>`. Held-out KL(fp32 teacher ‖ "
             "deployed quantized student): the checkpoint `recipes/export.py` wrote, loaded with transformers (which "
             "decompresses it with compressed-tensors' own code and fake-quantises the activations as the format "
             "says), bf16. KD-then-PTQ is today's export of the plain KD student (`w4a16`: GPTQ on 32 training "
             "prompts); QAD's export writes the format it trained for (`w4a16`: round-to-nearest int4, the rounding "
             "it trained with).", "", "LoRA (QAD fake-quantises the merged weight every step):", "",
             *_table(runs, res["formats"], "cache", "qad_")]
    if full:
        lines += ["", "Full fine-tune (QAD fake-quantises the weight itself):", "",
                  *_table(runs, res["formats"], "full", "full_qad_")]
    lines += ["", "Targets (issue 32): QAD ≥ 30% lower than KD-then-PTQ for w4a16 and nvfp4, no worse for fp8_dynamic:",
              *_targets(runs, res["formats"], "cache", "qad_", "LoRA")]
    if full:
        lines += _targets(runs, res["formats"], "full", "full_qad_", "full fine-tune")
    bf = statistics.mean(r["kl"]["bf16"]["kl"] for r in kd)
    worst = max(statistics.mean(r["kl"][PTQ[f]]["kl"] for r in kd) for f in res["formats"])
    lines += ["", f"On this bed the formats cost little: the unquantized LoRA KD student is at {bf:.3f}, and the worst "
              f"post-training copy adds {worst - bf:+.4f} nats ({(worst - bf) / worst:.1%} of its deployed KL). A "
              "deployed KL 30% below KD-then-PTQ would need the quantized student to be far better than the "
              "unquantized one; no training in the deployment format can give that here, so the 30% target cannot "
              "be tested on this bed (the tiny student's linears are 128-256 wide, and its KL to the teacher is "
              "dominated by what distillation has not closed). What can be read is in the verdict and last "
              "columns: whether the deployed QAD student differs from the post-training copy beyond the seeds' "
              "spread, and how much KL each format adds over the plain KD student."]
    tm = res.get("timing")
    if tm:
        base = statistics.median(tm["cache"]["wall_s"])
        base_st = statistics.median(tm["cache"]["step_s"])
        lines += ["", f"Cost on CPU (`--timing {tm['reps']}`: one run at a time, {tm['reps']} times interleaved, 1 "
                  "thread, the same 81-step job, fresh run folders; medians; other sessions' work may have shared the "
                  "2 cores). Wall time is the whole `tune run` (start-up, "
                  "3 epochs, saving); step time the median of the logged optimizer steps. No GPU cost was measured "
                  "(this work had no GPU).", "",
                  "| run | wall s | × plain KD | step ms | × plain KD |", "|---|---|---|---|---|",
                  f"| plain KD | {base:.1f} | 1.00 | {1e3 * base_st:.1f} | 1.00 |"]
        for f in res["formats"]:
            w, st = statistics.median(tm[f"qad_{f}"]["wall_s"]), statistics.median(tm[f"qad_{f}"]["step_s"])
            lines.append(f"| QAD {f} | {w:.1f} | {w / base:.2f} | {1e3 * st:.1f} | {st / base_st:.2f} |")
        over = [f for f in res["formats"]
                if statistics.median(tm[f"qad_{f}"]["wall_s"]) / base > 1.25]
        lines += ["", "Target ≤ 1.25× plain KD's time on CPU (whole run): "
                  + ("met for every format." if not over else
                     f"met for {', '.join(f for f in res['formats'] if f not in over) or 'none'}, **NOT met** for "
                     f"{', '.join(over)}.")
                  + (" NVFP4's extra time is compressed-tensors' FP4 rounding, which on CPU is an eager chain of "
                     "masked writes over every weight and activation (on CUDA the same function dispatches to a "
                     "Triton kernel); the tiny model's GEMMs are too small to hide it." if "nvfp4" in over else "")]
    lines += ["", "Export round trip (each quantized copy loaded back with transformers + compressed-tensors against "
              "the merged bf16 model on 8 training prompts, `kd_quantize.json` `check`; mean over seeds):", "",
              "| copy | max \\|logit diff\\| | KL(merged ‖ quantized) | top-1 agreement |", "|---|---|---|---|"]
    for name, rs in (("KD-then-PTQ", kd), *((f"QAD {f}", [r for r in runs if r["method"] == f"qad_{f}"])
                                             for f in res["formats"])):
        for scheme in sorted(rs[0].get("check", {})):
            cs = [r["check"][scheme] for r in rs if r.get("check", {}).get(scheme)]
            if cs:
                lines.append(f"| {name}: {scheme} | {statistics.mean(c['max_abs_diff'] for c in cs):.3f} "
                             f"| {statistics.mean(c['mean_kl'] for c in cs):.2e} "
                             f"| {statistics.mean(c['top1_agreement'] for c in cs):.1%} |")
    lines += ["", "Per run (held-out KL to the teacher per deployed copy; step / wall of the training run as it ran, "
              "under `--jobs` load, not the timing above):", "", "```"]
    for r in runs:
        lines.append(f"{r['method']:20s} seed {r['seed']}: " + ", ".join(f"{k} {v['kl']:.4f}" for k, v in r["kl"].items())
                     + f"; step {1e3 * r['step_s']:.0f} ms, wall {r['wall_s']:.0f}s")
    lines += ["```", END]
    return lines


def write_section(doc: Path, res: Dict[str, Any]) -> None:
    from kd.core.atomic import atomic_write_text

    text = doc.read_text() if doc.is_file() else ""
    block = "\n".join(section(res))
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(doc, text)


if __name__ == "__main__":
    main()
