"""kd.cache.store, kd.losses.sparse and the sparse (Random-Sampling KD) fused loss, against float64 references written here."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from kd.cache.store import (
    FORMAT,
    CacheError,
    CacheKey,
    TeacherCacheStore,
    records_from_samples,
    row_seeds,
    sample_hash,
    sparse_targets_for_batch,
)
from kd.losses.distillation import DistillationLoss, fused_linear_kd_ce, sparse_soft_ce_sum
from kd.losses.sparse import SparseTargets, TeacherSampler, sample_teacher_rows


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _key(**kw):
    base = dict(format=FORMAT, teacher="t0", precision="none/fp32", temperature=1.0, k=12, sampling="random",
                seed=0, tokenizer="tok0", template="tpl0", max_seq_len=256)
    base.update(kw)
    return CacheKey(**base)


def _to_sparse(ids: torch.Tensor, k: int, V: int) -> SparseTargets:
    """Unique ids + counts per row, written naively (reference for the store's encoding)."""
    n = ids.shape[0]
    sid = torch.zeros(n, k, dtype=torch.long)
    sw = torch.zeros(n, k, dtype=torch.float64)
    for i in range(n):
        a, c = torch.unique(ids[i].long(), return_counts=True)
        sid[i, : len(a)] = a
        sw[i, : len(a)] = c.double() / k
    return sid, sw


# ---------------------------------------------------------------------------------------------------------
# the estimator
# ---------------------------------------------------------------------------------------------------------
def test_sampled_p_hat_is_unbiased():
    """Mean of p_hat = counts / K over M independent draws equals p = softmax(t / T) within 5 standard errors
    sqrt(p (1 - p) / (M K)) for every (row, token); top-k renormalisation is far outside that band."""
    torch.manual_seed(0)
    n, V, K, T, M = 3, 23, 12, 1.7, 3000
    t = torch.randn(n, V, dtype=torch.float64) * 2.5
    t[0, 5] = -float("inf")  # a masked-out vocabulary entry is never drawn
    p = torch.softmax(t / T, -1)
    rows = t.repeat(M, 1)  # draw m of row i is row m * n + i, with its own seed
    seeds = row_seeds(list(range(M)), n, seed=7)
    ids, probs, ent, top1 = sample_teacher_rows(rows, seeds, K, T, "random")
    assert probs.numel() == 0 and ids.shape == (M * n, K)
    p_hat = F.one_hot(ids.long(), V).sum(1).double().div(K).view(M, n, V).mean(0)
    se = (p * (1 - p) / (M * K)).sqrt()
    assert ((p_hat - p).abs() <= 5 * se + 1e-12).all(), ((p_hat - p).abs() / (se + 1e-12)).max()
    assert p_hat[0, 5] == 0
    # entropy and top-1 are exact per row
    H = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    assert torch.allclose(ent.view(M, n)[0].double(), H, rtol=1e-5)
    assert (top1.view(M, n)[0] == t.argmax(-1)).all()
    # the biased comparison: renormalised top-k (k=4 here) misses the tail mass entirely
    tid, tpr, _, _ = sample_teacher_rows(t, row_seeds([0], n, 0), 4, T, "topk")
    p_topk = torch.zeros_like(p).scatter_(1, tid.long(), tpr.double())
    assert ((p_topk - p).abs() > 5 * se).any()


def test_sampler_is_batch_and_chunk_invariant():
    """A row's draws depend only on its seed (sample id, position): same ids alone, in a batch, or chunked."""
    torch.manual_seed(1)
    t = torch.randn(9, 31)
    seeds = row_seeds([11, 12, 13], 3, seed=0)
    full = sample_teacher_rows(t, seeds, 12, 1.0, "random")[0]
    parts = torch.cat([sample_teacher_rows(t[i:i + 2], seeds[i:i + 2], 12, 1.0, "random")[0] for i in range(0, 9, 2)])
    assert torch.equal(full, parts)
    other = sample_teacher_rows(t, row_seeds([11, 12, 13], 3, seed=1), 12, 1.0, "random")[0]
    assert not torch.equal(full, other)


def _fused_grads(h, W, A, B, lab, kd_ratio, loss, **kw):
    for x in (h, A, B):
        x.grad = None
    out = fused_linear_kd_ce(h, W, lab, kd_ratio=kd_ratio, loss=loss, chunk_size=5,
                             student_lora=(A, B, 0.5), **kw)
    out.loss_sum.backward()
    return out, torch.cat([h.grad.reshape(-1), A.grad.reshape(-1), B.grad.reshape(-1)])


def test_sparse_gradient_is_unbiased_for_forward_kl():
    """Mean (over M draws) of the fused sparse-loss gradient w.r.t. hidden states and LoRA equals the fused
    full forward-KL gradient: squared error <= 3 x its expected value (sum of squared standard errors from
    20 groups of draws), and far below a single draw's error. The top-k estimate fails the same check."""
    torch.manual_seed(2)
    n, Hs, V, K, T, r = 6, 7, 29, 12, 2.0, 3
    h0 = torch.randn(n, Hs, dtype=torch.float64)
    W = torch.randn(V, Hs, dtype=torch.float64)
    A0 = torch.randn(r, Hs, dtype=torch.float64) * 0.3
    B0 = torch.randn(V, r, dtype=torch.float64) * 0.3
    t = torch.randn(n, V, dtype=torch.float64) * 2
    lab = torch.randint(0, V, (n,))
    lab[3] = -100
    loss = DistillationLoss(kind="forward_kl", temperature=T)
    leaf = lambda x: x.clone().requires_grad_(True)  # noqa: E731
    h, A, B = leaf(h0), leaf(A0), leaf(B0)
    full_out, g_full = _fused_grads(h, W, A, B, lab, 1.0, loss, teacher_logits=t)

    G, per = 20, 40  # 800 draws, evaluated 40 at a time (rows stacked: gradients of A, B add up)
    means = []
    for g in range(G):
        rows = t.repeat(per, 1)
        seeds = row_seeds(list(range(g * per, (g + 1) * per)), n, seed=3)
        ids, _, ent, top1 = sample_teacher_rows(rows, seeds, K, T, "random")
        sid, sw = _to_sparse(ids, K, V)
        st = SparseTargets(sid, sw, top1.long(), ent.double())
        hh, AA, BB = leaf(h0.repeat(per, 1)), leaf(A0), leaf(B0)
        out, gr = _fused_grads(hh, W, AA, BB, lab.repeat(per), 1.0, loss, teacher_sparse=st)
        gh = hh.grad.view(per, n, Hs).mean(0).reshape(-1)
        means.append(torch.cat([gh, AA.grad.reshape(-1) / per, BB.grad.reshape(-1) / per]))
        if g == 0:
            # the KL estimate's mean is the true KL too (entropy subtracted)
            assert out.kl_sum.item() / per == pytest.approx(full_out.kl_sum.item(), rel=0.1)
    means = torch.stack(means)
    mean = means.mean(0)
    se2 = means.var(0) / G  # squared standard error of the mean, per entry
    err2 = ((mean - g_full) ** 2).sum()
    assert err2 <= 3 * se2.sum(), (err2, se2.sum())
    # one draw is much noisier than the mean of 800: the check has power
    assert ((means[0] - g_full) ** 2).sum() > 5 * err2
    # top-k renormalised targets: a biased gradient, outside the same band
    tid, tpr, tent, ttop = sample_teacher_rows(t, row_seeds([0], n, 0), 3, T, "topk")
    st = SparseTargets(tid.long(), tpr.double(), ttop.long(), tent.double())
    h, A, B = leaf(h0), leaf(A0), leaf(B0)
    _, g_topk = _fused_grads(h, W, A, B, lab, 1.0, loss, teacher_sparse=st)
    assert ((g_topk - g_full) ** 2).sum() > 30 * se2.sum()


@pytest.mark.parametrize("T,kd_ratio,soft_ce", [(1.0, 0.5, False), (2.0, 1.0, False), (0.7, 0.3, True)])
def test_sparse_fused_matches_float64_reference(T, kd_ratio, soft_ce):
    """Values and gradients of the fused sparse loss (ragged chunks, LoRA, an ignored row, -inf logit) equal
    autograd through materialised float64 logits: (1-r) CE + r T^2 (H_hat - H) [or H_hat with soft_ce]."""
    torch.manual_seed(3)
    n, Hs, V, K, r = 11, 6, 17, 5, 2
    h = torch.randn(n, Hs, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, Hs, dtype=torch.float64)
    A = (torch.randn(r, Hs, dtype=torch.float64) * 0.2).requires_grad_(True)
    B = (torch.randn(V, r, dtype=torch.float64) * 0.2).requires_grad_(True)
    lab = torch.randint(0, V, (n,))
    lab[[0, 7]] = -100
    t = torch.randn(n, V, dtype=torch.float64)
    ids, _, ent, top1 = sample_teacher_rows(t, row_seeds([5], n, 0), K, T, "random")
    sid, sw = _to_sparse(ids, K, V)
    st = SparseTargets(sid, sw, top1.long(), ent.double())
    loss = DistillationLoss(kind="forward_kl", temperature=T, soft_ce=soft_ce)
    out = fused_linear_kd_ce(h, W, lab, teacher_sparse=st, kd_ratio=kd_ratio, loss=loss, chunk_size=4,
                             student_lora=(A, B, 0.5))
    out.loss_sum.backward()
    got = [x.grad.clone() for x in (h, A, B)]
    for x in (h, A, B):
        x.grad = None
    z = h @ W.T + 0.5 * (h @ A.T) @ B.T
    valid = lab != -100
    ce = F.cross_entropy(z[valid], lab[valid], reduction="sum")
    log_q = torch.log_softmax(z / T, -1)
    h_hat = -(sw * log_q.gather(1, sid))[valid].sum()
    kd = T * T * (h_hat if soft_ce else h_hat - ent.double()[valid].sum())
    ref = (1 - kd_ratio) * ce + kd_ratio * kd
    ref.backward()
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-10)
    assert out.kd_sum.item() == pytest.approx(kd.item(), rel=1e-10)
    assert out.n_valid.item() == 9
    assert out.n_agree.item() == int(((z.argmax(-1) == top1.long()) & valid).sum())
    for g, x in zip(got, (h, A, B)):
        assert torch.allclose(g, x.grad, rtol=1e-9, atol=1e-11)
    # the plain form gives the same sparse soft CE
    assert sparse_soft_ce_sum(z.detach(), sid, sw, lab, T).loss_sum.item() == pytest.approx(h_hat.item(), rel=1e-10)


def test_sampling_inside_fused_head_equals_direct_sampling():
    """teacher_sampler draws in the fused loop, chunk by chunk, exactly what the sampler gives on full logits."""
    torch.manual_seed(4)
    n, Hs, Ht, V = 10, 4, 6, 19
    h = torch.randn(n, Hs)
    W = torch.randn(V, Hs)
    th, tw = torch.randn(n, Ht), torch.randn(V, Ht)
    lab = torch.randint(0, V, (n,))
    seeds = row_seeds([1, 2], 5, 0)
    for sampling in ("random", "topk"):
        out = fused_linear_kd_ce(h, W, lab, teacher_hidden=th, teacher_weight=tw, kd_ratio=0.5,
                                 loss=DistillationLoss(temperature=1.5), chunk_size=3,
                                 teacher_sampler=TeacherSampler(4, 1.5, sampling, seeds))
        ref = sample_teacher_rows(th @ tw.T, seeds, 4, 1.5, sampling)
        assert torch.equal(out.samples.ids, ref[0])
        assert torch.allclose(out.samples.entropy, ref[2]) and torch.equal(out.samples.top1, ref[3])
        if sampling == "topk":
            assert torch.allclose(out.samples.probs, ref[1])


def test_divergences_needing_the_full_distribution_are_refused():
    st = SparseTargets(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), torch.zeros(3, dtype=torch.long),
                       torch.zeros(3))
    for kind in ("reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"):
        with pytest.raises(ValueError, match="full teacher distribution"):
            fused_linear_kd_ce(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long),
                               teacher_sparse=st, kd_ratio=0.5, loss=DistillationLoss(kind=kind))


# ---------------------------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------------------------
def _batch(B=3, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 50, (B, S), generator=g)
    labels[:, :3] = -100
    labels[1, 6:] = -100  # padding
    return labels


def _samples_for(labels, K=12, V=50, sampling="random", seed=0):
    B, S = labels.shape
    t = torch.randn(B * S, V, generator=torch.Generator().manual_seed(seed)) * 2
    ids, probs, ent, top1 = sample_teacher_rows(t, row_seeds(list(range(B)), S, 0), K, 1.0, sampling)
    from kd.losses.sparse import TeacherSamples

    return TeacherSamples(ids, probs, ent, top1), t


def test_store_round_trip_and_bytes_per_token(tmp_path):
    labels = _batch()
    samples, t = _samples_for(labels)
    sids, hashes = [10, 11, 12], [sample_hash([i], [i]) for i in range(3)]
    store = TeacherCacheStore(tmp_path / "c", _key())
    store.check_or_init_key()
    store.open_for_append(0)
    store.append(records_from_samples(samples, sids, hashes, labels, 12))
    store.close()
    store.scan()
    assert sorted(store.index) == sids and store.n_bad_tail == 0
    st = sparse_targets_for_batch(store, sids, hashes, labels)
    valid = (labels != -100).reshape(-1)
    # p_hat from the store equals the naive unique/count of the draws; unused rows have weight 0
    sid, sw = _to_sparse(samples.ids, 12, 50)
    dense = lambda i, w: torch.zeros(i.shape[0], 50, dtype=torch.float64).scatter_add_(1, i, w.double())  # noqa
    assert torch.allclose(dense(st.ids, st.weights)[valid], dense(sid, sw)[valid], atol=1e-7)
    assert (st.weights[~valid] == 0).all()
    assert torch.allclose(st.weights.sum(-1)[valid], torch.ones(int(valid.sum())), atol=1e-6)
    assert torch.equal(st.top1[valid], samples.top1.long()[valid])
    assert torch.allclose(st.entropy[valid], samples.entropy[valid], rtol=1e-3)  # stored as float16
    stats = store.stats()
    assert stats["answer_tokens"] == int(valid.sum())
    # 5 B per stored entry + 7 B per position + 48 B per record header
    assert stats["bytes_per_answer_token"] <= 5 * 12 + 7 + 48 * 3 / int(valid.sum()) + 1
    # a changed sample (other tokens) has no entry for its new hash
    with pytest.raises(CacheError, match="no teacher-cache entry"):
        sparse_targets_for_batch(store, sids, [hashes[0], b"x" * 16, hashes[2]], labels)
    assert store.missing({10: hashes[0], 11: b"x" * 16, 99: b"y" * 16}) == [11, 99]


def test_topk_records(tmp_path):
    labels = _batch()
    samples, _ = _samples_for(labels, K=4, sampling="topk")
    store = TeacherCacheStore(tmp_path / "c", _key(k=4, sampling="topk"))
    store.check_or_init_key()
    store.open_for_append(0)
    store.append(records_from_samples(samples, [0, 1, 2], [b"a" * 16, b"b" * 16, b"c" * 16], labels, 4))
    store.close()
    store.scan()
    st = sparse_targets_for_batch(store, [0, 1, 2], [b"a" * 16, b"b" * 16, b"c" * 16], labels)
    valid = (labels != -100).reshape(-1)
    assert torch.equal(st.ids[valid], samples.ids.long()[valid])
    assert torch.allclose(st.weights[valid], samples.probs[valid], atol=1e-3)


def test_torn_and_corrupt_tails_lose_only_the_last_batch(tmp_path):
    labels = _batch()
    samples, _ = _samples_for(labels)
    hashes = [bytes([i]) * 16 for i in range(3)]
    store = TeacherCacheStore(tmp_path / "c", _key())
    store.check_or_init_key()
    store.open_for_append(0)
    recs = records_from_samples(samples, [0, 1, 2], hashes, labels, 12)
    store.append(recs[:2])
    store.close()
    path = store.shard_path(0)
    good = path.stat().st_size
    # kill -9 in the middle of the next write: half a record on disk
    with open(path, "ab") as f:
        f.write(recs[2][: len(recs[2]) // 2])
    store.scan()
    assert sorted(store.index) == [0, 1] and store.n_bad_tail > 0
    # a writer resuming truncates the torn tail before appending, then the record is whole
    store.open_for_append(0)
    assert path.stat().st_size == good
    store.append(recs[2:])
    store.close()
    store.scan()
    assert sorted(store.index) == [0, 1, 2] and store.n_bad_tail == 0
    # a flipped bit inside the last record's payload: its CRC fails, the earlier records stay readable
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40
    path.write_bytes(bytes(data))
    store.scan()
    assert sorted(store.index) == [0, 1]


def test_cache_key_detects_every_listed_change(tmp_path):
    """teacher, precision, temperature, K, sampling, seed, tokenizer, template and max_seq_len: each change is
    refused with the field named; rebuild moves the old cache aside (nothing deleted)."""
    root = tmp_path / "cache"
    s = TeacherCacheStore(root, _key())
    s.check_or_init_key()
    (root / "shards" / "rank-00000.bin").write_bytes(b"")
    TeacherCacheStore(root, _key()).check_or_init_key()  # same key: accepted
    changes = dict(teacher="t1", precision="nf4/bf16", temperature=2.0, k=8, sampling="topk", seed=1,
                   tokenizer="tok1", template="tpl1", max_seq_len=512)
    for field, value in changes.items():
        with pytest.raises(CacheError, match=field) as e:
            TeacherCacheStore(root, _key(**{field: value})).check_or_init_key()
        assert "rebuild=True" in str(e.value)
    TeacherCacheStore(root, _key(temperature=2.0)).check_or_init_key(rebuild=True)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith("cache.stale-")]
    assert len(stale) == 1 and (stale[0] / "shards" / "rank-00000.bin").is_file()
    assert json.loads((root / "cache.json").read_text())["temperature"] == 2.0
    with pytest.raises(CacheError, match="no teacher cache"):
        TeacherCacheStore(tmp_path / "none", _key()).check_or_init_key(create=False)


def test_fingerprints_see_changes(tmp_path, testbed, tiny_tokenizer):
    """The real fingerprint functions change when the teacher weights, the tokenizer files, the system
    prompt or the masking rule change (and not otherwise)."""
    import shutil

    from kd.cache.store import checkpoint_fingerprint, template_fingerprint, tokenizer_fingerprint
    from kd.data.alpaca import AlpacaKDDataset

    tdir = tmp_path / "teacher"
    shutil.copytree(testbed.teacher_dir, tdir)
    f0 = checkpoint_fingerprint(tdir)
    assert checkpoint_fingerprint(tdir) == f0
    shard = sorted(tdir.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 1  # one weight changed at the end of a shard
    shard.write_bytes(bytes(data))
    assert checkpoint_fingerprint(tdir) != f0
    assert checkpoint_fingerprint(testbed.teacher_dir, model_cfg={"num_layers": 4}) != \
        checkpoint_fingerprint(testbed.teacher_dir, model_cfg={"num_layers": 3})

    tok_dir = testbed.root / "tokenizer"
    cfg = {"path": str(tok_dir / "vocab.json"), "merges_file": str(tok_dir / "merges.txt")}
    k0 = tokenizer_fingerprint(cfg, tiny_tokenizer)
    alt = tmp_path / "merges.txt"
    alt.write_text((tok_dir / "merges.txt").read_text() + "\n")
    assert tokenizer_fingerprint({**cfg, "merges_file": str(alt)}, tiny_tokenizer) != k0
    assert tokenizer_fingerprint({**cfg, "max_seq_len": 7}, tiny_tokenizer) == k0  # its own key field

    src = testbed.root / "demo_buddhist_qa.json"
    ds = AlpacaKDDataset(tiny_tokenizer, src)
    c = {"_component_": "kd.data.alpaca.alpaca_kd_dataset", "source": str(src)}
    t0 = template_fingerprint(c, ds, tiny_tokenizer)
    assert template_fingerprint({**c, "val_size": 0.2}, ds, tiny_tokenizer) == t0  # selection only
    ds2 = AlpacaKDDataset(tiny_tokenizer, src, system_prompt="another prompt")
    assert template_fingerprint(c, ds2, tiny_tokenizer) != t0
    ds3 = AlpacaKDDataset(tiny_tokenizer, src, train_on_input=True)
    assert template_fingerprint(c, ds3, tiny_tokenizer) != t0


def test_planner_knows_the_cache():
    """kd plan: mode=use plans without the teacher; online_then_cache adds the cache-epoch peak; the size
    bound is 67 B per answer token at K=12; the job-time split of teacher work per mode."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from kd.ops import planner

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/tiny/kd_lora.yaml")
    online = planner.plan_from_config(cfg)
    use = planner.plan_from_config(OmegaConf.merge(cfg, {"teacher_cache": {"mode": "use"}}))
    assert online.row("teacher weights") > 0 and use.row("teacher weights") == 0
    assert use.peak_bytes < online.peak_bytes
    otc = OmegaConf.merge(cfg, {"teacher_cache": {"mode": "online_then_cache", "dir": "/nonexistent"}})
    assert planner.plan_from_config(otc).row("teacher weights") == online.row("teacher weights")
    text = planner.cache_summary(otc)
    assert "67 B per answer token" in text and "epochs 2+ (teacher freed)" in text
    assert planner.cache_bytes_per_token_bound(12) == 67
    assert planner.teacher_forward_epochs(OmegaConf.merge(cfg, {"epochs": 3})) == (3.0, 0.0)
    assert planner.teacher_forward_epochs(OmegaConf.merge(otc, {"epochs": 3})) == (1.0, 0.0)


def _complete_prefix(blob: bytes, n: int) -> int:
    """Bytes of whole records in blob[:n]."""
    from kd.cache.store import _parse

    return _parse(blob[:n], 0)[1]


def _sync_worker(rank, dirs, port, results):
    import torch.distributed as dist

    from kd.cache.store import sync_shards

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        store = TeacherCacheStore(dirs[rank], _key())
        results[rank] = sync_shards(store, rank, 2, 0, torch.device("cpu"), chunk_bytes=700)
    finally:
        dist.destroy_process_group()


def test_sync_shards_copies_every_shard_to_every_node(tmp_path):
    """Two 'nodes' with separate directories (gloo): node 0 holds 4 shards from a 4-rank build, node 1 a
    prefix of one of them plus a torn tail; afterwards both hold the same 4 complete shards."""
    import socket

    import torch.multiprocessing as mp

    labels = _batch()
    samples, _ = _samples_for(labels)
    d0, d1 = tmp_path / "n0", tmp_path / "n1"
    for d in (d0, d1):
        (d / "shards").mkdir(parents=True)
    blobs = []
    for j in range(4):
        recs = records_from_samples(samples, [3 * j, 3 * j + 1, 3 * j + 2], [bytes([j, i]) * 8 for i in range(3)],
                                    labels, 12)
        blob = b"".join(recs)
        blobs.append(blob)
        (d0 / "shards" / f"rank-{j:05d}.bin").write_bytes(blob)
    (d1 / "shards" / "rank-00002.bin").write_bytes(blobs[2][: len(blobs[2]) // 2 + 1])  # torn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_sync_worker, args=([d0, d1], port, results), nprocs=2)
    for j in range(4):
        assert (d1 / "shards" / f"rank-{j:05d}.bin").read_bytes() == blobs[j]
        assert (d0 / "shards" / f"rank-{j:05d}.bin").read_bytes() == blobs[j]
    assert results[0] == 0 and results[1] == sum(map(len, blobs)) - (len(blobs[2]) // 2 + 1) + \
        (len(blobs[2]) // 2 + 1 - _complete_prefix(blobs[2], len(blobs[2]) // 2 + 1))


# ---------------------------------------------------------------------------------------------------------
# packed data: per-sample records out of packs, and back into packs
# ---------------------------------------------------------------------------------------------------------
def _fake_teacher_logits(segs, B, S, V, salt=0):
    """[B*S, V] logits that depend only on (sample id, position in the sample): what an exact teacher gives
    the same sample packed or padded."""
    t = torch.zeros(B * S, V)
    for b, o, n, sid, _ in segs:
        g = torch.Generator().manual_seed(1000 * sid + salt)
        t[b * S + o: b * S + o + n] = torch.randn(n, V, generator=g)[: min(n, S - o)] * 2
    return t


@pytest.mark.parametrize("packing,train_on_input", [("best_fit", False), ("greedy", False), ("best_fit", True)])
def test_packed_batches_write_and_read_the_records_of_unpacked_ones(tiny_tokenizer, tmp_path, packing,
                                                                    train_on_input):
    """Packs (kd.data.alpaca best_fit / greedy) carry their samples' ids; CacheCollate splits them by seq_lens: the
    same keys and per-position seeds as the samples alone, so records written from packed batches equal, byte
    for byte, records written from padded batches (given the same teacher logits), and records read back into
    packs line up with every valid (shifted label != -100) row of the pack. With train_on_input the first
    token of a sample is a label, so the previous sample's last row in a pack is valid but belongs to no
    sample (torchtune's packed shift): it gets weight 0 and is the only valid row without a target."""
    from torch.utils.data import ConcatDataset
    from torchtune.data import padded_collate_packed, padded_collate_sft

    from kd.cache.store import CacheCollate, Segments, TeacherSamples, index_dataset, item_segments, unpacked_view
    from kd.data.alpaca import DEMO_DATA_PATH, alpaca_kd_dataset

    kw = dict(split="all", max_seq_len=256, train_on_input=train_on_input)
    if train_on_input:
        kw["system_prompt"] = None
    flat = alpaca_kd_dataset(tiny_tokenizer, str(DEMO_DATA_PATH), **kw)
    packed = alpaca_kd_dataset(tiny_tokenizer, str(DEMO_DATA_PATH), packed=True, packing=packing, **kw)
    assert unpacked_view(packed) is packed.ds and isinstance(unpacked_view(ConcatDataset([packed])), ConcatDataset)
    ix = index_dataset(unpacked_view(packed))
    assert ix.wanted() == index_dataset(flat).wanted()
    K, V = 12, tiny_tokenizer.vocab_size if hasattr(tiny_tokenizer, "vocab_size") else 300
    V = min(V, 300)

    def shifted(lab):
        return torch.cat([lab[:, 1:], torch.full_like(lab[:, :1], -100)], dim=1)

    def write(store, items, collate, rank):
        cc = CacheCollate(collate, store, seed=5)
        batch = cc(items)
        segs = item_segments(items)
        B, S = batch["labels"].shape
        t = _fake_teacher_logits(segs, B, S, V)
        samples = TeacherSamples(*sample_teacher_rows(t, batch["cache_row_seed"].reshape(-1), K, 1.0, "random"))
        store.append(records_from_samples(samples, (), (), shifted(batch["labels"]), K,
                                          segments=Segments.from_batch(batch)))
        return batch, segs

    packs = [p for p in (packed[i] for i in range(len(packed))) if len(p["sample_ids"]) >= 2][:4]
    packs[1:1] = [packed[0]]  # and one pack that may hold a single long sample
    members = [int(s) for p in packs for s in p["sample_ids"]]
    assert len(packs) == 5 and len(members) >= 9
    by_sid = {flat[i]["sample_id"]: flat[i] for i in range(len(flat))}
    stores = {}
    for name, items, collate in (("packed", packs, padded_collate_packed),
                                 ("flat", [by_sid[s] for s in members],
                                  lambda x: padded_collate_sft(x, padding_idx=0, ignore_idx=-100))):
        st = TeacherCacheStore(tmp_path / name, _key(k=K))
        st.check_or_init_key()
        st.open_for_append(0)
        write(st, items, collate, 0)
        st.close()
        st.scan()
        stores[name] = st
    for s in members:
        ea, eb = stores["packed"].index[s][-1], stores["flat"].index[s][-1]
        assert (ea.n, ea.e, ea.hash) == (eb.n, eb.e, eb.hash) == (ea.n, ea.e, ix.wanted()[s])
        ra = [x.copy() for x in stores["packed"].read(ea)]
        rb = [x.copy() for x in stores["flat"].read(eb)]
        assert all((x == y).all() for x, y in zip(ra, rb)), s
    # read back into the packs: every valid row has a target (weights sum to 1) except cross-boundary rows
    cc = CacheCollate(padded_collate_packed, stores["flat"], seed=5)
    cc.read = True
    batch = cc(packs)
    lab = shifted(batch["labels"]).reshape(-1)
    valid = lab != -100
    wsum = batch["teacher_weights"].sum(-1)
    covered = torch.zeros_like(valid)
    for b, o, n, _, _ in item_segments(packs):
        S = batch["labels"].shape[1]
        covered[b * S + o: b * S + o + n - 1] = True
    assert torch.allclose(wsum[valid & covered], torch.ones(int((valid & covered).sum())), atol=1e-6)
    assert (wsum[~valid] == 0).all() and (wsum[valid & ~covered] == 0).all()
    n_cross = int((valid & ~covered).sum())
    if train_on_input:
        assert n_cross > 0  # the documented pack-boundary rows exist and have no target
    else:
        assert n_cross == 0
    # a pack without sample ids (another packer) is refused with a clear error
    bare = [{k: v for k, v in p.items() if k != "sample_ids"} for p in packs]
    with pytest.raises(CacheError, match="name their samples"):
        CacheCollate(padded_collate_packed, stores["flat"], seed=5)(bare)
