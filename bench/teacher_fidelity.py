"""Fidelity of each teacher precision on the test bed's trained teacher (CPU; FP8 through kd.teacher.precision's exact
emulation of the rounding).

    PYTHONPATH=$PWD python bench/teacher_fidelity.py [--testbed .cache/testbed] [--split val] [--out FILE.json]

For every precision the teacher is loaded exactly as the recipes load it (``kd.teacher.precision.resolve_precision`` +
``load_hf_into_model(**prec.load_kwargs())`` + ``apply_precision``), in bf16 (weights and activations, as on the
GPU), and run over the held-out split of configs/tiny/kd_lora.yaml (val_size 0.1, seed 0). Per answer token
(the tokens the KD loss uses, labels shifted as in the recipe):

  KL(bf16 || q) = sum_v p_bf16(v) (log p_bf16(v) - log p_q(v)),  top-1 agreement with the bf16 teacher,
  CE of the quantized teacher on the labels (the bf16 teacher's CE beside it).

The fp32 teacher is listed too: KL(bf16 || fp32) is bf16's own rounding, the floor under any bf16-activation path.
Deterministic (no sampling): one run is the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_teacher(testbed, quant, dtype):
    from omegaconf import OmegaConf

    from kd.teacher.precision import apply_precision, resolve_precision
    from kd.train.models import build_on_meta, load_hf_into_model

    cfg = OmegaConf.load(REPO / "configs/tiny/kd_lora.yaml")
    prec = resolve_precision(quant, torch.device("cpu"), dtype)
    model = build_on_meta(cfg.teacher_model, dtype)
    load_hf_into_model(model, testbed.teacher_dir, device=torch.device("cpu"), dtype=dtype, which="teacher",
                       **prec.load_kwargs())
    n = apply_precision(model, prec)
    return model.eval(), prec, n


@torch.no_grad()
def logits_over(model, batches):
    return [model(tok).float() for tok, _ in batches]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", default=os.environ.get("KD_TESTBED_DIR", str(REPO / ".cache/testbed")))
    ap.add_argument("--split", default="val", choices=["val", "train"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    from torchtune.data import padded_collate_sft

    from kd.data.alpaca import alpaca_kd_dataset
    from kd.testing.testbed import build_testbed

    tb = build_testbed(args.testbed)
    tok = tb.tokenizer(max_seq_len=256)
    ds = alpaca_kd_dataset(tok, str(tb.data_json), split=args.split, val_size=0.1, seed=0)
    batches = []
    for i in range(0, len(ds), args.batch_size):
        b = padded_collate_sft([ds[j] for j in range(i, min(len(ds), i + args.batch_size))],
                               padding_idx=tok.pad_id, ignore_idx=-100)
        labels = torch.cat([b["labels"][:, 1:], torch.full_like(b["labels"][:, :1], -100)], dim=1)
        batches.append((b["tokens"], labels))
    n_tok = sum(int((lab != -100).sum()) for _, lab in batches)
    print(f"test bed {tb.root}: {args.split} split, {len(ds)} samples, {n_tok} answer tokens", flush=True)

    t0 = time.perf_counter()
    ref_model, _, _ = load_teacher(tb, "bf16", torch.bfloat16)
    ref = logits_over(ref_model, batches)
    del ref_model
    rows = {}
    variants = [("fp32 (context)", "bf16", torch.float32), ("bf16", "bf16", torch.bfloat16),
                ("nf4", "nf4", torch.bfloat16), ("fp8", "fp8", torch.bfloat16),
                ("nf4_fp8", "nf4_fp8", torch.bfloat16)]
    for label, quant, dtype in variants:
        model, prec, n = load_teacher(tb, quant, dtype)
        out = logits_over(model, batches)
        kl = agree = ce = ce_ref = 0.0
        for (tokens, lab), r, q in zip(batches, ref, out):
            valid = lab != -100
            lr, lq = r.log_softmax(-1)[valid].double(), q.log_softmax(-1)[valid].double()
            y = lab[valid]
            kl += float((lr.exp() * (lr - lq)).sum())
            agree += float((lr.argmax(-1) == lq.argmax(-1)).sum())
            ce += float(-lq.gather(1, y[:, None]).sum())
            ce_ref += float(-lr.gather(1, y[:, None]).sum())
        rows[label] = {"precision": prec.name, "impl": prec.impl, "dtype": str(dtype).replace("torch.", ""),
                       "quantized_linears": n, "kl_bf16_q": kl / n_tok, "top1_agreement": agree / n_tok,
                       "ce": ce / n_tok, "ce_bf16": ce_ref / n_tok}
        print(f"{label:<15} [{prec.impl}] KL(bf16||q) {kl / n_tok:.3e}  top-1 {agree / n_tok:.4f}  "
              f"CE {ce / n_tok:.4f} (bf16 {ce_ref / n_tok:.4f})", flush=True)
    k4, k48 = rows["nf4"]["kl_bf16_q"], rows["nf4_fp8"]["kl_bf16_q"]
    summary = {"kl_ratio_nf4_fp8_over_nf4": k48 / k4, "kl_ratio_fp8_over_nf4": rows["fp8"]["kl_bf16_q"] / k4,
               "target_nf4_fp8_le_1p5x_nf4": k48 <= 1.5 * k4}
    print(f"KL(nf4_fp8) / KL(nf4) = {k48 / k4:.3f} (target <= 1.5: {'met' if k48 <= 1.5 * k4 else 'MISSED'}); "
          f"KL(fp8) / KL(nf4) = {summary['kl_ratio_fp8_over_nf4']:.3f}; {time.perf_counter() - t0:.0f} s")
    print("\n| teacher | path | KL(bf16 ‖ q) / token | top-1 agreement | CE (bf16: %.4f) |" % rows["bf16"]["ce_bf16"])
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | `{r['impl']}`, {r['dtype']} | {r['kl_bf16_q']:.2e} | {100 * r['top1_agreement']:.2f}% "
              f"| {r['ce']:.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"split": args.split, "samples": len(ds), "answer_tokens": n_tok,
                                              "rows": rows, "summary": summary, "torch": torch.__version__},
                                             indent=1) + "\n")


if __name__ == "__main__":
    main()
