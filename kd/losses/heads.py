"""Output heads that plug the fused KD+CE loss into a torchtune ``TransformerDecoder``.

The student's ``output`` module is replaced by :class:`FusedKDHead`, which owns the *same* parameter
objects under the *same* names (``output.weight``, ``output.lora_a.weight``, ``output.lora_b.weight``) so
checkpoints, adapter export and FSDP2 grouping are unchanged. Inside ``with head.fused(FusedTargets(...)) as
call:`` the model's next forward computes ``(1-kd_ratio)*CE_sum + kd_ratio*KD_sum`` chunk by chunk
(:class:`kd.losses.distillation.FusedKDCELoss`) instead of returning [b, s, V] logits, so neither model's full-vocabulary
logits are ever materialised; the :class:`kd.losses.distillation.KDCEResult` is ``call.result``. Outside such a block the
head returns plain logits. The targets are bound to one forward (a second forward in the block is an error,
as is a block whose forward never reached the head) and nothing outlives the block. Living
inside the model's forward matters under FSDP2: the root unit's parameters are gathered in its
pre-forward hook and their gradients reduce-scattered by its post-backward hooks, exactly as for
``nn.Linear``.

The teacher's ``output`` is replaced by :class:`HiddenStatesHead` (returns the final-norm hidden states);
its projection weight is kept beside the model as a plain replicated tensor (frozen).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torchtune.modules.peft.lora import _lora_a_init_params, _lora_b_init_params

from kd.losses.distillation import DistillationLoss, FusedKDCELoss, KDCEResult
from kd.losses.sparse import SparseTargets, TeacherSampler


@dataclass(frozen=True)
class FusedTargets:
    """What one fused forward of the student needs besides its hidden states.

    labels: [b, s] int64, shifted (``labels[..., i]`` is the target of position i).
    loss: the :class:`kd.losses.distillation.FusedKDCELoss` the config's ``loss:`` names; kd_loss: its divergence
    (``kd_loss:``, a :class:`kd.losses.distillation.DistillationLoss`); kd_ratio: weight of the KD term.
    Teacher (at most one kind): ``teacher_hidden`` [b, s, Ht] + ``teacher_weight`` [V, Ht] (live teacher),
    ``teacher_logits`` ([N, V] or row chunks), or ``teacher_sparse`` (cached targets,
    :class:`kd.losses.sparse.SparseTargets`, N = b*s rows); ``teacher_sampler`` draws cache samples from the
    live teacher (returned in ``result.samples``). None everywhere: CE only (kd_ratio must be 0).
    """

    labels: torch.Tensor
    loss: FusedKDCELoss
    kd_loss: DistillationLoss
    kd_ratio: float
    teacher_hidden: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    teacher_logits: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None
    teacher_sparse: Optional[SparseTargets] = None
    teacher_sampler: Optional[TeacherSampler] = None


class FusedCall:
    """The handle of one ``with head.fused(targets)`` block: ``result`` is the forward's
    :class:`kd.losses.distillation.KDCEResult` once the model has run (None before)."""

    def __init__(self, targets: FusedTargets):
        self.targets = targets
        self.result: Optional[KDCEResult] = None


class FusedKDHead(nn.Module):
    """Drop-in replacement for a decoder's output projection that returns a loss sum.

    Args:
        output: the original ``model.output`` (``nn.Linear``, torchtune ``LoRALinear`` or ``TiedLinear``).
        chunk_size: tokens per chunk of the fused loss.
    """

    def __init__(self, output: Any, chunk_size: int = 1024):
        super().__init__()
        self._tied = None
        if isinstance(output, nn.Module):
            if getattr(output, "bias", None) is not None:
                raise ValueError("FusedKDHead does not support an output projection with a bias.")
            self.weight = output.weight
            if hasattr(output, "lora_a"):
                self.lora_a = output.lora_a
                self.lora_b = output.lora_b
                self.scaling = output.alpha / output.rank
                p = getattr(output.dropout, "p", 0.0)
                if p:
                    raise ValueError(
                        f"lora_dropout={p} on the output projection is not supported by the fused loss "
                        "(loss_form=fused); set model.lora_dropout=0.0 or loss_form=chunked."
                    )
        else:  # torchtune TiedLinear: weight lives in tok_embeddings (registered there)
            self._tied = output
        self.chunk_size = chunk_size
        self._call: Optional[FusedCall] = None  # set only inside a `with self.fused(...)` block

    def adapter_params(self):
        """torchtune's AdapterModule protocol, so ``get_adapter_params`` (and kd.train.adapter_io.lora_state_dict)
        see the head's LoRA matrices exactly as they see a LoRALinear's."""
        return ["lora_a.weight", "lora_b.weight"] if hasattr(self, "lora_a") else []

    def init_lora_parameters(self, device) -> None:
        """Materialise and initialise the LoRA matrices as torchtune's LoRALinear does (A: Kaiming
        uniform, B: zeros), leaving the loaded base weight alone."""
        if hasattr(self, "lora_a"):
            self.lora_a.to_empty(device=device)
            self.lora_b.to_empty(device=device)
            _lora_a_init_params(self.lora_a)
            _lora_b_init_params(self.lora_b)

    def proj_weight(self) -> torch.Tensor:
        return self._tied.tied_module.weight if self._tied is not None else self.weight

    @contextlib.contextmanager
    def fused(self, targets: FusedTargets) -> Iterator[FusedCall]:
        """Bind ``targets`` to the model's next forward: it returns the loss sum, and ``call.result`` holds
        the :class:`kd.losses.distillation.KDCEResult`. Exactly one forward must run inside the block."""
        if self._call is not None:
            raise RuntimeError("FusedKDHead.fused blocks cannot be nested")
        call = FusedCall(targets)
        self._call = call
        try:
            yield call
        finally:
            self._call = None
        if call.result is None:
            raise RuntimeError("the model's forward did not reach the fused head inside the `fused` block")

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Plain logits (for generation/evaluation outside a ``fused`` block)."""
        out = nn.functional.linear(h, self.proj_weight())
        if hasattr(self, "lora_a"):
            out = out + self.scaling * self.lora_b(self.lora_a(h))
        return out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        call = self._call
        if call is None:
            return self.logits(h)
        if call.result is not None:
            raise RuntimeError("a second forward inside one FusedKDHead.fused block (its targets are for one)")
        t = call.targets
        lora = (self.lora_a.weight, self.lora_b.weight, self.scaling) if hasattr(self, "lora_a") else None
        th = t.teacher_hidden
        call.result = t.loss(
            h.reshape(-1, h.shape[-1]), self.proj_weight(), t.labels.reshape(-1),
            kd_loss=t.kd_loss, kd_ratio=t.kd_ratio, chunk_size=self.chunk_size, student_lora=lora,
            teacher_hidden=None if th is None else th.reshape(-1, th.shape[-1]),
            teacher_weight=t.teacher_weight, teacher_logits=t.teacher_logits,
            teacher_sparse=t.teacher_sparse, teacher_sampler=t.teacher_sampler,
        )
        # torchtune's unembed() calls .float() on what the output module returns: a 0-d sum is fine.
        return call.result.loss_sum


class HiddenStatesHead(nn.Module):
    """Identity ``output`` for the teacher: the decoder returns its final-norm hidden states."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h
