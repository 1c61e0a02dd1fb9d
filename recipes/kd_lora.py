"""Online knowledge distillation: a LoRA student trained against a live (NF4 or bf16) teacher.

One recipe for every world size: a single process (``tune run recipes/kd_lora.py --config ...``), several
processes on one node, or several nodes (``tune run --nnodes 2 --nproc_per_node 1 ...`` / ``torchrun``).
The only branch on world size is whether models are wrapped with FSDP2 (``fully_shard``); the training
loop, loss normalisation, gradient clipping, logging and checkpointing are the same code everywhere.

Loss per optimizer step (G = gradient-accumulation micro-batches, R = ranks, N = valid tokens of all of
them, counted and all-reduced *before* the first backward of the step):

    loss = sum_{g, r} [ (1 - kd_ratio) * CE_sum(g, r) + kd_ratio * KD_sum(g, r) ] / N

Each micro-batch back-propagates its own sum divided by N (times R, undoing FSDP2's gradient mean), so
the gradient is exactly that of the global token mean, whatever batch_size x G x R split is used.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import random
import resource
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtune import config as tt_config
from torchtune import training, utils
from torchtune.data import padded_collate_packed, padded_collate_sft
from torchtune.datasets import ConcatDataset
from torchtune.modules.peft import get_lora_module_names
from torchtune.training import DummyProfiler
from tqdm import tqdm

from kd.cache.session import teacher_cache_for
from kd.core import run_lock
from kd.core.config import ConfigError, DataError, activation_checkpoint_layers
from kd.core.progress import configure_logging, progress
from kd.data.alpaca import check_truncation
from kd.losses import components as loss_components
from kd.losses.distillation import KDCEResult, chunked_kd_ce, kd_ce_mix
from kd.losses.heads import FusedKDHead, FusedTargets, HiddenStatesHead
from kd.ops.planner import chunked_extra_gib, plan_from_config
from kd.teacher.precision import check_sharding
from kd.train import dist as kdist
from kd.train import full
from kd.train import qad as kqad
from kd.train import run_checks as checks
from kd.train.adapter_io import lora_state_dict
from kd.train.cli_util import run_recipe
from kd.train.full import all_trainable
from kd.train.guard import NonFiniteGuard
from kd.train.hf_export import save_merged_hf
from kd.train.metric_logging import NamedVector, kd_logging_cfg
from kd.train.models import (
    apply_activation_checkpointing,
    build_on_meta,
    is_adapter_param,
    load_adapter_state_dict,
    load_frozen_model,
    load_hf_into_model,
    shift_labels,
)
from kd.train.on_policy import count_on_policy_steps, generate_on_policy, is_on_policy_step
from kd.train.settings import kd_lora_settings
from kd.train.step_checkpoint import CheckpointManager
from kd.train.timing import PhaseTimer

log = logging.getLogger("kd.recipe")

# The keys this recipe accepts, their defaults and ranges: one table (kd.train.schema.KD_LORA), read once into
# kd.train.settings.KDLoRASettings (also behind `kd plan` and docs/config_keys.md).


class KDLoRARecipe:
    """LoRA student + frozen teacher, fused or chunked KD+CE loss, FSDP2 for world_size > 1."""

    def __init__(self, cfg: DictConfig) -> None:
        st = kd_lora_settings(cfg)  # the config, checked and parsed once (kd.train.settings; kd plan runs the same)
        self._device = kdist.resolve_device(cfg.get("device", "auto"))
        self._dist = kdist.init_distributed(self._device)
        self._dtype = training.get_dtype(cfg.get("dtype", "bf16"), device=self._device)
        if self._dtype == torch.float16:
            raise ConfigError("dtype=fp16 is not supported (no loss scaling); use bf16 or fp32.")
        self.world_size, self.rank = self._dist.world_size, self._dist.rank
        self._is_rank_zero = self._dist.is_rank_zero
        self._fsdp = self.world_size > 1
        if cfg.get("fsdp_cpu_offload", False) and self._device.type != "cuda":
            raise ConfigError(
                "fsdp_cpu_offload=True offloads GPU memory to the host; it needs device=cuda "
                "(on CPU, and on GB10's unified memory, it buys nothing)."
            )
        self.seed = training.set_seed(
            seed=cfg.get("seed", None), debug_mode=cfg.get("cudnn_deterministic_mode", None)
        )
        # the teacher precision this device runs (one warning per fall-back); the cache key records it
        self._settings = st = st.resolve_teacher(self._device, self._dtype).with_run_seed(self.seed)
        self._layout = st.layout
        self._output_dir = st.layout.root
        self._log_every_n_steps = st.log_every_n_steps
        self._log_peak_memory_stats = bool(cfg.get("log_peak_memory_stats", True))
        self._kd_ratio = st.kd_ratio
        self._grad_accum = st.gradient_accumulation_steps
        self._clip_grad_norm = st.clip_grad_norm
        # torchtune's chunked losses named with loss_form=fused run chunked (kd.losses.components.effective_loss_form)
        self._loss_form, self._loss_form_note = st.loss_form, st.loss_form_note
        self._fused_chunk_size = st.fused_chunk_size
        self.total_epochs = st.epochs
        self.max_steps_per_epoch = st.max_steps_per_epoch
        self._save_every = st.save_every_n_steps
        self._eval_every = st.eval_every_n_steps
        self._max_eval_batches = st.max_eval_batches
        self._resume = st.resume
        self.epochs_run = 0
        self.global_step = 0
        self._step_in_epoch = 0
        self._stop_requested = False

    # ----------------------------------------------------------------------------------------------
    # Setup
    # ----------------------------------------------------------------------------------------------
    def setup(self, cfg: DictConfig) -> None:
        kdist.check_same_run(cfg)  # every rank: same resolved config + package versions, else one error line (issue 27)
        self._cfg = cfg
        # 0. output_dir: writable; a fresh run never overwrites another run, a resume needs the same data
        self._setup_run_dir(cfg)
        # 1. tokenizer (needed by the dataset); its ids must fit both embeddings (checked before loading)
        self._tokenizer = checks.build_tokenizer(cfg)
        models = (("model", cfg.model), ("teacher_model", cfg.get("teacher_model", None)))
        checks.check_tokenizer_fits(self._tokenizer, models)
        checks.check_seq_len_fits(cfg, models)  # tokenizer.max_seq_len <= each model's max_seq_len
        # 2. metric logger and run info (rank 0 only)
        self._setup_logging(cfg)
        # 3. memory plan (rank 0), then the FSDP2 device mesh (None for one process)
        self._log_memory_plan(cfg)
        self._mesh = kdist.build_mesh(self._dist, self._device, cfg.get("fsdp_strategy", "shard")) if self._fsdp else None
        # 3b. teacher cache (kd.cache.session; NoCache without the section); a teacher-only build needs no student
        self._setup_teacher_cache(cfg)
        if self._cache.builds_only:
            return self._setup_cache_build(cfg)
        # 4. student: LoRA on a frozen base, weights streamed from the HF checkpoint
        self._model = self._setup_student(cfg)
        # 5. teacher: frozen, eval, in its precision (kd.teacher.precision: bf16/nf4/fp8/nf4_fp8), streamed layer by layer
        #    (not loaded when the teacher cache makes it unnecessary)
        self._teacher, self._teacher_head_weight = self._setup_teacher(cfg) if self._teacher_at_start else (None, None)
        # 6. losses (KD divergence + CE) and the way they are computed (fused / chunked)
        self._setup_loss(cfg)
        self._setup_on_policy(cfg)
        # 7. optimizer over the adapter parameters only
        self._optimizer = tt_config.instantiate(
            cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad]
        )
        # 8. data: train loader (stateful, for mid-epoch resume) and optional validation loader
        self._train_loader = self._setup_data(cfg.dataset, shuffle=bool(cfg.get("shuffle", True)), split="train")
        self._val_loader = self._setup_val_data(cfg)
        steps = len(self._train_loader) // self._grad_accum
        if steps == 0:
            raise ConfigError(
                f"The training set gives {len(self._train_loader)} batches per rank, fewer than "
                f"gradient_accumulation_steps={self._grad_accum}: lower batch_size or gradient_accumulation_steps."
            )
        self._steps_per_epoch = min(steps, self.max_steps_per_epoch or steps)
        # 9. LR scheduler (needs the number of steps)
        self._lr_scheduler = None
        if cfg.get("lr_scheduler") is not None:
            self._lr_scheduler = tt_config.instantiate(
                cfg.lr_scheduler, self._optimizer,
                num_training_steps=self.total_epochs * self._steps_per_epoch, last_epoch=-1,
            )
        # 10. checkpoints: restore everything when resuming
        self._setup_checkpointing(cfg)
        # 11. profiler
        self._profiler = self._setup_profiler(cfg.get("profiler", None))
        # 12. teacher cache: index the data, check the cache key, fill or switch phases as the mode says
        val_ds = self._val_loader.dataset if self._val_loader is not None else None
        self._cache.begin(cfg, loss=self._kd_loss, tokenizer=self._tokenizer, ignore_index=self._ignore_index,
                          datasets=[self._train_loader.dataset, val_ds], loaders=[self._train_loader, self._val_loader],
                          teacher=self)
        # 13. the config file of the run, written only once setup has succeeded (a failed start must not
        # replace the torchtune_config.yaml of the run whose checkpoints are in output_dir)
        if self._metric_logger is not None:
            self._metric_logger.log_config(cfg)

    def _setup_run_dir(self, cfg: DictConfig) -> None:
        self._run_info = checks.run_info(cfg, self.world_size)

        def check():
            checks.writable_dir(cfg.output_dir)
            # one live run per output_dir (kd.core.run_lock): held until cleanup / process exit
            self._run_lock = run_lock.acquire(cfg.output_dir, "a kd_lora run" + (" (resumed)" if self._resume else ""))
            checks.check_run_dir(cfg.output_dir, resume=self._resume, overwrite=bool(cfg.get("overwrite", False)),
                                 info=self._run_info)
            return self._run_lock.info

        rank0_lock = kdist.rank0_then_broadcast(check, error_type=ConfigError)
        # several nodes: each node's own output_dir is locked too (kd.train.run_checks.lock_node_dir)
        self._node_lock = checks.lock_node_dir(cfg.output_dir, self._dist, rank0_lock, "a kd_lora run")

    def _setup_logging(self, cfg: DictConfig) -> None:
        self._metric_logger = None
        if self._is_rank_zero:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            if cfg.get("metric_logger") is not None:
                self._metric_logger = tt_config.instantiate(kd_logging_cfg(cfg.metric_logger))
            self._metrics_file = open(self._layout.metrics, "a", buffering=1)
        self._progress_bar = bool(cfg.get("progress_bar", True))

    def _log_memory_plan(self, cfg: DictConfig) -> None:
        if not self._is_rank_zero or cfg.get("teacher_model", None) is None:
            return

        try:
            plan = plan_from_config(cfg, self.world_size)
        except ConfigError:
            raise
        except Exception as e:  # the plan is advice: never block training on it
            log.warning(f"memory plan unavailable: {e}")
            return
        log.info("memory plan (per device):\n" + plan.table())

    def _lora_info(self, cfg_model: DictConfig) -> None:
        # A plain (non-LoRA) builder trains the full student: same loop, sharded checkpoints (kd.train.full).
        self._full = self._settings.full_finetune
        if self._full:
            self._lora_rank, self._lora_alpha = 0, 1.0
            return
        self._lora_rank = int(cfg_model.lora_rank)
        self._lora_alpha = float(cfg_model.lora_alpha)
        self._lora_attn_modules = list(cfg_model.get("lora_attn_modules", []))
        self._apply_lora_to_mlp = bool(cfg_model.get("apply_lora_to_mlp", False))
        self._apply_lora_to_output = bool(cfg_model.get("apply_lora_to_output", False))

    def _setup_student(self, cfg: DictConfig) -> nn.Module:
        self._lora_info(cfg.model)
        model = build_on_meta(cfg.model, self._dtype)
        # Activation checkpointing on the layers torchtune's keys select (all, none or every x-th layer);
        # kd.ops.planner counts the same layers.
        ac_layers = activation_checkpoint_layers(cfg, len(model.layers))
        apply_activation_checkpointing(model, ac_layers)
        self._log(f"activation checkpointing on {len(ac_layers)}/{len(model.layers)} student layers")
        if self._loss_form == "fused":
            # Swap the head before loading/sharding, so FSDP2 manages the parameters the head holds
            # (same names: output.weight, output.lora_a.weight, ...).
            model.output = FusedKDHead(model.output, chunk_size=self._fused_chunk_size)
        ck = cfg.checkpointer
        self._student_ckpt_dir = ck.checkpoint_dir
        quant = cfg.get("student_quantization", None)
        if quant not in (None, "nf4"):
            raise ConfigError(f"student_quantization must be null or 'nf4', got {quant!r}.")
        load_hf_into_model(
            model, ck.checkpoint_dir, ck.get("checkpoint_files", None),
            device=self._device, dtype=self._dtype, nf4=quant == "nf4",
            mesh=self._mesh, fsdp=self._fsdp,
            reshard_after_forward=bool(cfg.get("fsdp_reshard_after_forward", True)),
            cpu_offload=bool(cfg.get("fsdp_cpu_offload", False)),
            trainable=all_trainable if self._full else is_adapter_param, which="student",
            progress=self._is_rank_zero,
            init_seed=self.seed or 0,
        )
        self._qad = self._settings.qad
        if self._qad is not None:  # before compile: the patched forwards are what gets compiled
            n = kqad.apply_qad_(model, self._qad)
            self._log(f"qad: {n} student linears run in {self._qad}'s fake-quantised numerics (kd.train.qad); "
                      f"export writes quantized-{kqad.export_scheme(self._qad)}")
        if cfg.get("compile", False):
            training.compile_model(model, verbose=self._is_rank_zero)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._log(f"student ready: {n_train:,} trainable ({'full fine-tune' if self._full else 'LoRA'}) "
                  "parameters per rank")
        return model

    def _setup_teacher(self, cfg: DictConfig):
        if cfg.get("teacher_model", None) is None:
            self._log("no teacher_model: plain LoRA SFT (kd_ratio=0)")
            return None, None
        # precision (bf16 | nf4 | fp8 | nf4_fp8): one warning and the next precision if this device cannot run it
        prec = self._settings.teacher_precision  # resolved in __init__ (fall-back warned there)
        sharding = self._settings.teacher_sharding
        check_sharding(prec, sharding, self._fsdp)
        head_weight = None
        fused = self._loss_form == "fused"
        # frozen, eval mode, NF4/FP8 fast forward applied; sharded below
        model = load_frozen_model(cfg.teacher_model, cfg.teacher_checkpointer, device=self._device,
                                  dtype=self._dtype, precision=prec, progress=self._is_rank_zero)
        if fused:
            # Keep the projection beside the model (replicated, frozen) for the fused loss.
            out = model.output
            head_weight = (out.tied_module.weight if not isinstance(out, nn.Module) else out.weight).detach()
            model.output = HiddenStatesHead()
        if self._fsdp and sharding == "shard":

            kw = {"mesh": self._mesh, "reshard_after_forward": True}
            for layer in model.layers:
                fully_shard(layer, **kw)
            fully_shard(model, **kw)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.get("compile", False):
            training.compile_model(model, verbose=self._is_rank_zero)
        # Vocabulary check here so a mismatch fails before training, naming both sizes
        # (the student is built first, in step 4 of setup; none in teacher_cache mode=build).
        s_vocab = self._model.tok_embeddings.num_embeddings if self._model is not None else None
        t_vocab = model.tok_embeddings.num_embeddings
        if s_vocab is not None and s_vocab != t_vocab:
            raise ConfigError(
                f"Teacher vocabulary ({t_vocab} rows) differs from the student's ({s_vocab} rows). "
                "Qwen2.5 <=3B models have 151,936 output rows and 7B/72B 152,064: pair models of the "
                "same family size group, or slice both to the 151,665 tokenizer ids."
            )
        self._log(f"teacher ready ({prec.name} [{prec.impl}], dtype {self._dtype})")
        return model, head_weight

    def _setup_loss(self, cfg: DictConfig) -> None:
        """``loss:`` (the CE term; in the fused form the fused CE+KD step) and ``kd_loss:`` (the divergence),
        instantiated exactly as the config names them (kd.losses.components: a component the loss form cannot
        run is a ConfigError naming the kd equivalent)."""
        self._ignore_index = -100  # kd's datasets mask with -100; checks.check_ignore_index rejects any other
        self._ce_loss, self._kd_loss = loss_components.build_losses(cfg, self._loss_form)
        self._log("losses: " + ", ".join(f"{k}={v}" for k, v in loss_components.describe(self._ce_loss, self._kd_loss).items()))
        if self._loss_form_note and self._is_rank_zero:
            extra = chunked_extra_gib(cfg, self.world_size)
            log.warning(self._loss_form_note + ("" if extra is None else f"; the memory plan puts its peak {extra:+.2f} "
                                                "GiB per device above the fused head's"))
        if self._loss_form == "chunked":
            n = loss_components.num_output_chunks(self._ce_loss, self._kd_loss)
            self._model.set_num_output_chunks(n)
            if self._teacher is not None:
                self._teacher.set_num_output_chunks(n)

    def _setup_on_policy(self, cfg: DictConfig) -> None:
        """``on_policy:`` section (kd.train.on_policy): with probability lmbda per optimizer step the student answers the
        step's prompts and the teacher scores those answers (GKD); None when the section is absent."""

        self._on_policy = self._settings.on_policy  # checked with the config (kd.train.settings)
        self._on_policy_stats: Dict[str, float] = {}
        if self._on_policy is None:
            return
        self._on_policy_count = None  # steps taken on-policy so far (recomputed from the seed after a resume)
        self._log(f"on-policy distillation: {self._on_policy}")

    def _on_policy_batches(self, micro):
        """Hook of the training step: on an on-policy step, the student's answers to the micro-batches' prompts
        (kd.train.on_policy.OnPolicyBatches with the GLOBAL generated-token count), else None."""

        if self._on_policy is None:
            return None
        if self._on_policy_count is None:
            self._on_policy_count = count_on_policy_steps(self._on_policy, self.global_step)
        if not is_on_policy_step(self._on_policy, self.global_step):
            self._on_policy_stats = {"on_policy": 0.0}
            return None
        gen = generate_on_policy(
            self._model, micro, self._on_policy, step=self.global_step, tokenizer=self._tokenizer,
            ignore_index=self._ignore_index, device=self._device, dtype=self._dtype,
            reshard_after_forward=bool(self._cfg.get("fsdp_reshard_after_forward", True)),
        )
        g = kdist.all_reduce_sum(torch.tensor([gen.n_tokens, gen.n_rows], dtype=torch.float32, device=self._device))
        self._on_policy_count += 1
        n_tok, n_rows = float(g[0]), float(g[1])
        self._on_policy_stats = {"on_policy": 1.0, "gen_tokens_per_second": n_tok / max(gen.seconds, 1e-9),
                                 "gen_mean_length": n_tok / max(n_rows, 1.0)}
        return gen._replace(n_tokens=g[0])

    def _on_policy_loss_step(self, batch, gen_batch, n_orig: torch.Tensor, n_gen: torch.Tensor, scale: torch.Tensor):
        """One micro-batch of an on-policy step: ``(1 - r) * CE_sum(original labels) / N_orig +
        r * KD_sum(student's answers) / N_gen`` (r = kd_ratio, both counts global). The CE part is back-propagated
        here (with ``scale`` = world_size / N_orig, so its graph is freed before the KD forward); the returned
        ``loss`` carries the KD part's gradient and the CE part as a constant, in the units of ``_loss_step``
        (sums that the step divides by N_orig): KD sums are multiplied by N_orig / N_gen."""
        r = self._kd_ratio
        with torch.no_grad() if r == 1.0 else contextlib.nullcontext():
            ce = self._loss_step(batch, 0.0, with_teacher=False)  # CE on the dataset's answers, no teacher
        if r < 1.0:
            (ce.loss_sum * ((1.0 - r) * scale)).backward()
        kd = self._loss_step(gen_batch, 1.0)  # teacher + student on the student's own answers
        w = n_orig / n_gen.clamp_min(1.0)
        return KDCEResult(kd_ce_mix(ce.loss_sum.detach(), w * kd.loss_sum, r), ce.ce_sum, kd.kd_sum * w,
                          kd.kl_sum * w, ce.n_valid, kd.n_agree * w)

    def _build_dataset(self, cfg_dataset, split: Optional[str]):
        def one(c):
            kwargs = {}
            if split is not None and c.get("_component_", "").startswith(("kd.data.alpaca.", "kd.data.offline.")):
                kwargs["split"] = split
            try:
                return tt_config.instantiate(c, self._tokenizer, **kwargs)
            except (ValueError, FileNotFoundError, TypeError) as e:
                raise DataError(f"dataset ({c.get('_component_')}): {e}") from e

        if isinstance(cfg_dataset, ListConfig):
            ds = ConcatDataset([one(c) for c in cfg_dataset])
            return ds, getattr(ds, "packed", False)
        return one(cfg_dataset), bool(cfg_dataset.get("packed", False))

    def _make_loader(self, ds, packed: bool, shuffle: bool, batch_size: int, drop_last: bool):
        if len(ds) < self.world_size:
            raise ConfigError(f"The dataset has {len(ds)} samples, fewer than the {self.world_size} ranks.")
        sampler = DistributedSampler(
            ds, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=self.seed or 0,
            drop_last=drop_last,
        )
        collate = (
            padded_collate_packed if packed
            else partial(padded_collate_sft, padding_idx=self._tokenizer.pad_id, ignore_idx=self._ignore_index)
        )
        return StatefulDataLoader(
            ds, batch_size=batch_size, sampler=sampler, collate_fn=collate,
            num_workers=int(self._cfg.get("num_workers", 0)), drop_last=drop_last,
        )

    def _setup_data(self, cfg_dataset, shuffle: bool, split: str):
        bs = self._settings.batch_size
        ds, packed = self._build_dataset(cfg_dataset, split)
        self._check_lengths(ds, split)
        self._packed = packed
        loader = self._make_loader(ds, packed, shuffle, bs, drop_last=True)
        self._log(f"train data: {len(ds)} samples, {len(loader)} batches/rank of {bs}")
        return loader

    def _check_lengths(self, ds, split: str) -> None:
        """Rank 0 counts the samples whose answers max_seq_len cuts (warning) or removes entirely (error when
        nothing is left); every rank gets the verdict."""

        def check():
            try:
                check_truncation(ds, split, progress=self._is_rank_zero)
            except ValueError as e:
                raise DataError(str(e)) from None

        kdist.rank0_then_broadcast(check, error_type=DataError)

    def _setup_val_data(self, cfg: DictConfig):
        if self._eval_every is None:
            return None
        src = cfg.get("val_dataset", None) or cfg.dataset
        ds, packed = self._build_dataset(src, "val" if cfg.get("val_dataset") is None else None)
        if len(ds) == 0:
            raise ConfigError("eval_every_n_steps is set but the validation split is empty: set dataset.val_size > 0.")
        bs = self._settings.batch_size
        self._log(f"validation data: {len(ds)} samples")
        return self._make_loader(ds, packed, shuffle=False, batch_size=bs, drop_last=False)

    def _setup_checkpointing(self, cfg: DictConfig) -> None:
        self._ckpt = CheckpointManager(self._layout.checkpoints, keep_last_n=self._settings.keep_last_n_checkpoints)
        merged = cfg.get("save_merged_model", None)
        if merged is None:  # torchtune's key: save_adapter_weights_only=False also writes merged weights
            merged = cfg.get("save_adapter_weights_only", True) is False
        self._save_merged = bool(merged)
        self._base_name = str(cfg.get("base_model_name_or_path", None) or self._student_ckpt_dir)
        if not self._resume:
            return
        if self._full:  # every rank loads its own shard of weights + optimizer state

            latest, state = full.load_checkpoint(self._ckpt, self._model, self._optimizer, rank=self.rank,
                                                 world_size=self.world_size, mesh_shape=self._mesh_shape())
        else:
            latest, state, adapter = self._load_resume_state()
            load_adapter_state_dict(self._model, adapter)
            self._load_optimizer_state(state["optimizer"])
        if self._lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self._lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step = int(state["global_step"])
        self.epochs_run = int(state["epoch"])
        self._step_in_epoch = int(state["step_in_epoch"])
        if state.get("dataloader") is not None:
            self._train_loader.sampler.set_epoch(self.epochs_run)
            self._train_loader.load_state_dict(state["dataloader"])
        self._set_rng_state(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
        self._log(f"resumed from {latest} at global step {self.global_step} (epoch {self.epochs_run}, "
                  f"step {self._step_in_epoch} of the epoch)")

    def _load_resume_state(self):
        """Rank 0 reads the newest readable checkpoint (a damaged one falls back to the previous, with a
        warning) and broadcasts it: only node 0's disk needs to hold checkpoints (no shared file system)."""

        def read():
            if self._ckpt.latest() is None:
                raise ConfigError(
                    f"resume_from_checkpoint=True but no checkpoint was found under {self._ckpt_dir_str()}."
                )
            p, _meta, state, adapter = self._ckpt.load_latest_valid(
                expected_adapter_meta=self._adapter_meta(), warn=lambda m: log.warning(m))
            return {"path": str(p), "state": state, "adapter": adapter}

        r = kdist.rank0_then_broadcast(read, error_type=ConfigError)
        return Path(r["path"]), r["state"], r["adapter"]

    def _mesh_shape(self):
        return tuple(self._mesh.mesh.shape) if self._mesh is not None else (1,)

    def _ckpt_dir_str(self) -> str:
        return str(self._layout.checkpoints)

    def _last_checkpoint_str(self) -> Optional[str]:
        latest = self._ckpt.latest() if self._is_rank_zero else None
        return None if latest is None else str(latest)

    def _setup_profiler(self, cfg_profiler: Optional[DictConfig]):
        if cfg_profiler is None or not cfg_profiler.get("enabled", False):
            return DummyProfiler()
        if "_component_" not in cfg_profiler:
            cfg_profiler["_component_"] = "torchtune.training.setup_torch_profiler"
        profiler, _ = tt_config.instantiate(cfg_profiler)
        return profiler

    # ----------------------------------------------------------------------------------------------
    # Teacher cache (kd.cache.session): Random-Sampling KD targets computed once, read every epoch
    # ----------------------------------------------------------------------------------------------
    def _setup_teacher_cache(self, cfg: DictConfig) -> None:
        """The run's teacher cache (kd.cache.session.teacher_cache_for: NoCache without the section), and whether
        the teacher is loaded in step 5 (the cache decides)."""

        self._model = None
        self._cache = teacher_cache_for(self._settings, rank=self.rank, world_size=self.world_size,
                                        local_rank=self._dist.local_rank, device=self._device,
                                        progress=self._progress_bar)
        self._teacher_at_start = self._cache.loads_teacher_at_start()
        if self._cache.describe_options():
            self._log(self._cache.describe_options() + ("" if self._teacher_at_start else " (teacher not loaded)"))

    def _cache_collate(self):
        return partial(padded_collate_sft, padding_idx=self._tokenizer.pad_id, ignore_idx=self._ignore_index)

    @property
    def _cache_batch_tokens(self) -> Optional[int]:
        """Tokens of one packed micro-batch (None for unpacked data): the fill pass's batch budget."""
        if not getattr(self, "_packed", False):
            return None
        ds = self._cache.datasets[0] if self._cache.datasets else None
        seq = getattr(ds, "max_seq_len", None)
        return None if seq is None else self._settings.batch_size * int(seq)

    # kd.cache.session.TeacherHooks: what the cache asks of the teacher
    def teacher_live(self) -> bool:
        return self._teacher is not None

    def load_teacher(self) -> None:
        self._teacher, self._teacher_head_weight = self._setup_teacher(self._cfg)

    def fill_and_free(self) -> None:
        """Teacher-only pass over what the cache lacks, then free the teacher (its memory goes back)."""

        stats = self._cache.fill(
            self._teacher, self._teacher_head_weight, self._cache_collate(),
            batch_size=self._settings.batch_size,
            chunk_size=self._fused_chunk_size, dtype=self._dtype,
            teacher_sharded=self._fsdp and self._settings.teacher_sharding == "shard",
            batch_tokens=self._cache_batch_tokens,  # packed data: as many tokens per forward as a step
        )
        if self._is_rank_zero and stats["samples"]:  # the pass's throughput (rank 0's share), e.g. for bench/
            self._emit({k: float(v) for k, v in stats.items()}, "cache_fill")
        before = torch.cuda.memory_allocated(self._device) if self._device.type == "cuda" else 0
        self._teacher = self._teacher_head_weight = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
            freed = (before - torch.cuda.memory_allocated(self._device)) / 2**30
            self._log(f"teacher freed: {freed:.2f} GiB returned (same micro-batch and activation checkpointing, "
                      "so the cache epochs compute the same step; raise batch_size in a mode=use run to use it)")
        else:
            self._log("teacher freed")

    def _setup_cache_build(self, cfg: DictConfig) -> None:
        """mode=build: teacher + data only (no student, optimizer or checkpoints)."""
        self._teacher, self._teacher_head_weight = self._setup_teacher(cfg)
        self._setup_loss(cfg)
        ds, self._packed = self._build_dataset(cfg.dataset, "train")
        val = None
        if self._eval_every is not None:
            val, _ = self._build_dataset(cfg.get("val_dataset", None) or cfg.dataset,
                                         "val" if cfg.get("val_dataset") is None else None)
        self._cache.begin(cfg, loss=self._kd_loss, tokenizer=self._tokenizer, ignore_index=self._ignore_index,
                          datasets=[ds, val], loaders=[], teacher=self)

    # ----------------------------------------------------------------------------------------------
    # State (optimizer, RNG) helpers
    # ----------------------------------------------------------------------------------------------
    def _optimizer_state(self) -> Dict[str, Any]:
        if not self._fsdp:
            return self._optimizer.state_dict()
        return get_optimizer_state_dict(
            self._model, self._optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def _load_optimizer_state(self, sd: Dict[str, Any]) -> None:
        if not self._fsdp:
            self._optimizer.load_state_dict(sd)
            return
        set_optimizer_state_dict(
            self._model, self._optimizer, sd, options=StateDictOptions(full_state_dict=True)
        )

    def _rng_state(self) -> Dict[str, Any]:
        st = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self._device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self._device)
        return st

    def _set_rng_state(self, st: Dict[str, Any]) -> None:
        torch.set_rng_state(st["torch"])
        random.setstate(st["python"])
        if self._device.type == "cuda" and "cuda" in st:
            torch.cuda.set_rng_state(st["cuda"], self._device)

    # ----------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------
    def _loss_step(
        self, batch: Dict[str, torch.Tensor], kd_ratio: float, timer: Optional[PhaseTimer] = None,
        with_teacher: bool = True,
    ) -> KDCEResult:
        """Forward both models on one micro-batch; return *sums* over its valid tokens (kd.losses.distillation.KDCEResult:
        loss_sum differentiable = (1-r)*CE + r*KD, ce/kd/kl sums, n_valid, n_agree). ``timer`` (training only)
        marks the end of the teacher forward and of the student forward + loss."""
        tokens, labels = batch["tokens"], shift_labels(batch["labels"], self._ignore_index)
        mask, input_pos = batch.get("mask", None), batch.get("input_pos", None)
        # The teacher runs even at kd_ratio=0 (when there is one): it feeds the logged KL / agreement.
        teacher_out = None
        if self._teacher is not None and with_teacher:
            with torch.no_grad():
                teacher_out = self._teacher(tokens, mask=mask, input_pos=input_pos)
        if timer is not None:
            timer.mark("teacher_fwd")
        if self._loss_form == "fused":
            cache_targets = self._cache.loss_targets(batch, labels, teacher_live=teacher_out is not None,
                                                     training=self._model.training)
            targets = FusedTargets(
                labels=labels, loss=self._ce_loss, kd_loss=self._kd_loss, kd_ratio=kd_ratio,
                teacher_hidden=None if teacher_out is None else teacher_out.to(self._dtype),
                teacher_weight=None if teacher_out is None else self._teacher_head_weight, **cache_targets,
            )
            with self._model.output.fused(targets) as call:
                self._model(tokens, mask=mask, input_pos=input_pos)
            self._cache.after_step(batch, labels, call.result.samples)
            out = call.result
        else:  # chunked: [b, s_i, V] logits chunks from both models, the config's losses as named
            s_chunks = self._model(tokens, mask=mask, input_pos=input_pos)
            out = chunked_kd_ce(s_chunks, teacher_out, labels, ce_loss=self._ce_loss, kd_loss=self._kd_loss,
                                kd_ratio=kd_ratio, ignore_index=self._ignore_index)
        if timer is not None:
            timer.mark("student_fwd")
        return out

    # ----------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------
    def _next_micro_batches(self, it) -> Optional[List[Dict[str, torch.Tensor]]]:
        batches = []
        for _ in range(self._grad_accum):
            try:
                batches.append(next(it))
            except StopIteration:
                return None
        return batches

    def train(self) -> None:
        if self._cache.builds_only:
            return self._cache.run_build(self)
        training.cleanup_before_training() if self._device.type == "cuda" else None
        self._optimizer.zero_grad(set_to_none=True)
        self._install_stop_handlers()
        # Per-phase step times (GPU timeline on CUDA), read only at logging steps: no extra host sync.
        timer = PhaseTimer(self._device)
        self._guard = NonFiniteGuard(self._device, last_checkpoint=self._last_checkpoint_str)
        if self._val_loader is not None and self.global_step == 0:
            self._validate_now()  # the step-0 baseline the later validation points compare with
        self._profiler.start()
        for epoch in range(self.epochs_run, self.total_epochs):
            loader = self._train_loader
            if self._step_in_epoch == 0:
                loader.sampler.set_epoch(epoch)
            it = iter(loader)
            pbar = tqdm(
                total=self._steps_per_epoch, initial=self._step_in_epoch,
                disable=not (self._is_rank_zero and self._progress_bar), desc=f"epoch {epoch + 1}",
                dynamic_ncols=True,
            )
            t0 = time.perf_counter()
            steps_since_log = 0
            while self._step_in_epoch < self._steps_per_epoch:
                timer.start()
                micro = self._next_micro_batches(it)
                if micro is None:
                    break
                sums, counts, grad_norm = self._optimizer_step(micro, timer)
                timer.mark("optimizer")
                steps_since_log += 1
                self.global_step += 1
                self._step_in_epoch += 1
                pbar.update(1)
                self._profiler.step()

                stop = False
                if self.global_step % self._log_every_n_steps == 0:
                    # The stop request (SIGINT/SIGTERM on any rank) rides on the metrics all-reduce that
                    # logging needs anyway, so every rank agrees on it without an extra sync.
                    # The non-finite flags ride on it too: a NaN/Inf step stops the run here, before any save.
                    packed = NamedVector(metrics=sums, guard=self._guard.flags(),
                                         stop=torch.tensor([float(self._stop_requested)], device=sums.device))
                    parts = packed.unpack(kdist.all_reduce_sum(packed.vector))
                    stop = bool(parts["stop"][0] > 0)
                    dt = time.perf_counter() - t0
                    phases = {k: v / steps_since_log for k, v in timer.collect().items()}
                    steps_since_log = 0
                    self._log_step(parts["metrics"], counts, grad_norm, dt, pbar, phases)
                    self._guard.check(parts["guard"], self.global_step, world_size=self.world_size)
                t0 = time.perf_counter()
                if stop:
                    self._log(f"stop requested: saving a checkpoint at step {self.global_step} and exiting")
                    self.save_checkpoint()
                    pbar.close()
                    raise KeyboardInterrupt
                if self._val_loader is not None and self.global_step % self._eval_every == 0:
                    self._validate_now()
                if self._save_every is not None and self.global_step % self._save_every == 0:
                    self.save_checkpoint()
            pbar.close()
            self.epochs_run = epoch + 1
            self._step_in_epoch = 0
            self._cache.epoch_end(self.epochs_run, self.total_epochs, self)
            self.save_checkpoint()
        self._profiler.stop()
        if self._save_merged:
            self._save_merged_model()

    def _optimizer_step(self, micro: List[Dict[str, torch.Tensor]], timer: PhaseTimer):
        """One optimizer step over the micro-batches: forward + backward of each (its sum / the GLOBAL valid-token
        count), clipping, the non-finite bookkeeping, optimizer and LR-scheduler step. Returns ``(sums, counts,
        grad_norm)``: the summed KDCEResult.metric_vector of this rank, the global [valid, non-pad] token counts,
        the clipped norm (None without clipping)."""
        for b in micro:
            utils.batch_to_device(b, self._device)
        gen = self._on_policy_batches(micro)  # on-policy step: the student's answers (kd.train.on_policy), else None
        # Global valid-token count of this optimizer step, known before any backward.
        local_n = sum((shift_labels(b["labels"], self._ignore_index) != self._ignore_index).sum() for b in micro)
        local_tok = sum((b["tokens"] != self._tokenizer.pad_id).sum() for b in micro)
        counts = kdist.all_reduce_sum(torch.stack([local_n, local_tok]).to(torch.float32))
        scale = self.world_size / counts[0].clamp_min(1.0)  # undo FSDP2's mean over ranks
        timer.mark("data")
        sums = None
        for i, b in enumerate(micro):
            out = self._loss_step(b, self._kd_ratio, timer) if gen is None else \
                self._on_policy_loss_step(b, gen.batches[i], counts[0], gen.n_tokens, scale)
            (out.loss_sum * scale).backward()
            timer.mark("backward")
            vals = out.metric_vector()
            sums = vals if sums is None else sums + vals
        grad_norm = None
        if self._clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self._model.parameters() if p.requires_grad], max_norm=self._clip_grad_norm
            )
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
        # NaN/Inf bookkeeping on the device (no host sync); read with the logging all-reduce in train()
        named = dict(zip(KDCEResult.METRICS, sums.unbind()))  # device tensors by name (no host sync)
        self._guard.observe(ce=named["ce_sum"], kd_terms=torch.stack([named["kd_sum"], named["kl_sum"]]),
                            grad_norm=grad_norm, step=self.global_step + 1)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        return sums, counts, grad_norm

    def _install_stop_handlers(self) -> None:
        """First SIGINT/SIGTERM: finish the current optimizer step, checkpoint, exit (at the next logging
        step). A second signal stops at once (the last periodic checkpoint stays valid: writes are atomic)."""

        self._stop_requested = False

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            if self._is_rank_zero:
                print(f"\nkd: signal {signum}: will checkpoint after this step (send again to stop now)",
                      file=sys.stderr, flush=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    def _log_step(self, sums, counts, grad_norm, dt: float, pbar, phases: Dict[str, float]) -> None:
        m = KDCEResult.read_metrics(sums)
        n_valid = m["n_valid"]
        if n_valid == 0 and self._is_rank_zero:
            log.warning(f"step {self.global_step}: no answer tokens in this step's batch (every answer cut away by "
                        "max_seq_len?): it contributes nothing; see the truncation report at setup")
        tokens = float(counts[1])
        metrics = {
            **self._token_means(m),
            "lr": self._optimizer.param_groups[0]["lr"],
            "tokens_per_second": tokens / max(dt, 1e-9),
            "tokens_per_second_per_gpu": tokens / max(dt, 1e-9) / self.world_size,
            "valid_tokens": n_valid,
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics["step_seconds"] = dt
        # mean seconds per optimizer step of each phase since the last log (see kd.train.timing)
        metrics.update({f"time_{k}_s": v for k, v in phases.items()})
        if self._on_policy is not None:  # this step on/off-policy, the fraction so far, generation speed/length
            metrics.update(self._on_policy_stats, on_policy_fraction=self._on_policy_count / max(self.global_step, 1))
        if self._log_peak_memory_stats:
            metrics.update(self._memory_stats())
        if self._is_rank_zero:
            self._emit(metrics, kind="train")
            pbar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl']:.4f}")

    def _memory_stats(self) -> Dict[str, float]:
        if self._device.type == "cuda":
            st = {"peak_memory_alloc_gib": torch.cuda.max_memory_allocated(self._device) / 2**30,
                  "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(self._device) / 2**30}
            torch.cuda.reset_peak_memory_stats(self._device)
            return st
        return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}

    def _emit(self, metrics: Dict[str, float], kind: str) -> None:
        rec = {"step": self.global_step, "kind": kind, **metrics}
        self._metrics_file.write(json.dumps(rec) + "\n")
        if self._metric_logger is not None:
            prefix = "" if kind == "train" else f"{kind}/"
            self._metric_logger.log_dict({prefix + k: v for k, v in metrics.items()}, step=self.global_step)
        msg = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        log.info(f"[{kind}] step {self.global_step}: {msg}")

    @torch.no_grad()
    def _validate_now(self) -> None:
        t0 = time.perf_counter()
        self._model.eval()
        sums = torch.zeros(len(KDCEResult.METRICS), device=self._device)
        n_val = len(self._val_loader) if self._max_eval_batches is None else min(len(self._val_loader), self._max_eval_batches)
        bar = progress(total=n_val, desc="validation", unit="batch", enabled=self._progress_bar)
        for i, b in enumerate(self._val_loader):
            if self._max_eval_batches is not None and i >= self._max_eval_batches:
                break
            bar.update(1)
            utils.batch_to_device(b, self._device)
            sums += self._loss_step(b, self._kd_ratio).metric_vector()
        bar.close()
        self._model.train()
        sums = kdist.all_reduce_sum(sums)
        m = KDCEResult.read_metrics(sums)
        if self._is_rank_zero:
            self._emit({**self._token_means(m), "valid_tokens": m["n_valid"],
                        "seconds": time.perf_counter() - t0}, kind="val")

    @staticmethod
    def _token_means(m: Dict[str, float]) -> Dict[str, float]:
        """The logged per-token means of summed KDCEResult metrics (one division by the global count)."""
        n = max(m["n_valid"], 1.0)
        return {"loss": m["loss_sum"] / n, "ce_loss": m["ce_sum"] / n, "kd_loss": m["kd_sum"] / n,
                "kl": m["kl_sum"] / n, "top1_agreement": m["n_agree"] / n}

    # ----------------------------------------------------------------------------------------------
    # Checkpointing
    # ----------------------------------------------------------------------------------------------
    def _adapter_meta(self) -> Dict[str, Any]:
        return {
            "rank": self._lora_rank, "alpha": self._lora_alpha,
            "target_modules": get_lora_module_names(
                self._lora_attn_modules, self._apply_lora_to_mlp, self._apply_lora_to_output
            ),
            "base_model_name_or_path": self._base_name,
        }

    def save_checkpoint(self) -> None:
        """Adapter (PEFT format), optimizer, LR scheduler, RNG of every rank and dataloader position,
        written atomically by rank 0 (full fine-tune: weights and optimizer state as per-rank shards, kd.train.full);
        collective (every rank must call it)."""

        # never checkpoint a NaN/Inf state (collective: flags of every rank since the last logging step)
        if getattr(self, "_guard", None) is not None:
            self._guard.check_before_save(self.global_step, world_size=self.world_size)
        t0 = time.perf_counter()
        self._cache.before_checkpoint()  # cache records of the steps this checkpoint covers are on disk
        # LoRA: full adapter + optimizer state gathered to rank 0 (small). Full fine-tune: each rank writes its
        # own shards (kd.train.full), nothing is gathered.
        adapter = None if self._full else lora_state_dict(self._model)  # collective under FSDP (full_tensor)
        opt = None if self._full else self._optimizer_state()  # collective under FSDP
        rng = [self._rng_state()]
        if self._fsdp:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if self._full:

            path = full.save_checkpoint(
                self._ckpt, self.global_step, self.epochs_run, self._model, self._optimizer,
                self._recipe_state(None, rng) if self._is_rank_zero else None,
                rank=self.rank, world_size=self.world_size, mesh_shape=self._mesh_shape(),
            )
            if self._qad is not None and self._is_rank_zero:
                kqad.write_meta(Path(path), self._qad)  # the format the export writes
            self._log(f"checkpoint saved: {path} (+ {self.world_size} rank shard(s) under checkpoints/shards)")
            return
        if self._is_rank_zero:
            state = self._recipe_state(opt, rng)
            path = self._ckpt.save(
                self.global_step, self.epochs_run, adapter_sd=adapter, adapter_meta=self._adapter_meta(),
                recipe_state=state, run_info={**self._run_info, "step_in_epoch": self._step_in_epoch},
            )
            if self._qad is not None:
                kqad.write_meta(Path(path) / "adapter", self._qad)  # the format the export writes
            self._log(f"checkpoint saved: {path}")
        kdist.barrier()
        if self._is_rank_zero:
            self._emit({"seconds": time.perf_counter() - t0}, kind="checkpoint")

    def _recipe_state(self, opt, rng) -> Dict[str, Any]:
        return {
            "optimizer": opt,
            "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler is not None else None,
            "global_step": self.global_step,
            "epoch": self.epochs_run,
            "step_in_epoch": self._step_in_epoch,
            "dataloader": self._train_loader.state_dict() if self._step_in_epoch > 0 else None,
            "rng": rng,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def _save_merged_model(self) -> None:
        out = self._layout.merged
        # FusedKDHead keeps torchtune's parameter names (output.weight, output.lora_*), so the state dict
        # merges exactly like the stock model's.
        save_merged_hf(
            self._model, self._student_ckpt_dir, out, rank=self._lora_rank, alpha=self._lora_alpha,
        )
        self._log(f"merged HF checkpoint written to {out}")

    def cleanup(self) -> None:
        if getattr(self, "_cache", None) is not None:
            self._cache.close()
        if self._is_rank_zero:
            if self._metric_logger is not None:
                self._metric_logger.close()
            self._metrics_file.close()
        kdist.destroy()
        for lk in (getattr(self, "_run_lock", None), getattr(self, "_node_lock", None)):
            if lk is not None:
                lk.release()

    def _log(self, msg: str) -> None:
        if self._is_rank_zero:
            log.info(msg)


def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run recipes/kd_lora.py --config <yaml> key=value ...``."""
    configure_logging()  # INFO on rank 0, WARNING elsewhere; lines print above the progress bar
    recipe = KDLoRARecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":  # `tune run` runs this file as __main__
    sys.exit(run_recipe(recipe_main))
