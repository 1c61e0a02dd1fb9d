"""Build torchtune models and load Hugging Face Qwen2 checkpoints into them layer by layer.

Why not torchtune's ``FullModelHFCheckpointer.load_checkpoint``: it reads every shard into one full
state dict before anything is converted, so a Qwen2.5-72B teacher needs ~145 GB of host memory just
to be quantized to a ~40 GB NF4 model, and the stock single-device KD recipe reads the student twice.
Here each decoder layer is materialised, filled from the safetensors shards (read lazily with
``safe_open``), optionally quantized to NF4 and (under FSDP2) sharded before the next layer is read, so
peak memory stays near the final (NF4, sharded) size plus one bf16 layer.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from kd.core.errors import CheckpointError
from kd.core.progress import progress as _progress
from kd.core.state_dict import strip_wrappers
from kd.teacher.nf4 import use_fast_nf4
from kd.teacher.precision import apply_precision
from kd.train.adapter_io import load_peft_adapter

log = logging.getLogger(__name__)

# Linear weights inside decoder layers that the NF4 teacher quantizes (torchtune names).
NF4_LINEAR_SUFFIXES = (
    "attn.q_proj.weight",
    "attn.k_proj.weight",
    "attn.v_proj.weight",
    "attn.output_proj.weight",
    "mlp.w1.weight",
    "mlp.w2.weight",
    "mlp.w3.weight",
)


# --------------------------------------------------------------------------------------------------
# Checkpoint discovery and validation
# --------------------------------------------------------------------------------------------------
def resolve_checkpoint_files(checkpoint_dir: str | Path, checkpoint_files: Any = None) -> List[Path]:
    """The safetensors files of an HF checkpoint directory, checked to exist.

    ``checkpoint_files`` may be None (use ``model.safetensors.index.json`` or ``*.safetensors``), a list of
    names, or torchtune's ``{filename_format, max_filenames}`` mapping.
    """
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise CheckpointError(f"Checkpoint directory {str(d)!r} does not exist.")
    if checkpoint_files is None:
        index = d / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            names = sorted(p.name for p in d.glob("*.safetensors"))
    elif isinstance(checkpoint_files, dict) or hasattr(checkpoint_files, "filename_format"):
        fmt = checkpoint_files["filename_format"]
        n = int(checkpoint_files["max_filenames"])
        names = [fmt.format(i, n) for i in range(1, n + 1)]
    else:
        names = [str(x) for x in checkpoint_files]
    if not names:
        raise CheckpointError(f"No *.safetensors files found in {str(d)!r}.")
    paths = [d / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"Checkpoint shard(s) missing in {str(d)!r}: {', '.join(missing)}. "
            "Copy the complete checkpoint (every file named in model.safetensors.index.json)."
        )
    return paths


def read_hf_config(checkpoint_dir: str | Path) -> Dict[str, Any]:
    p = Path(checkpoint_dir) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{str(p)!r} not found: an HF checkpoint directory needs its config.json.")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(p)!r} is not valid JSON: {e}") from e


def model_dims(model: nn.Module) -> Dict[str, int]:
    """Dimensions of a torchtune TransformerDecoder (works on meta models)."""
    layer0 = model.layers[0]
    attn = getattr(layer0, "_checkpoint_wrapped_module", layer0).attn
    return {
        "num_layers": len(model.layers),
        "embed_dim": model.tok_embeddings.embedding_dim,
        "vocab_size": model.tok_embeddings.num_embeddings,
        "num_heads": attn.num_heads,
        "num_kv_heads": attn.num_kv_heads,
        "head_dim": attn.head_dim,
    }


def check_matches_hf_config(model: nn.Module, hf_cfg: Dict[str, Any], *, which: str, path: str) -> None:
    """Fail clearly when the configured builder does not match the checkpoint's config.json."""
    dims = model_dims(model)
    pairs = [
        ("num_layers", "num_hidden_layers"),
        ("embed_dim", "hidden_size"),
        ("vocab_size", "vocab_size"),
        ("num_heads", "num_attention_heads"),
        ("num_kv_heads", "num_key_value_heads"),
    ]
    bad = [
        f"{ours}={dims[ours]} in the config's builder vs {theirs}={hf_cfg.get(theirs)} in {path}/config.json"
        for ours, theirs in pairs
        if theirs in hf_cfg and int(hf_cfg[theirs]) != dims[ours]
    ]
    if bad:
        raise CheckpointError(
            f"The {which} model builder does not match its checkpoint:\n  - " + "\n  - ".join(bad)
            + f"\nPick the builder for this checkpoint (e.g. torchtune.models.qwen2_5.*) or fix "
            f"{which}_checkpointer.checkpoint_dir."
        )


class HFCheckpointReader:
    """Lazy, name-mapped access to the tensors of an HF Qwen2 safetensors checkpoint."""

    def __init__(self, files: Sequence[Path], *, tie_word_embeddings: bool = False):
        from safetensors import safe_open
        from torchtune.models.convert_weights import get_mapped_key
        from torchtune.models.qwen2._convert_weights import _FROM_HF

        self._handles = {}
        self.index: Dict[str, tuple] = {}  # torchtune name -> (file, hf name)
        self.bytes_read = 0  # checkpoint bytes handed out so far (for the loading bar's GB/s)
        for f in files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # corrupt / truncated shard
                raise CheckpointError(f"Cannot read checkpoint shard {str(f)!r}: {e}") from e
            self._handles[str(f)] = h
            for hf_name in h.keys():
                if "rotary_emb.inv_freq" in hf_name:
                    continue
                if tie_word_embeddings and hf_name == "lm_head.weight":
                    continue
                try:
                    tune_name = get_mapped_key(hf_name, _FROM_HF)
                except Exception as e:
                    raise CheckpointError(
                        f"Unexpected tensor {hf_name!r} in {str(f)!r}: not a Qwen2 parameter name."
                    ) from e
                self.index[tune_name] = (str(f), hf_name)

    def get(self, tune_name: str) -> torch.Tensor:
        f, hf_name = self.index[tune_name]
        t = self._handles[f].get_tensor(hf_name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def names(self) -> List[str]:
        return list(self.index)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def _is_nf4_target(name: str) -> bool:
    return name.startswith("layers.") and name.endswith(NF4_LINEAR_SUFFIXES)


def _to_nf4(t: torch.Tensor) -> torch.Tensor:
    from torchao.dtypes.nf4tensor import to_nf4

    block, scaler_block = 64, 256
    if t.numel() % (block * scaler_block) != 0:
        raise CheckpointError(
            f"Cannot quantize a weight of shape {tuple(t.shape)} to NF4: its size must be divisible by "
            f"{block}*{scaler_block} (torchao's block sizes)."
        )
    return to_nf4(t, block_size=block, scaler_block_size=scaler_block)


def _fsdp_kwargs(mesh, reshard_after_forward: bool, cpu_offload: bool) -> Dict[str, Any]:
    kw: Dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        kw["offload_policy"] = CPUOffloadPolicy()
    return kw


def _load_module(
    module: nn.Module,
    prefix: str,
    reader: HFCheckpointReader,
    *,
    device: torch.device,
    dtype: torch.dtype,
    nf4: bool,
    allowed_missing: Callable[[str], bool],
) -> List[str]:
    """Fill ``module``'s parameters (names ``prefix + local``) from the reader; return loaded names."""
    sd: Dict[str, torch.Tensor] = {}
    loaded = []
    for local, p in module.named_parameters():
        full = prefix + strip_wrappers(local)
        if full not in reader.index:
            if allowed_missing(full):
                continue
            raise CheckpointError(f"Parameter {full!r} is missing from the checkpoint.")
        t = reader.get(full)
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(
                f"Shape mismatch for {full!r}: checkpoint has {tuple(t.shape)}, the model expects "
                f"{tuple(p.shape)}. Check that the model builder matches the checkpoint."
            )
        t = t.to(device=device, dtype=dtype)
        if nf4 and _is_nf4_target(full):
            t = _to_nf4(t)
        sd[local] = t
        loaded.append(full)
    module.load_state_dict(sd, strict=False, assign=True)
    return loaded


def load_hf_into_model(
    model: nn.Module,
    checkpoint_dir: str | Path,
    checkpoint_files: Any = None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    nf4: bool = False,
    mesh=None,
    fsdp: bool = False,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    trainable: Optional[Callable[[str], bool]] = None,
    which: str = "model",
    progress: bool = False,
    init_seed: Optional[int] = 0,
    on_layer_loaded: Optional[Callable[[int, nn.Module], None]] = None,
) -> nn.Module:
    """Materialise a meta-device torchtune ``TransformerDecoder`` from an HF Qwen2 checkpoint.

    Args:
        model: built under ``torch.device("meta")`` (LoRA modules allowed; activation checkpointing may
            already be applied).
        checkpoint_dir / checkpoint_files: see :func:`resolve_checkpoint_files`.
        device, dtype: where and in which dtype the weights live.
        nf4: quantize decoder-layer linear weights to torchao ``NF4Tensor`` while loading (teacher or
            QLoRA student base); they become frozen.
        mesh / fsdp: shard each layer with FSDP2 ``fully_shard`` right after it is loaded, then the root.
        trainable: predicate on parameter names (e.g. LoRA params) that keep ``requires_grad``; all other
            parameters are frozen.
        init_seed: seed for the LoRA initialisation, identical on every rank. torchtune seeds each rank
            with ``seed + rank``; initialising the full LoRA matrices from that and keeping one shard per
            rank would give a different initial adapter for every world size.
        on_layer_loaded: ``fn(i, layer)`` called right after decoder layer ``i`` is filled (before it is
            sharded), e.g. :mod:`kd.teacher.precision`'s per-layer FP8 conversion, so a bf16 copy of the whole model is
            never resident.
    Returns the loaded model (same object).
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        return _load_hf_into_model(
            model, checkpoint_dir, checkpoint_files, device=device, dtype=dtype, nf4=nf4, mesh=mesh,
            fsdp=fsdp, reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload,
            trainable=trainable, which=which, progress=progress, on_layer_loaded=on_layer_loaded,
        )


def _load_root(model: nn.Module, reader, checkpoint_dir, *, device, dtype, trainable, loaded: set) -> None:
    """After the decoder layers: the root-level parameters (embeddings, final norm, output projection) from
    ``reader``, then LoRA init and RoPE caches of what is still on the meta device; names go into ``loaded``."""
    from torchtune.modules.peft import DoRALinear, LoRALinear

    for name, p in list(model.named_parameters()):
        cname = strip_wrappers(name)
        if cname.startswith("layers."):
            continue
        owner_path, _, leaf = cname.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if cname in reader.index:
            t = reader.get(cname)
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"Shape mismatch for {cname!r}: checkpoint has {tuple(t.shape)}, the model expects "
                    f"{tuple(p.shape)}."
                )
            owner.load_state_dict({leaf: t.to(device=device, dtype=dtype)}, strict=False, assign=True)
            loaded.add(cname)
        elif not is_adapter_param(cname):
            raise CheckpointError(f"Parameter {cname!r} is missing from {checkpoint_dir}.")
    with torch.device(device):
        for m in model.modules():
            lora_meta = hasattr(m, "lora_a") and m.lora_a.weight.is_meta
            if isinstance(m, (LoRALinear, DoRALinear)) and lora_meta:
                m.to_empty(device=device)
                m.initialize_parameters()
            elif lora_meta and hasattr(m, "init_lora_parameters"):  # kd.losses.heads.FusedKDHead
                m.init_lora_parameters(device)
            if hasattr(m, "rope_init"):
                m.rope_init()
    for name, p in model.named_parameters():
        if not strip_wrappers(name).startswith("layers."):
            p.requires_grad_(trainable(strip_wrappers(name)))



def _load_hf_into_model(
    model, checkpoint_dir, checkpoint_files, *, device, dtype, nf4, mesh, fsdp, reshard_after_forward,
    cpu_offload, trainable, which, progress, on_layer_loaded=None,
) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torchtune.modules.peft import DoRALinear, LoRALinear

    t0 = time.perf_counter()
    files = resolve_checkpoint_files(checkpoint_dir, checkpoint_files)
    hf_cfg = read_hf_config(checkpoint_dir)
    check_matches_hf_config(model, hf_cfg, which=which, path=str(checkpoint_dir))
    tied = bool(hf_cfg.get("tie_word_embeddings", False))
    reader = HFCheckpointReader(files, tie_word_embeddings=tied)
    trainable = trainable or (lambda n: False)
    fsdp_kw = _fsdp_kwargs(mesh, reshard_after_forward, cpu_offload) if fsdp else None
    loaded: set = set()
    n_layers = len(model.layers)

    # one bar step per decoder layer, with the checkpoint read rate (GB/s) as the postfix
    bar = _progress(total=n_layers, desc=f"{which}: load", unit="layer", enabled=progress)
    for i, layer in enumerate(model.layers):
        loaded.update(
            _load_module(
                layer, f"layers.{i}.", reader, device=device, dtype=dtype, nf4=nf4,
                allowed_missing=is_adapter_param,
            )
        )
        with torch.device(device):
            for m in layer.modules():
                if isinstance(m, (LoRALinear, DoRALinear)):
                    m.to_empty(device=device)
                    m.initialize_parameters()
        for name, p in layer.named_parameters():
            p.requires_grad_(trainable(f"layers.{i}.{strip_wrappers(name)}") and p.is_floating_point())
        if on_layer_loaded is not None:
            on_layer_loaded(i, layer)
        if fsdp:
            fully_shard(layer, **fsdp_kw)
        bar.update(1)
        bar.set_postfix_str(f"{reader.bytes_read / 1e9 / max(time.perf_counter() - t0, 1e-9):.2f} GB/s", refresh=False)
    bar.close()

    _load_root(model, reader, checkpoint_dir, device=device, dtype=dtype, trainable=trainable, loaded=loaded)
    unexpected = sorted(set(reader.names()) - loaded)
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} tensor(s) in {checkpoint_dir} have no place in the {which} model, "
            f"e.g. {unexpected[:3]}. The builder does not match the checkpoint."
        )
    for n, b in model.named_buffers():
        if b.is_meta:
            raise RuntimeError(f"Buffer {n} still on the meta device after loading.")
    if fsdp:
        fully_shard(model, **fsdp_kw)
    dt = time.perf_counter() - t0
    log.info(f"{which}: loaded {len(loaded)} tensors ({reader.bytes_read / 1e9:.2f} GB) from {checkpoint_dir} "
             f"in {dt:.1f}s ({reader.bytes_read / 1e9 / max(dt, 1e-9):.2f} GB/s)")
    return model


def build_on_meta(model_cfg, dtype: torch.dtype) -> nn.Module:
    """Instantiate a torchtune model component on the meta device in ``dtype``."""
    from torchtune import config as tt_config
    from torchtune import training

    with training.set_default_dtype(dtype), torch.device("meta"):
        return tt_config.instantiate(model_cfg)


def apply_activation_checkpointing(model: nn.Module, layers: Sequence[int]) -> None:
    """Wrap ``model.layers[i]`` for ``i`` in ``layers`` with torch's non-reentrant checkpoint wrapper.

    Same wrapper and options as torchtune's ``set_activation_checkpointing`` / selective layer AC, so parameter
    names gain the usual ``_checkpoint_wrapped_module.`` prefix (stripped by the loaders and savers). Called
    before loading and sharding, like torchtune's recipes do.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    from torch.utils.checkpoint import checkpoint

    for i in layers:
        model.layers[i] = checkpoint_wrapper(
            model.layers[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT, checkpoint_fn=checkpoint,
            use_reentrant=False, preserve_rng_state=False,
        )


def is_adapter_param(name: str) -> bool:
    return any(k in name for k in ("lora_a", "lora_b", "magnitude"))


def load_adapter_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    """Copy full adapter tensors into a (possibly FSDP2-sharded) model, checking names and shapes."""
    from torch.distributed.tensor import distribute_tensor

    params = {strip_wrappers(n): p for n, p in model.named_parameters() if is_adapter_param(n)}
    missing = sorted(set(params) - set(sd))
    extra = sorted(set(sd) - set(params))
    if missing or extra:
        raise CheckpointError(
            "The adapter checkpoint does not match the model's LoRA configuration: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}. "
            "Resume with the same lora_rank / lora_attn_modules / apply_lora_to_* as the saved run."
        )
    with torch.no_grad():
        for name, p in params.items():
            full = sd[name]
            if tuple(full.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"Adapter tensor {name!r} has shape {tuple(full.shape)} in the checkpoint but "
                    f"{tuple(p.shape)} in the model (different lora_rank?)."
                )
            full = full.to(dtype=p.dtype)
            if hasattr(p, "device_mesh"):
                full = distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                p.to_local().copy_(full.to_local())
            else:
                p.copy_(full.to(p.device))


@torch.no_grad()
def nf4_linears_(module: nn.Module, *, fast: bool = True) -> int:
    """The NF4 teacher path for a module already in memory (benchmarks, tests): every ``nn.Linear`` weight becomes
    the ``NF4Tensor`` that ``load_hf_into_model(nf4=True)`` would have made while loading (same block sizes), then
    :func:`use_fast_nf4` swaps in the fast forward (``fast=False``: torchao's stock ``linear_nf4``). Pass one decoder
    layer (or ``model.layers``): embeddings and the output projection are not quantised by the teacher path either.
    Freezes ``module``; returns the number of NF4 linears."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                child.weight = nn.Parameter(_to_nf4(child.weight.detach().contiguous()), requires_grad=False)
    n = use_fast_nf4(module, fast=fast)
    for p in module.parameters():
        p.requires_grad_(False)
    return n


def load_frozen_model(
    model_cfg,
    checkpointer,
    *,
    device: torch.device,
    dtype: torch.dtype,
    precision=None,
    which: str = "teacher",
    progress: bool = True,
) -> nn.Module:
    """The one loader of a frozen model: the teacher of the KD recipe, of ``generate_teacher`` and of ``evaluate``
    (and evaluate's base students, ``precision=None``).

    Builds ``model_cfg`` on the meta device, streams the HF checkpoint named by ``checkpointer`` (``checkpoint_dir``,
    optional ``checkpoint_files``) in layer by layer, puts the model in eval mode with every parameter frozen, then
    gives it the fast forward of ``precision`` (a :class:`kd.teacher.precision.TeacherPrecision`: NF4/FP8 weights are made
    while loading; None: dense in ``dtype``). Not sharded: shard it afterwards (``fully_shard`` after
    :func:`kd.teacher.precision.apply_precision`, as the recipe does).
    """

    if checkpointer is None or checkpointer.get("checkpoint_dir") is None:
        raise CheckpointError(f"{which}: checkpointer.checkpoint_dir is missing (the folder of its HF checkpoint).")
    model = build_on_meta(model_cfg, dtype)
    load_hf_into_model(
        model, checkpointer.checkpoint_dir, checkpointer.get("checkpoint_files", None), device=device, dtype=dtype,
        which=which, progress=progress, **(precision.load_kwargs() if precision is not None else {}),
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if precision is not None:
        n = apply_precision(model, precision)
        log.info(f"{which} precision: {precision.describe()}; {n} quantized linears")
    return model


def load_adapter_dir(model: nn.Module, adapter_dir: str | Path, model_cfg) -> None:
    """Load a PEFT adapter folder (``<output_dir>/checkpoints/step_NNNNNNN/adapter`` or any peft save of a Qwen2
    LoRA) into the torchtune LoRA ``model`` built from ``model_cfg``; its ``r`` / ``lora_alpha`` must match the
    config's ``lora_rank`` / ``lora_alpha`` (:class:`kd.core.errors.CheckpointError` otherwise)."""

    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise CheckpointError(f"adapter dir {str(d)!r} has no adapter_config.json (pass a PEFT adapter folder, e.g. "
                              "<output_dir>/checkpoints/step_XXXXXXX/adapter).")
    sd, acfg = load_peft_adapter(d)
    r, a = int(model_cfg.get("lora_rank", -1)), float(model_cfg.get("lora_alpha", -1))
    if int(acfg.get("r", r)) != r or float(acfg.get("lora_alpha", a)) != a:
        raise CheckpointError(f"adapter {d}: r={acfg.get('r')}, lora_alpha={acfg.get('lora_alpha')} but the model "
                              f"config has lora_rank={r}, lora_alpha={a}.")
    load_adapter_state_dict(model, sd)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Targets aligned with the logits: ``labels[..., i + 1]`` becomes the target of position ``i`` and the last
    position gets ``ignore_index`` (torchtune's SFT convention). ``labels``: [..., S] int64 -> same shape."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)
