"""Packing: a packed batch gives the same per-sample loss sums as the same samples run one by one.

Teacher and student are the test bed's (different) tiny Qwen2 models, fp32 on CPU, through the recipe's own
pieces: kd.data.alpaca's packed dataset (torchtune PackedDataset), torchtune's packed collate (document mask + per-sample
positions), the NF4-free teacher with HiddenStatesHead and the student's FusedKDHead. A pack without the
document mask, or with positions that do not restart per sample, fails the comparison (checked too)."""

from __future__ import annotations

import pytest
import torch

from kd.data.alpaca import alpaca_kd_dataset
from kd.losses.distillation import DistillationLoss, FusedKDCELoss
from kd.losses.heads import FusedKDHead, FusedTargets, HiddenStatesHead
from kd.train.models import build_on_meta, is_adapter_param, load_hf_into_model


def _models(testbed):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load("configs/tiny/kd_lora.yaml")
    dev = torch.device("cpu")
    student = build_on_meta(cfg.model, torch.float32)
    student.output = FusedKDHead(student.output, chunk_size=7)  # odd chunk: chunks straddle samples
    load_hf_into_model(student, testbed.root / "student", None, device=dev, dtype=torch.float32,
                       trainable=is_adapter_param, which="student", init_seed=3)
    with torch.no_grad():  # a non-zero adapter, so LoRA paths matter
        for n, p in student.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    teacher = build_on_meta(cfg.teacher_model, torch.float32)
    load_hf_into_model(teacher, testbed.root / "teacher", None, device=dev, dtype=torch.float32, which="teacher")
    head_w = teacher.output.weight.detach()
    teacher.output = HiddenStatesHead()
    return student.eval(), teacher.eval(), head_w


def _shift(labels):
    return torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], -100)], dim=-1)


def _sums(student, teacher, head_w, tokens, labels, mask=None, input_pos=None):
    loss = DistillationLoss(kind="forward_kl")
    with torch.no_grad():
        th = teacher(tokens, mask=mask, input_pos=input_pos)
        targets = FusedTargets(labels=_shift(labels), loss=FusedKDCELoss(), kd_loss=loss, kd_ratio=0.5,
                               teacher_hidden=th, teacher_weight=head_w)
        with student.output.fused(targets) as call:
            total = student(tokens, mask=mask, input_pos=input_pos)
    o = call.result
    return torch.stack([total, o.ce_sum, o.kd_sum, o.n_valid.to(total.dtype)])


@pytest.mark.parametrize("packing", ["best_fit", "greedy"])
def test_packed_equals_unpacked_per_sample(testbed, tiny_tokenizer, packing):
    from torchtune.data import padded_collate_packed

    src = str(testbed.root / "demo_buddhist_qa.json")
    tok = tiny_tokenizer
    plain = alpaca_kd_dataset(tok, src, val_size=0, seed=0, max_seq_len=400)
    packed = alpaca_kd_dataset(tok, src, val_size=0, seed=0, max_seq_len=400, packed=True, packing=packing)
    student, teacher, head_w = _models(testbed)

    pack = packed[1]
    seq_lens = pack["seq_lens"].tolist()
    assert len(seq_lens) >= 2, "pack should hold several samples"
    batch = padded_collate_packed([pack])
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape[-1] == 400
    # torchtune appends the end-of-pack padding as one more "sample" (its own block of the mask)
    by_tokens = {tuple(plain[i]["tokens"]): i for i in range(len(plain))}
    starts = [sum(seq_lens[:k]) for k in range(len(seq_lens))]
    ids = [by_tokens.get(tuple(batch["tokens"][0, st:st + n].tolist())) for st, n in zip(starts, seq_lens)]
    assert all(i is not None for i in ids[:-1]), "every packed segment but the padding is a data-set sample"
    if ids[-1] is None:  # the padding segment carries no loss
        assert (batch["labels"][0, starts[-1]:] == -100).all()
        ids, starts, seq_lens = ids[:-1], starts[:-1], seq_lens[:-1]
    ignore_all = torch.full_like(batch["labels"], -100)
    compared = 0
    for k, (i, st, n) in enumerate(zip(ids, starts, seq_lens)):
        s = plain[i]
        assert len(s["tokens"]) == n and batch["tokens"][0, st:st + n].tolist() == s["tokens"]
        # per-sample sums from the pack: keep only this sample's labels
        lab = ignore_all.clone()
        lab[0, st:st + n] = batch["labels"][0, st:st + n]
        got = _sums(student, teacher, head_w, batch["tokens"], lab, batch["mask"], batch["input_pos"])
        ref = _sums(student, teacher, head_w, torch.tensor([s["tokens"]]), torch.tensor([s["labels"]]))
        assert got[3] == ref[3] and ref[3] > 0
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5)
        if k > 0:
            # the control: the same pack under a plain causal mask (attention across samples) differs
            causal = torch.tril(torch.ones(1, 400, 400, dtype=torch.bool))
            leak = _sums(student, teacher, head_w, batch["tokens"], lab, causal, batch["input_pos"])
            assert not torch.allclose(leak, ref, rtol=1e-4, atol=1e-4)
            compared += 1
    assert compared >= 1


def test_packed_positions_restart(testbed, tiny_tokenizer):
    from torchtune.data import padded_collate_packed

    packed = alpaca_kd_dataset(tiny_tokenizer, str(testbed.root / "demo_buddhist_qa.json"), val_size=0, seed=0,
                               max_seq_len=400, packed=True)
    b = padded_collate_packed([packed[0], packed[1]])
    for row, lens in enumerate([packed[0]["seq_lens"], packed[1]["seq_lens"]]):
        pos = b["input_pos"][row].tolist()
        st = 0
        n_samples = 0
        for n in lens.tolist():
            seg_labels = b["labels"][row, st:st + n]
            if (b["tokens"][row, st:st + n] == tiny_tokenizer.pad_id).all():
                assert (seg_labels == -100).all()  # torchtune's end-of-pack padding segment: no loss
            else:
                assert pos[st:st + n] == list(range(n))  # RoPE positions restart for every sample
                n_samples += 1
            st += n
        assert n_samples >= 2


def test_user_configs_pack():
    """The shipped 72B->7B configs pack by default (issue 9), on both models (one batch feeds both)."""
    import glob

    from omegaconf import OmegaConf

    for path in glob.glob("configs/qwen2_5/72B_to_7B_kd_*.yaml"):
        cfg = OmegaConf.load(path)
        assert cfg.dataset.packed is True, path


def test_best_fit_bins_partition_and_beats_next_fit():
    import math
    import random

    from kd.data.alpaca import best_fit_bins, greedy_bins

    rng = random.Random(1)
    # the benchmark's length distribution (bench/recipe_bench.py LENGTHS), odd count
    lens = [min(2048, rng.randint(60, 150) + int(rng.lognormvariate(math.log(400), 0.8035))) for _ in range(3001)]
    bins = best_fit_bins(lens, 2048)
    assert sorted(i for b in bins for i in b) == list(range(len(lens)))  # every sample exactly once
    assert all(sum(lens[i] for i in b) <= 2048 for b in bins)
    assert bins == best_fit_bins(lens, 2048)  # deterministic
    pad = lambda bs: 1 - sum(lens) / (len(bs) * 2048)  # noqa: E731
    assert pad(bins) < 0.02 < 0.15 < pad(greedy_bins(lens, 2048))
    # lower bound: no packing can use fewer packs than ceil(total / capacity) by more than a few percent
    assert len(bins) <= math.ceil(sum(lens) / 2048) * 1.02
    with pytest.raises(ValueError, match="more than the pack size"):
        best_fit_bins([10, 3000], 2048)


def test_greedy_bins_is_torchtunes_rule(testbed, tiny_tokenizer):
    """kd.ops.jobtime models torchtune's PackedDataset with greedy_bins: same packs."""
    from kd.data.alpaca import greedy_bins

    src = str(testbed.root / "demo_buddhist_qa.json")
    plain = alpaca_kd_dataset(tiny_tokenizer, src, val_size=0, seed=0, max_seq_len=400)
    tt = alpaca_kd_dataset(tiny_tokenizer, src, val_size=0, seed=0, max_seq_len=400, packed=True, packing="greedy")
    lens = [len(plain[i]["tokens"]) for i in range(len(plain))]
    want = [[lens[i] for i in b] for b in greedy_bins(lens, 400)]
    got = [[n for n, t in zip(p["seq_lens"].tolist(), [0] * 99)][: len(w)] for p, w in zip(tt, want)]
    assert len(tt) == len(want) and got == want
