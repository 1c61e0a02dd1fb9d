"""Tiny-model test bed: tiny tokenizer, a trained (sharp) tiny Qwen2 teacher, a random tiny Qwen2
student and the demo data, in Hugging Face format (config.json + safetensors), loadable by
torchtune's ``FullModelHFCheckpointer(model_type="QWEN2")`` and ``transformers.AutoModelForCausalLM``.

    python -m kd.testing.testbed --out DIR [--force]

``build_testbed(root)`` is idempotent: a complete test bed of the same version/parameters (stamp file
``TESTBED.json``) is returned at once; builds are serialized with a file lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from kd.data.alpaca import DEMO_DATA_PATH, alpaca_kd_dataset
from kd.testing.tokenizer import TINY_NUM_REGULAR, load_tiny_tokenizer, tiny_tokenizer_files

TESTBED_VERSION = "3"
TINY_VOCAB_SIZE = 1024
STAMP_NAME = "TESTBED.json"

# torchtune builder kwargs (torchtune.models.qwen2.qwen2 / lora_qwen2 argument names)
TINY_TEACHER: Dict[str, Any] = dict(
    vocab_size=TINY_VOCAB_SIZE, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=256,
    intermediate_dim=512, max_seq_len=4096, norm_eps=1e-6, rope_base=1_000_000.0, tie_word_embeddings=False,
)
TINY_STUDENT: Dict[str, Any] = dict(
    vocab_size=TINY_VOCAB_SIZE, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=128,
    intermediate_dim=256, max_seq_len=4096, norm_eps=1e-6, rope_base=1_000_000.0, tie_word_embeddings=False,
)
TEACHER_SEED = 1234
STUDENT_SEED = 5678
# teacher training recipe (CPU, deterministic)
# Teacher: 100 steps on the train split (all tokens): sharp (answer CE ~0.7 on the data) but not a one-hot
# memoriser, so its distributions carry information beyond the labels -- what distillation transfers.
TEACHER_TRAIN = dict(steps=100, batch_size=16, lr=3e-3, warmup=10, weight_decay=0.0, train_on_input=True, seed=0,
                     val_size=0.1, split_seed=0)
# Student base: a weak "pretrained" model -- 100 steps on the train split's PROMPTS only (system + user turns,
# answers masked). Like a real pretrained 7B it has structure and can express sharp outputs, yet knows none of the
# answers (answer CE ~8 nats); a LoRA on a purely random base learns almost nothing in a demo-sized run.
STUDENT_PRETRAIN = dict(steps=100, batch_size=16, lr=3e-3, warmup=10, weight_decay=0.0, train_on_input=True,
                        seed=0, val_size=0.1, split_seed=0, prompts_only=True)
TEACHER_MAX_SHARD_SIZE = "5MB"  # the teacher is saved in several shards (as the real 72B is)

__all__ = [
    "TESTBED_VERSION", "TINY_TEACHER", "TINY_STUDENT", "Testbed", "build_testbed", "write_tiny_qwen2",
    "hf_kwargs_from_dims", "answer_ce", "load_tune_model", "checkpoint_files",
]


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[kd.testing.testbed] {msg}", flush=True)


def hf_kwargs_from_dims(dims: Dict[str, Any]) -> Dict[str, Any]:
    """Map torchtune builder kwargs (TINY_TEACHER style) to ``write_tiny_qwen2`` kwargs."""
    return dict(
        num_layers=dims["num_layers"], hidden_size=dims["embed_dim"], num_heads=dims["num_heads"],
        num_kv_heads=dims["num_kv_heads"], intermediate_size=dims["intermediate_dim"],
        vocab_size=dims["vocab_size"], tie_word_embeddings=dims.get("tie_word_embeddings", False),
        max_position_embeddings=dims.get("max_seq_len", 4096), rope_theta=dims.get("rope_base", 1e6),
        rms_norm_eps=dims.get("norm_eps", 1e-6),
    )


def _hf_config(*, num_layers, hidden_size, num_heads, num_kv_heads, intermediate_size, vocab_size,
               tie_word_embeddings, max_position_embeddings, rope_theta, rms_norm_eps):
    from transformers import Qwen2Config

    im_end, eot = TINY_NUM_REGULAR + 2, TINY_NUM_REGULAR  # <|im_end|>, <|endoftext|>
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=tie_word_embeddings, hidden_act="silu", use_sliding_window=False,
        bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot,
    )


def _new_hf_model(config, seed: int):
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    return model


def _save_hf_model(model, out_dir: Path, max_shard_size: Optional[Union[str, int]],
                   tokenizer_files: Optional[Dict[str, Path]]) -> List[str]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.safetensors.index.json")):
        p.unlink()
    kw = {"safe_serialization": True}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    else:
        kw["max_shard_size"] = "50GB"
    model.save_pretrained(str(out_dir), **kw)
    # keep rope_theta also at top level of config.json (older readers look for it there)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", model.config.rope_parameters["rope_theta"] if getattr(model.config, "rope_parameters", None) else 1e6)
    cfg["torch_dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {
        "bos_token_id": model.config.bos_token_id,
        "eos_token_id": [model.config.eos_token_id, model.config.pad_token_id],
        "pad_token_id": model.config.pad_token_id,
        "do_sample": False,
        "max_new_tokens": 128,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_files:
        from kd.testing.tokenizer import copy_tokenizer_files

        copy_tokenizer_files(tokenizer_files, out_dir)
    return checkpoint_files(out_dir)


def checkpoint_files(model_dir: Union[str, Path]) -> List[str]:
    """Sorted safetensors file names of an HF model dir (for FullModelHFCheckpointer)."""
    return sorted(p.name for p in Path(model_dir).glob("*.safetensors"))


def write_tiny_qwen2(
    out_dir: Union[str, Path],
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_size: int = TINY_VOCAB_SIZE,
    seed: int,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 4096,
    rope_theta: float = 1e6,
    rms_norm_eps: float = 1e-6,
    max_shard_size: Optional[Union[str, int]] = None,
    tokenizer_files: Optional[Dict[str, Path]] = None,
) -> List[str]:
    """Write a randomly initialised (fixed seed) fp32 tiny Qwen2 in HF format; returns the
    safetensors file names (several + ``model.safetensors.index.json`` with ``max_shard_size``).
    Tokenizer files (default: the tiny asset) and generation_config.json are written alongside."""

    config = _hf_config(
        num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
    )
    model = _new_hf_model(config, seed)
    return _save_hf_model(model, Path(out_dir), max_shard_size, tokenizer_files or tiny_tokenizer_files())


# ----------------------------------------------------------------------------------------------
# Loading / evaluation helpers
# ----------------------------------------------------------------------------------------------
def load_tune_model(model_dir: Union[str, Path], dims: Dict[str, Any], output_dir: Optional[Union[str, Path]] = None):
    """Build ``torchtune.models.qwen2.qwen2(**dims)`` (fp32) and load ``model_dir`` through
    ``FullModelHFCheckpointer(model_type="QWEN2")``."""
    import tempfile

    from torchtune.models.qwen2 import qwen2
    from torchtune.training import FullModelHFCheckpointer

    model_dir = Path(model_dir)
    with contextlib.ExitStack() as stack:
        if output_dir is None:
            output_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="kd_ckpt_out_"))
        ckpt = FullModelHFCheckpointer(
            checkpoint_dir=str(model_dir), checkpoint_files=checkpoint_files(model_dir),
            model_type="QWEN2", output_dir=str(output_dir),
        )
        sd = ckpt.load_checkpoint()["model"]
    model = qwen2(**dims)
    model.load_state_dict(sd)
    return model.float().eval()


def _batches(data_json: Union[str, Path], *, train_on_input: bool, batch_size: int, max_seq_len: Optional[int] = None,
             split: str = "all", val_size: float = 0.0, split_seed: int = 0):
    import torch
    from torchtune.data import padded_collate_sft

    tok = load_tiny_tokenizer()
    ds = alpaca_kd_dataset(tok, str(data_json), split=split, val_size=val_size, seed=split_seed,
                           train_on_input=train_on_input, max_seq_len=max_seq_len)
    items = [ds[i] for i in range(len(ds))]
    out = []
    for i in range(0, len(items), batch_size):
        b = padded_collate_sft(items[i : i + batch_size], padding_idx=tok.pad_id, ignore_idx=-100)
        labels = torch.cat([b["labels"][:, 1:], torch.full_like(b["labels"][:, :1], -100)], dim=1)
        out.append((b["tokens"], labels))
    return out


def _logits(model, tokens):
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def answer_ce(model, data_json: Union[str, Path], batch_size: int = 32) -> float:
    """Mean next-token CE (nats) on the answer tokens (+ closing <|im_end|>) of ``data_json``.
    ``model``: an HF CausalLM or a torchtune TransformerDecoder (called on token ids)."""
    import torch
    import torch.nn.functional as F

    tot, n = 0.0, 0
    with torch.no_grad():
        for tokens, labels in _batches(data_json, train_on_input=False, batch_size=batch_size):
            logits = _logits(model, tokens).float()
            tot += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum").item()
            n += int((labels != -100).sum())
    return tot / max(n, 1)


def _train_teacher(model, data_json: Path, cfg: Dict[str, Any], verbose: bool) -> float:
    import torch

    # The teacher never sees the validation split of configs/tiny/kd_lora.yaml (val_size 0.1, seed 0):
    # its predictions there are its generalisation from the training split, which a student can
    # approach by distillation on that same split (a memorised answer could never be learnt).
    batches_all = _batches(data_json, train_on_input=cfg["train_on_input"], batch_size=10**9,
                           split="train", val_size=cfg["val_size"], split_seed=cfg["split_seed"])
    if cfg.get("prompts_only"):  # keep the labels of the prompt tokens only (answers masked)
        answers = _batches(data_json, train_on_input=False, batch_size=10**9,
                           split="train", val_size=cfg["val_size"], split_seed=cfg["split_seed"])
        (t_all, l_all), (_, l_ans) = batches_all[0], answers[0]
        batches_all = [(t_all, torch.where(l_ans == -100, l_all, torch.full_like(l_all, -100)))]
    tokens_all, labels_all = batches_all[0]
    g = torch.Generator().manual_seed(cfg["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.98))
    steps, warm = cfg["steps"], cfg["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    t0 = time.time()
    loss_v = float("nan")
    # One thread: the same float reduction order on every machine (so the recipe tests' golden values
    # hold), and no OpenMP spin-wait collapse when other processes share the 2 CI cores.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss_v = _teacher_loop(model, opt, sched, tokens_all, labels_all, g, cfg, t0, verbose)
    finally:
        torch.set_num_threads(n_threads)
    model.eval()
    return loss_v


def _teacher_loop(model, opt, sched, tokens_all, labels_all, g, cfg, t0, verbose) -> float:
    import torch
    import torch.nn.functional as F

    steps = cfg["steps"]
    loss_v = float("nan")
    for step in range(steps):
        idx = torch.randperm(tokens_all.size(0), generator=g)[: cfg["batch_size"]]
        tokens, labels = tokens_all[idx], labels_all[idx]
        # trim right padding common to the batch
        L = int((labels != -100).any(0).nonzero().max()) + 2
        tokens, labels = tokens[:, :L], labels[:, :L]
        logits = model(tokens).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            loss_v = loss.item()
            _log(f"teacher step {step:4d} loss {loss_v:.4f} ({time.time() - t0:.1f}s)", verbose)
    return loss_v


# ----------------------------------------------------------------------------------------------
# Test bed
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Testbed:
    root: Path
    tokenizer_dir: Path
    vocab: Path
    merges: Path
    special_tokens: Path  # tokenizer.json (added_tokens = Qwen2.5 special tokens at 1000..)
    tokenizer_config: Path
    teacher_dir: Path
    student_dir: Path
    teacher_checkpoint_files: List[str]  # sharded
    student_checkpoint_files: List[str]  # single file
    data_json: Path
    teacher_dims: Dict[str, Any]  # torchtune qwen2()/lora_qwen2() kwargs
    student_dims: Dict[str, Any]
    vocab_size: int
    teacher_answer_ce: float  # teacher's mean CE (nats) on the demo answers after training
    student_answer_ce: float  # the random student's (~ log(vocab_size))
    version: str = TESTBED_VERSION

    __test__ = False  # not a pytest class

    def tokenizer(self, max_seq_len: Optional[int] = None):
        """torchtune Qwen2_5Tokenizer on the tiny vocab."""

        return load_tiny_tokenizer(max_seq_len, self.tokenizer_dir)

    def tokenizer_kwargs(self, max_seq_len: Optional[int] = None) -> Dict[str, Any]:
        """kwargs for ``torchtune.models.qwen2_5.qwen2_5_tokenizer``."""
        return dict(path=str(self.vocab), merges_file=str(self.merges),
                    special_tokens_path=str(self.special_tokens), max_seq_len=max_seq_len)

    def teacher_tune(self):
        return load_tune_model(self.teacher_dir, self.teacher_dims)

    def student_tune(self):
        return load_tune_model(self.student_dir, self.student_dims)

    def to_json(self) -> Dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def _file_sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _params_hash() -> str:
    tf = tiny_tokenizer_files()
    params = {
        "version": TESTBED_VERSION, "teacher": TINY_TEACHER, "student": TINY_STUDENT,
        "seeds": [TEACHER_SEED, STUDENT_SEED], "train": TEACHER_TRAIN, "student_pretrain": STUDENT_PRETRAIN, "shard": TEACHER_MAX_SHARD_SIZE,
        "files": {k: _file_sha(tf[k]) for k in ("vocab", "merges", "special_tokens")},
        "data": _file_sha(DEMO_DATA_PATH),
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _from_stamp(root: Path, stamp: Dict[str, Any]) -> Optional[Testbed]:
    tb = Testbed(
        root=root, tokenizer_dir=root / "tokenizer", vocab=root / "tokenizer" / "vocab.json",
        merges=root / "tokenizer" / "merges.txt", special_tokens=root / "tokenizer" / "tokenizer.json",
        tokenizer_config=root / "tokenizer" / "tokenizer_config.json",
        teacher_dir=root / "teacher", student_dir=root / "student",
        teacher_checkpoint_files=list(stamp["teacher_checkpoint_files"]),
        student_checkpoint_files=list(stamp["student_checkpoint_files"]),
        data_json=root / "demo_buddhist_qa.json", teacher_dims=dict(TINY_TEACHER), student_dims=dict(TINY_STUDENT),
        vocab_size=TINY_VOCAB_SIZE, teacher_answer_ce=float(stamp["teacher_answer_ce"]),
        student_answer_ce=float(stamp["student_answer_ce"]),
    )
    need = [tb.vocab, tb.merges, tb.special_tokens, tb.data_json, tb.teacher_dir / "config.json", tb.student_dir / "config.json"]
    need += [tb.teacher_dir / f for f in tb.teacher_checkpoint_files] + [tb.student_dir / f for f in tb.student_checkpoint_files]
    return tb if all(p.is_file() for p in need) else None


@contextlib.contextmanager
def _lock(root: Path):
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_existing(root: Path, phash: str) -> Optional[Testbed]:
    sp = root / STAMP_NAME
    if not sp.is_file():
        return None
    try:
        stamp = json.loads(sp.read_text())
    except json.JSONDecodeError:
        return None
    if stamp.get("version") != TESTBED_VERSION or stamp.get("params_hash") != phash:
        return None
    return _from_stamp(root, stamp)


def build_testbed(root: Union[str, Path], force: bool = False, verbose: bool = False) -> Testbed:
    """Build (or return the cached) tiny test bed under ``root``."""
    import torch

    root = Path(root).resolve()
    phash = _params_hash()
    if not force:
        tb = _load_existing(root, phash)
        if tb is not None:
            return tb
    with _lock(root):
        if not force:
            tb = _load_existing(root, phash)  # built by another process meanwhile
            if tb is not None:
                return tb
        t0 = time.time()
        (root / STAMP_NAME).unlink(missing_ok=True)
        for d in ("tokenizer", "teacher", "student"):
            shutil.rmtree(root / d, ignore_errors=True)
        tok_dir = root / "tokenizer"
        tok_dir.mkdir(parents=True)
        tf = tiny_tokenizer_files()
        from kd.testing.tokenizer import copy_tokenizer_files

        copy_tokenizer_files(tf, tok_dir)
        tf_local = tiny_tokenizer_files(tok_dir)
        data_json = root / "demo_buddhist_qa.json"
        shutil.copyfile(DEMO_DATA_PATH, data_json)
        _log(f"tokenizer + data -> {tok_dir}, {data_json}", verbose)

        n_threads = torch.get_num_threads()
        try:
            torch.set_num_threads(max(1, min(n_threads, os.cpu_count() or 1)))
            # student: random init, then a prompt-only "pre-training" (see STUDENT_PRETRAIN)
            s_cfg = _hf_config(**hf_kwargs_from_dims(TINY_STUDENT))
            student = _new_hf_model(s_cfg, STUDENT_SEED)
            torch.manual_seed(STUDENT_PRETRAIN["seed"])
            _train_teacher(student, data_json, STUDENT_PRETRAIN, verbose)
            s_files = _save_hf_model(student, root / "student", None, tf_local)
            student_ce = answer_ce(student, data_json)
            _log(f"student (prompt-pretrained) -> {root / 'student'}  answer CE {student_ce:.3f}", verbose)
            # teacher: trained to be sharp on the demo data
            t_cfg = _hf_config(**hf_kwargs_from_dims(TINY_TEACHER))
            teacher = _new_hf_model(t_cfg, TEACHER_SEED)
            torch.manual_seed(TEACHER_TRAIN["seed"])
            _train_teacher(teacher, data_json, TEACHER_TRAIN, verbose)
            teacher_ce = answer_ce(teacher, data_json)
            t_files = _save_hf_model(teacher, root / "teacher", TEACHER_MAX_SHARD_SIZE, tf_local)
            _log(f"teacher (trained) -> {root / 'teacher'} ({len(t_files)} shards)  answer CE {teacher_ce:.4f}", verbose)
        finally:
            torch.set_num_threads(n_threads)
        stamp = {
            "version": TESTBED_VERSION, "params_hash": phash, "teacher_checkpoint_files": t_files,
            "student_checkpoint_files": s_files, "teacher_answer_ce": teacher_ce, "student_answer_ce": student_ce,
            "build_seconds": round(time.time() - t0, 1),
        }
        tmp = root / (STAMP_NAME + ".tmp")
        tmp.write_text(json.dumps(stamp, indent=2) + "\n")
        os.replace(tmp, root / STAMP_NAME)
        _log(f"built in {time.time() - t0:.1f}s", verbose)
        tb = _from_stamp(root, stamp)
        assert tb is not None
        return tb


def main(argv: Optional[List[str]] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kd.testing.testbed", description="Build the tiny KD test bed")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete test bed exists")
    a = p.parse_args(argv)
    t0 = time.time()
    tb = build_testbed(a.out, force=a.force, verbose=True)
    print(f"[kd.testing.testbed] ready in {time.time() - t0:.1f}s")
    for k, v in tb.to_json().items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
