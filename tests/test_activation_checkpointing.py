"""Selective activation checkpointing through torchtune's keys (ac_mode / ac_option): the layers the recipe wraps,
the errors, and the memory each checkpointed layer saves against kd.ops.planner's prediction.

Memory here is the bytes autograd keeps for backward (every tensor saved outside the checkpointed regions, counted
once per storage through ``saved_tensors_hooks``) during a forward of the test bed's LoRA student, built and
wrapped exactly as the recipe does (kd.core.config.activation_checkpoint_layers + kd.train.models.apply_activation_checkpointing).
The GPU peak through the whole recipe is compared with the planner in docs/benchmarks.md."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kd.core.config import ConfigError, activation_checkpoint_layers
from kd.ops.planner import activation_elems_per_token, count_model
from kd.train.models import apply_activation_checkpointing, build_on_meta, is_adapter_param, load_hf_into_model


@pytest.mark.parametrize("ov,want", [
    ({"enable_activation_checkpointing": True}, list(range(28))),
    ({"enable_activation_checkpointing": False}, []),
    ({"ac_mode": "none"}, []),
    ({"ac_mode": "full"}, list(range(28))),
    ({"ac_mode": "selective", "ac_option": 3}, [2, 5, 8, 11, 14, 17, 20, 23, 26]),  # torchtune: every 3rd, from 1
    ({"ac_mode": "selective", "ac_option": "4"}, [3, 7, 11, 15, 19, 23, 27]),
])
def test_layers_follow_torchtunes_rule(ov, want):
    assert activation_checkpoint_layers(OmegaConf.create(ov), 28) == want


@pytest.mark.parametrize("ov,msg", [
    ({"ac_mode": "selctive"}, "did you mean 'selective'"),
    ({"ac_mode": "selective"}, "needs ac_option"),
    ({"ac_mode": "selective", "ac_option": 0}, "needs ac_option"),
    ({"ac_mode": "selective", "ac_option": "op"}, "needs ac_option"),
    ({"ac_mode": "selective", "ac_option": 2, "enable_activation_checkpointing": True}, "silently checkpoint nothing"),
    ({"ac_option": 2}, "ac_mode is not"),
])
def test_bad_keys_are_clear_errors(ov, msg):
    with pytest.raises(ConfigError, match=msg):
        activation_checkpoint_layers(OmegaConf.create(ov), 28)


def _saved_bytes(testbed, ov, tokens):
    cfg = OmegaConf.merge(OmegaConf.load("configs/tiny/kd_lora.yaml"), OmegaConf.create(ov))
    m = build_on_meta(cfg.model, torch.float32)
    layers = activation_checkpoint_layers(cfg, len(m.layers))
    apply_activation_checkpointing(m, layers)
    load_hf_into_model(m, testbed.root / "student", None, device=torch.device("cpu"), dtype=torch.float32,
                       trainable=is_adapter_param, which="student")
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(tokens).sum().backward()
    return sum(seen.values()), len(layers), count_model(m)


def test_each_checkpointed_layer_saves_what_the_planner_says(testbed):
    tokens = torch.randint(0, 1000, (2, 384), generator=torch.Generator().manual_seed(0))
    rows = [_saved_bytes(testbed, ov, tokens) for ov in (
        {"enable_activation_checkpointing": False},
        {"ac_mode": "selective", "ac_option": 2},  # 2 layers: layer 1 only
        {"ac_mode": "full"},
    )]
    assert [k for _, k, _ in rows] == [0, 1, 2]
    c = rows[0][2]
    n = tokens.numel()
    # planner: a checkpointed layer keeps only its input instead of its per-token activations
    per_layer = sum(activation_elems_per_token(c).values()) * n * 4 - n * c.embed_dim * 4
    for (b_hi, k_hi, _), (b_lo, k_lo, _) in zip(rows, rows[1:]):
        saved = b_hi - b_lo
        assert saved > 0
        assert saved == pytest.approx(per_layer * (k_lo - k_hi), rel=0.25), (saved, per_layer)
