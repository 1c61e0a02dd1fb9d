"""Output heads that plug the fused KD+CE loss into a torchtune ``TransformerDecoder``.

The student's ``output`` module is replaced by :class:`FusedKDHead`, which owns the *same* parameter
objects under the *same* names (``output.weight``, ``output.lora_a.weight``, ``output.lora_b.weight``) so
checkpoints, adapter export and FSDP2 grouping are unchanged. When targets are set, its forward computes
``(1-kd_ratio)*CE_sum + kd_ratio*KD_sum`` chunk by chunk (:func:`kd.losses.fused_linear_kd_ce`) instead of
returning [b, s, V] logits, so neither model's full-vocabulary logits are ever materialised. Living
inside the model's forward matters under FSDP2: the root unit's parameters are gathered in its
pre-forward hook and their gradients reduce-scattered by its post-backward hooks, exactly as for
``nn.Linear``.

The teacher's ``output`` is replaced by :class:`HiddenStatesHead` (returns the final-norm hidden states);
its projection weight is kept beside the model as a plain replicated tensor (frozen).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn


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
        self._targets: Optional[Dict[str, Any]] = None
        self.last: Optional[Any] = None

    def adapter_params(self):
        """torchtune's AdapterModule protocol, so ``get_adapter_params`` (and kd.checkpoint.lora_state_dict)
        see the head's LoRA matrices exactly as they see a LoRALinear's."""
        return ["lora_a.weight", "lora_b.weight"] if hasattr(self, "lora_a") else []

    def init_lora_parameters(self, device) -> None:
        """Materialise and initialise the LoRA matrices as torchtune's LoRALinear does (A: Kaiming
        uniform, B: zeros), leaving the loaded base weight alone."""
        from torchtune.modules.peft.lora import _lora_a_init_params, _lora_b_init_params

        if hasattr(self, "lora_a"):
            self.lora_a.to_empty(device=device)
            self.lora_b.to_empty(device=device)
            _lora_a_init_params(self.lora_a)
            _lora_b_init_params(self.lora_b)

    def proj_weight(self) -> torch.Tensor:
        return self._tied.tied_module.weight if self._tied is not None else self.weight

    def set_targets(self, **targets: Any) -> None:
        """labels [b, s] (shifted), kd_ratio, loss (DistillationLoss), and teacher_hidden [b, s, Ht] +
        teacher_weight [V, Ht], or teacher_logits, or teacher_sparse (cached targets); optionally
        teacher_sampler (draw cache samples from the live teacher); consumed by the next forward."""
        self._targets = targets

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Plain logits (for generation/evaluation when no targets are set)."""
        out = nn.functional.linear(h, self.proj_weight())
        if hasattr(self, "lora_a"):
            out = out + self.scaling * self.lora_b(self.lora_a(h))
        return out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self._targets is None:
            return self.logits(h)
        from kd.losses import fused_linear_kd_ce

        t = self._targets
        self._targets = None
        hs = h.reshape(-1, h.shape[-1])
        lora = None
        if hasattr(self, "lora_a"):
            lora = (self.lora_a.weight, self.lora_b.weight, self.scaling)
        teacher_hidden = t.get("teacher_hidden")
        if teacher_hidden is not None:
            teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        out = fused_linear_kd_ce(
            hs,
            self.proj_weight(),
            t["labels"].reshape(-1),
            teacher_hidden=teacher_hidden,
            teacher_weight=t.get("teacher_weight"),
            teacher_logits=t.get("teacher_logits"),
            kd_ratio=t["kd_ratio"],
            loss=t["loss"],
            chunk_size=self.chunk_size,
            student_lora=lora,
            teacher_sparse=t.get("teacher_sparse"),
            teacher_sampler=t.get("teacher_sampler"),
        )
        self.last = out
        # torchtune's unembed() calls .float() on what the output module returns: a 0-d sum is fine.
        return out.loss_sum


class HiddenStatesHead(nn.Module):
    """Identity ``output`` for the teacher: the decoder returns its final-norm hidden states."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h
