"""The recipe drives features through interfaces: the teacher cache's lifecycle is one object called at fixed
points (its mode decisions live in kd.cache.session), both checkpoint formats commit through
CheckpointManager.commit, and the logged metrics travel and are read by name (NamedVector)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kd.cache.session import CacheSession, NoCache, teacher_cache_for
from kd.core.layout import RunLayout
from kd.train import full
from kd.train.metric_logging import NamedVector
from kd.train.step_checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]


def test_recipe_has_no_cache_mode_branches():
    """No teacher_cache mode string and no `.mode` read in recipes/kd_lora.py's code (docstrings aside)."""
    tree = ast.parse((REPO / "recipes" / "kd_lora.py").read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    bad = [f"line {n.lineno}: {n.value!r}" for n in ast.walk(tree) if isinstance(n, ast.Constant)
           and id(n) not in docstrings and n.value in ("online_then_cache", "build", "use")]
    bad += [f"line {n.lineno}: .mode" for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "mode"]
    assert not bad, bad


class _Hooks:
    def __init__(self, live: bool):
        self.live, self.calls = live, []

    def teacher_live(self):
        return self.live

    def load_teacher(self):
        self.calls.append("load")
        self.live = True

    def fill_and_free(self):
        self.calls.append("fill")
        self.live = False


def _session(mode: str, missing=(), resume_epoch_=0, monkeypatch=None):
    opts = SimpleNamespace(mode=mode, dir=Path("/nonexistent"), k=4, sampling="random")
    st = SimpleNamespace(cache=opts, layout=RunLayout(Path("/nonexistent")), resume=resume_epoch_ > 0)
    s = CacheSession(st, rank=0, world_size=1, local_rank=0, device="cpu", ignore_index=-100, progress=False)
    calls = []
    s.attach = lambda cfg, **kw: calls.append("attach")
    s.wrap_loader = lambda loader: calls.append("wrap")
    s.missing = lambda: list(missing)
    s.require_complete = lambda: calls.append("require_complete")
    s.set_reading = lambda on: calls.append(f"reading={on}")
    s.start_writing = lambda: calls.append("start_writing")
    s.stop_writing = lambda: calls.append("stop_writing")
    s.flush = lambda: calls.append("flush")
    s.describe = lambda: ""
    return s, calls


def _begin(s, hooks):
    s.begin(None, loss=None, tokenizer=None, datasets=[], loaders=["train", None], ignore_index=-100, teacher=hooks)


def test_cache_lifecycle_decisions_per_mode():
    s, calls = _session("use")
    h = _Hooks(live=False)
    _begin(s, h)
    assert calls == ["attach", "wrap", "wrap", "require_complete", "reading=True"] and h.calls == []

    s, calls = _session("online_then_cache")  # epoch 1: writes while the live teacher trains
    h = _Hooks(live=True)
    _begin(s, h)
    assert calls[-1] == "start_writing" and h.calls == []
    s.epoch_end(1, 3, h)  # more epochs follow: fill, free, read
    assert h.calls == ["fill"] and calls[-3:] == ["stop_writing", "require_complete", "reading=True"]
    calls.clear()
    s.epoch_end(2, 3, h)  # the teacher is gone: nothing more
    assert calls == []

    s, calls = _session("online_then_cache")  # a one-epoch run: only flush at the end
    h = _Hooks(live=True)
    _begin(s, h)
    s.epoch_end(1, 1, h)
    assert calls[-1] == "flush" and h.calls == []

    s, calls = _session("online_then_cache", missing=[3])  # resumed after epoch 1, cache incomplete
    h = _Hooks(live=False)
    _begin(s, h)
    assert h.calls == ["load", "fill"] and calls[-2:] == ["require_complete", "reading=True"]

    s, calls = _session("build")
    h = _Hooks(live=True)
    assert s.builds_only and s.loads_teacher_at_start()
    _begin(s, h)
    assert calls == ["attach", "wrap", "wrap"]
    s.run_build(h)
    assert h.calls == ["fill"]


def test_no_cache_answers_the_same_calls():
    c = teacher_cache_for(SimpleNamespace(cache=None), rank=0, world_size=1, local_rank=0, device="cpu",
                          progress=False)
    assert isinstance(c, NoCache) and not c.builds_only and c.loads_teacher_at_start()
    assert c.loss_targets({}, None, teacher_live=True, training=True) == {}
    for call in (c.before_checkpoint, c.close):
        call()
    c.epoch_end(1, 2, _Hooks(live=True))
    c.after_step({}, None, None)


def test_commit_is_atomic_points_latest_and_keeps_n(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last_n=2)
    for step in (1, 2, 3):
        p = mgr.commit(step, {"step": step, "epoch": 0, "format": "x"}, lambda tmp: (tmp / "payload").write_text("p"))
        assert (p / "payload").read_text() == "p" and json.loads((p / "meta.json").read_text())["step"] == step
    assert mgr.latest().name == "step_0000003"
    assert [p.name for p in mgr.list_checkpoints()] == ["step_0000002", "step_0000003"]


def test_full_finetune_commits_through_the_manager(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last_n=1)
    committed = []
    real = CheckpointManager.commit
    monkeypatch.setattr(CheckpointManager, "commit",
                        lambda self, step, meta, write: committed.append(step) or real(self, step, meta, write))
    for step in (5, 6):
        path = full.save_checkpoint(mgr, step, 0, model, opt, {"global_step": step}, rank=0, world_size=1,
                                    mesh_shape=(1,))
    assert committed == [5, 6] and path == mgr.latest() and path.name == "step_0000006"
    assert json.loads((path / "meta.json").read_text())["format"] == full.FORMAT
    name, state = full.load_checkpoint(mgr, model, opt, rank=0, world_size=1, mesh_shape=(1,))
    assert name == "step_0000006" and state["global_step"] == 6


def test_named_vector_round_trip():
    v = NamedVector(metrics=torch.arange(6.0), guard=torch.tensor([7.0, 8.0, 9.0, 10.0]), stop=torch.tensor([1.0]))
    parts = v.unpack(v.vector * 2)  # e.g. the all-reduce of two equal ranks
    assert parts["metrics"].tolist() == [0, 2, 4, 6, 8, 10]
    assert parts["guard"].tolist() == [14, 16, 18, 20] and parts["stop"].tolist() == [2.0]
    with pytest.raises(KeyError):
        parts["other"]
