import json
import math

import pytest
import torch

from kd.testing.testbed import TINY_STUDENT, TINY_TEACHER, answer_ce, build_testbed, load_tune_model, write_tiny_qwen2


def _sample_tokens(testbed, n=3):
    from torchtune.data import padded_collate_sft

    from kd.data.alpaca import alpaca_kd_dataset

    ds = alpaca_kd_dataset(testbed.tokenizer(), str(testbed.data_json), split="all")
    return padded_collate_sft([ds[i] for i in range(n)], padding_idx=1000)["tokens"]


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def test_testbed_layout(testbed):
    assert testbed.vocab_size == 1024
    assert len(testbed.teacher_checkpoint_files) > 1  # sharded
    assert (testbed.teacher_dir / "model.safetensors.index.json").is_file()
    assert testbed.student_checkpoint_files == ["model.safetensors"]
    for d in (testbed.teacher_dir, testbed.student_dir):
        for f in ("config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.json"):
            assert (d / f).is_file(), d / f
    assert testbed.teacher_dims == TINY_TEACHER and testbed.student_dims == TINY_STUDENT
    cfg = json.loads((testbed.teacher_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["hidden_size"] == 256 and cfg["num_key_value_heads"] == 2
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == 1024
    # idempotent: a second call returns the cached one without rebuilding
    again = build_testbed(testbed.root)
    assert again == testbed


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_tune_and_hf_logits_match(testbed, which):
    model_dir = getattr(testbed, f"{which}_dir")
    dims = getattr(testbed, f"{which}_dims")
    tune = load_tune_model(model_dir, dims)
    hf = _hf(model_dir)
    tokens = _sample_tokens(testbed)
    with torch.no_grad():
        a = tune(tokens)
        b = hf(tokens).logits
    assert a.shape == b.shape == (*tokens.shape, 1024)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_lora_model_loads_base(testbed):
    from torchtune.models.qwen2 import lora_qwen2
    from torchtune.training import FullModelHFCheckpointer

    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(testbed.student_dir), checkpoint_files=testbed.student_checkpoint_files,
        model_type="QWEN2", output_dir=str(testbed.root / "_ckpt_out_test"),
    )
    sd = ckpt.load_checkpoint()["model"]
    lora = lora_qwen2(["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8,
                      **testbed.student_dims)
    missing, unexpected = lora.load_state_dict(sd, strict=False)
    assert not unexpected and all("lora" in k for k in missing)
    base = testbed.student_tune()
    tokens = _sample_tokens(testbed, 2)
    with torch.no_grad():
        torch.testing.assert_close(lora.eval()(tokens), base(tokens), atol=1e-5, rtol=1e-5)


def test_teacher_is_sharp_and_differs_from_student(testbed):
    teacher = testbed.teacher_tune()
    student = testbed.student_tune()
    tokens = _sample_tokens(testbed, 2)
    with torch.no_grad():
        t, s = teacher(tokens), student(tokens)
    assert not torch.allclose(t, s)
    ce_t = answer_ce(teacher, testbed.data_json)
    ce_s = answer_ce(student, testbed.data_json)
    # trained teacher: answer CE far below uniform (log 1024 = 6.93); the student base knows no answers
    assert ce_t < 2.0 and ce_t < 0.3 * math.log(1024)
    assert ce_s > 0.8 * math.log(1024)
    assert testbed.teacher_answer_ce < 2.0
    # the teacher's distributions are peaked: mean max-prob on answer tokens is high
    probs = torch.softmax(t, -1).max(-1).values
    assert probs.mean() > 0.5


def test_write_tiny_qwen2_sharded(tmp_path):
    files = write_tiny_qwen2(tmp_path / "m", num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2,
                             intermediate_size=256, seed=0, max_shard_size="300KB")
    assert len(files) > 1 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    dims = dict(TINY_STUDENT, num_kv_heads=2)
    tune = load_tune_model(tmp_path / "m", dims)
    hf = _hf(tmp_path / "m")
    tokens = torch.randint(0, 1000, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(tune(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    # same seed -> same weights
    files2 = write_tiny_qwen2(tmp_path / "m2", num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2,
                              intermediate_size=256, seed=0)
    assert files2 == ["model.safetensors"]
    sd1, sd2 = load_tune_model(tmp_path / "m", dims).state_dict(), load_tune_model(tmp_path / "m2", dims).state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_teacher_linears_nf4(testbed):
    from torchao.dtypes.nf4tensor import to_nf4

    teacher = testbed.teacher_tune()
    n = 0
    for name, mod in teacher.named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach().to(torch.bfloat16)
            assert w.numel() % (64 * 256) == 0, name
            q = to_nf4(w)
            deq = q.to(torch.float32)
            rel = (deq - w.float()).norm() / w.float().norm()
            assert rel < 0.2, (name, rel)
            n += 1
    assert n == 4 * 7 + 1
