"""Tests for kd.losses.distillation against a naive float64 reference written here (not calling kd.losses.distillation)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses.distillation import (
    KINDS,
    DistillationLoss,
    KDCEResult,
    LossSums,
    chunked_cross_entropy_sum,
    cross_entropy_sum,
    fused_linear_kd_ce,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: intra-op threading only adds overhead (5x slower on a shared 2-core box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------
# naive float64 reference
# ---------------------------------------------------------------------------------------------------------


def _softmax64(x, T):
    x = x.double() / T
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _kl64(a, b):
    # a, b: float64 probabilities [n, V]; 0 * log(0 / b) = 0
    return torch.where(a > 0, a * (torch.log(a) - torch.log(b)), torch.zeros_like(a)).sum(-1)


def ref_rows(kind, s, t, T=1.0, beta=0.5, alpha=0.1, soft_ce=False):
    """Per-token divergence [n] from float64 probabilities (no T**2 factor), plain textbook formulas."""
    p = _softmax64(t, T)
    q = _softmax64(s, T)
    if kind == "forward_kl":
        return -(p * torch.log(q)).sum(-1) if soft_ce else _kl64(p, q)
    if kind == "reverse_kl":
        return _kl64(q, p)
    if kind == "jsd":  # TRL GKDTrainer.generalized_jsd_loss convention
        if beta == 0:
            return _kl64(p, q)
        if beta == 1:
            return _kl64(q, p)
        m = beta * p + (1 - beta) * q
        return beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)
    if kind == "skew_forward_kl":
        return _kl64(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_reverse_kl":
        return _kl64(q, alpha * q + (1 - alpha) * p)
    raise AssertionError(kind)


def ref_loss(kind, s, t, labels, ignore_index=-100, T=1.0, scale_by_t2=True, **kw):
    """Sum over the valid rows (explicit Python selection of row indices); s float64 (may require grad)."""
    rows = [i for i in range(s.shape[0]) if int(labels[i]) != ignore_index]
    if not rows:
        return s.sum() * 0.0, 0
    idx = torch.tensor(rows)
    total = ref_rows(kind, s[idx], t[idx].double(), T=T, **kw).sum()
    if scale_by_t2:
        total = total * T * T
    return total, len(rows)


def ref_ce(s, labels, ignore_index=-100):
    rows = [i for i in range(s.shape[0]) if int(labels[i]) != ignore_index]
    if not rows:
        return s.sum() * 0.0
    idx = torch.tensor(rows)
    q = _softmax64(s[idx], 1.0)
    return -torch.log(q[torch.arange(len(rows)), labels[idx]]).sum()


# (kind, extra kwargs) covering every divergence, torchtune soft-CE and the JSD ends
CASES = [
    ("forward_kl", {}),
    ("forward_kl", {"soft_ce": True}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"alpha": 0.2}),
    ("skew_reverse_kl", {"alpha": 0.2}),
]
CASE_IDS = [k + "".join(f"-{a}{v}" for a, v in kw.items()) for k, kw in CASES]


def _make(n, v, dtype, seed=0, ignore_index=-100, mask_frac=0.3, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < mask_frac] = ignore_index
    return s, t, labels


TOL = {  # per-dtype tolerances: (value rtol/atol, grad atol relative to max|grad|)
    torch.float32: (1e-5, 1e-4, 1e-5),
    torch.bfloat16: (1e-5, 1e-4, 1e-2),  # inputs are rounded identically; grads come back in bf16
}


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,t2", [(1.0, True), (2.0, True), (0.7, False)])
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_divergence_matches_float64_reference(kind, kw, dtype, T, t2, ignore_index):
    s, t, labels = _make(3 * 47, 123, dtype, ignore_index=ignore_index)
    loss = DistillationLoss(kind, temperature=T, scale_by_t2=t2, ignore_index=ignore_index, **kw)
    s_in = s.clone().requires_grad_(True)
    out = loss(s_in, t, labels)
    assert isinstance(out, LossSums)
    assert out.loss_sum.dtype == torch.float32 and out.n_valid.dtype == torch.int64
    (g,) = torch.autograd.grad(out.loss_sum, s_in)
    assert g.dtype == dtype

    s64 = s.double().requires_grad_(True)
    ref, n = ref_loss(kind, s64, t.double(), labels, ignore_index=ignore_index, T=T, scale_by_t2=t2, **kw)
    (g_ref,) = torch.autograd.grad(ref, s64)

    rtol, atol, gtol = TOL[dtype]
    assert int(out.n_valid) == n
    torch.testing.assert_close(out.loss_sum.double(), ref.detach(), rtol=rtol * 10, atol=atol)
    torch.testing.assert_close(g.double(), g_ref, rtol=0, atol=gtol * g_ref.abs().max().item() + 1e-7)
    # masked rows get exactly zero gradient
    assert (g[labels == ignore_index] == 0).all()


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_gradcheck_float64(kind, kw):
    s, t, labels = _make(3, 5, torch.float64, seed=1, mask_frac=0.0)
    labels[1] = -100
    loss = DistillationLoss(kind, temperature=1.5, **kw)
    s = s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, t, labels).loss_sum, (s,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_all_masked_and_garbage_rows(kind, kw):
    loss = DistillationLoss(kind, **kw)
    s, t, labels = _make(6, 11, torch.float32, seed=2, mask_frac=0.0)
    # all masked: 0 sum, 0 count, finite zero grads
    all_masked = torch.full_like(labels, -100)
    x = s.clone().requires_grad_(True)
    out = loss(x, t, all_masked)
    assert out.loss_sum.item() == 0.0 and out.n_valid.item() == 0
    (g,) = torch.autograd.grad(out.loss_sum, x)
    assert torch.isfinite(g).all() and (g == 0).all()
    # inf/nan garbage in masked rows changes nothing and leaks no NaN
    labels2 = labels.clone()
    labels2[[1, 4]] = -100
    clean = loss(s, t, labels2).loss_sum
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[1] = float("nan")
    s_bad[4, :3] = float("-inf")
    t_bad[4] = float("inf")
    t_bad[1, 0] = float("-inf")
    x = s_bad.clone().requires_grad_(True)
    out = loss(x, t_bad, labels2)
    assert out.loss_sum.item() == clean.item()
    (g,) = torch.autograd.grad(out.loss_sum, x)
    assert torch.isfinite(g).all() and (g[[1, 4]] == 0).all()


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_neg_inf_vocab_columns(kind, kw):
    """-inf logits in the same columns of both models (e.g. a masked vocab tail): 0*log0 = 0, no NaN."""
    s, t, labels = _make(9, 20, torch.float32, seed=3, mask_frac=0.2)
    labels[labels >= 15] = 3
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, 15:] = float("-inf")
    t_inf[:, 15:] = float("-inf")
    loss = DistillationLoss(kind, temperature=1.3, **kw)
    x = s_inf.clone().requires_grad_(True)
    out = loss(x, t_inf, labels)
    (g,) = torch.autograd.grad(out.loss_sum, x)
    ref, _ = ref_loss(kind, s[:, :15].double(), t[:, :15].double(), labels, T=1.3, **kw)
    torch.testing.assert_close(out.loss_sum.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(g).all() and (g[:, 15:] == 0).all()
    ce = cross_entropy_sum(s_inf, labels).loss_sum
    torch.testing.assert_close(ce.double(), ref_ce(s[:, :15].double(), labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_cross_entropy_sum(dtype, ignore_index):
    s, _, labels = _make(3 * 47, 123, dtype, ignore_index=ignore_index)
    x = s.clone().requires_grad_(True)
    out = cross_entropy_sum(x, labels, ignore_index)
    (g,) = torch.autograd.grad(out.loss_sum, x)
    s64 = s.double().requires_grad_(True)
    ref = ref_ce(s64, labels, ignore_index)
    (g_ref,) = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(out.loss_sum.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g.double(), g_ref, rtol=0, atol=TOL[dtype][2] * g_ref.abs().max().item())
    assert int(out.n_valid) == int((labels != ignore_index).sum())
    # and torch's own
    torch.testing.assert_close(
        out.loss_sum, F.cross_entropy(s.float(), labels, ignore_index=ignore_index, reduction="sum")
    )


# ---------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_identical_logits_give_exact_zero(kind, T):
    s, _, labels = _make(31, 57, torch.float32, seed=4)
    for kw in ({}, {"beta": 0.3}, {"alpha": 0.4}):
        if "beta" in kw and kind != "jsd":
            continue
        out = DistillationLoss(kind, temperature=T, **kw)(s, s.clone(), labels)
        assert out.loss_sum.item() == 0.0, (kind, kw)
    # soft CE gives the teacher entropy instead
    if kind == "forward_kl":
        out = DistillationLoss(kind, temperature=T, soft_ce=True)(s, s.clone(), labels)
        p = _softmax64(s, T)
        ent = -(p * p.log()).sum(-1)[labels != -100].sum() * T * T
        torch.testing.assert_close(out.loss_sum.double(), ent, rtol=1e-5, atol=1e-5)
        assert out.loss_sum.item() > 0


def test_jsd_ends_equal_forward_and_reverse_kl():
    s, t, labels = _make(40, 33, torch.float32, seed=5)
    fkl = DistillationLoss("forward_kl", temperature=1.7)(s, t, labels).loss_sum
    rkl = DistillationLoss("reverse_kl", temperature=1.7)(s, t, labels).loss_sum
    j0 = DistillationLoss("jsd", beta=0.0, temperature=1.7)(s, t, labels).loss_sum
    j1 = DistillationLoss("jsd", beta=1.0, temperature=1.7)(s, t, labels).loss_sum
    assert j0.item() == fkl.item() and j1.item() == rkl.item()
    assert abs(fkl.item() - rkl.item()) > 1e-3  # the test distinguishes the two ends
    # the general formula tends to 0 near the ends (why TRL/Liger special-case them)
    jsmall = DistillationLoss("jsd", beta=1e-4, temperature=1.7)(s, t, labels).loss_sum
    assert jsmall.item() < 1e-2 * fkl.item()


def test_skew_alpha_zero_equals_plain_kl():
    s, t, labels = _make(40, 33, torch.float32, seed=6)
    fkl = DistillationLoss("forward_kl")(s, t, labels).loss_sum
    rkl = DistillationLoss("reverse_kl")(s, t, labels).loss_sum
    assert DistillationLoss("skew_forward_kl", alpha=0.0)(s, t, labels).loss_sum.item() == fkl.item()
    assert DistillationLoss("skew_reverse_kl", alpha=0.0)(s, t, labels).loss_sum.item() == rkl.item()
    # tiny / large alpha go through the general (log1p/expm1) branch accurately (float64 reference)
    for kind in ("skew_forward_kl", "skew_reverse_kl"):
        for alpha in (1e-6, 0.9, 0.999):
            got = DistillationLoss(kind, alpha=alpha)(s, t, labels).loss_sum
            ref, _ = ref_loss(kind, s.double(), t.double(), labels, alpha=alpha)
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    for beta in (1e-6, 0.02, 0.98, 1 - 1e-6):
        got = DistillationLoss("jsd", beta=beta)(s, t, labels).loss_sum
        ref, _ = ref_loss("jsd", s.double(), t.double(), labels, beta=beta)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_teacher_zero_probability_columns(kind, kw):
    """Teacher assigns probability 0 (-inf logit) where the student does not: skew/JSD stay finite and
    exact; reverse KL is genuinely infinite."""
    s, t, labels = _make(12, 19, torch.float32, seed=11, mask_frac=0.25)
    t[:, :4] = float("-inf")
    loss = DistillationLoss(kind, temperature=1.2, **kw)
    x = s.clone().requires_grad_(True)
    out = loss(x, t, labels).loss_sum
    ref, _ = ref_loss(kind, s.double(), t.double(), labels, T=1.2, **kw)
    if kind == "reverse_kl" or (kind == "jsd" and kw["beta"] == 1.0):
        assert math.isinf(out.item()) and math.isinf(ref.item())
        return
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    (g,) = torch.autograd.grad(out, x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kl_matches_torch_kl_div(T):
    s, t, labels = _make(50, 77, torch.float32, seed=7)
    valid = labels != -100
    log_q = F.log_softmax(s[valid] / T, -1)
    log_p = F.log_softmax(t[valid] / T, -1)
    fkl = DistillationLoss("forward_kl", temperature=T, scale_by_t2=False)(s, t, labels).loss_sum
    rkl = DistillationLoss("reverse_kl", temperature=T, scale_by_t2=False)(s, t, labels).loss_sum
    torch.testing.assert_close(fkl, F.kl_div(log_q, log_p, log_target=True, reduction="sum"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rkl, F.kl_div(log_p, log_q, log_target=True, reduction="sum"), rtol=1e-5, atol=1e-5)


def test_true_kl_vs_soft_ce_differ_by_teacher_entropy_and_match_torchtune():
    from torchtune.modules.loss import ForwardKLLoss

    s, t, labels = _make(50, 77, torch.float32, seed=8)
    x1 = s.clone().requires_grad_(True)
    x2 = s.clone().requires_grad_(True)
    kl = DistillationLoss("forward_kl")(x1, t, labels).loss_sum
    sce = DistillationLoss("forward_kl", soft_ce=True)(x2, t, labels).loss_sum
    p = _softmax64(t, 1.0)
    ent = -(p * p.log()).sum(-1)[labels != -100].sum()
    torch.testing.assert_close((sce - kl).double(), ent, rtol=1e-5, atol=1e-4)
    # same gradient wrt the student
    g1, g2 = torch.autograd.grad(kl, x1)[0], torch.autograd.grad(sce, x2)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    # soft_ce reproduces torchtune's ForwardKLLoss number (normalize=False gives the sum)
    tt = ForwardKLLoss()(s, t, labels, normalize=False)
    torch.testing.assert_close(sce, tt, rtol=1e-5, atol=1e-4)


def test_value_errors():
    s = torch.zeros(2, 151936)
    t = torch.zeros(2, 152064)
    lab = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="151936") as e:
        DistillationLoss()(s, t, lab)
    assert "152064" in str(e.value) and "151665" in str(e.value)
    with pytest.raises(ValueError, match="152064"):
        DistillationLoss()([s[None]], [t[None]], lab[None])
    with pytest.raises(ValueError, match="152064"):
        fused_linear_kd_ce(
            torch.zeros(2, 4), torch.zeros(151936, 4), lab, teacher_hidden=torch.zeros(2, 3),
            teacher_weight=torch.zeros(152064, 3), kd_ratio=0.5, loss=DistillationLoss(),
        )
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        DistillationLoss()(torch.zeros(3, 5), torch.zeros(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels shape"):
        DistillationLoss()(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss("skew_forward_kl", alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss("skew_forward_kl", alpha=-0.1)
    with pytest.raises(ValueError, match="beta"):
        DistillationLoss("jsd", beta=1.5)
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl"):
        DistillationLoss("kl")
    with pytest.raises(ValueError, match="kd_ratio"):
        fused_linear_kd_ce(torch.zeros(2, 4), torch.zeros(5, 4), lab, kd_ratio=1.5, loss=DistillationLoss())
    with pytest.raises(ValueError, match="teacher"):
        fused_linear_kd_ce(torch.zeros(2, 4), torch.zeros(5, 4), lab, kd_ratio=0.5, loss=DistillationLoss())
    with pytest.raises(ValueError, match="sum to 9"):
        DistillationLoss()(
            [torch.zeros(1, 4, 5), torch.zeros(1, 5, 5)], [torch.zeros(1, 4, 5), torch.zeros(1, 5, 5)],
            torch.zeros(1, 10, dtype=torch.long),
        )


# ---------------------------------------------------------------------------------------------------------
# plain == chunked == fused
# ---------------------------------------------------------------------------------------------------------

ALL_KINDS = [(k, kw) for k, kw in CASES if not (k == "jsd" and kw["beta"] in (0.0, 1.0))]


@pytest.mark.parametrize("kind,kw", ALL_KINDS, ids=[c for c, (k, kw) in zip(CASE_IDS, CASES) if (k, kw) in ALL_KINDS])
@pytest.mark.parametrize("split", ["chunk", "tensor_split"])
def test_chunked_equals_plain(kind, kw, split):
    B, S, V, n = 3, 47, 61, 5
    s, t, labels = _make(B * S, V, torch.float32, seed=9, mask_frac=0.4)
    s, t, labels = s.view(B, S, V), t.view(B, S, V), labels.view(B, S)
    loss = DistillationLoss(kind, temperature=2.0, **kw)
    closs = DistillationLoss(kind, temperature=2.0, **kw)
    x1 = s.clone().requires_grad_(True)
    x2 = s.clone().requires_grad_(True)
    plain = loss(x1, t, labels)
    if split == "chunk":
        sc, tc = x2.chunk(n, dim=1), t.chunk(n, dim=1)
    else:
        sc, tc = x2.tensor_split(n, dim=1), t.tensor_split(n, dim=1)
    sizes = [c.shape[1] for c in sc]
    assert sizes == ([10, 10, 10, 10, 7] if split == "chunk" else [10, 10, 9, 9, 9])
    chunked = closs(list(sc), list(tc), labels)
    torch.testing.assert_close(chunked.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-4)
    assert int(chunked.n_valid) == int(plain.n_valid)
    g1 = torch.autograd.grad(plain.loss_sum, x1)[0]
    g2 = torch.autograd.grad(chunked.loss_sum, x2)[0]
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)
    # CE too
    ce_plain = cross_entropy_sum(s, labels)
    ce_chunk = chunked_cross_entropy_sum([c.detach() for c in sc], labels)
    torch.testing.assert_close(ce_chunk.loss_sum, ce_plain.loss_sum, rtol=1e-5, atol=1e-4)
    # sensitivity: labels misaligned by one position (what a wrong label split does at chunk boundaries)
    # must change the result, so the equality above is meaningful
    shifted = closs([c.detach() for c in sc], list(tc), labels.roll(1, dims=1)).loss_sum
    assert abs(float(shifted) - float(plain.loss_sum.detach())) > 1e-2


def _fused_case(dtype=torch.float32, N=37, Hs=16, Ht=24, V=53, r=4, seed=10, mask_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, Hs, generator=g)).to(dtype)
    W = (torch.randn(V, Hs, generator=g) * 0.5).to(dtype)
    A = (torch.randn(r, Hs, generator=g) * 0.3).to(dtype)
    Bm = (torch.randn(V, r, generator=g) * 0.3).to(dtype)
    th = torch.randn(N, Ht, generator=g).to(dtype)
    tw = (torch.randn(V, Ht, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < mask_frac] = -100
    return h, W, A, Bm, th, tw, labels


def _plain_total(loss, h, W, labels, kd_ratio, th=None, tw=None, t_logits=None, lora=None):
    z = F.linear(h, W)
    if lora is not None:
        A, Bm, sc = lora
        z = z + sc * F.linear(F.linear(h, A), Bm)
    t = t_logits if t_logits is not None else F.linear(th, tw)
    kd = loss(z, t, labels)
    ce = cross_entropy_sum(z, labels, loss.ignore_index)
    valid = labels != loss.ignore_index
    log_p = F.log_softmax(t.double() / loss.temperature, -1)[valid]
    log_q = F.log_softmax(z.detach().double() / loss.temperature, -1)[valid]
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    agree = ((z.argmax(-1) == t.argmax(-1)) & valid).sum()
    return (1 - kd_ratio) * ce.loss_sum + kd_ratio * kd.loss_sum, ce.loss_sum, kd.loss_sum, kl, kd.n_valid, agree


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("lora", [False, True])
def test_fused_equals_plain(kind, kw, kd_ratio, lora):
    h, W, A, Bm, th, tw, labels = _fused_case()
    loss = DistillationLoss(kind, temperature=2.0, **kw)
    leaves1 = [x.clone().requires_grad_(True) for x in (h, W, A, Bm)]
    leaves2 = [x.clone().requires_grad_(True) for x in (h, W, A, Bm)]
    h1, W1, A1, B1 = leaves1
    h2, W2, A2, B2 = leaves2
    lo1 = (A1, B1, 0.75) if lora else None
    lo2 = (A2, B2, 0.75) if lora else None
    tot, ce, kd, kl, nv, na = _plain_total(loss, h1, W1, labels, kd_ratio, th, tw, lora=lo1)
    out = fused_linear_kd_ce(
        h2, W2, labels, teacher_hidden=th, teacher_weight=tw, kd_ratio=kd_ratio, loss=loss, chunk_size=8,
        student_lora=lo2,
    )
    assert isinstance(out, KDCEResult)
    torch.testing.assert_close(out.loss_sum, tot, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.ce_sum, ce.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.kd_sum, kd.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.kl_sum.double(), kl, rtol=1e-4, atol=1e-4)
    assert int(out.n_valid) == int(nv) and int(out.n_agree) == int(na)
    assert out.n_valid.dtype == torch.int64 and out.n_agree.dtype == torch.int64
    assert not out.ce_sum.requires_grad and not out.kd_sum.requires_grad and not out.kl_sum.requires_grad
    wrt1 = [h1, W1] + ([A1, B1] if lora else [])
    wrt2 = [h2, W2] + ([A2, B2] if lora else [])
    # non-unit grad_output: backward must scale the stored grads
    g1 = torch.autograd.grad(tot * 0.37, wrt1)
    g2 = torch.autograd.grad(out.loss_sum * 0.37, wrt2)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_frozen_weight_lora_teacher_logits_forms_and_no_grad():
    h, W, A, Bm, th, tw, labels = _fused_case(N=45)
    loss = DistillationLoss("reverse_kl", temperature=1.5)
    t_logits = F.linear(th, tw)
    h1, A1, B1 = [x.clone().requires_grad_(True) for x in (h, A, Bm)]
    tot, *_ = _plain_total(loss, h1, W, labels, 0.5, t_logits=t_logits, lora=(A1, B1, 2.0))
    ref_g = torch.autograd.grad(tot, [h1, A1, B1])
    # teacher as [N, V] tensor and as uneven row chunks; W frozen (the common LoRA case)
    for tl in (t_logits, list(t_logits.split([7, 20, 18])), list(t_logits.split([45]))):
        h2, A2, B2 = [x.clone().requires_grad_(True) for x in (h, A, Bm)]
        out = fused_linear_kd_ce(
            h2, W, labels, teacher_logits=tl, kd_ratio=0.5, loss=loss, chunk_size=16, student_lora=(A2, B2, 2.0)
        )
        torch.testing.assert_close(out.loss_sum, tot, rtol=1e-5, atol=1e-4)
        for a, b in zip(torch.autograd.grad(out.loss_sum, [h2, A2, B2]), ref_g):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # hidden without grad: only LoRA grads
    A3, B3 = A.clone().requires_grad_(True), Bm.clone().requires_grad_(True)
    out = fused_linear_kd_ce(h, W, labels, teacher_logits=t_logits, kd_ratio=0.5, loss=loss, chunk_size=16,
                             student_lora=(A3, B3, 2.0))
    for a, b in zip(torch.autograd.grad(out.loss_sum, [A3, B3]), ref_g[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # nothing requires grad / no_grad mode: same numbers, no graph
    with torch.no_grad():
        out = fused_linear_kd_ce(h, W, labels, teacher_logits=t_logits, kd_ratio=0.5, loss=loss,
                                 student_lora=(A, Bm, 2.0))
    assert not out.loss_sum.requires_grad
    torch.testing.assert_close(out.loss_sum, tot.detach(), rtol=1e-5, atol=1e-4)
    # kd_ratio = 0 without any teacher: CE only, kl/agree zero
    out = fused_linear_kd_ce(h, W, labels, kd_ratio=0.0, loss=loss, chunk_size=16)
    torch.testing.assert_close(out.loss_sum, cross_entropy_sum(F.linear(h, W), labels).loss_sum)
    assert out.kl_sum.item() == 0 and out.n_agree.item() == 0


def test_fused_all_masked():
    h, W, A, Bm, th, tw, labels = _fused_case(N=20)
    labels[:] = -100
    h1, W1 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    out = fused_linear_kd_ce(h1, W1, labels, teacher_hidden=th, teacher_weight=tw, kd_ratio=0.5,
                             loss=DistillationLoss("jsd"), chunk_size=8)
    assert out.loss_sum.item() == 0 and out.n_valid.item() == 0 and out.n_agree.item() == 0
    for g in torch.autograd.grad(out.loss_sum, [h1, W1]):
        assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_fused_bf16(kind):
    h, W, A, Bm, th, tw, labels = _fused_case(dtype=torch.bfloat16, N=33)
    loss = DistillationLoss(kind, temperature=2.0)
    h1, W1, A1, B1 = [x.clone().requires_grad_(True) for x in (h, W, A, Bm)]
    h2, W2, A2, B2 = [x.clone().requires_grad_(True) for x in (h, W, A, Bm)]
    tot, *_ = _plain_total(loss, h1, W1, labels, 0.5, th, tw, lora=(A1, B1, 0.5))
    out = fused_linear_kd_ce(h2, W2, labels, teacher_hidden=th, teacher_weight=tw, kd_ratio=0.5, loss=loss,
                             chunk_size=8, student_lora=(A2, B2, 0.5))
    assert out.loss_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss_sum, tot, rtol=1e-3, atol=1e-2)
    g1 = torch.autograd.grad(tot, [h1, W1, A1, B1])
    g2 = torch.autograd.grad(out.loss_sum, [h2, W2, A2, B2])
    for a, b in zip(g2, g1):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2e-2 * b.float().abs().max().item())


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_fused_gradcheck_float64(kind, kw):
    """The fused Function's analytic gradients (hidden, weight, LoRA A/B) pass gradcheck in float64."""
    h, W, A, Bm, th, tw, labels = _fused_case(dtype=torch.float64, N=7, Hs=3, Ht=4, V=6, r=2, seed=12)
    labels[2] = -100
    loss = DistillationLoss(kind, temperature=1.5, **kw)

    def f(h_, W_, A_, B_):
        return fused_linear_kd_ce(h_, W_, labels, teacher_hidden=th, teacher_weight=tw, kd_ratio=0.3, loss=loss,
                                  chunk_size=3, student_lora=(A_, B_, 0.5)).loss_sum

    inputs = tuple(x.clone().requires_grad_(True) for x in (h, W, A, Bm))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)
