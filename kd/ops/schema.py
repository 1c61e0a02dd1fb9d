"""One table of config keys per recipe: the single source of the keys a recipe accepts.

From each :class:`Schema` come

- the unknown-key check with its "did you mean" (:meth:`Schema.check`, via :func:`kd.core.config.check_keys`);
- the value of a key with its default and range (:meth:`Schema.get`); a kd_lora config is read through its table
  once, by :func:`kd.train.settings.kd_lora_settings`, which the recipe and ``kd plan`` both run;
- the key tables of ``docs/config_keys.md`` (:func:`markdown`; ``python -m kd.ops.schema --write`` regenerates
  the file, ``tests/test_schema.py`` fails when it is stale).

torchtune's ``config.parse`` accepts any key, so without this a typo such as ``kd_ration=0.7`` would
silently train with the default. Sections whose keys belong to a component (``loss``, ``kd_loss``,
``optimizer``, ``model``, ...) are checked by instantiating that component as written. The training recipe's
tables (``KD_LORA``, ``HF_CHECKPOINTER``, ``TEACHER_CACHE``) live in :mod:`kd.train.schema` (kd.train parses the
config; it may not import kd.ops) and the ``on_policy`` section's in :mod:`kd.train.on_policy`; all are listed here
for the docs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from kd.core.keys import Key, Schema, top_p_value
from kd.core.keys import kd_key as _k
from kd.core.keys import tt_key as _tt
from kd.data.alpaca import DEFAULT_SYSTEM_PROMPT
from kd.train.on_policy import ON_POLICY
from kd.train.schema import HF_CHECKPOINTER, KD_LORA, TEACHER_CACHE


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
