"""Distillation losses: KL family divergences, plain / chunked / fused-linear forms.

Notation (per token, over the vocabulary of size V)::

    p = softmax(teacher_logits / T)      # teacher, never receives gradients
    q = softmax(student_logits / T)      # student

Divergences (``DistillationLoss(kind=...)``), all computed per token and SUMMED over valid tokens:

``forward_kl``
    ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` (Hinton et al. 2015, "Distilling the Knowledge in a
    Neural Network"; word-level KD, Kim & Rush 2016 eq. 5).  Reported as the TRUE KL, so identical
    distributions give exactly 0.  torchtune's ``ForwardKLLoss`` instead returns the soft cross-entropy
    ``H(p, q) = -sum_v p_v log q_v = KL(p||q) + H(p)``; its gradient w.r.t. the student is identical, only
    the reported number differs by the teacher entropy ``H(p)``.  ``soft_ce=True`` reproduces torchtune's
    number.
``reverse_kl``
    ``KL(q || p) = sum_v q_v (log q_v - log p_v)`` (MiniLLM, Gu et al. 2024, eq. 1 / the token-level
    reverse KL it optimises).
``jsd``
    Generalized JSD of GKD (Agarwal et al. 2024, eq. 1) in TRL's ``GKDTrainer.generalized_jsd_loss`` and
    Liger-Kernel's ``LigerFusedLinearJSDLoss`` convention::

        m = beta * p + (1 - beta) * q
        JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)

    with the two ends SPECIAL-CASED exactly as TRL/Liger do: ``beta == 0`` -> forward ``KL(p || q)``,
    ``beta == 1`` -> reverse ``KL(q || p)``.  (The formula itself tends to 0 at both ends -- it is
    O(beta) and O(1-beta) -- so the ends are a deliberate discontinuity, not a limit.  Older Liger
    releases used ``m = beta*q + (1-beta)*p`` with the same weights; we follow the current TRL/Liger code.)
``skew_forward_kl``
    ``KL(p || alpha p + (1 - alpha) q)`` (DistiLLM, Ko et al. 2024, eq. 4, "alpha-SKL"); alpha=0 is
    forward KL.
``skew_reverse_kl``
    ``KL(q || alpha q + (1 - alpha) p)`` (DistiLLM eq. 5, "alpha-SRKL"); alpha=0 is reverse KL.

Temperature ``T`` divides both logits; the KD sum is multiplied by ``T**2`` (``scale_by_t2=True``) so the
gradient magnitude does not shrink as ``1/T**2`` (Hinton et al. 2015, sec. 2).

Conventions shared by every form:

* ``labels`` are already shifted; tokens with ``labels == ignore_index`` are excluded.
* Every loss returns the SUM over valid tokens and the valid-token count (``LossSums``); the caller divides
  once by the (global) count.  No host syncs (``.item()``, data-dependent ``if``) in the hot path.
* Math is done in float32 (or float64 if the input is float64, for ``gradcheck``) whatever the input dtype.
  Masked rows are replaced by zeros BEFORE any math, so garbage/inf/NaN logits in ignored rows contribute
  exactly 0 to the value and to the gradient.  ``0 * log 0`` is taken as 0 (``-inf`` logits are allowed,
  e.g. a masked-off vocabulary tail), using the "double where" trick so no NaN reaches the backward.

Three forms with the same numbers: ``DistillationLoss`` on plain [N, V] logits or on lists of [B, s_i, V]
chunks (torchtune's ``set_num_output_chunks``), and ``fused_linear_kd_ce`` (hidden states + output weights,
never materialising [N, V] logits).

The training objective per micro-batch is ``(1 - kd_ratio) * CE_sum + kd_ratio * KD_sum``: the mix is
:func:`kd_ce_mix`, ``kd_ratio`` is checked by :func:`check_kd_ratio`, and both forms return a
:class:`KDCEResult` (fused: :func:`fused_linear_kd_ce`, chunked: :func:`chunked_kd_ce`). The config
components: ``loss: kd.losses.distillation.FusedKDCELoss`` (fused form) or ``kd.losses.distillation.ChunkedCrossEntropyLoss`` /
torchtune's ``CEWithChunkedOutputLoss`` (chunked form); ``kd_loss: kd.losses.distillation.DistillationLoss``.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from kd.core import kernels
from kd.losses.sparse import SparseTargets, TeacherSampler, TeacherSamples, sample_teacher_rows

__all__ = [
    "KINDS",
    "LossSums",
    "KDCEResult",
    "DistillationLoss",
    "ChunkedCrossEntropyLoss",
    "FusedKDCELoss",
    "check_kd_ratio",
    "kd_ce_mix",
    "cross_entropy_sum",
    "chunked_cross_entropy_sum",
    "chunked_kd_ce",
    "fused_linear_kd_ce",
    "sparse_soft_ce_sum",
]

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")

# Qwen2.5 output-row counts, quoted in error messages (config.json "vocab_size"); the tokenizer itself
# has 151,665 ids (151,643 BPE + 22 special), the rest are padding rows.
_QWEN_SMALL_ROWS = 151_936
_QWEN_LARGE_ROWS = 152_064
_QWEN_TOKENIZER_IDS = 151_665


class LossSums(NamedTuple):
    """``loss_sum``: 0-dim float32 (float64 for float64 input) SUM over valid tokens (differentiable).
    ``n_valid``: 0-dim int64 number of valid tokens (``labels != ignore_index``)."""

    loss_sum: torch.Tensor
    n_valid: torch.Tensor


class KDCEResult(NamedTuple):
    """What one KD+CE loss step returns (both forms); every field is a 0-dim tensor.

    loss_sum: ``(1 - kd_ratio) * ce_sum + kd_ratio * kd_sum`` (:func:`kd_ce_mix`; float32, differentiable).
    ce_sum:   hard-label cross-entropy sum at T=1 (float32, detached).
    kd_sum:   the configured divergence sum, incl. the ``T**2`` factor if enabled (float32, detached).
    kl_sum:   TRUE forward ``KL(p_T || q_T)`` sum at the loss temperature, WITHOUT the ``T**2`` factor,
              whatever the training divergence is (float32, detached; 0 if no teacher given).
    n_valid:  number of valid tokens (int64).
    n_agree:  valid tokens where ``argmax(teacher) == argmax(student)`` (int64; 0 if no teacher given).
    samples:  :class:`kd.losses.sparse.TeacherSamples` drawn from the teacher logits when a
              ``teacher_sampler`` was given (for the teacher cache), else None.

    With sparse cached targets (``teacher_sparse``) ``kd_sum`` and ``kl_sum`` are the Random-Sampling KD
    ESTIMATES ``sum H_hat(p, q) - H(p)`` (unbiased for random sampling, biased for top-k) and ``n_agree``
    compares with the cached teacher top-1.

    :meth:`metric_vector` stacks the numbers in :attr:`METRICS` order (one all-reduce for all of them);
    :meth:`read_metrics` names them again: the order is written only here.
    """

    loss_sum: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    kl_sum: torch.Tensor
    n_valid: torch.Tensor
    n_agree: torch.Tensor
    samples: Optional[Any] = None

    METRICS = ("loss_sum", "ce_sum", "kd_sum", "kl_sum", "n_valid", "n_agree")

    def metric_vector(self) -> torch.Tensor:
        """float32 [6] (detached) in :attr:`METRICS` order; sums of these vectors stay sums."""
        return torch.stack([getattr(self, k).detach().to(torch.float32) for k in self.METRICS])

    @classmethod
    def read_metrics(cls, vec: torch.Tensor) -> Dict[str, float]:
        """``{name: float}`` from a (summed) :meth:`metric_vector` (one device-to-host copy)."""
        return dict(zip(cls.METRICS, vec.tolist()))


def _option_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_kd_ratio(kd_ratio: Any) -> float:
    """The one check of ``kd_ratio`` (weight of the KD term): a finite number in [0, 1] (ValueError otherwise;
    the config schema turns it into a ConfigError naming the key)."""
    if isinstance(kd_ratio, bool) or not isinstance(kd_ratio, (int, float)):
        raise ValueError(f"kd_ratio must be a number in [0, 1], got {kd_ratio!r}")
    r = float(kd_ratio)
    if r != r:
        raise ValueError(f"kd_ratio must be a finite number in [0, 1], got {r}")
    if r < 0.0:
        raise ValueError(f"kd_ratio must be >= 0.0, got {r}")
    if r > 1.0:
        raise ValueError(f"kd_ratio must be <= 1.0, got {r}")
    return r


def kd_ce_mix(ce_sum: Any, kd_sum: Any, kd_ratio: float) -> Any:
    """``(1 - kd_ratio) * CE + kd_ratio * KD`` (Hinton et al. 2015, sec. 2: the weighted average of the hard-label
    and the soft-target objectives): the one place this formula is written. Works on tensors and floats;
    ``kd_ratio`` has been checked by :func:`check_kd_ratio`."""
    return (1.0 - kd_ratio) * ce_sum + kd_ratio * kd_sum


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------


def _vocab_mismatch_error(v_student: int, v_teacher: int) -> ValueError:
    return ValueError(
        f"teacher/student vocab size mismatch: student has {v_student} output rows, teacher has {v_teacher}. "
        f"Distillation needs the same vocabulary axis. Note that Qwen2.5 models of <=3B parameters have "
        f"{_QWEN_SMALL_ROWS} output rows while 7B/14B/32B/72B have {_QWEN_LARGE_ROWS}; both share the same "
        f"{_QWEN_TOKENIZER_IDS} tokenizer ids, so when mixing sizes slice both logits (or output weights) to "
        f"[..., :{_QWEN_TOKENIZER_IDS}] or use models of the same size class."
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # At least float32 (bf16/fp16 logits are upcast); float64 stays float64 so gradcheck is meaningful.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_logits_labels(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor):
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise _vocab_mismatch_error(student_logits.shape[-1], teacher_logits.shape[-1])
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits shape {tuple(student_logits.shape)} != teacher logits shape "
            f"{tuple(teacher_logits.shape)}"
        )
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(student_logits.shape)} "
            f"(expected labels of shape {tuple(student_logits.shape[:-1])})"
        )


# ----------------------------------------------------------------------------------------------------------
# numerically safe per-row building blocks (inputs: log-probabilities, rows = tokens, last dim = vocab)
# ----------------------------------------------------------------------------------------------------------


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(a || b) = sum_v a_v (log a_v - log b_v)`` with ``0 log 0 = 0``.

    The difference is computed only where ``a > 0`` (double-where: the unselected branch is replaced by 0
    BEFORE the product, so ``-inf - -inf = NaN`` never meets the backward's multiplications).
    """
    a = log_a.exp()
    pos = a > 0
    diff = torch.where(pos, log_a - log_b, torch.zeros((), dtype=log_a.dtype, device=log_a.device))
    return (a * diff).sum(-1)


def _log_m_over_a(log_a: torch.Tensor, log_b: torch.Tensor, w_b: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise ``(a, log(m / a))`` with ``m = (1 - w_b) a + w_b b``, ``0 < w_b < 1``; the log-ratio is
    0 where ``a == 0`` (those entries are always multiplied by ``a``).

    ``log a - log m = -log(w_a + w_b e^d)`` with ``d = log b - log a`` and ``w_a = 1 - w_b``.  Evaluated as
      ``log1p(u) + max(d, 0)`` with ``u = w_b expm1(d)`` (d <= 0) or ``u = w_a expm1(-d)`` (d > 0)
    which is EXACTLY 0 for a == b (d == 0: identical distributions give an exact 0, where a logsumexp
    of the mixture leaves ~1e-8 residue), never overflows and is accurate for small |d|. When
    ``u < -0.5`` the ``1 + u`` would cancel (small w_a or w_b), so there we use the stable
    ``logaddexp(log w_a, log w_b + d)`` instead. Every branch sees only inputs it can handle
    (double-where), so no inf/NaN reaches the backward.
    """
    w_a = 1.0 - w_b
    a = log_a.exp()
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    d = torch.where(a > 0, log_b - log_a, zero)  # finite, or -inf where b == 0 < a
    # (the `del`s keep the fused path, which runs this without a graph, at few live [n, V] buffers)
    d_pos = torch.where(d > 0, d, zero)
    u = torch.where(d > 0, w_a * torch.expm1(-d_pos), w_b * torch.expm1(torch.where(d <= 0, d, zero)))
    use_lae = u < -0.5
    small = torch.log1p(torch.where(use_lae, zero, u)) + d_pos
    del u, d_pos
    lae = torch.logaddexp(
        torch.full((), math.log(w_a), dtype=log_a.dtype, device=log_a.device),
        math.log(w_b) + torch.where(use_lae, d, zero),
    )
    del d
    return a, torch.where(use_lae, lae, small)


def _skew_kl_rows(log_a: torch.Tensor, log_b: torch.Tensor, w_b: float) -> torch.Tensor:
    """Per-row ``KL(a || m) = -sum_v a_v log(m_v / a_v)``, ``m = (1 - w_b) a + w_b b`` (see _log_m_over_a)."""
    a, lr = _log_m_over_a(log_a, log_b, w_b)
    return -(a * lr).sum(-1)


def _soft_ce_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row ``H(p, q) = -sum_v p_v log q_v`` (torchtune ForwardKLLoss number), ``0 log 0 = 0``."""
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_q, torch.zeros((), dtype=log_q.dtype, device=log_q.device))).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# plain and chunked forms
# ----------------------------------------------------------------------------------------------------------

ChunkList = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_chunk_list(x: ChunkList) -> List[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)



class DistillationLoss(torch.nn.Module):
    """Token-level KD divergence between teacher and student logits (sum over valid tokens).

    Args:
        kind: one of ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"``, ``"skew_forward_kl"``,
            ``"skew_reverse_kl"`` (see the module docstring for the formulas and paper equations).
        temperature: ``T > 0``; both logits are divided by ``T`` before the softmax.
        beta: generalized-JSD coefficient in ``[0, 1]`` (TRL/Liger convention, ends special-cased:
            0 -> forward KL, 1 -> reverse KL). Only used by ``kind="jsd"``.
        alpha: skew coefficient in ``[0, 1)`` for the DistiLLM skew KLs (0 -> plain KL).
        scale_by_t2: multiply the divergence by ``T**2`` (Hinton et al. 2015) so gradients keep their scale.
        soft_ce: forward KL only: report the soft cross-entropy ``-sum p log q`` (torchtune's ForwardKLLoss
            number, = KL + H(p)) instead of the true KL. Same gradient w.r.t. the student.
        ignore_index: label value of tokens to exclude (torchtune's CROSS_ENTROPY_IGNORE_IDX = -100).

    ``forward(student_logits [N, V] (or [..., V]), teacher_logits same shape, labels [N] (or [...]))``
    -> ``LossSums(loss_sum 0-dim float32, n_valid 0-dim int64)``. Logits may be any float dtype (bf16 ok);
    the math runs in float32. The teacher logits are detached (the teacher never gets gradients).
    torchtune's chunked outputs (``set_num_output_chunks``) are accepted too: lists of [B, s_i, V] student
    and teacher chunks (same sizes) with labels [B, S], S = sum s_i; only one chunk is upcast at a time.
    The fused form (:class:`FusedKDCELoss`) takes this module as its divergence.
    """

    def __init__(
        self,
        kind: str = "forward_kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        scale_by_t2: bool = True,
        soft_ce: bool = False,
        ignore_index: int = -100,
    ):
        super().__init__()
        # the one check of the options (kd.losses.components.check_kd_loss turns its ValueError into the config's
        # one-line error): every message starts with the option's name
        if kind not in KINDS:
            close = difflib.get_close_matches(str(kind), KINDS, n=1, cutoff=0.5)
            raise ValueError(f"kind={kind!r} is not a distillation kind"
                             f"{' (did you mean ' + repr(close[0]) + '?)' if close else ''}; valid: {', '.join(KINDS)}")
        temperature = _option_float("temperature", temperature)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        beta = _option_float("beta", beta)
        if not (0.0 <= beta <= 1.0):
            raise ValueError(f"beta must be >= 0 and <= 1, got {beta}")
        alpha = _option_float("alpha", alpha)
        if not (0.0 <= alpha < 1.0):
            raise ValueError(f"alpha must be >= 0 and < 1, got {alpha}")
        if soft_ce and kind != "forward_kl":
            raise ValueError(f"soft_ce=True only applies to kind='forward_kl', got kind={kind!r}")
        self.kind = kind
        self.temperature = temperature
        self.beta = beta
        self.alpha = alpha
        self.scale_by_t2 = bool(scale_by_t2)
        self.soft_ce = bool(soft_ce)
        self.ignore_index = int(ignore_index)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, temperature={self.temperature}, beta={self.beta}, alpha={self.alpha}, "
            f"scale_by_t2={self.scale_by_t2}, soft_ce={self.soft_ce}, ignore_index={self.ignore_index}"
        )

    # -- core, shared by all three forms --------------------------------------------------------------
    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        # logits already in the compute dtype and masked; dividing by a Python float keeps dtype.
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return F.log_softmax(logits, dim=-1)

    def _divergence_from_log_probs(self, log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """Per-row divergence (no T**2 factor, no masking) from student/teacher log-probs [N, V]."""
        kind = self.kind
        if kind == "forward_kl":
            return _soft_ce_rows(log_p, log_q) if self.soft_ce else _kl_rows(log_p, log_q)
        if kind == "reverse_kl":
            return _kl_rows(log_q, log_p)
        if kind == "jsd":
            b = self.beta
            if b == 0.0:  # TRL/Liger special case: forward KL
                return _kl_rows(log_p, log_q)
            if b == 1.0:  # TRL/Liger special case: reverse KL
                return _kl_rows(log_q, log_p)
            # m = b p + (1-b) q: KL(p||m) has weight (1-b) on the "other" (q); KL(q||m) has weight b on p.
            return b * _skew_kl_rows(log_p, log_q, 1.0 - b) + (1.0 - b) * _skew_kl_rows(log_q, log_p, b)
        if kind == "skew_forward_kl":
            if self.alpha == 0.0:
                return _kl_rows(log_p, log_q)
            return _skew_kl_rows(log_p, log_q, 1.0 - self.alpha)  # m = alpha p + (1-alpha) q
        if kind == "skew_reverse_kl":
            if self.alpha == 0.0:
                return _kl_rows(log_q, log_p)
            return _skew_kl_rows(log_q, log_p, 1.0 - self.alpha)  # m = alpha q + (1-alpha) p
        raise AssertionError(kind)

    @property
    def _t2(self) -> float:
        return self.temperature**2 if self.scale_by_t2 else 1.0

    def _rows(
        self, student: torch.Tensor, teacher: torch.Tensor, want_true_kl: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-row scaled divergence for MASKED (zeroed invalid rows), compute-dtype logits [n, V].

        Returns ``(div_rows [n] incl. T**2, true_kl_rows [n] detached without T**2 or None)``.
        """
        log_q = self._log_probs(student)
        log_p = self._log_probs(teacher)
        div = self._divergence_from_log_probs(log_q, log_p)
        t2 = self._t2
        if t2 != 1.0:
            div = div * t2
        kl = None
        if want_true_kl:
            with torch.no_grad():
                if self.kind == "forward_kl" and not self.soft_ce:
                    kl = div.detach() / t2 if t2 != 1.0 else div.detach()
                else:
                    kl = _kl_rows(log_p.detach(), log_q.detach())
        return div, kl

    @torch.no_grad()
    def _rows_and_grad(
        self, student: torch.Tensor, teacher: torch.Tensor, log_q: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused-path helper (no autograd graph, to keep only a few [n, V] buffers alive).

        Inputs: masked compute-dtype logits [n, V] (and optionally the student's log_softmax(z / T)).
        Returns ``(div_rows [n] incl. T**2, true_kl_rows [n] without T**2, d(div_rows.sum())/d student [n, V])``.
        Values come from the same row functions as :meth:`_rows`; the gradient is analytic:
        with ``G = dL/dlog q``, ``dL/dz = (G - q * sum_v G) / T`` (softmax Jacobian), and
          forward KL (and soft CE): ``G = -p``
          reverse KL:               ``G = q (log q - log p)``
          skew forward KL:          ``G = -(1 - alpha) p q / m``,            m = alpha p + (1 - alpha) q
          skew reverse KL:          ``G = q (log(q/m) - alpha q / m)`` (+q, cancels), m = alpha q + (1-alpha) p
          generalized JSD:          ``G = (1 - beta) q log(q / m)``,          m = beta p + (1 - beta) q
        """
        if log_q is None:
            log_q = self._log_probs(student)
        log_p = self._log_probs(teacher)
        zero = torch.zeros((), dtype=log_q.dtype, device=log_q.device)
        q = log_q.exp()
        kind, b, al = self.kind, self.beta, self.alpha
        if kind == "jsd" and b == 0.0 or kind == "skew_forward_kl" and al == 0.0:
            kind = "forward_kl"
        if kind == "jsd" and b == 1.0 or kind == "skew_reverse_kl" and al == 0.0:
            kind = "reverse_kl"
        true_kl = _kl_rows(log_p, log_q)
        if kind == "forward_kl":
            div = _soft_ce_rows(log_p, log_q) if self.soft_ce else true_kl.clone()
            G = -log_p.exp()
        elif kind == "reverse_kl":
            diff = torch.where(q > 0, log_q - log_p, zero)
            G = q * diff
            del diff
            div = G.sum(-1)
        elif kind == "skew_forward_kl":
            p, lr = _log_m_over_a(log_p, log_q, 1.0 - al)  # lr = log(m / p)
            div = -(p * lr).sum(-1)
            # p q / m = q * exp(-lr) where p > 0, else 0
            G = torch.where(p > 0, q * torch.exp(-lr), zero).mul_(-(1.0 - al))
            del p, lr
        elif kind == "skew_reverse_kl":
            _, lr = _log_m_over_a(log_q, log_p, 1.0 - al)  # lr = log(m / q)
            div = -(q * lr).sum(-1)
            G = torch.where(q > 0, q * (-lr - al * torch.exp(-lr)), zero)
            del lr
        elif kind == "jsd":
            p, lrp = _log_m_over_a(log_p, log_q, 1.0 - b)  # log(m / p)
            div = b * -(p * lrp).sum(-1)
            del p, lrp
            _, lrq = _log_m_over_a(log_q, log_p, b)  # log(m / q)
            G = q * lrq
            div = div + (1.0 - b) * -G.sum(-1)
            G.mul_(-(1.0 - b))
            del lrq
        else:  # pragma: no cover
            raise AssertionError(kind)
        # softmax Jacobian and the 1/T of z/T; T**2 factor on value and gradient
        t2 = self._t2
        grad = G.sub_(q * G.sum(-1, keepdim=True)).mul_(t2 / self.temperature)
        return div * t2 if t2 != 1.0 else div, true_kl, grad

    def forward(self, student_logits: ChunkList, teacher_logits: ChunkList, labels: torch.Tensor) -> LossSums:
        if isinstance(student_logits, torch.Tensor) and isinstance(teacher_logits, torch.Tensor):
            return self._plain(student_logits, teacher_logits, labels)
        sc, tc = _as_chunk_list(student_logits), _as_chunk_list(teacher_logits)
        if len(sc) != len(tc):
            raise ValueError(f"got {len(sc)} student chunks but {len(tc)} teacher chunks")
        if len(sc) == 0:
            raise ValueError("no chunks given")
        for i, (s, t) in enumerate(zip(sc, tc)):
            if s.shape[-1] != t.shape[-1]:
                raise _vocab_mismatch_error(s.shape[-1], t.shape[-1])
            if s.shape != t.shape:
                raise ValueError(f"chunk {i}: student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}")
        parts = [self._plain(s, t, lab) for s, t, lab in zip(sc, tc, _split_labels(sc, labels, "student"))]
        return LossSums(sum(p.loss_sum for p in parts), sum(p.n_valid for p in parts))

    def _plain(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> LossSums:
        _check_logits_labels(student_logits, teacher_logits, labels)
        V = student_logits.shape[-1]
        s = student_logits.reshape(-1, V)
        t = teacher_logits.detach().reshape(-1, V)
        lab = labels.reshape(-1)
        valid = lab != self.ignore_index
        cd = _compute_dtype(s.dtype)
        s, t = _mask_rows(s, valid, cd), _mask_rows(t, valid, cd)
        div, _ = self._rows(s, t)
        zero = torch.zeros((), dtype=div.dtype, device=div.device)
        return LossSums(torch.where(valid, div, zero).sum(), valid.sum())


def _mask_rows(x: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Upcast and zero the invalid rows (so inf/NaN there can't leak into values or gradients)."""
    return torch.where(valid.unsqueeze(-1), x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def check_label_range(labels: torch.Tensor, valid: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Targets must be ``ignore_index`` or in ``[0, vocab)``, as ``F.cross_entropy`` requires: on CPU an
    out-of-range label raises ``IndexError`` naming it (like torch); on CUDA a device-side assert fires
    (like torch's kernel), so there is no host sync."""
    ok = ((labels >= 0) & (labels < vocab)) | ~valid
    msg = f"Target out of bounds: labels must be in [0, {vocab}) or ignore_index={ignore_index}"
    if labels.device.type == "cpu":
        if not bool(ok.all()):
            bad = int(labels[~ok][0])
            raise IndexError(f"Target {bad} is out of bounds: labels must be in [0, {vocab}) or "
                             f"ignore_index={ignore_index}")
    else:
        torch._assert_async(ok.all(), msg)


def _ce_rows(logits_masked: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row hard-label CE (T = 1) on masked compute-dtype logits; 0 on invalid rows. The caller has
    checked the valid labels' range (:func:`check_label_range`), so none is silently ignored by torch's own
    default ignore_index (-100)."""
    safe_labels = torch.where(valid, labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    ce = F.cross_entropy(logits_masked, safe_labels, reduction="none", ignore_index=-(2**62))
    return torch.where(valid, ce, torch.zeros((), dtype=ce.dtype, device=ce.device))


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> LossSums:
    """Hard-label cross-entropy SUM over valid tokens (T = 1, computed in float32).

    Args:
        logits: [N, V] (or [..., V]) student logits, any float dtype.
        labels: [N] (or [...]) int64 targets; ``ignore_index`` marks excluded tokens.
    Returns: ``LossSums(loss_sum 0-dim float32, n_valid 0-dim int64)``.
    """
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)} "
            f"(expected labels of shape {tuple(logits.shape[:-1])})"
        )
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    lab = labels.reshape(-1)
    valid = lab != ignore_index
    check_label_range(lab, valid, V, ignore_index)
    z = _mask_rows(z, valid, _compute_dtype(z.dtype))
    return LossSums(_ce_rows(z, lab, valid).sum(), valid.sum())


# ----------------------------------------------------------------------------------------------------------
# chunked form (torchtune TransformerDecoder.set_num_output_chunks)
# ----------------------------------------------------------------------------------------------------------

def _split_labels(chunks: List[torch.Tensor], labels: torch.Tensor, what: str) -> Tuple[torch.Tensor, ...]:
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, S], got shape {tuple(labels.shape)}")
    sizes = []
    for i, c in enumerate(chunks):
        if c.dim() != 3:
            raise ValueError(f"{what} chunk {i} must be [B, s_i, V], got shape {tuple(c.shape)}")
        if c.shape[0] != labels.shape[0]:
            raise ValueError(f"{what} chunk {i} has batch {c.shape[0]} but labels have batch {labels.shape[0]}")
        sizes.append(c.shape[1])
    if sum(sizes) != labels.shape[1]:
        raise ValueError(
            f"{what} chunk lengths {sizes} sum to {sum(sizes)} but labels have sequence length {labels.shape[1]}"
        )
    # Split by the ACTUAL chunk sizes: correct whether the model used .chunk (torchtune 0.6.1) or
    # tensor_split (other versions), whose size patterns differ (e.g. S=47, n=5: 10,10,10,10,7 vs 10,10,9,9,9).
    return labels.split(sizes, dim=1)


def chunked_cross_entropy_sum(chunks: ChunkList, labels: torch.Tensor, ignore_index: int = -100) -> LossSums:
    """Hard-label CE SUM over torchtune chunked logits (list of [B, s_i, V]) with labels [B, S]."""
    cl = _as_chunk_list(chunks)
    if len(cl) == 0:
        raise ValueError("no chunks given")
    total, n = None, None
    for c, lab in zip(cl, _split_labels(cl, labels, "logits")):
        out = cross_entropy_sum(c, lab, ignore_index)
        total = out.loss_sum if total is None else total + out.loss_sum
        n = out.n_valid if n is None else n + out.n_valid
    return LossSums(total, n)


class ChunkedCrossEntropyLoss(torch.nn.Module):
    """The CE term of ``loss_form: chunked`` as a config component (``loss: _component_:
    kd.losses.distillation.ChunkedCrossEntropyLoss``): :func:`chunked_cross_entropy_sum` as a module.

    ``forward(chunks: list of [B, s_i, V] (or one [B, S, V]), labels [B, S]) -> LossSums`` (a SUM, unlike
    torchtune's ``CEWithChunkedOutputLoss``, which returns the mean over the micro-batch's valid tokens)."""

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, chunks: ChunkList, labels: torch.Tensor) -> LossSums:
        return chunked_cross_entropy_sum(chunks, labels, self.ignore_index)


def _as_sum(out: Union[LossSums, torch.Tensor], n_valid: torch.Tensor) -> torch.Tensor:
    """kd's losses return :class:`LossSums`; torchtune's (``CEWithChunkedOutputLoss``,
    ``ForwardKLWithChunkedOutputLoss``, ...) return the MEAN over the micro-batch's valid tokens, so the mean
    times the micro-batch's count is the sum. (A micro-batch without any valid token makes torchtune's CE 0/0 =
    NaN; the non-finite guard then stops the run. kd's components return 0 there.)"""
    if isinstance(out, LossSums):
        return out.loss_sum
    return out * n_valid.to(out.dtype)


@torch.no_grad()
def _chunked_kl_agree(sc: List[torch.Tensor], tc: List[torch.Tensor], labels: torch.Tensor, temperature: float,
                      ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logged metrics of the chunked form: true forward KL sum at ``temperature`` (no T**2) and top-1 agreement."""
    kl = DistillationLoss("forward_kl", temperature=temperature, scale_by_t2=False, ignore_index=ignore_index)
    agree = torch.zeros((), dtype=torch.long, device=labels.device)
    for s, t, lab in zip(sc, tc, _split_labels(sc, labels, "student")):
        agree += ((s.argmax(-1) == t.argmax(-1)) & (lab != ignore_index)).sum()
    return kl(sc, tc, labels).loss_sum, agree


def chunked_kd_ce(
    student_chunks: ChunkList,
    teacher_chunks: Optional[ChunkList],
    labels: torch.Tensor,
    *,
    ce_loss: torch.nn.Module,
    kd_loss: torch.nn.Module,
    kd_ratio: float,
    ignore_index: int = -100,
) -> KDCEResult:
    """The ``loss_form: chunked`` step: ``ce_loss`` and ``kd_loss`` exactly as the config names them (kd's or
    torchtune's chunked losses), on torchtune's chunked logits, mixed by :func:`kd_ce_mix`.

    student_chunks / teacher_chunks: lists of [B, s_i, V] (teacher None: CE only, kd_ratio must be 0);
    labels [B, S] shifted. Returns :class:`KDCEResult` with SUMS (torchtune's means are multiplied by the
    micro-batch's valid count, :func:`_as_sum`); ``kl_sum`` / ``n_agree`` at ``kd_loss.temperature`` (1 for
    torchtune's losses, which have none)."""
    kd_ratio = check_kd_ratio(kd_ratio)
    sc = _as_chunk_list(student_chunks)
    n_valid = (labels != ignore_index).sum()
    ce = _as_sum(ce_loss(sc, labels), n_valid)
    if teacher_chunks is None:
        if kd_ratio > 0:
            raise ValueError("kd_ratio > 0 needs teacher logits")
        zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
        return KDCEResult(kd_ce_mix(ce, zero, kd_ratio), ce.detach(), zero, zero, n_valid, n_valid.new_zeros(()))
    tc = _as_chunk_list(teacher_chunks)
    kd = _as_sum(kd_loss(sc, tc, labels), n_valid)
    kl, agree = _chunked_kl_agree(sc, tc, labels, float(getattr(kd_loss, "temperature", 1.0)), ignore_index)
    return KDCEResult(kd_ce_mix(ce, kd, kd_ratio), ce.detach(), kd.detach(), kl, n_valid, agree)


# ----------------------------------------------------------------------------------------------------------
# fused-linear form
# ----------------------------------------------------------------------------------------------------------


def _detached_leaf(x: Optional[torch.Tensor], requires_grad: bool) -> Optional[torch.Tensor]:
    if x is None:
        return None
    y = x.detach()
    if requires_grad:
        y.requires_grad_(True)
    return y


def _ce_chunk(zm, lab, valid, kd_ratio: float, want_ce_grad: bool):
    """Hard-label CE at T = 1 on masked compute-dtype logits [n, V]: value ``-log_softmax[label]``, grad
    ``softmax - onehot`` (scaled by ``1 - kd_ratio``, 0 on invalid rows). Returns (log_softmax, ce_sum, dz|None)."""
    zero = torch.zeros((), dtype=zm.dtype, device=zm.device)
    lsm = F.log_softmax(zm, dim=-1)
    safe_lab = torch.where(valid, lab, torch.zeros((), dtype=lab.dtype, device=lab.device))
    ce_rows = -lsm.gather(1, safe_lab.unsqueeze(1)).squeeze(1)
    ce_c = torch.where(valid, ce_rows, zero).sum()
    dz = None
    if want_ce_grad:
        dz = lsm.exp()
        dz.scatter_add_(1, safe_lab.unsqueeze(1), torch.full_like(ce_rows, -1.0).unsqueeze(1))
        dz = dz * ((1.0 - kd_ratio) * valid.unsqueeze(1).to(zm.dtype))
    return lsm, ce_c, dz


def _sparse_chunk_math_eager(loss, z, ids, w, top1, ent, lab, valid, kd_ratio: float, want_ce_grad: bool,
                             want_kd_grad: bool):
    """The fused loss on one chunk with SPARSE cached teacher targets (Random-Sampling KD, Anshumann et al.
    2025, eq. 3): no [n, V] teacher logits exist, only ``ids`` [n, K] and ``w`` [n, K] (p_hat = counts/K).

    Per valid row, with ``q = softmax(z / T)``::

        H_hat(p, q) = -sum_j w_j log q_{ids_j}              (sparse soft CE, E[H_hat] = H(p, q))
        kd_row      = T**2 * (H_hat - H(p))                 (soft_ce=False: an unbiased KL estimate)
        d kd_row/dz = T * (q * sum_j w_j - scatter(w))      (= T (q - p_hat): E = the forward-KL gradient)

    ``ent`` [n] is the cached teacher entropy H(p_T), ``top1`` [n] its argmax. Returns the same tuple as
    :func:`chunk_math_eager`."""
    cd = _compute_dtype(z.dtype)
    zm = _mask_rows(z, valid, cd)
    zero = torch.zeros((), dtype=cd, device=z.device)
    lsm, ce_c, dz = _ce_chunk(zm, lab, valid, kd_ratio, want_ce_grad)
    T = loss.temperature
    log_q = lsm if T == 1.0 else F.log_softmax(zm / T, dim=-1)
    w = torch.where(valid.unsqueeze(1), w.to(cd), zero)
    # 0 * log q at an unused slot (id 0) must stay 0 even where log q = -inf
    sel = torch.where(w > 0, log_q.gather(1, ids), zero)
    h_hat = -(w * sel).sum(-1)
    kl_rows = torch.where(valid, h_hat - ent.to(cd), zero)
    div = torch.where(valid, h_hat, zero) if loss.soft_ce else kl_rows
    t2 = loss._t2
    kd_c = div.sum() * t2
    kl_c = kl_rows.sum()
    agree_c = ((zm.argmax(-1) == top1) & valid).sum()
    if want_kd_grad:
        g = log_q.exp().mul_(w.sum(-1, keepdim=True))
        g.scatter_add_(1, ids, -w)
        g = g * (kd_ratio * t2 / T)
        dz = g if dz is None else dz + g
    return ce_c, kd_c, kl_c, agree_c, dz


def sparse_soft_ce_sum(student_logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       labels: torch.Tensor, temperature: float = 1.0, ignore_index: int = -100) -> LossSums:
    """Plain (differentiable, materialised-logits) Random-Sampling KD loss, for tests and small models:
    ``sum_valid -sum_j weights_j log softmax(z / T)_{ids_j}`` (no T**2, no entropy term).

    student_logits [N, V]; ids [N, K] int64; weights [N, K] (p_hat = counts / K); labels [N]."""
    valid = labels.reshape(-1) != ignore_index
    V = student_logits.shape[-1]
    z = _mask_rows(student_logits.reshape(-1, V), valid, _compute_dtype(student_logits.dtype))
    log_q = F.log_softmax(z / temperature, dim=-1)
    w = torch.where(valid.unsqueeze(1), weights.to(z.dtype), torch.zeros((), dtype=z.dtype))
    sel = torch.where(w > 0, log_q.gather(1, ids), torch.zeros((), dtype=z.dtype))
    return LossSums(-(w * sel).sum(), valid.sum())


def chunk_math_eager(loss, z, t, lab, valid, kd_ratio: float, want_ce_grad: bool, want_kd_grad: bool):
    """Everything the fused loss computes on one [n, V] chunk, without autograd (pure function).

    z: student logits [n, V] (any float dtype), t: teacher logits [n, V] or None, lab/valid: [n].
    Returns (ce_sum, kd_sum, true_kl_sum, n_agree, dloss/dz [n, V] in the compute dtype or None), where
    dz = (1 - kd_ratio) * dCE/dz + kd_ratio * dKD/dz on valid rows (0 elsewhere).
    """
    cd = _compute_dtype(z.dtype)
    zm = _mask_rows(z, valid, cd)
    zero = torch.zeros((), dtype=cd, device=z.device)
    lsm, ce_c, dz = _ce_chunk(zm, lab, valid, kd_ratio, want_ce_grad)
    vmask = valid.unsqueeze(1).to(cd)
    if t is None:
        return ce_c, torch.zeros((), dtype=cd, device=z.device), torch.zeros((), dtype=cd, device=z.device), \
            torch.zeros((), dtype=torch.long, device=z.device), dz
    tm = _mask_rows(t, valid, cd)
    # reuse the CE log-softmax as the KD student log-probs when T == 1
    div, kl, g_kd = loss._rows_and_grad(zm, tm, log_q=lsm if loss.temperature == 1.0 else None)
    kd_c = torch.where(valid, div, zero).sum()
    kl_c = torch.where(valid, kl, zero).sum()
    # masked rows are all-zero in both (argmax 0 == 0), so count only valid rows
    agree_c = ((zm.argmax(-1) == tm.argmax(-1)) & valid).sum()
    if want_kd_grad:
        g_kd = g_kd * (kd_ratio * vmask)
        dz = g_kd if dz is None else dz + g_kd
    return ce_c, kd_c, kl_c, agree_c, dz


_COMPILED = {"fn": None, "sparse_fn": None, "broken": False}


def _chunk_math(loss, device: torch.device, full_chunk: bool = True, sparse: bool = False):
    """The per-chunk math, ``torch.compile``d on CUDA (a few fused kernels per chunk instead of ~20
    element-wise passes over [chunk, V] float32 buffers); eager elsewhere or with KD_FUSED_COMPILE=0.
    Same function either way (the CPU tests check the eager one against float64 references).
    ``sparse``: the cached-targets variant (:func:`_sparse_chunk_math_eager`)."""
    eager = _sparse_chunk_math_eager if sparse else chunk_math_eager
    key = "sparse_fn" if sparse else "fn"
    off = os.environ.get("KD_FUSED_COMPILE", "1") == "0" or _COMPILED["broken"] or kernels.forced_eager()
    if device.type != "cuda" or not full_chunk or off:
        return functools.partial(eager, loss)
    if _COMPILED[key] is None:
        _COMPILED[key] = torch.compile(eager, dynamic=False)
    return functools.partial(_chunk_math_compiled, key, eager, loss)


def _chunk_math_compiled(key, eager, loss, *args):
    if not _COMPILED["broken"]:
        try:
            return _COMPILED[key](loss, *args)
        except Exception as e:  # pragma: no cover - no working compiler: fall back once, loudly
            logging.getLogger(__name__).warning(f"torch.compile of the fused loss failed ({e}); using eager")
            _COMPILED["broken"] = True
    return eager(loss, *args)


class _FusedPlan(NamedTuple):
    """Everything :class:`_FusedLinearKDFunction` needs besides the four student tensors that may get
    gradients (those are the Function's positional inputs, so autograd tracks them). Built and checked by
    :func:`fused_linear_kd_ce`; frozen (a NamedTuple), so one call cannot change the next one's plan."""

    labels: torch.Tensor  # [N] int64
    loss: "DistillationLoss"
    kd_ratio: float
    lora_scale: float
    chunk_size: int
    bounds: Tuple[Tuple[int, int, int, int], ...]  # (start, end, teacher_list_idx, offset_in_that_chunk)
    need: Tuple[bool, bool, bool, bool]  # grads wanted for (hidden, weight, lora_a, lora_b)
    teacher_hidden: Optional[torch.Tensor] = None  # [N, Ht]
    teacher_weight: Optional[torch.Tensor] = None  # [V, Ht] (never gets a grad)
    teacher_logits: Optional[Union[torch.Tensor, List[torch.Tensor]]] = None  # [N, V] or [n_i, V] row chunks
    sparse: Optional[SparseTargets] = None  # cached targets (N rows)
    sampler: Optional[TeacherSampler] = None
    samples: Optional[TeacherSamples] = None  # with a sampler: the buffers the draws are written into

    @property
    def has_live_teacher(self) -> bool:
        return self.teacher_logits is not None or self.teacher_hidden is not None


class _Acc:
    """The running sums of one fused call (float32; grads of the weights in float32, the hidden grad in the
    input dtype: its rows are disjoint per chunk, so it is written in place)."""

    def __init__(self, h: torch.Tensor, w: torch.Tensor, a, b, plan: _FusedPlan):
        dev, f32 = h.device, _compute_dtype(h.dtype)
        self.ce, self.kd, self.kl = (torch.zeros((), dtype=f32, device=dev) for _ in range(3))
        self.n_valid = torch.zeros((), dtype=torch.long, device=dev)
        self.n_agree = torch.zeros((), dtype=torch.long, device=dev)
        need_h, need_w, need_a, need_b = plan.need
        self.grads = [
            torch.zeros_like(h) if need_h else None,
            torch.zeros(w.shape, dtype=f32, device=dev) if need_w else None,
            torch.zeros(a.shape, dtype=f32, device=dev) if need_a else None,
            torch.zeros(b.shape, dtype=f32, device=dev) if need_b else None,
        ]
        self.samples = plan.samples


def _teacher_chunk(plan: _FusedPlan, start: int, end: int, t_idx: int, t_off: int, acc: _Acc):
    """The teacher logits [end - start, V] of one chunk (never part of the graph), or None; with a sampler
    also the cache draws from them (the logits this chunk has anyway)."""
    if not plan.has_live_teacher:
        return None
    with torch.no_grad():
        tl = plan.teacher_logits
        if tl is None:
            t = F.linear(plan.teacher_hidden[start:end], plan.teacher_weight)
        elif isinstance(tl, torch.Tensor):
            t = tl[start:end]
        else:
            t = tl[t_idx][t_off : t_off + (end - start)]
        t = t.detach()  # masked and upcast inside _chunk_math
        sp = plan.sampler
        if sp is not None:
            ids_c, pr_c, ent_c, top_c = sample_teacher_rows(t, sp.row_seeds[start:end], sp.k, sp.temperature,
                                                            sp.sampling)
            out = acc.samples
            out.ids[start:end] = ids_c
            if pr_c.numel():
                out.probs[start:end] = pr_c
            out.entropy[start:end] = ent_c
            out.top1[start:end] = top_c
    return t


def _chunk_forward(plan: _FusedPlan, leaves, hidden: torch.Tensor, start: int, end: int, t, acc: _Acc) -> None:
    """One chunk: student logits (only the projection under autograd: it saves h and refs to W/A/B, not
    [chunk, V]), the loss numbers and d loss / d logits without a graph (:func:`_chunk_math`), then the
    gradients w.r.t. the student inputs, accumulated into ``acc``."""
    W, A, B = leaves
    need_h = plan.need[0]
    any_grad = any(plan.need)
    lab = plan.labels[start:end]
    valid = lab != plan.loss.ignore_index
    acc.n_valid += valid.sum()
    h = _detached_leaf(hidden[start:end], need_h)
    with torch.enable_grad() if any_grad else torch.no_grad():
        z = F.linear(h, W)
        if A is not None:  # torchtune LoRALinear on the output projection: base(x) + scale * B(A(x))
            z = z + plan.lora_scale * F.linear(F.linear(h, A), B)
    want_ce = plan.kd_ratio != 1.0 and any_grad
    want_kd = plan.kd_ratio != 0.0 and any_grad
    # Full chunks share one compiled graph (static shapes); the ragged last chunk runs eagerly rather than
    # recompiling for every batch's token count.
    full = end - start == plan.chunk_size
    with torch.no_grad():
        if plan.sparse is not None:
            sp = plan.sparse
            math_fn = _chunk_math(plan.loss, h.device, full_chunk=full, sparse=True)
            ce_c, kd_c, kl_c, agree_c, dz = math_fn(
                z.detach(), sp.ids[start:end], sp.weights[start:end], sp.top1[start:end], sp.entropy[start:end],
                lab, valid, plan.kd_ratio, want_ce, want_kd)
        else:
            math_fn = _chunk_math(plan.loss, h.device, full_chunk=full)
            ce_c, kd_c, kl_c, agree_c, dz = math_fn(z.detach(), t, lab, valid, plan.kd_ratio, want_ce, want_kd)
    acc.ce += ce_c
    acc.kd += kd_c
    acc.kl += kl_c
    acc.n_agree += agree_c
    if dz is None:
        return
    inputs = (h, W, A, B)
    wrt = [x for x, n in zip(inputs, plan.need) if n]
    grads = iter(torch.autograd.grad(z, wrt, grad_outputs=dz.to(z.dtype), allow_unused=True))
    for i, n in enumerate(plan.need):
        if not n:
            continue
        g = next(grads)
        if g is None:
            continue
        if i == 0:
            acc.grads[0][start:end] = g.to(acc.grads[0].dtype)
        else:
            acc.grads[i] += g.to(acc.grads[i].dtype)


class _FusedLinearKDFunction(torch.autograd.Function):
    """Liger-style chunked loss: the whole loss AND its gradients are computed in the forward, one token
    chunk at a time, so only [chunk, V] logits ever exist; backward scales the stored grads.

    ``apply(student_hidden [N, Hs], student_weight [V, Hs], lora_a [r, Hs] | None, lora_b [V, r] | None,
    plan: _FusedPlan)`` -> ``(loss_sum, ce_sum, kd_sum, kl_sum, n_valid, n_agree)``."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, lora_a, lora_b, plan: _FusedPlan):
        if plan.kd_ratio != 1.0:  # the CE term indexes the logits by label: same range rule as F.cross_entropy
            ii = plan.loss.ignore_index
            check_label_range(plan.labels, plan.labels != ii, student_weight.shape[0], ii)
        acc = _Acc(student_hidden, student_weight, lora_a, lora_b, plan)
        leaves = tuple(_detached_leaf(x, n) for x, n in zip((student_weight, lora_a, lora_b), plan.need[1:]))
        for start, end, t_idx, t_off in plan.bounds:
            t = _teacher_chunk(plan, start, end, t_idx, t_off, acc)
            _chunk_forward(plan, leaves, student_hidden, start, end, t, acc)
            del t  # free the chunk's [chunk, V] teacher logits before the next chunk
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in acc.grads))
        ctx.need = plan.need
        ctx.dtypes = tuple(x.dtype if x is not None else None for x in (student_hidden, student_weight, lora_a, lora_b))
        loss_sum = kd_ce_mix(acc.ce, acc.kd, plan.kd_ratio)
        ctx.mark_non_differentiable(acc.ce, acc.kd, acc.kl, acc.n_valid, acc.n_agree)
        return loss_sum, acc.ce, acc.kd, acc.kl, acc.n_valid, acc.n_agree

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        out = []
        for g, n, dt in zip(ctx.saved_tensors, ctx.need, ctx.dtypes):
            if not n or grad_loss is None:
                out.append(None)
            else:
                # scale in float32 then return in the input's dtype
                out.append((g.to(torch.float32 if g.dtype != torch.float64 else g.dtype) * grad_loss).to(dt))
        return (*out, None)  # no gradient for the plan


def _check_student(student_hidden, student_weight, labels, student_lora):
    """Flattened student inputs ``(h [N, Hs], labels [N], A, B, scale)`` after the shape checks."""
    if student_hidden.dim() < 2:
        raise ValueError(f"student_hidden must be [N, Hs], got shape {tuple(student_hidden.shape)}")
    Hs = student_hidden.shape[-1]
    h2 = student_hidden.reshape(-1, Hs)
    N = h2.shape[0]
    if student_weight.dim() != 2 or student_weight.shape[1] != Hs:
        raise ValueError(f"student_weight must be [V, Hs={Hs}], got shape {tuple(student_weight.shape)}")
    V = student_weight.shape[0]
    lab = labels.reshape(-1)
    if lab.shape[0] != N:
        raise ValueError(f"labels have {lab.shape[0]} tokens but student_hidden has {N} rows")
    if student_lora is None:
        return h2, lab, None, None, 0.0
    A, B, scale = student_lora
    if A.dim() != 2 or A.shape[1] != Hs:
        raise ValueError(f"LoRA A must be [r, Hs={Hs}], got shape {tuple(A.shape)}")
    if B.dim() != 2 or B.shape != (V, A.shape[0]):
        raise ValueError(f"LoRA B must be [V={V}, r={A.shape[0]}], got shape {tuple(B.shape)}")
    return h2, lab, A, B, float(scale)


def _check_teacher_hidden(teacher_hidden, teacher_weight, N: int, V: int) -> Optional[torch.Tensor]:
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("teacher_hidden and teacher_weight must be given together")
    if teacher_hidden is None:
        return None
    Ht = teacher_hidden.shape[-1]
    th = teacher_hidden.detach().reshape(-1, Ht)
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != Ht:
        raise ValueError(f"teacher_weight must be [V, Ht={Ht}], got shape {tuple(teacher_weight.shape)}")
    if teacher_weight.shape[0] != V:
        raise _vocab_mismatch_error(V, teacher_weight.shape[0])
    if th.shape[0] != N:
        raise ValueError(f"teacher_hidden has {th.shape[0]} rows but student_hidden has {N}")
    return th


def _teacher_logit_bounds(teacher_logits, N: int, V: int, chunk_size: int):
    """``(teacher logits as [N, V] or a list of [n_i, V] row chunks (detached) or None, chunk bounds)``;
    a list's chunks are each subdivided by ``chunk_size``."""
    if teacher_logits is None or isinstance(teacher_logits, torch.Tensor):
        tl = None
        if teacher_logits is not None:
            if teacher_logits.shape[-1] != V:
                raise _vocab_mismatch_error(V, teacher_logits.shape[-1])
            tl = teacher_logits.detach().reshape(-1, V)
            if tl.shape[0] != N:
                raise ValueError(f"teacher_logits have {tl.shape[0]} rows but student_hidden has {N}")
        return tl, tuple((s, min(s + chunk_size, N), 0, 0) for s in range(0, N, chunk_size))
    tl = []
    for i, c in enumerate(teacher_logits):
        if c.dim() != 2:
            raise ValueError(
                f"teacher_logits list items must be [n_i, V] row chunks of the flattened [N, V] logits; "
                f"item {i} has shape {tuple(c.shape)} (flatten torchtune [B, s_i, V] chunks is NOT "
                f"row-contiguous, concatenate/flatten first)"
            )
        if c.shape[-1] != V:
            raise _vocab_mismatch_error(V, c.shape[-1])
        tl.append(c.detach())
    if sum(c.shape[0] for c in tl) != N:
        raise ValueError(
            f"teacher_logits row chunks {[c.shape[0] for c in tl]} sum to {sum(c.shape[0] for c in tl)} "
            f"rows but student_hidden has {N}"
        )
    bounds, s = [], 0
    for i, c in enumerate(tl):
        for off in range(0, c.shape[0], chunk_size):
            bounds.append((s + off, s + min(off + chunk_size, c.shape[0]), i, off))
        s += c.shape[0]
    return tl, tuple(bounds)


def _check_sparse_and_sampler(loss, teacher_sparse, teacher_sampler, live: bool, N: int) -> None:
    if teacher_sparse is not None:
        if live:
            raise ValueError("give either a live teacher (hidden/logits) or teacher_sparse targets, not both")
        if loss.kind != "forward_kl":
            raise ValueError(
                f"kind={loss.kind!r} needs the full teacher distribution, but a teacher cache holds only K "
                "sampled token ids per position: use kind='forward_kl' (the sparse soft cross-entropy of "
                "Random-Sampling KD) or train online without teacher_cache")
        ids, w = teacher_sparse.ids, teacher_sparse.weights
        if ids.shape[0] != N or w.shape != ids.shape or teacher_sparse.top1.shape[0] != N \
                or teacher_sparse.entropy.shape[0] != N:
            raise ValueError(f"teacher_sparse must hold {N} rows (ids/weights [N, K], top1/entropy [N]); got "
                             f"ids {tuple(ids.shape)}, weights {tuple(w.shape)}")
    if teacher_sampler is not None and not live:
        raise ValueError("teacher_sampler needs a live teacher (teacher_hidden + teacher_weight or teacher_logits)")
    if teacher_sampler is not None and teacher_sampler.row_seeds.shape[0] != N:
        raise ValueError(f"teacher_sampler.row_seeds must have {N} rows, got {teacher_sampler.row_seeds.shape[0]}")


def fused_linear_kd_ce(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    teacher_logits: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
    kd_ratio: float,
    loss: DistillationLoss,
    chunk_size: int = 1024,
    student_lora: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
    teacher_sparse: Optional[SparseTargets] = None,
    teacher_sampler: Optional[TeacherSampler] = None,
) -> KDCEResult:
    """``(1 - kd_ratio) * CE_sum + kd_ratio * KD_sum`` from hidden states, never materialising [N, V].

    A custom autograd Function loops over token chunks of ``chunk_size`` rows: it computes the chunk's
    student logits ``h @ W.T (+ scale * (h @ A.T) @ B.T)`` and teacher logits (``teacher_hidden @
    teacher_weight.T`` under no_grad, or rows of ``teacher_logits``), the CE/KD sums, and the gradients
    w.r.t. the student inputs, accumulates them and frees the chunk (Liger-Kernel ``chunked_loss``
    technique). The loss gradient w.r.t. the logits is analytic (see ``DistillationLoss._rows_and_grad``);
    only the projection goes through autograd. Backward only multiplies the stored gradients by
    ``grad_output``. Peak extra memory does not depend on N: about 14 [chunk_size, V] float32 buffers for
    ``jsd`` (measured on CPU: ~0.9 GiB at chunk 512 x V 32768; fewer for the plain KLs), i.e. ~8.5 GiB at
    chunk 1024 x V 152064 -- use chunk_size 256 (~2 GiB) for Qwen2.5 vocabularies if memory is tight; plus,
    if ``student_weight`` requires grad, a float32 [V, Hs] accumulator (and [r, Hs], [V, r] for LoRA).

    Args:
        student_hidden: [N, Hs] (or [B, S, Hs], flattened) final-norm hidden states, fp32/bf16; gets a
            grad if it requires grad.
        student_weight: [V, Hs] output projection; gets a grad only if it requires grad (frozen in LoRA).
        labels: [N] (or [B, S]) int64 shifted targets; ``loss.ignore_index`` marks excluded tokens.
        teacher_hidden: [N, Ht] teacher final hidden states (any float dtype), used with ``teacher_weight``.
        teacher_weight: [V, Ht] teacher output projection (anything ``F.linear`` accepts). No grad.
        teacher_logits: alternative to teacher_hidden/weight: [N, V] tensor, or a list of [n_i, V] row
            chunks whose concatenation is [N, V]. No grad.
        kd_ratio: weight of the KD term in [0, 1] (:func:`check_kd_ratio`); 0 skips KD gradients (kl_sum /
            n_agree are still reported if a teacher is given), 1 skips CE gradients.
        loss: the :class:`DistillationLoss` (kind, temperature, T**2 scaling, ignore_index).
        chunk_size: tokens per chunk (N need not be divisible).
        student_lora: ``(A [r, Hs], B [V, r], scale)`` when the output projection is a torchtune LoRALinear
            (dropout on the LoRA path must be 0 / eval); A and B get grads if they require grad.
        teacher_sparse: alternative teacher: cached sparse targets (:class:`kd.losses.sparse.SparseTargets`,
            N rows) -- the Random-Sampling KD loss (see :func:`_sparse_chunk_math_eager`); forward KL only,
            since the other divergences need the full teacher distribution.
        teacher_sampler: with a live teacher, also draw cache samples from its per-chunk logits
            (:class:`kd.losses.sparse.TeacherSampler`); returned as ``samples``.

    Returns:
        :class:`KDCEResult`; ``loss_sum`` differentiable, the rest detached.
    """
    if not isinstance(loss, DistillationLoss):
        raise ValueError(f"loss must be a DistillationLoss, got {type(loss).__name__}")
    kd_ratio = check_kd_ratio(kd_ratio)
    chunk_size = int(chunk_size)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    h2, lab, A, B, scale = _check_student(student_hidden, student_weight, labels, student_lora)
    N, V = h2.shape[0], student_weight.shape[0]
    if teacher_logits is not None and (teacher_hidden is not None or teacher_weight is not None):
        raise ValueError("give either teacher_logits or teacher_hidden + teacher_weight, not both")
    th = _check_teacher_hidden(teacher_hidden, teacher_weight, N, V)
    tl, bounds = _teacher_logit_bounds(teacher_logits, N, V, chunk_size)
    live = th is not None or tl is not None
    _check_sparse_and_sampler(loss, teacher_sparse, teacher_sampler, live, N)
    if kd_ratio > 0 and not live and teacher_sparse is None:
        raise ValueError("kd_ratio > 0 needs a teacher: pass teacher_hidden + teacher_weight or teacher_logits")
    ge = torch.is_grad_enabled()
    need = tuple(ge and x is not None and x.requires_grad for x in (h2, student_weight, A, B))
    plan = _FusedPlan(labels=lab, loss=loss, kd_ratio=kd_ratio, lora_scale=scale, chunk_size=chunk_size, bounds=bounds, need=need,
                      teacher_hidden=th, teacher_weight=teacher_weight, teacher_logits=tl,
                      sparse=teacher_sparse, sampler=teacher_sampler,
                      samples=None if teacher_sampler is None else _sample_buffers(teacher_sampler, N, h2.device))
    out = _FusedLinearKDFunction.apply(h2, student_weight, A, B, plan)
    return KDCEResult(*out, samples=plan.samples)


def _sample_buffers(sampler: TeacherSampler, N: int, device: torch.device) -> TeacherSamples:
    """Output buffers of the cache draws (filled chunk by chunk inside the Function, no grad)."""
    k = sampler.k
    return TeacherSamples(
        torch.zeros(N, k, dtype=torch.int32, device=device),
        torch.zeros(N, k, dtype=torch.float32, device=device) if sampler.sampling == "topk"
        else torch.empty(0, device=device),
        torch.zeros(N, dtype=torch.float32, device=device),
        torch.zeros(N, dtype=torch.int32, device=device),
    )


class FusedKDCELoss(torch.nn.Module):
    """The fused form's loss as a config component (``loss: _component_: kd.losses.distillation.FusedKDCELoss``): hard-label
    CE + the ``kd_loss`` divergence, mixed by :func:`kd_ce_mix`, from hidden states and the output projection
    (:func:`fused_linear_kd_ce`), never materialising [N, V] logits. The student's head
    (:class:`kd.losses.heads.FusedKDHead`) calls it inside the model's forward.

    ``forward(student_hidden [N, Hs], student_weight [V, Hs], labels [N], *, kd_loss, kd_ratio, chunk_size,
    student_lora, teacher_hidden / teacher_weight | teacher_logits | teacher_sparse, teacher_sampler)`` ->
    :class:`KDCEResult` (same keyword arguments as :func:`fused_linear_kd_ce`, whose ``loss`` is ``kd_loss``).
    """

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, labels: torch.Tensor, *,
                kd_loss: DistillationLoss, kd_ratio: float, **kwargs: Any) -> KDCEResult:
        if getattr(kd_loss, "ignore_index", self.ignore_index) != self.ignore_index:
            raise ValueError(f"kd_loss.ignore_index={kd_loss.ignore_index} differs from the CE term's "
                             f"ignore_index={self.ignore_index}")
        return fused_linear_kd_ce(student_hidden, student_weight, labels, kd_ratio=kd_ratio, loss=kd_loss, **kwargs)
