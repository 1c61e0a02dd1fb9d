"""Quantization-aware distillation (kd.train.qad): the fake-quantised forward is the exported format's own
dequantisation (compressed-tensors decompresses the export; the numbers must agree), the config key, the export
of the trained format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")

from kd.core.config import ConfigError  # noqa: E402
from kd.train import qad as kqad  # noqa: E402
from kd.train import quantize as kq  # noqa: E402

FORMATS = list(kqad.FORMATS)


@pytest.fixture(scope="module")
def calib(testbed):
    return kq.calibration_prompts(testbed.tokenizer(256), testbed.data_json, num_samples=1, max_seq_len=256,
                                  val_size=0.1)


def _linears(model):
    return {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quantised_forward_is_the_exported_format(fmt, testbed, calib, tmp_path):
    """Export the test-bed student in ``fmt`` with compressed-tensors, load it back with transformers (which
    decompresses it with compressed-tensors' own code): every weight equals QAD's fake-quantised weight bit for bit,
    and QAD's forward (weights and activations fake-quantised, on the uncompressed model) gives the deployed
    model's logits bit for bit. NVFP4's activation global scale is static in the deployed model (calibrated at
    export) and the batch's absmax in training: the forward is bit-equal given the deployed scales, and within the
    format's rounding with the training-time ones."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / fmt
    kq.quantize_checkpoint(testbed.student_dir, out, kqad.export_scheme(fmt), calibration=calib,
                           dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    deployed = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(testbed.student_dir), dtype=torch.bfloat16).eval()
    ids = torch.as_tensor(calib[0]).unsqueeze(0)
    with torch.no_grad():
        want = deployed(input_ids=ids).logits.float()  # the first forward decompresses the weights
    sch = kqad.scheme_of(fmt)
    dq, rq = _linears(deployed), _linears(ref)
    assert set(dq) == set(rq) and len(rq) == 14
    for n, m in rq.items():
        fq = kq.fake_quantize_weight(m.weight.data, sch.weights)
        assert torch.equal(dq[n].weight.data, fq), n
        assert not torch.equal(fq, m.weight.data), n  # it is quantized
    with torch.no_grad():
        plain = ref(input_ids=ids).logits.float()
        assert kqad.apply_qad_(ref, fmt, layers=ref.model.layers) == 14
        got_train = ref(input_ids=ids).logits.float()
        for n, m in rq.items():
            if hasattr(dq[n], "input_global_scale"):
                m._kd_qad_input_gs = dq[n].input_global_scale.data
        got = ref(input_ids=ids).logits.float()
    assert torch.equal(got, want), f"{fmt}: max |diff| {float((got - want).abs().max()):.3g}"
    err_q = float((plain - want).abs().max())
    assert err_q > 0.01  # the quantization is visible in the logits
    if fmt == "nvfp4":  # training-time global scale: another rounding of the same format, closer than unquantized
        kl = lambda a, b: float((a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean())
        assert 0 < kl(want, got_train) < kl(want, plain), (kl(want, got_train), kl(want, plain))
    else:
        assert torch.equal(got_train, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_merged_weight_is_fake_quantised_with_ste(fmt):
    """LoRA: the forward uses FQ(W0 + s B A); A and B get gradients through the straight-through estimator."""
    from torchtune.modules.peft import LoRALinear

    torch.manual_seed(0)
    m = LoRALinear(in_dim=128, out_dim=64, rank=4, alpha=8.0)
    torch.nn.init.normal_(m.lora_b.weight, std=0.05)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": m})])

    h = Holder()
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        merged = m.weight + 2.0 * m.lora_b.weight @ m.lora_a.weight
    assert kqad.apply_qad_(h, fmt) == 1
    y = m(x)
    sch = kqad.scheme_of(fmt)
    xin = x if sch.input_activations is None else kqad.fake_quantize_input(x, sch.input_activations)
    want = torch.nn.functional.linear(xin, kq.fake_quantize_weight(merged, sch.weights).float())
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5)
    y.sum().backward()
    assert m.lora_a.weight.grad is not None and m.lora_a.weight.grad.abs().sum() > 0
    assert m.lora_b.weight.grad is not None and m.lora_b.weight.grad.abs().sum() > 0


def test_qad_key_is_validated():
    assert kqad.check_format(None) is None and kqad.check_format("NVFP4") == "nvfp4"
    with pytest.raises(ConfigError, match="did you mean 'nvfp4'"):
        kqad.check_format("nvfp")
    with pytest.raises(ConfigError, match="use one of"):
        kqad.check_format(4)


def test_nvfp4_export_layout_and_round_trip(testbed, calib, tmp_path):
    """quantize=nvfp4: compressed-tensors' nvfp4-pack-quantized layout (FP4 packed two a byte, FP8 E4M3 scales per 16
    input columns, fp32 per-tensor global scales for weight and input), lm_head kept; loading it back with
    compressed-tensors' decompression gives logits close to the unquantized model (the export's logits check)."""
    from safetensors import safe_open

    out = tmp_path / "nv"
    res = kq.quantize_checkpoint(testbed.student_dir, out, "nvfp4", calibration=calib)
    assert res.format == "nvfp4-pack-quantized" and res.modules == 14
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    w, i = qc["config_groups"]["group_0"]["weights"], qc["config_groups"]["group_0"]["input_activations"]
    assert (w["num_bits"], w["type"], w["group_size"], w["strategy"]) == (4, "float", 16, "tensor_group")
    assert (i["num_bits"], i["type"], i["group_size"], i["dynamic"]) == (4, "float", 16, "local")
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        k = "model.layers.0.mlp.down_proj"  # [128, 256] in the test bed
        assert h.get_slice(f"{k}.weight_packed").get_dtype() == "U8"
        assert h.get_slice(f"{k}.weight_packed").get_shape() == [128, 128]
        assert h.get_slice(f"{k}.weight_scale").get_dtype() == "F8_E4M3"
        assert h.get_slice(f"{k}.weight_scale").get_shape() == [128, 16]
        for g in ("weight_global_scale", "input_global_scale"):
            assert h.get_slice(f"{k}.{g}").get_dtype() == "F32" and h.get_slice(f"{k}.{g}").get_shape() == [1]
        assert f"{k}.weight" not in h.keys() and h.get_slice("lm_head.weight").get_dtype() in ("BF16", "F32")
    assert res.weight_bytes_after < 0.4 * res.weight_bytes_before
    chk = kq.compare_logits(testbed.student_dir, out, calib)
    assert 0 < chk.mean_kl < 0.05 and chk.top1_agreement > 0.9, chk
    assert "quantized-nvfp4" in kq.vllm_serve_command(out.parent / "quantized-nvfp4", "nvfp4")


@pytest.mark.slow
def test_qad_run_then_export_writes_its_format(testbed, tmp_path):
    """A 4-step LoRA KD run with qad=w4a16 records its format next to the adapter; the export (no quantize=) then
    writes quantized-w4a16_rtn. A bad qad value is one line with a suggestion."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from recipe_utils import tune_run

    run = tmp_path / "run"
    tune_run(testbed, [f"output_dir={run}", "qad=w4a16", "kd_ratio=1", "epochs=1", "max_steps_per_epoch=4",
                       "~eval_every_n_steps", "progress_bar=False"])
    adapter = next(run.glob("checkpoints/step_*/adapter"))
    assert json.loads((adapter / kqad.META_FILE).read_text())["qad"] == "w4a16"
    out = tmp_path / "exp"
    p = tune_run(testbed, [f"output_dir={out}", f"adapter_dir={adapter}"], recipe="recipes/export.py",
                 config="configs/tiny/export.yaml")
    assert (out / "quantized-w4a16_rtn" / "config.json").is_file() and "trained for w4a16" in p.stderr + p.stdout
    bad = tune_run(testbed, [f"output_dir={tmp_path / 'bad'}", "qad=nvfp5"], check=False)
    assert bad.returncode != 0 and "did you mean 'nvfp4'" in bad.stderr + bad.stdout
