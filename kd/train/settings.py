"""A kd_lora config parsed once: :func:`kd_lora_settings` checks it (the recipe's whole start-up validation) and
returns a frozen :class:`KDLoRASettings`.

``recipes/kd_lora.py``, ``kd plan`` / ``kd preflight`` / ``kd calibrate`` (:mod:`kd.ops.planner`), the teacher
cache (:mod:`kd.cache.session`) and ``kd summary`` (the :class:`kd.core.layout.RunLayout`) read the config through
it, so a value is interpreted in one place and ``kd plan`` rejects what the recipe rejects, with the same line.
The key tables are :mod:`kd.train.schema`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, ListConfig

from kd.core.config import ConfigError, require_component
from kd.core.layout import RunLayout
from kd.losses import components as loss_components
from kd.teacher.precision import TeacherPrecision, parse_precision, resolve_precision
from kd.train import full
from kd.train import qad as kqad
from kd.train import run_checks as checks
from kd.train.on_policy import OnPolicyConfig, parse_on_policy
from kd.train.schema import HF_CHECKPOINTER, KD_LORA, TEACHER_CACHE


@dataclass(frozen=True)
class CacheOptions:
    """The ``teacher_cache`` section, checked against the rest of the config."""

    mode: str  # online_then_cache | build | use
    dir: Path
    k: int
    sampling: str
    seed: int
    build_batch_size: Optional[int]
    build_max_tokens: Optional[int]
    rebuild: bool


def parse_cache(cfg, layout: RunLayout) -> Optional[CacheOptions]:
    """The ``teacher_cache`` section (None when absent); ConfigError for unknown keys and bad values."""
    sec = cfg.get("teacher_cache", None)
    if sec is None:
        return None
    if not hasattr(sec, "keys"):
        raise ConfigError(f"'teacher_cache' must be a mapping (mode, dir, k, ...), got {sec!r}.")
    TEACHER_CACHE.check(sec)
    get = lambda name: TEACHER_CACHE.get(sec, name)  # noqa: E731
    mode = get("mode")
    if cfg.get("teacher_model", None) is None:
        raise ConfigError("teacher_cache needs teacher_model and teacher_checkpointer (the cache is built from, "
                          "and checked against, that teacher).")
    if KD_LORA.get(cfg, "loss_form") != "fused":
        raise ConfigError("teacher_cache needs loss_form=fused (the sparse targets are gathered per chunk in the "
                          "fused head).")
    return CacheOptions(
        mode=mode, dir=Path(sec.get("dir", None) or layout.teacher_cache), k=get("k"), sampling=get("sampling"),
        seed=get("seed"), build_batch_size=get("build_batch_size"), build_max_tokens=get("build_max_tokens"),
        rebuild=get("rebuild"),
    )


@dataclass(frozen=True)
class KDLoRASettings:
    """What a kd_lora config says, each value checked and with its default (see :data:`kd.train.schema.KD_LORA`)."""

    layout: RunLayout
    has_teacher: bool
    full_finetune: bool  # a plain model builder (kd.train.full) instead of a LoRA one
    kd_ratio: float
    loss_form: str  # the form that runs (torchtune's chunked losses named with fused: chunked)
    loss_form_note: Optional[str]  # why loss_form differs from the config's, else None
    fused_chunk_size: int
    batch_size: int
    gradient_accumulation_steps: int
    clip_grad_norm: Optional[float]
    epochs: int
    max_steps_per_epoch: Optional[int]
    log_every_n_steps: int
    save_every_n_steps: Optional[int]
    eval_every_n_steps: Optional[int]
    max_eval_batches: Optional[int]
    keep_last_n_checkpoints: Optional[int]
    resume: bool
    teacher_quantization: str  # the requested precision, canonical (null -> bf16)
    teacher_sharding: str
    dtype: str
    qad: Optional[str]
    cache: Optional[CacheOptions]
    on_policy: Optional[OnPolicyConfig]  # seed: the section's, else the config's seed (see with_run_seed)
    on_policy_seeded: bool  # the on_policy section names its own seed
    teacher_precision: Optional[TeacherPrecision] = None  # resolved on the run's device (resolve_teacher)

    @property
    def precision_key(self) -> str:
        """The teacher's numerics as the cache key records them: the precision that RUNS (after any fall-back,
        so null and bf16 are one key) and the dtype. Needs :meth:`resolve_teacher` first."""
        if self.teacher_precision is None:
            raise RuntimeError("precision_key before resolve_teacher: the precision that runs depends on the device")
        return f"{self.teacher_precision.name}/{self.dtype}"

    def resolve_teacher(self, device, dtype) -> "KDLoRASettings":
        """These settings with the teacher precision this device runs (one warning per fall-back)."""
        if not self.has_teacher:
            return self
        return dataclasses.replace(self, teacher_precision=resolve_precision(self.teacher_quantization, device, dtype))

    def with_run_seed(self, seed: Optional[int]) -> "KDLoRASettings":
        """An on_policy section without its own seed takes the run's (possibly drawn) seed."""
        if self.on_policy is None or self.on_policy_seeded:
            return self
        return dataclasses.replace(self, on_policy=dataclasses.replace(self.on_policy, seed=int(seed or 0)))


def _check_checkpointers(cfg) -> None:
    for key in ("checkpointer", "teacher_checkpointer"):
        if cfg.get(key, None) is None:
            continue
        section = cfg[key]
        HF_CHECKPOINTER.check(section, where=f"'{key}'")
        mt = str(section.get("model_type", "QWEN2")).upper()
        if mt not in ("QWEN2", "QWEN2_5"):
            raise ConfigError(
                f"{key}.model_type={mt!r}: this recipe loads Qwen2/Qwen2.5 HF checkpoints (model_type: QWEN2)."
            )
        comp = section.get("_component_", "torchtune.training.FullModelHFCheckpointer")
        if comp != "torchtune.training.FullModelHFCheckpointer":
            raise ConfigError(
                f"{key}._component_={comp!r}: this recipe streams HF safetensors checkpoints "
                "(torchtune.training.FullModelHFCheckpointer layout)."
            )
        if section.get("recipe_checkpoint") or section.get("adapter_checkpoint"):
            raise ConfigError(
                f"{key}.recipe_checkpoint/adapter_checkpoint are not used: resuming reads the latest "
                "checkpoint under output_dir. Set resume_from_checkpoint=True instead."
            )


def _check_on_policy_data(cfg, has_teacher: bool) -> None:
    if cfg.get("on_policy", None) is None:
        return
    if not has_teacher:
        raise ConfigError("on_policy needs a teacher (teacher_model): the teacher scores the student's answers.")
    ds = cfg.dataset
    if any(bool(c.get("packed", False)) for c in (ds if isinstance(ds, ListConfig) else [ds])):
        raise ConfigError("on_policy needs unpacked data (dataset.packed=False): the prompts are re-answered per row.")


# One function on purpose: it is the recipe's whole start-up validation, in the order the checks must run (keys
# first, then the values that decide which later checks apply), and returns every value it read.
def kd_lora_settings(cfg: DictConfig) -> KDLoRASettings:
    """Check a kd_lora config (ConfigError, one line) and return its settings. No model, file or device is
    touched, so ``kd plan`` runs exactly this too."""
    KD_LORA.check(cfg)
    get = lambda name: KD_LORA.get(cfg, name)  # noqa: E731
    # No teacher = plain LoRA SFT (the offline-distillation path): only valid with kd_ratio=0.
    has_teacher = cfg.get("teacher_model", None) is not None
    kd_ratio = get("kd_ratio")
    if not has_teacher and kd_ratio != 0.0:
        raise ConfigError(
            "teacher_model is not set: without a teacher this recipe trains plain LoRA SFT, which "
            f"needs kd_ratio=0 (got kd_ratio={kd_ratio})."
        )
    precision = parse_precision(cfg.get("teacher_quantization", None))  # a bad value fails before anything is built
    qad = kqad.check_format(cfg.get("qad", None))
    if qad is not None and cfg.get("student_quantization", None):
        raise ConfigError("qad fake-quantises the student's own weights; it cannot run on an NF4 student base "
                          "(student_quantization=nf4): remove one of the two.")
    if has_teacher and cfg.get("teacher_checkpointer", None) is None:
        raise ConfigError("teacher_model is set but teacher_checkpointer is missing.")
    for key in ("model", "teacher_model", "tokenizer", "dataset", "optimizer"):
        if key == "dataset" and isinstance(cfg.dataset, ListConfig):
            continue
        if key == "teacher_model" and not has_teacher:
            continue
        require_component(cfg, key)
    _check_checkpointers(cfg)
    if cfg.get("custom_sharded_layers", None):
        raise ConfigError(
            "custom_sharded_layers is not needed: every decoder layer and the root are FSDP2 units, and "
            "the fused head never materialises the output logits. Remove the key."
        )
    if cfg.get("enable_activation_offloading", False):
        raise ConfigError(
            "enable_activation_offloading=True is not supported by this recipe; use "
            "enable_activation_checkpointing=True to save activation memory."
        )
    full_ft = full.is_full_finetune(cfg.model)
    if full_ft:
        full.check_config(cfg)
    else:
        checks.check_lora(cfg.model)
    # values torch/torchtune would reject later with a traceback, checked before any model is loaded
    dtype = checks.check_dtype(cfg)
    checks.check_tokenizer_section(cfg, files=False)  # the files are checked when it is built (setup)
    checks.check_optimizer(cfg)
    checks.check_lr_scheduler(cfg)  # num_warmup_steps >= 0, arguments it takes
    loss_components.check_kd_loss(cfg)
    loss_form, note = loss_components.effective_loss_form(cfg, get("loss_form"))
    loss_components.check_loss_components(cfg, loss_form)
    checks.check_ignore_index(cfg)
    layout = RunLayout(Path(str(cfg.output_dir)))
    cache = parse_cache(cfg, layout)
    _check_on_policy_data(cfg, has_teacher)
    on_policy = parse_on_policy(cfg.get("on_policy", None), cfg.get("seed", None))
    return KDLoRASettings(
        layout=layout, has_teacher=has_teacher, full_finetune=full_ft, kd_ratio=kd_ratio, loss_form=loss_form,
        loss_form_note=note, fused_chunk_size=get("fused_chunk_size"), batch_size=get("batch_size"),
        gradient_accumulation_steps=get("gradient_accumulation_steps"), clip_grad_norm=get("clip_grad_norm"),
        epochs=get("epochs"), max_steps_per_epoch=get("max_steps_per_epoch"),
        log_every_n_steps=get("log_every_n_steps"), save_every_n_steps=get("save_every_n_steps"),
        eval_every_n_steps=get("eval_every_n_steps"), max_eval_batches=get("max_eval_batches"),
        keep_last_n_checkpoints=get("keep_last_n_checkpoints"),
        resume=bool(cfg.get("resume_from_checkpoint", False)), teacher_quantization=precision,
        teacher_sharding=get("teacher_sharding"), dtype=str(dtype), qad=qad, cache=cache, on_policy=on_policy,
        on_policy_seeded=on_policy is not None and cfg.on_policy.get("seed", None) is not None,
    )

