"""Quantized deployment export (kd.train.quantize, recipes/export.py quantize=...): GPTQ is correct, the
compressed-tensors checkpoint loads back in transformers and stays close to the merged model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from recipe_utils import tune_run

ct = pytest.importorskip("compressed_tensors", reason="the deploy extra (compressed-tensors) is not installed")


def _w4a16_args():
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme("W4A16", ["Linear"]).weights


def _rtn(W, args):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from kd.train.quantize import minmax_qparams

    s, z = minmax_qparams(W, args)
    return fake_quantize(W.float(), s, z, args), s


def test_gptq_on_the_grid_and_better_than_round_to_nearest():
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from kd.train.quantize import gptq_quantize

    args = _w4a16_args()
    g = torch.Generator().manual_seed(0)
    out_f, in_f, n = 24, 256, 2048
    W = torch.randn(out_f, in_f, generator=g) * torch.linspace(0.2, 2.0, in_f)  # odd column scales
    # correlated inputs (as real activations are): GPTQ's error feedback has something to exploit
    X = torch.randn(n, 32, generator=g) @ torch.randn(32, in_f, generator=g) + 0.1 * torch.randn(n, in_f, generator=g)
    H = 2.0 / n * X.T @ X
    r = gptq_quantize(W, H, args)
    assert r.scale.shape == (out_f, in_f // 128) and torch.all(r.zero_point == 0)
    # every weight is an int4 value times its group scale, and compressed-tensors' own quantizer agrees
    q_int = r.weight.reshape(out_f, -1, 128) / r.scale.unsqueeze(-1)
    assert torch.allclose(q_int, q_int.round(), atol=1e-4) and q_int.round().min() >= -8 and q_int.round().max() <= 7
    assert torch.allclose(fake_quantize(r.weight, r.scale, r.zero_point, args), r.weight, atol=1e-6)
    # the objective GPTQ minimises: ||X W^T - X Q^T||^2, well below round-to-nearest's
    rtn, _ = _rtn(W, args)
    err = lambda Q: float(((X @ (W - Q).T) ** 2).sum())  # noqa: E731
    assert err(r.weight) < 0.7 * err(rtn), (err(r.weight), err(rtn))


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """With H = c*I there is no correlation to feed errors into: GPTQ must reduce exactly to RTN."""
    from kd.train.quantize import gptq_quantize

    args = _w4a16_args()
    W = torch.randn(8, 384, generator=torch.Generator().manual_seed(1))
    r = gptq_quantize(W, 3.0 * torch.eye(384), args)
    rtn, s = _rtn(W, args)
    assert torch.equal(r.weight, rtn.float()) and torch.allclose(r.scale, s.float())


def test_missing_deploy_extra_names_it(monkeypatch):
    from kd.core.config import ConfigError
    from kd.train.quantize import check_scheme, require_deploy_extra

    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import -> ImportError
    with pytest.raises(ConfigError, match=r"quantize=w4a16 needs the optional 'deploy' extra: pip install -e \"\.\[deploy\]\""):
        require_deploy_extra("w4a16")
    with pytest.raises(ConfigError, match="use one of"):
        check_scheme("int3")


def test_export_quantized_loads_in_transformers_close_to_merged(testbed, tmp_path):
    """tune run recipes/export.py ... quantize=[fp8_dynamic,w4a16,w4a16_rtn]: each copy loads back in transformers
    (compressed-tensors integration) with logits close to the merged bf16 model; GPTQ beats RTN."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from kd.train.quantize import calibration_prompts, compare_logits

    out = tmp_path / "exp"
    adapter = _adapter(testbed, tmp_path)
    p = tune_run(testbed, [f"output_dir={out}", f"adapter_dir={adapter}", "quantize=[fp8_dynamic,w4a16,w4a16_rtn]"],
                 recipe="recipes/export.py", config="configs/tiny/export.yaml")
    assert "vllm serve" in p.stdout
    merged = out / "merged"
    # held-out check samples: the validation split (GPTQ calibrated on the train split)
    tok = testbed.tokenizer()
    from kd.data.alpaca import AlpacaKDDataset

    val = AlpacaKDDataset(tok, testbed.data_json, split="val", val_size=0.1, seed=0, max_seq_len=256)
    held_out = [val[i]["tokens"] for i in range(len(val))]
    train_ids = {tuple(t) for t in calibration_prompts(tok, testbed.data_json, num_samples=32, max_seq_len=256,
                                                        val_size=0.1)}
    assert not train_ids & {tuple(t) for t in held_out}
    checks = {}
    for scheme, fmt in (("fp8_dynamic", "float-quantized"), ("w4a16", "pack-quantized"), ("w4a16_rtn", "pack-quantized")):
        d = out / f"quantized-{scheme}"
        qcfg = json.loads((d / "config.json").read_text())["quantization_config"]
        assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == fmt and qcfg["ignore"] == ["lm_head"]
        meta = json.loads((d / "kd_quantize.json").read_text())
        assert meta["modules"] == 14 and meta["check"]["tokens"] > 0
        names = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as h:
                names.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
        w = "model.layers.0.mlp.down_proj"
        if fmt == "pack-quantized":
            assert names[f"{w}.weight_packed"] == "I32" and f"{w}.weight" not in names  # 8 int4 per int32
            assert meta["weight_bytes_after"] < 0.35 * meta["weight_bytes_before"]
        else:
            assert names[f"{w}.weight"] == "F8_E4M3"
        assert names["lm_head.weight"] in ("BF16", "F32")
        # loads back through transformers' compressed-tensors integration; weights really are quantized
        q = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16)
        m = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.bfloat16)
        with torch.no_grad():
            q(input_ids=torch.tensor([held_out[0][:8]]))  # the first forward decompresses the weights
        wq, wm = q.model.layers[0].mlp.down_proj.weight.float(), m.model.layers[0].mlp.down_proj.weight.float()
        assert wq.dtype == torch.float32 and not torch.equal(wq, wm)
        if fmt == "pack-quantized":  # int4 values times the saved group scales
            with safe_open(str(next(iter(d.glob("*.safetensors")))), framework="pt") as h:
                sc = h.get_tensor(f"{w}.weight_scale").float() if f"{w}.weight_scale" in h.keys() else None
            if sc is not None:
                qi = wq.reshape(wq.shape[0], -1, 128) / sc.unsqueeze(-1)
                assert torch.allclose(qi, qi.round(), rtol=1e-2, atol=1e-3) and qi.round().abs().max() <= 8  # bf16 rounding
        checks[scheme] = compare_logits(merged, d, held_out)
        print(f"{scheme}: {checks[scheme]}")
    for scheme, c in checks.items():
        assert c.mean_kl < {"fp8_dynamic": 2e-3, "w4a16": 2e-2, "w4a16_rtn": 5e-2}[scheme], (scheme, c)
        assert c.top1_agreement > 0.9, (scheme, c)
        assert 0 < c.max_abs_diff < 2.0, (scheme, c)
    assert checks["fp8_dynamic"].mean_kl < checks["w4a16"].mean_kl  # 8 bits closer than 4
    assert checks["w4a16"].mean_kl < checks["w4a16_rtn"].mean_kl  # GPTQ calibration pays off on held-out data


def _adapter(testbed, tmp_path) -> Path:
    """A short online-KD run's adapter (kd_ratio=1), so the merged student differs from its base."""
    out = tmp_path / "kd"
    tune_run(testbed, [f"output_dir={out}", "epochs=1", "max_steps_per_epoch=6", "kd_ratio=1", "~eval_every_n_steps",
                       "save_every_n_steps=null", "progress_bar=False"])
    return sorted((out / "checkpoints").glob("step_*"))[-1] / "adapter"
