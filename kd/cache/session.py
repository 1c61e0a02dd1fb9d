"""The teacher cache as the KD recipe uses it (``teacher_cache:`` config section).

Modes:

``online_then_cache``
    Epoch 1 runs the live teacher as usual and, from the same per-chunk teacher logits inside the fused
    head, writes K samples per answer token to the cache. At the end of epoch 1 the samples epoch 1 did not
    see (``drop_last`` / ``max_steps_per_epoch`` / the validation split) are filled by a teacher-only pass,
    every node receives every shard, and the teacher is freed. Later epochs train from the cache.
``build``
    A teacher-only pass over the training (and validation) data: no student, data-parallel over all ranks
    and nodes (batch ``b`` of the missing ones goes to rank ``b % world_size``), resumable (only what is
    missing is computed). The recipe exits after it.
``use``
    Student training from a complete cache; the teacher is never loaded (its checkpoint is only
    fingerprinted, to check the cache belongs to it).

Every mode resumes: a checkpoint never depends on cache records written after it (the draws are a
deterministic function of the sample, so a re-run writes identical records), and a build resumes by
re-running exactly the planned batches that still miss samples.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from kd.cache.store import (
    FORMAT,
    CacheCollate,
    CacheError,
    CacheKey,
    CacheWriter,
    DatasetIndex,
    Segments,
    TeacherCacheStore,
    build_batches,
    checkpoint_fingerprint,
    index_dataset,
    item_segments,
    row_seeds,
    segments_tensors,
    sync_shards,
    template_fingerprint,
    tokenizer_fingerprint,
    unpacked_view,
)
from kd.core.config import ConfigError, to_container
from kd.core.layout import RunLayout
from kd.losses.sparse import SparseTargets, TeacherSampler, TeacherSamples, sample_teacher_rows
from kd.train import dist as kdist
from kd.train.settings import CacheOptions, KDLoRASettings
from kd.train.step_checkpoint import CheckpointManager

log = logging.getLogger("kd.cache")

def resume_epoch(layout: RunLayout, resume: bool) -> int:
    """Epochs completed by the checkpoint a resume will load (0 if not resuming or none): read from its
    meta.json only, so the recipe can decide whether to load the teacher before restoring anything."""
    if not resume:
        return 0

    latest = CheckpointManager(layout.checkpoints).latest()
    if latest is None:
        return 0
    return int(json.loads((latest / "meta.json").read_text()).get("epoch", 0))


def make_key(cfg, settings: KDLoRASettings, *, temperature: float, tokenizer, dataset) -> CacheKey:
    """The key of the cache this run reads or writes. ``precision`` is the teacher precision that runs (after
    any fall-back: null and bf16 are one key; an nf4_fp8 run that fell back to nf4 writes nf4's key)."""
    opts = settings.cache
    ck = cfg.teacher_checkpointer
    files = ck.get("checkpoint_files", None)
    files = list(files) if files is not None and not isinstance(files, (str, dict)) and not hasattr(files, "keys") \
        else None
    base = getattr(dataset, "ds", dataset)
    return CacheKey(
        format=FORMAT,
        teacher=checkpoint_fingerprint(ck.checkpoint_dir, files, to_container(cfg.teacher_model)),
        precision=settings.precision_key,
        temperature=float(temperature), k=opts.k, sampling=opts.sampling, seed=opts.seed,
        tokenizer=tokenizer_fingerprint(to_container(cfg.tokenizer), tokenizer),
        template=template_fingerprint(to_container(cfg.dataset), dataset, tokenizer),
        max_seq_len=getattr(base, "max_seq_len", None),
    )


def _data_hash(samples: Dict[int, bytes]) -> str:
    """Short identity of a data set as the cache sees it: its (sample id, token hash) pairs."""
    import hashlib

    h = hashlib.sha256()
    for sid in sorted(samples):
        h.update(int(sid).to_bytes(8, "little", signed=True) + bytes(samples[sid]))
    return h.hexdigest()[:12]


class TeacherHooks(Protocol):
    """What the cache asks of the recipe's teacher (the recipe implements these three)."""

    def teacher_live(self) -> bool:
        """Whether the teacher is loaded now."""

    def load_teacher(self) -> None:
        """Load the teacher (a resumed online_then_cache run whose cache still lacks samples)."""

    def fill_and_free(self) -> None:
        """Run :meth:`CacheSession.fill` with the loaded teacher, then free the teacher."""


class CacheSession:
    """State of the teacher cache during one recipe run (see the module docstring).

    The recipe drives it at fixed points, whatever the mode: :meth:`loads_teacher_at_start` (before the teacher is
    built), :meth:`builds_only` (a teacher-only run), :meth:`begin` (once the data and the losses exist),
    :meth:`loss_targets` / :meth:`after_step` (every fused loss step), :meth:`before_checkpoint`, :meth:`epoch_end`,
    :meth:`run_build` (instead of training, for ``builds_only``) and :meth:`close`. The mode's decisions are made
    here; :class:`NoCache` answers the same calls when the config has no ``teacher_cache``.
    """

    def __init__(self, settings: KDLoRASettings, *, rank: int, world_size: int, local_rank: int, device,
                 ignore_index: int, progress: bool):
        self.settings = settings
        self.opts: CacheOptions = settings.cache
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device
        self.ignore_index = ignore_index
        self.progress = progress
        self.store: Optional[TeacherCacheStore] = None
        self.writer: Optional[CacheWriter] = None
        self.temperature = 1.0
        self.datasets: List[Any] = []
        self.indexes: List[DatasetIndex] = []
        self.collates: List[CacheCollate] = []

    @property
    def mode(self) -> str:
        return self.opts.mode

    # -- the recipe's fixed points ----------------------------------------------------------------
    def describe_options(self) -> str:
        o = self.opts
        return f"teacher cache: mode={o.mode}, dir={o.dir}, K={o.k}, sampling={o.sampling}"

    def loads_teacher_at_start(self) -> bool:
        """Whether the recipe loads the teacher in setup: always for build; never for use; for online_then_cache
        only while epoch 1 is not finished (a resume after it loads the teacher later, in :meth:`begin`, only if
        the cache lacks samples)."""
        if self.mode == "use":
            return False
        if self.mode == "online_then_cache":
            return resume_epoch(self.settings.layout, self.settings.resume) == 0
        return True

    @property
    def builds_only(self) -> bool:
        """A teacher-only run (mode=build): no student, optimizer or checkpoints; :meth:`run_build` instead of training."""
        return self.mode == "build"

    def begin(self, cfg, *, loss, tokenizer, datasets: Sequence[Any], loaders: Sequence[Any], ignore_index: int,
              teacher: TeacherHooks) -> None:
        """Index the data, check or create the key, and start the mode's phase: read a complete cache (use),
        write while the live teacher trains (online_then_cache, epoch 1), or fill what is missing and read
        (online_then_cache resumed after epoch 1). ``loaders`` get the cache's collate (sample keys, cached
        targets)."""
        self.ignore_index = ignore_index
        self.attach(cfg, loss=loss, tokenizer=tokenizer, datasets=datasets)
        for loader in loaders:
            self.wrap_loader(loader)
        if self.builds_only:
            return
        if self.mode == "online_then_cache" and teacher.teacher_live():
            self.start_writing()  # epoch 1
            return
        if self.mode == "online_then_cache" and self.missing():  # resumed after epoch 1, cache incomplete
            teacher.load_teacher()
            teacher.fill_and_free()
        self.require_complete()
        self.set_reading(True)

    def before_checkpoint(self) -> None:
        """The records of the steps a checkpoint covers are on disk before it is written."""
        self.flush()

    def epoch_end(self, epochs_run: int, total_epochs: int, teacher: TeacherHooks) -> None:
        """online_then_cache after epoch 1 (if more epochs follow): fill what epoch 1 did not see, give every node
        every shard, free the teacher and read the cache from now on."""
        if self.mode != "online_then_cache" or not teacher.teacher_live():
            return
        if epochs_run >= total_epochs:
            self.flush()
            return
        teacher.fill_and_free()
        self.stop_writing()
        self.require_complete()
        self.set_reading(True)

    def run_build(self, teacher: TeacherHooks) -> None:
        """mode=build: the teacher-only pass over what the cache lacks."""
        teacher.fill_and_free()
        self.log(f"teacher cache built: {self.describe()}")

    def close(self) -> None:
        self.stop_writing()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            log.info(msg)

    # -- setup --------------------------------------------------------------------------------------
    def attach(self, cfg, *, loss, tokenizer, datasets: Sequence[Any]) -> None:
        """Check the loss, index the data sets (hash every sample), check/create the key, map the shards."""
        if loss.kind != "forward_kl":
            raise ConfigError(
                f"kd_loss kind={loss.kind!r} needs the full teacher distribution, but teacher_cache stores K "
                "sampled tokens per position: use kind=forward_kl (Random-Sampling KD's sparse soft "
                "cross-entropy) or remove teacher_cache to distil online.")
        self.temperature = loss.temperature
        # entries are per sample: packed data sets are indexed (and filled) through their samples; the
        # loader's packs name their samples and spans (CacheCollate), so records line up either way
        self.datasets = [unpacked_view(d) for d in datasets if d is not None]
        self.indexes = [index_dataset(d, progress=self.progress) for d in self.datasets]
        key = make_key(cfg, self.settings, temperature=loss.temperature, tokenizer=tokenizer, dataset=self.datasets[0])
        self.store = TeacherCacheStore(self.opts.dir, key)
        writes = self.mode != "use"

        # mode=use on a node without the cache (no shared FS): if another node has one, this node takes the
        # same key and receives the shards below; a node with a cache of another key still fails
        here = (self.store.root / TeacherCacheStore.KEY_FILE).is_file()
        anywhere = float(kdist.all_reduce_sum(torch.tensor([float(here)], device=self.device))[0]) > 0
        err = None
        try:
            self.store.check_or_init_key(rebuild=self.opts.rebuild and writes, create=writes or anywhere,
                                         is_writer=self.local_rank == 0)  # one writer per node (no shared FS)
        except CacheError as e:
            err = str(e)
        # agree on failure, so no rank waits forever in a collective another rank never reaches
        n_err = float(kdist.all_reduce_sum(torch.tensor([float(err is not None)], device=self.device))[0])
        if n_err:
            raise ConfigError(err or "the teacher cache check failed on another rank (see its error)")
        kdist.barrier()
        if not writes:
            sync_shards(self.store, self.rank, self.world_size, self.local_rank, self.device)
        self.store.scan()
        self.log(f"teacher cache {self.store.root}: {self.describe()}")

    def wanted(self) -> Dict[int, bytes]:
        out: Dict[int, bytes] = {}
        for ix in self.indexes:
            out.update(ix.wanted())
        return out

    def missing(self) -> List[int]:
        return self.store.missing(self.wanted())

    def describe(self) -> str:
        st = self.store.stats()
        n_want = len(self.wanted())
        n_have = n_want - len(self.missing())
        return (f"{n_have}/{n_want} samples cached, {st['answer_tokens']:,} answer tokens, "
                f"{st['bytes'] / 2**20:.2f} MiB = {st['bytes_per_answer_token']:.1f} B per answer token "
                f"({st['entries_per_token']:.2f} stored ids per token; K={self.opts.k}, {self.opts.sampling})")

    def require_complete(self) -> None:
        miss = self.missing()
        wanted = self.wanted()
        if miss and len(miss) == len(wanted) and self.store.index:
            # not one of this run's samples, yet the cache holds others: it was built from another data set
            held = {sid: ents[-1].hash for sid, ents in self.store.index.items()}
            raise ConfigError(
                f"the teacher cache in {self.store.root} belongs to another data set (data hash "
                f"{_data_hash(held)}, {len(held)} samples; this run's data hash {_data_hash(wanted)}, {len(wanted)} "
                "samples, none of them in it); point teacher_cache.dir at a cache for this data set, or build one "
                "with teacher_cache.mode=build.")
        if miss:
            raise ConfigError(
                f"the teacher cache in {self.store.root} lacks {len(miss)} of {len(self.wanted())} samples "
                f"(e.g. ids {miss[:8]}); run teacher_cache.mode=build first (it resumes and fills only what is "
                "missing), or use mode=online_then_cache.")

    # -- training step hooks ----------------------------------------------------------------------
    def wrap_loader(self, loader) -> None:
        """Make ``loader`` batches carry the sample keys (and, once reading, the cached targets)."""
        if loader is not None and not isinstance(loader.collate_fn, CacheCollate):
            loader.collate_fn = CacheCollate(loader.collate_fn, self.store, self.opts.seed, self.ignore_index)
            self.collates.append(loader.collate_fn)

    def set_reading(self, on: bool) -> None:
        for c in self.collates:
            c.read = on

    def loss_targets(self, batch: Dict[str, Any], labels: torch.Tensor, *, teacher_live: bool,
                     training: bool) -> Dict[str, Any]:
        """Extra FusedKDHead targets for one micro-batch: a sampler while writing (live teacher, training
        step), the cached sparse targets (already on the device, gathered by the loader) when the teacher
        is gone, nothing otherwise."""
        if teacher_live:
            if not training or self.writer is None:
                return {}
            # per-position seeds of the sample at each position (CacheCollate): packed or not, a sample's
            # draws are the same, a function of the sample alone
            seeds = batch["cache_row_seed"].reshape(-1)
            return {"teacher_sampler": TeacherSampler(self.opts.k, self.temperature, self.opts.sampling, seeds)}
        if "teacher_ids" not in batch:
            raise CacheError("internal: a cache-phase batch without cached targets (loader not switched)")
        return {"teacher_sparse": SparseTargets(batch["teacher_ids"], batch["teacher_weights"],
                                                batch["teacher_top1"], batch["teacher_entropy"])}

    def after_step(self, batch: Dict[str, Any], labels: torch.Tensor, samples: Optional[TeacherSamples]) -> None:
        if samples is not None and self.writer is not None:
            self.writer.submit(samples, Segments.from_batch(batch), labels)

    def start_writing(self) -> None:
        if self.writer is None:
            self.writer = CacheWriter(self.store, self.rank, self.ignore_index)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def stop_writing(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # -- teacher-only pass --------------------------------------------------------------------------
    @torch.no_grad()
    def fill(self, teacher, head_weight: torch.Tensor, collate: Callable, *, batch_size: int,
             chunk_size: int, dtype: torch.dtype, teacher_sharded: bool,
             batch_tokens: Optional[int] = None) -> Dict[str, float]:
        """Teacher-only pass over the samples the cache lacks (collective). Batches come from a plan over
        ALL wanted samples (longest first), so a resumed pass recomputes exactly the batches an
        uninterrupted one would; only the missing samples of a batch are written. Batch ``b`` of the
        to-do list goes to rank ``b % world_size``; each rank appends to its own shard; at the end every
        node receives every shard.

        ``batch_size`` rows per batch unless ``build_batch_size`` is set; with ``batch_tokens`` (packed
        training data: the tokens of one training micro-batch, ``batch_size * max_seq_len``) the samples are
        batched up to that many padded tokens instead (unless ``build_batch_size``/``build_max_tokens`` say
        otherwise), so the pass does as much work per forward as a training step and fits the same memory."""
        from tqdm import tqdm

        self.flush()
        sync_shards(self.store, self.rank, self.world_size, self.local_rank, self.device)
        self.store.scan()
        bs = self.opts.build_batch_size or (batch_size if batch_tokens is None else batch_tokens)
        max_tokens = self.opts.build_max_tokens or batch_tokens
        todo = []  # (dataset number, [positions]) batches that contain a missing sample
        n_missing = 0
        for d, (ds, ix) in enumerate(zip(self.datasets, self.indexes)):
            miss = {s for s, h in ix.wanted().items() if self.store.lookup(s, h) is None}
            n_missing += len(miss)
            for b in build_batches(ix, range(len(ix.sample_ids)), bs, max_tokens):
                if any(ix.sample_ids[i] in miss for i in b):
                    todo.append((d, b))
        if not todo:
            return {"samples": 0, "seconds": 0.0, "batches": 0, "answer_tokens_this_rank": 0, "tokens_this_rank": 0,
                    "positions_this_rank": 0}
        self.log(f"teacher cache: teacher-only pass over {n_missing} missing samples in {len(todo)} batches "
                 f"of <= {bs}" + (f" rows / {max_tokens} tokens" if max_tokens else "")
                 + f" on {self.world_size} rank(s)")
        own_writer = self.writer is None
        self.start_writing()
        mine = todo[self.rank::self.world_size]
        rounds = math.ceil(len(todo) / self.world_size)
        t0 = time.perf_counter()
        n_tok = n_in = n_pos = 0  # answer rows, real tokens, padded positions (this rank)
        pbar = tqdm(total=rounds, disable=not (self.progress and self.rank == 0), desc="teacher cache",
                    dynamic_ncols=True)
        for r in range(rounds):
            if r < len(mine):
                d, pos = mine[r]
                ds, ix = self.datasets[d], self.indexes[d]
                items = [ds[i] for i in pos]  # samples (unpacked), right-padded by ``collate``
                batch = collate(items)
                batch["segments"] = segments_tensors(item_segments(items))
                n_tok += self._fill_batch(teacher, head_weight, batch, chunk_size, dtype)
                n_in += sum(len(x["tokens"]) for x in items)
                n_pos += int(batch["tokens"].numel())
            elif teacher_sharded:
                # FSDP-sharded teacher: every rank must run as many forwards (all-gathers) as the others
                teacher(torch.zeros(1, 1, dtype=torch.long, device=self.device))
            pbar.update(1)
            dt = time.perf_counter() - t0
            pbar.set_postfix(answer_tok_s=f"{n_tok / max(dt, 1e-9):.0f}")
        pbar.close()
        self.writer.flush()
        if own_writer:
            self.stop_writing()
        kdist.barrier()
        sync_shards(self.store, self.rank, self.world_size, self.local_rank, self.device)
        self.store.scan()
        dt = time.perf_counter() - t0
        self.log(f"teacher cache: pass done in {dt:.1f} s; {self.describe()}")
        return {"samples": n_missing, "seconds": dt, "batches": len(todo), "answer_tokens_this_rank": n_tok,
                "tokens_this_rank": n_in, "positions_this_rank": n_pos}

    def _fill_batch(self, teacher, head_weight, batch, chunk_size: int, dtype) -> int:
        tokens = batch["tokens"].to(self.device)
        lab = batch["labels"]
        labels = torch.cat([lab[:, 1:], torch.full_like(lab[:, :1], self.ignore_index)], dim=1)
        B, S = labels.shape
        hidden = teacher(tokens).to(dtype).reshape(B * S, -1)
        rows = torch.nonzero(labels.reshape(-1) != self.ignore_index).squeeze(1).to(self.device)
        seeds = row_seeds(batch["segments"].sample_id.tolist(), S, self.opts.seed, device=self.device)
        k = self.opts.k
        ids = torch.zeros(B * S, k, dtype=torch.int32, device=self.device)
        probs = torch.zeros(B * S, k, device=self.device) if self.opts.sampling == "topk" \
            else torch.empty(0, device=self.device)
        ent = torch.zeros(B * S, device=self.device)
        top1 = torch.zeros(B * S, dtype=torch.int32, device=self.device)
        for s in range(0, rows.numel(), chunk_size):
            r = rows[s:s + chunk_size]
            t = F.linear(hidden[r], head_weight)
            i_, p_, e_, t_ = sample_teacher_rows(t, seeds[r], k, self.temperature, self.opts.sampling)
            ids[r], ent[r], top1[r] = i_, e_, t_
            if p_.numel():
                probs[r] = p_
        self.writer.submit(TeacherSamples(ids, probs, ent, top1), batch["segments"], labels)
        return int(rows.numel())


class NoCache:
    """The teacher cache's fixed points when the config has none: the live teacher every step."""

    builds_only = False
    datasets: List[Any] = []

    def describe_options(self) -> str:
        return ""

    def loads_teacher_at_start(self) -> bool:
        return True

    def begin(self, cfg, **kw) -> None:
        pass

    def loss_targets(self, batch, labels, *, teacher_live: bool, training: bool) -> Dict[str, Any]:
        return {}

    def after_step(self, batch, labels, samples) -> None:
        pass

    def before_checkpoint(self) -> None:
        pass

    def epoch_end(self, epochs_run: int, total_epochs: int, teacher: TeacherHooks) -> None:
        pass

    def close(self) -> None:
        pass


def teacher_cache_for(settings: KDLoRASettings, *, rank: int, world_size: int, local_rank: int, device,
                      progress: bool):
    """The run's teacher cache: a :class:`CacheSession` when the config has a ``teacher_cache`` section, else
    :class:`NoCache`."""
    if settings.cache is None:
        return NoCache()
    return CacheSession(settings, rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                        ignore_index=-100, progress=progress)
