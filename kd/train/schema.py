"""The config-key tables of the training recipe ``recipes/kd_lora.py``: its top level (:data:`KD_LORA`), its
``checkpointer`` sections (:data:`HF_CHECKPOINTER`) and its ``teacher_cache`` section (:data:`TEACHER_CACHE`).

They live in kd.train (not kd.ops) because :mod:`kd.train.settings` parses a config through them once for the
recipe, ``kd plan``, ``kd summary`` and the teacher cache alike; :mod:`kd.ops.schema` lists them with the other
recipes' tables for ``docs/config_keys.md``.
"""

from __future__ import annotations

from kd.core.keys import Schema, kd_key, tt_key
from kd.losses.distillation import check_kd_ratio
from kd.losses.sparse import SAMPLINGS

CACHE_MODES = ("online_then_cache", "build", "use")  # teacher_cache.mode (kd.cache.session)
DEFAULT_CACHE_K = 12  # teacher_cache.k when the section does not set it

HF_CHECKPOINTER = Schema("checkpointer / teacher_checkpointer (kd_lora)", "'checkpointer'", [
    tt_key("_component_", "must be torchtune.training.FullModelHFCheckpointer (HF safetensors are streamed)",
        default="torchtune.training.FullModelHFCheckpointer"),
    tt_key("checkpoint_dir", "directory of the HF checkpoint", required=True),
    tt_key("checkpoint_files", "safetensors files (default: all in checkpoint_dir)"),
    tt_key("output_dir", "accepted for torchtune compatibility; checkpoints go under the run's output_dir"),
    tt_key("model_type", "QWEN2 (Qwen2 / Qwen2.5)", default="QWEN2"),
    tt_key("recipe_checkpoint", "rejected: resume reads the latest checkpoint under output_dir"),
    tt_key("adapter_checkpoint", "rejected: resume reads the latest checkpoint under output_dir"),
    tt_key("safe_serialization", "accepted for torchtune compatibility"),
], doc="Sections `checkpointer` and `teacher_checkpointer` of recipes/kd_lora.py.")

KD_LORA = Schema("recipes/kd_lora.py", "the kd_lora config", [
    # torchtune's KD recipe keys
    tt_key("output_dir", "run directory: checkpoints, metrics.jsonl, torchtune_config.yaml", required=True),
    tt_key("model", "student builder (`lora_*` builder: LoRA; plain builder: full fine-tune)", "section", required=True),
    tt_key("teacher_model", "teacher builder; absent: plain LoRA SFT (kd_ratio must be 0)", "section"),
    tt_key("tokenizer", "tokenizer component (max_seq_len is the padded length)", "section", required=True),
    tt_key("checkpointer", "student HF checkpoint (table `checkpointer`)", "section", required=True),
    tt_key("teacher_checkpointer", "teacher HF checkpoint (required with teacher_model)", "section"),
    tt_key("resume_from_checkpoint", "resume from the latest checkpoint under output_dir", "bool", False),
    tt_key("dataset", "dataset component (or a list of them)", "section", required=True),
    tt_key("seed", "global seed (null: random)", "int", None, nullable=True),
    tt_key("shuffle", "shuffle the training data each epoch", "bool", True),
    tt_key("batch_size", "micro-batch size per rank", "int", 1, lo=1),
    tt_key("optimizer", "optimizer component (over the trainable parameters)", "section", required=True),
    tt_key("lr_scheduler", "LR scheduler component (gets num_training_steps)", "section"),
    tt_key("loss", "CE term: kd.losses.distillation.FusedKDCELoss (fused) or a chunked CE (kd/losses/components.py)", "section"),
    tt_key("kd_loss", "divergence: kd.losses.distillation.DistillationLoss (or torchtune's chunked KD losses, loss_form=chunked)",
        "section"),
    tt_key("kd_ratio", "weight r of the KD term: loss = (1 - r) CE + r KD", "float", 0.5, check=check_kd_ratio),
    tt_key("epochs", "training epochs", "int", 1, lo=1),
    tt_key("max_steps_per_epoch", "cap on optimizer steps per epoch", "int", None, lo=1, nullable=True),
    tt_key("compile", "torch.compile the decoder layers", "bool", False),
    tt_key("gradient_accumulation_steps", "micro-batches per optimizer step", "int", 1, lo=1),
    tt_key("metric_logger", "torchtune metric logger component (rank 0)", "section"),
    tt_key("log_every_n_steps", "optimizer steps between logged metrics", "int", 10, lo=1),
    tt_key("log_peak_memory_stats", "log peak memory with the metrics", "bool", True),
    tt_key("device", "auto | cpu | cuda[:i]", default="auto"),
    tt_key("dtype", "bf16 | fp32 (fp16 is rejected)", default="bf16"),
    tt_key("enable_activation_checkpointing", "checkpoint every student layer (see ac_mode)", "bool", False),
    tt_key("enable_activation_offloading", "rejected (use activation checkpointing)", "bool", False),
    tt_key("profiler", "torchtune profiler section (enabled: true to use)", "section"),
    tt_key("clip_grad_norm", "max gradient norm (null: no clipping)", "float", 1.0, lo=0.0, nullable=True),
    tt_key("save_adapter_weights_only", "False also writes merged weights at the end (see save_merged_model)", "bool",
        True),
    tt_key("fsdp_cpu_offload", "FSDP2 CPU offload (device=cuda only)", "bool", False),
    tt_key("fsdp_reshard_after_forward", "FSDP2 reshard_after_forward of the student", "bool", True),
    tt_key("custom_sharded_layers", "rejected: every layer and the root are FSDP2 units already"),
    tt_key("cudnn_deterministic_mode", "torchtune's debug_mode of set_seed", default=None),
    tt_key("ac_mode", "none | full | selective (kd.core.config.activation_checkpoint_layers)", default=None),
    tt_key("ac_option", "selective: checkpoint every x-th layer", default=None),
    # kd's keys
    kd_key("teacher_quantization", "bf16 (= null) | nf4 | fp8 | nf4_fp8 (kd.teacher.precision)", default=None),
    kd_key("student_quantization", "nf4 (QLoRA base) | null", default=None),
    kd_key("loss_form", "fused: loss from hidden states, never [tokens, vocab] logits; chunked: torchtune's chunked "
       "logits", "choice", "fused", choices=("fused", "chunked")),
    kd_key("fused_chunk_size", "tokens per chunk of the fused loss", "int", 1024, lo=1),
    kd_key("fsdp_strategy", "shard | hybrid (HSDP: replicate across nodes, shard within)", default="shard"),
    kd_key("teacher_sharding", "shard (FSDP2 like the student) | replicate (whole frozen teacher per rank)", "choice",
       "shard", choices=("shard", "replicate")),
    kd_key("save_every_n_steps", "optimizer steps between checkpoints (null: epoch ends only)", "int", None, lo=1,
       nullable=True),
    kd_key("keep_last_n_checkpoints", "older checkpoints are deleted (null: keep all)", "int", None, lo=1, nullable=True),
    kd_key("save_merged_model", "write a merged HF checkpoint at the end (null: from save_adapter_weights_only)",
       default=None),
    kd_key("base_model_name_or_path", "base_model_name_or_path of the PEFT adapter (default: checkpoint_dir)"),
    kd_key("eval_every_n_steps", "optimizer steps between validations (null: none)", "int", None, lo=1, nullable=True),
    kd_key("max_eval_batches", "cap on validation batches", "int", None, lo=1, nullable=True),
    kd_key("val_dataset", "validation dataset (default: the dataset's val split)", "section"),
    kd_key("num_workers", "dataloader workers", "int", 0, lo=0),
    kd_key("progress_bar", "tqdm progress bars (rank 0)", "bool", True),
    kd_key("overwrite", "a fresh run may replace the checkpoints already in output_dir", "bool", False),
    kd_key("teacher_cache", "online_then_cache | build | use (kd.cache.session; docs/teacher_cache.md)",
       "section"),
    kd_key("on_policy", "on-policy (student-generated) distillation: lmbda, temperature, ... (kd.train.on_policy)",
       "section"),
    kd_key("qad", "quantization-aware distillation: fp8_dynamic | w4a16 | nvfp4 | null; the student's decoder linears "
       "run fake-quantised in that deployment format (LoRA: the merged weight), export writes it (kd.train.qad)",
       default=None),
], doc="Online KD (and, without a teacher, LoRA SFT): `tune run recipes/kd_lora.py --config ...`.")

TEACHER_CACHE = Schema("teacher_cache (section of kd_lora)", "'teacher_cache'", [
    kd_key("mode", "online_then_cache | build | use (docs/teacher_cache.md)", "choice", choices=CACHE_MODES,
       required=True),
    kd_key("dir", "cache directory, one per node (default ${output_dir}/teacher_cache)"),
    kd_key("k", "sampled teacher tokens per answer token", "int", DEFAULT_CACHE_K, lo=1, hi=255),
    kd_key("sampling", "random (Random-Sampling KD, unbiased) | topk (renormalised top-k: biased, for comparison)",
       "choice", "random", choices=tuple(SAMPLINGS)),
    kd_key("seed", "seed of the teacher draws", "int", 0, lo=0),
    kd_key("build_batch_size", "samples per teacher-only batch (default: batch_size)", "int", None, lo=1, nullable=True),
    kd_key("build_max_tokens", "token budget of a teacher-only batch", "int", None, lo=1, nullable=True),
    kd_key("rebuild", "discard a cache whose key no longer matches and build again", "bool", False),
], prefix="teacher_cache.")
