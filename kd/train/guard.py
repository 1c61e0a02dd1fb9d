"""Non-finite loss / gradient detection for the training loop, without an extra host sync per step.

Every optimizer step the recipe already has, on the device, the step's loss sums (``ce``, ``kd``, ``kl``)
and the gradient norm. :class:`NonFiniteGuard` folds "is any of them NaN/Inf" into a small device tensor
(three element-wise ops on a handful of scalars, no ``.item()``), and the recipe appends that tensor to
the metrics all-reduce it performs for logging anyway; the host looks at it only there (and at
checkpoint time, which is not the hot path). Which value went bad names the culprit:

- ``ce`` non-finite: the student's own output (its logits; typically a diverged run, e.g. a too-high lr);
- ``ce`` finite but ``kd``/``kl`` non-finite: the teacher's logits (the CE term does not involve the teacher);
- only the gradient norm non-finite: an overflow in the backward pass.

The culprit is the one of the *first* bad step, whatever the check's schedule: a NaN teacher makes the KD term
NaN, the update then makes the student NaN too, and by the next log line both are non-finite -- the one that went
bad first is named (the flags keep a one-hot of the first bad step's culprit).

A non-finite step is never checkpointed (:meth:`NonFiniteGuard.check_before_save`) and the run stops with
:class:`NonFiniteError`, so retention never removes the last finite checkpoint in favour of a broken one.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["NonFiniteError", "NonFiniteGuard"]


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient norm (user-facing: one-line message, exit 2)."""


_FIELDS = ("student", "teacher", "grad_norm")


class NonFiniteGuard:
    """Device-side record of non-finite values since the last check.

    ``flags()`` is a float32 tensor ``[n_student, n_teacher, n_grad, first_bad_step, first_student,
    first_teacher, first_grad]`` (counts of bad optimizer steps on this rank; ``first_bad_step`` is 0 when none;
    the last three: the one-hot culprit of that first bad step) meant to be SUM-all-reduced with the logging
    metrics; :meth:`check` reads the reduced values and raises.
    """

    n_flags = 7

    def __init__(self, device: torch.device, last_checkpoint: Optional[Callable[[], Optional[str]]] = None):
        self._device = device
        self._acc = torch.zeros(self.n_flags, dtype=torch.float32, device=device)
        self._last_checkpoint = last_checkpoint or (lambda: None)

    def observe(self, *, ce: torch.Tensor, kd_terms: torch.Tensor, grad_norm: Optional[torch.Tensor],
                step: int) -> None:
        """Record one optimizer step. ``ce``: 0-d sum of the step's CE; ``kd_terms``: the KD and KL sums
        (any shape); ``grad_norm``: 0-d (or None without clipping). Device ops only."""
        ce_bad = ~torch.isfinite(ce.detach().float())
        kd_bad = ~torch.isfinite(kd_terms.detach().float()).all()
        teacher_bad = kd_bad & ~ce_bad
        if grad_norm is not None:
            g_bad = ~torch.isfinite(grad_norm.detach().float().to(self._device)) & ~ce_bad & ~kd_bad
        else:
            g_bad = torch.zeros((), dtype=torch.bool, device=self._device)
        bad = torch.stack([ce_bad, teacher_bad, g_bad]).to(torch.float32)
        any_bad = bad.sum() > 0
        first = self._acc[3]
        step_t = torch.full((), float(step), dtype=torch.float32, device=self._device)
        is_first = any_bad & (first == 0)
        new_first = torch.where(is_first, step_t, first)
        culprit = torch.where(is_first, bad, self._acc[4:7])  # kept from the first bad step on
        self._acc = torch.cat([self._acc[:3] + bad, new_first.reshape(1), culprit])

    def flags(self) -> torch.Tensor:
        return self._acc

    def reset(self) -> None:
        self._acc = torch.zeros(self.n_flags, dtype=torch.float32, device=self._device)

    def check(self, reduced: torch.Tensor, step: int, *, world_size: int = 1) -> None:
        """Raise :class:`NonFiniteError` if the (all-reduced) ``flags()`` record a bad step; else reset.
        Collective-safe: every rank holds the same reduced values, so every rank raises together."""
        vals = [float(x) for x in reduced.tolist()]
        n_student, n_teacher, n_grad, first_sum = vals[:4]
        if n_student == 0 and n_teacher == 0 and n_grad == 0:
            self.reset()
            return
        first = self._first_bad_step(first_sum, world_size)
        c_student, c_teacher, _ = self._first_culprit(first, world_size)
        later = ""
        if c_teacher and n_student:
            later = " (the student's loss went non-finite after it, from the teacher's NaN/Inf in the update)"
        if c_student:
            what = ("the student's loss (CE) is NaN/Inf: the student's output is non-finite, typically a diverged "
                    "run (lower optimizer.lr, keep clip_grad_norm set, use dtype=bf16/fp32)")
        elif c_teacher:
            what = ("the KD/KL terms are NaN/Inf while the student's CE is finite: the teacher's output (logits) is "
                    f"non-finite{later} (check the teacher checkpoint for NaN/Inf weights and the teacher precision)")
        else:
            what = ("the gradient norm is NaN/Inf while the losses are finite: the backward pass overflowed "
                    "(lower optimizer.lr or kd_loss.temperature, use dtype=fp32)")
        last = self._last_checkpoint()
        where = f"the last finite checkpoint is {last}" if last else "no checkpoint of this run was written"
        at = f"at step {first}" if first == step else f"at step {first} (detected at step {step})"
        raise NonFiniteError(
            f"training stopped {at}: {what}. Nothing was saved for the non-finite step(s); {where} "
            "(resume_from_checkpoint=True continues from it once the cause is fixed)."
        )

    def _first_bad_step(self, first_sum: float, world_size: int) -> int:
        """Earliest bad step over ranks (only on the failure path: one extra small collective there)."""
        import torch.distributed as dist

        mine = self._acc[3]
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.where(mine > 0, mine, torch.full_like(mine, float("inf"))).reshape(1).clone()
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            return int(t.item())
        return int(first_sum)

    def _first_culprit(self, first: int, world_size: int):
        """(student, teacher, grad) culprit flags of the earliest bad step, over ranks (failure path only)."""
        import torch.distributed as dist

        mine = self._acc[4:7] * (self._acc[3] == float(first)).to(torch.float32)
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            mine = mine.clone()
            dist.all_reduce(mine, op=dist.ReduceOp.SUM)
        vals = [float(x) > 0 for x in mine.tolist()]
        return tuple(vals) if any(vals) else (False, False, True)

    def check_before_save(self, step: int, *, world_size: int = 1) -> None:
        """Collective (call on every rank, like the save itself): all-reduce the pending flags and raise
        rather than save a checkpoint of a non-finite state."""
        import torch.distributed as dist

        t = self._acc.clone()
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.check(t, step, world_size=world_size)
