"""Issue 31 item 9: a torchtune user's config runs as written. loss: CEWithChunkedOutputLoss with kd_loss:
ForwardKLWithChunkedOutputLoss used to stop with "cannot run with loss_form=fused"; such losses need materialised
logits, so they run in the chunked form, with one log line giving the memory cost and the kd components that
avoid it. Only what cannot run at all is refused."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from recipe_utils import metrics, tune_run

from kd.core.config import ConfigError
from kd.losses import components as lc

TT_CE = "torchtune.modules.loss.CEWithChunkedOutputLoss"
TT_KD = "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss"


def _cfg(ce=None, kd=None):
    c = {}
    if ce:
        c["loss"] = {"_component_": ce}
    if kd:
        c["kd_loss"] = {"_component_": kd}
    return OmegaConf.create(c)


def test_effective_form_runs_torchtunes_chunked_losses_chunked():
    form, note = lc.effective_loss_form(_cfg(TT_CE, TT_KD), "fused")
    assert form == "chunked" and TT_CE in note and TT_KD in note and lc.FUSED_CE in note
    lc.check_loss_components(_cfg(TT_CE, TT_KD), form)  # runs
    assert lc.effective_loss_form(_cfg(TT_CE), "fused")[0] == "chunked"  # kd's DistillationLoss runs chunked too
    assert lc.effective_loss_form(_cfg(lc.FUSED_CE, lc.KD_LOSS), "fused") == ("fused", None)
    assert lc.effective_loss_form(_cfg(), "fused") == ("fused", None)
    # what no single form runs is still refused: the fused CE with a chunked torchtune KD loss
    form, _ = lc.effective_loss_form(_cfg(lc.FUSED_CE, TT_KD), "fused")
    with pytest.raises(ConfigError, match="cannot run with loss_form=fused"):
        lc.check_loss_components(_cfg(lc.FUSED_CE, TT_KD), form)


def test_torchtune_users_losses_run_with_one_line_naming_the_cost(testbed, tmp_path):
    out = tmp_path / "run"
    p = tune_run(testbed, ["~loss", "~kd_loss", f"loss._component_={TT_CE}", f"kd_loss._component_={TT_KD}",
                           f"output_dir={out}", "epochs=1", "max_steps_per_epoch=2", "~eval_every_n_steps",
                           "progress_bar=False", "log_every_n_steps=1"])
    lines = [l for l in (p.stdout + p.stderr).splitlines() if "need materialised logits" in l]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "running loss_form=chunked" in lines[0] and "GiB per device above the fused head" in lines[0]
    assert lc.FUSED_CE in lines[0]
    rows = metrics(out)
    assert len(rows) == 2 and all(r["kd_loss"] > 0 for r in rows)
