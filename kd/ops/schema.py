"""One table of config keys per recipe: the single source of the keys a recipe accepts.

From each :class:`Schema` come

- the unknown-key check with its "did you mean" (:meth:`Schema.check`, via :func:`kd.core.config.check_keys`);
- the value of a key with its default and range (:meth:`Schema.get`), so the recipe and ``kd plan``
  (:mod:`kd.ops.planner`, which runs the recipe's own ``_validate``) read the same default and reject the same
  values;
- the key tables of ``docs/config_keys.md`` (:func:`markdown`; ``python -m kd.ops.schema --write`` regenerates
  the file, ``tests/test_schema.py`` fails when it is stale).

torchtune's ``config.parse`` accepts any key, so without this a typo such as ``kd_ration=0.7`` would
silently train with the default. Sections whose keys belong to a component (``loss``, ``kd_loss``,
``optimizer``, ``model``, ...) are checked by instantiating that component as written; the ``teacher_cache`` and
``on_policy`` sections have their tables beside the code that reads them (:mod:`kd.cache.session`,
:mod:`kd.train.on_policy`, same :class:`kd.core.keys.Schema` type) and are listed here for the docs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from kd.core.keys import Key, Schema, _k, _tt, top_p_value
from kd.data.alpaca import DEFAULT_SYSTEM_PROMPT
from kd.losses.distillation import check_kd_ratio
from kd.cache.session import TEACHER_CACHE
from kd.train.on_policy import ON_POLICY

HF_CHECKPOINTER = Schema("checkpointer / teacher_checkpointer (kd_lora)", "'checkpointer'", [
    _tt("_component_", "must be torchtune.training.FullModelHFCheckpointer (HF safetensors are streamed)",
        default="torchtune.training.FullModelHFCheckpointer"),
    _tt("checkpoint_dir", "directory of the HF checkpoint", required=True),
    _tt("checkpoint_files", "safetensors files (default: all in checkpoint_dir)"),
    _tt("output_dir", "accepted for torchtune compatibility; checkpoints go under the run's output_dir"),
    _tt("model_type", "QWEN2 (Qwen2 / Qwen2.5)", default="QWEN2"),
    _tt("recipe_checkpoint", "rejected: resume reads the latest checkpoint under output_dir"),
    _tt("adapter_checkpoint", "rejected: resume reads the latest checkpoint under output_dir"),
    _tt("safe_serialization", "accepted for torchtune compatibility"),
], doc="Sections `checkpointer` and `teacher_checkpointer` of recipes/kd_lora.py.")

KD_LORA = Schema("recipes/kd_lora.py", "the kd_lora config", [
    # torchtune's KD recipe keys
    _tt("output_dir", "run directory: checkpoints, metrics.jsonl, torchtune_config.yaml", required=True),
    _tt("model", "student builder (`lora_*` builder: LoRA; plain builder: full fine-tune)", "section", required=True),
    _tt("teacher_model", "teacher builder; absent: plain LoRA SFT (kd_ratio must be 0)", "section"),
    _tt("tokenizer", "tokenizer component (max_seq_len is the padded length)", "section", required=True),
    _tt("checkpointer", "student HF checkpoint (table `checkpointer`)", "section", required=True),
    _tt("teacher_checkpointer", "teacher HF checkpoint (required with teacher_model)", "section"),
    _tt("resume_from_checkpoint", "resume from the latest checkpoint under output_dir", "bool", False),
    _tt("dataset", "dataset component (or a list of them)", "section", required=True),
    _tt("seed", "global seed (null: random)", "int", None, nullable=True),
    _tt("shuffle", "shuffle the training data each epoch", "bool", True),
    _tt("batch_size", "micro-batch size per rank", "int", 1, lo=1),
    _tt("optimizer", "optimizer component (over the trainable parameters)", "section", required=True),
    _tt("lr_scheduler", "LR scheduler component (gets num_training_steps)", "section"),
    _tt("loss", "CE term: kd.losses.distillation.FusedKDCELoss (fused) or a chunked CE (kd/losses/components.py)", "section"),
    _tt("kd_loss", "divergence: kd.losses.distillation.DistillationLoss (or torchtune's chunked KD losses, loss_form=chunked)",
        "section"),
    _tt("kd_ratio", "weight r of the KD term: loss = (1 - r) CE + r KD", "float", 0.5, check=check_kd_ratio),
    _tt("epochs", "training epochs", "int", 1, lo=1),
    _tt("max_steps_per_epoch", "cap on optimizer steps per epoch", "int", None, lo=1, nullable=True),
    _tt("compile", "torch.compile the decoder layers", "bool", False),
    _tt("gradient_accumulation_steps", "micro-batches per optimizer step", "int", 1, lo=1),
    _tt("metric_logger", "torchtune metric logger component (rank 0)", "section"),
    _tt("log_every_n_steps", "optimizer steps between logged metrics", "int", 10, lo=1),
    _tt("log_peak_memory_stats", "log peak memory with the metrics", "bool", True),
    _tt("device", "auto | cpu | cuda[:i]", default="auto"),
    _tt("dtype", "bf16 | fp32 (fp16 is rejected)", default="bf16"),
    _tt("enable_activation_checkpointing", "checkpoint every student layer (see ac_mode)", "bool", False),
    _tt("enable_activation_offloading", "rejected (use activation checkpointing)", "bool", False),
    _tt("profiler", "torchtune profiler section (enabled: true to use)", "section"),
    _tt("clip_grad_norm", "max gradient norm (null: no clipping)", "float", 1.0, lo=0.0, nullable=True),
    _tt("save_adapter_weights_only", "False also writes merged weights at the end (see save_merged_model)", "bool",
        True),
    _tt("fsdp_cpu_offload", "FSDP2 CPU offload (device=cuda only)", "bool", False),
    _tt("fsdp_reshard_after_forward", "FSDP2 reshard_after_forward of the student", "bool", True),
    _tt("custom_sharded_layers", "rejected: every layer and the root are FSDP2 units already"),
    _tt("cudnn_deterministic_mode", "torchtune's debug_mode of set_seed", default=None),
    _tt("ac_mode", "none | full | selective (kd.core.config.activation_checkpoint_layers)", default=None),
    _tt("ac_option", "selective: checkpoint every x-th layer", default=None),
    # kd's keys
    _k("teacher_quantization", "bf16 (= null) | nf4 | fp8 | nf4_fp8 (kd.teacher.precision)", default=None),
    _k("student_quantization", "nf4 (QLoRA base) | null", default=None),
    _k("loss_form", "fused: loss from hidden states, never [tokens, vocab] logits; chunked: torchtune's chunked "
       "logits", "choice", "fused", choices=("fused", "chunked")),
    _k("fused_chunk_size", "tokens per chunk of the fused loss", "int", 1024, lo=1),
    _k("fsdp_strategy", "shard | hybrid (HSDP: replicate across nodes, shard within)", default="shard"),
    _k("teacher_sharding", "shard (FSDP2 like the student) | replicate (whole frozen teacher per rank)", "choice",
       "shard", choices=("shard", "replicate")),
    _k("save_every_n_steps", "optimizer steps between checkpoints (null: epoch ends only)", "int", None, lo=1,
       nullable=True),
    _k("keep_last_n_checkpoints", "older checkpoints are deleted (null: keep all)", "int", None, lo=1, nullable=True),
    _k("save_merged_model", "write a merged HF checkpoint at the end (null: from save_adapter_weights_only)",
       default=None),
    _k("base_model_name_or_path", "base_model_name_or_path of the PEFT adapter (default: checkpoint_dir)"),
    _k("eval_every_n_steps", "optimizer steps between validations (null: none)", "int", None, lo=1, nullable=True),
    _k("max_eval_batches", "cap on validation batches", "int", None, lo=1, nullable=True),
    _k("val_dataset", "validation dataset (default: the dataset's val split)", "section"),
    _k("num_workers", "dataloader workers", "int", 0, lo=0),
    _k("progress_bar", "tqdm progress bars (rank 0)", "bool", True),
    _k("overwrite", "a fresh run may replace the checkpoints already in output_dir", "bool", False),
    _k("teacher_cache", "online_then_cache | build | use (kd.cache.session; docs/teacher_cache.md)",
       "section"),
    _k("on_policy", "on-policy (student-generated) distillation: lmbda, temperature, ... (kd.train.on_policy)",
       "section"),
    _k("qad", "quantization-aware distillation: fp8_dynamic | w4a16 | nvfp4 | null; the student's decoder linears "
       "run fake-quantised in that deployment format (LoRA: the merged weight), export writes it (kd.train.qad)",
       default=None),
], doc="Online KD (and, without a teacher, LoRA SFT): `tune run recipes/kd_lora.py --config ...`.")

def _head(output_dir: str, model: str, checkpointer: str, *, checkpointer_required: bool = True) -> List[Key]:
    """The keys every offline recipe starts with: where it writes, the model builder and its HF checkpoint."""
    return [_tt("output_dir", output_dir, required=True), _tt("model", model, "section", required=True),
            _tt("checkpointer", checkpointer, "section", required=checkpointer_required)]


# device and dtype of the offline recipes (kd_lora has its own defaults and the fp16 rejection)
_DEVICE_DTYPE = [_tt("device", "auto | cpu | cuda[:i]"), _tt("dtype", "bf16 | fp32")]


EVALUATE = Schema("recipes/evaluate.py", "the evaluate config", [
    *_head("where the report and plots go", "student builder", "student HF checkpoint"),
    _k("adapters", "adapter directories to compare"),
    _tt("teacher_model", "teacher builder", "section"),
    _tt("teacher_checkpointer", "teacher HF checkpoint", "section"),
    _k("teacher_quantization", "bf16 (= null) | nf4 | fp8 | nf4_fp8"),
    _k("evaluate_teacher", "also evaluate the teacher", "bool", True),
    _tt("tokenizer", "tokenizer component", "section", required=True),
    _tt("dataset", "held-out data (source, split, ...)", "section", required=True),
    _tt("batch_size", "batch size", "int", 4, lo=1),
    _k("max_samples", "cap on evaluated samples", "int", None, lo=1, nullable=True),
    _k("questions", "questions answered in the report (null = the built-in Buddhist-QA questions)"),
    _k("max_new_tokens", "generation length", "int", 256, lo=1),
    _k("temperature", "sampling temperature (0 = greedy)", "float", 0.0, lo=0.0),
    _k("top_p", "nucleus sampling", "float", 1.0, check=top_p_value),
    _tt("seed", "seed", "int", 0),
    *_DEVICE_DTYPE,
    _k("plots", "write plots", "bool", True),
    _k("length_samples", "samples for the answer-length statistics", "int", 32, lo=0),
    _k("training_metrics", "metrics.jsonl files to plot"),
    _k("progress_bar", "tqdm progress bars", "bool", True),
], doc="Held-out evaluation of saved adapters: `tune run recipes/evaluate.py --config ...`.")

EXPORT = Schema("recipes/export.py", "the export config", [
    *_head("where merged/ and adapter/ go", "student builder", "base HF checkpoint"),
    _k("adapter_dir", "the PEFT adapter to merge"),
    *_DEVICE_DTYPE,
    _k("max_shard_size_gb", "safetensors shard size", "float", 5.0, lo=0.001),
    _tt("tokenizer", "the student's tokenizer (calibration prompts)", "section"),
    _k("overwrite", "replace a non-empty merged/ or adapter/", "bool", False),
    _k("quantize", "post-training quantization schemes (kd.train.quantize)"),
    _k("calibration", "calibration data of the quantization", "section"),
    _k("full_checkpoint", "export a full fine-tune checkpoint instead of an adapter"),
], doc="Merged HF export: `tune run recipes/export.py --config ...`.")

GENERATE_TEACHER = Schema("recipes/generate_teacher.py", "the generate_teacher config", [
    *_head("where the generated dataset goes", "teacher builder", "teacher HF checkpoint (or teacher_checkpointer)",
           checkpointer_required=False),
    _tt("teacher_checkpointer", "teacher HF checkpoint (alias of checkpointer)", "section"),
    _tt("tokenizer", "tokenizer component", "section", required=True),
    _k("source", "prompts (alpaca JSON)", required=True),
    _k("system_prompt", "system prompt of the chat template", default=DEFAULT_SYSTEM_PROMPT),
    _k("on_bad_record", "what a malformed record does", "choice", "error", choices=("error", "skip")),
    _k("teacher_quantization", "teacher precision: bf16 (= null) | nf4 | fp8 | nf4_fp8"),
    _tt("device", "auto | cpu | cuda[:i]"),
    _tt("dtype", "bf16 | fp32", default="bf16"),
    _tt("seed", "seed of the sampling", "int", 0, lo=0),
    _tt("batch_size", "prompts per batch", "int", 64, lo=1),
    _k("max_batch_tokens", "token budget per batch", "int", None, lo=1, nullable=True),
    _k("max_new_tokens", "generation length", "int", 1024, lo=1),
    _k("temperature", "sampling temperature (0 = greedy)", "float", 0.7, lo=0.0),
    _k("top_p", "nucleus sampling", "float", 1.0, check=top_p_value),
    _k("top_k", "top-k sampling (null = off)", "int", None, lo=1, nullable=True),
    _k("dataset_name", "name of the generated dataset", default="teacher_distill"),
    _k("merge", "also write the SFT file that merges the answers with the prompts", "bool", True),
    _k("allow_missing", "allow prompts without an answer", "bool", False),
    _k("progress_bar", "tqdm progress bars", "bool", True),
    _k("on_source_change", "what to do when the prompts changed since the last run", "choice", "error",
       choices=("error", "regenerate")),
    _k("max_samples", "cap on prompts", "int", None, lo=1, nullable=True),
    _k("log_level", "logging level", "choice", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    _k("decode_engine", "static (KV cache per bucket, CUDA graphs) | eager (same tokens)", "choice", "static",
       choices=("static", "eager")),
    _k("cuda_graphs", "capture the decode step in CUDA graphs", "bool", True),
    _k("nf4_decode_kernel", "NF4 decode kernel (kd.generate.nf4_matmul): auto (kd's CUDA GEMV up to 8 rows, the "
       "read-once Triton kernel up to nf4_fused_max_batch, dequantise + cuBLAS above), fused (the Triton kernel up "
       "to nf4_fused_max_batch) or dequant (the reference: dequantise + cuBLAS)", "choice", "auto",
       choices=("auto", "fused", "dequant")),
    _k("nf4_fused_max_batch", "largest batch the read-once NF4 kernels take (larger: dequantise + cuBLAS, "
       "compute-bound there; docs/offline.md)", "int", 128, lo=0),
], doc="Offline teacher generation: `tune run recipes/generate_teacher.py --config ...`.")

SCHEMAS = (KD_LORA, HF_CHECKPOINTER, TEACHER_CACHE, ON_POLICY, EVALUATE, EXPORT, GENERATE_TEACHER)
DOC = Path(__file__).resolve().parents[2] / "docs" / "config_keys.md"
_HEADER = """# Config keys

Generated from `kd/ops/schema.py` by `python -m kd.ops.schema --write`; do not edit by hand (`tests/test_schema.py`
fails when this file is stale). Every recipe rejects a key that is not listed here, with a "did you mean"
suggestion. "from": torchtune = the key of torchtune's recipes, read with the same meaning; kd = this project's.
Sections that name a `_component_` (model, loss, kd_loss, optimizer, ...) take the arguments of that component.
"""


def markdown() -> str:
    return _HEADER + "\n" + "\n".join(s.markdown() for s in SCHEMAS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kd.ops.schema", description="Print or write docs/config_keys.md.")
    p.add_argument("--write", action="store_true", help=f"write {DOC}")
    a = p.parse_args(argv)
    if a.write:
        DOC.write_text(markdown(), encoding="utf-8")
    else:
        sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
