"""The bad-input battery of issue 13, through the public commands, on the tiny test bed.

Every case runs a real entry point -- ``tune run recipes/{kd_lora,generate_teacher,evaluate,export}.py``,
``kd plan``, ``kd preflight`` -- with its own argv/env/cwd (tests/cli_driver.py forks them after one import of
torch; ``KD_CLI_SUBPROCESS=1`` runs each as a fresh ``tune``/``kd`` process instead) and asserts:

- the exit code (2 for a user error);
- for errors: no Python traceback, the last stderr line is the one-line ``kd...: error``/``FAIL`` message and
  it contains what names the mistake (key, file, step);
- for faults that must not be silent: the warning is printed (and the run does the safe thing);
- nothing lost: refused runs leave the other run's checkpoints, ``latest`` and ``torchtune_config.yaml`` intact,
  a diverged run keeps its last finite checkpoint, export keeps the user's files, a crafted pickle never runs.

Most cases fail at setup, before a model is loaded; the few that train run 1-3 tiny steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_utils import REPO

DRIVER = REPO / "tests" / "cli_driver.py"
KD = ["tune", "run", "recipes/kd_lora.py", "--config", "configs/tiny/kd_lora.yaml"]
GEN = ["tune", "run", "recipes/generate_teacher.py", "--config", "configs/tiny/generate.yaml"]
EVAL = ["tune", "run", "recipes/evaluate.py", "--config", "configs/tiny/evaluate.yaml"]
EXPORT = ["tune", "run", "recipes/export.py", "--config", "configs/tiny/export.yaml"]
PLAN = ["kd", "plan", "--config", "configs/tiny/kd_lora.yaml"]
PREFLIGHT = ["kd", "preflight", "--config", "configs/tiny/kd_lora.yaml"]
SHORT = ["epochs=1", "max_steps_per_epoch=2", "~eval_every_n_steps", "progress_bar=False", "log_every_n_steps=1",
         "save_every_n_steps=1", "keep_last_n_checkpoints=5"]


def _drive(cases, tmp: Path, env) -> dict:
    cj, rj = tmp / "cases.json", tmp / "results.json"
    cj.write_text(json.dumps(cases))
    subprocess.run([sys.executable, str(DRIVER), str(cj), str(rj)], cwd=REPO, env=env, check=True, timeout=1800)
    return json.loads(rj.read_text())


def _case(name, argv, *, rc=2, expect=(), warn=(), env=None, timeout=240, fsize_limit=None, post=None):
    return {"name": name, "argv": argv, "rc": rc, "expect": list(expect), "warn": list(warn), "env": env or {},
            "timeout": timeout, "fsize_limit": fsize_limit, "post": post, "cwd": str(REPO)}


def _snapshot(run_dir: Path) -> dict:
    ck = run_dir / "checkpoints"
    return {
        "latest": (ck / "latest").read_text(),
        "steps": sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")),
        "config": (run_dir / "torchtune_config.yaml").read_text(),
        "adapter": (ck / "step_0000004" / "adapter" / "adapter_model.safetensors").read_bytes(),
    }


@pytest.fixture(scope="module")
def battery(testbed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("battery")
    env = dict(os.environ, KD_TESTBED_DIR=str(testbed.root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_MODE"):
        env.pop(k, None)

    # ---- phase 1: one good run (4 steps over 2 epochs, a checkpoint every step) --------------------------
    good = tmp / "good"
    res = _drive([_case("good", KD + [f"output_dir={good}", "epochs=2", "max_steps_per_epoch=2", *SHORT[2:]], rc=0)],
                 tmp, env)["good"]
    assert res["rc"] == 0, res["stderr"][-4000:]
    assert (good / "checkpoints" / "latest").read_text().strip() == "step_0000004"

    def clone(name, keep=None):
        d = tmp / name
        shutil.copytree(good, d)
        if keep is not None:
            for p in (d / "checkpoints").iterdir():
                if p.name.startswith("step_") and p.name != keep:
                    shutil.rmtree(p)
            (d / "checkpoints" / "latest").write_text(keep + "\n")
        return d

    mid = clone("mid", keep="step_0000001")  # as if killed right after step 1 (mid-epoch)
    mid2 = clone("mid2", keep="step_0000001")
    refuse = clone("refuse")
    snap = _snapshot(refuse)
    corrupt = clone("corrupt")
    st = corrupt / "checkpoints" / "step_0000004" / "recipe_state.pt"
    st.write_bytes(st.read_bytes()[:200])
    crafted = clone("crafted")
    marker = tmp / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"global_step": 4, "x": Evil()}, crafted / "checkpoints" / "step_0000004" / "recipe_state.pt")
    nan_teacher = tmp / "nan_teacher"
    shutil.copytree(testbed.teacher_dir, nan_teacher)
    from safetensors.torch import load_file, save_file

    idx = json.loads((nan_teacher / "model.safetensors.index.json").read_text())["weight_map"]
    shard = nan_teacher / idx["model.norm.weight"]
    sd = load_file(str(shard))
    sd["model.norm.weight"] = torch.full_like(sd["model.norm.weight"], float("nan"))
    save_file(sd, str(shard), metadata={"format": "pt"})
    latin = tmp / "gbk.json"
    latin.write_bytes(json.dumps([{"instruction": "什么是心经？", "output": "般若经典"}], ensure_ascii=False)
                      .encode("gb18030"))
    badjson = tmp / "bad.json"
    badjson.write_text('[{"instruction": "a", "output": "b"},')
    badyaml = tmp / "bad.yaml"
    badyaml.write_text("model:\n  _component_: [x\n")
    afile = tmp / "a_file"
    afile.write_text("x")
    unwritable = f"{afile}/sub"  # below a regular file: cannot be created by anyone, root included
    export_out = tmp / "export_out"
    (export_out / "merged").mkdir(parents=True)
    (export_out / "merged" / "my_notes.txt").write_text("keep me")
    adapter = good / "checkpoints" / "step_0000004" / "adapter"
    interp_cfg = tmp / "interp.yaml"
    text = (REPO / "configs" / "tiny" / "kd_lora.yaml").read_text()
    text = text.replace("checkpoint_dir: ${oc.env:KD_TESTBED_DIR,.cache/testbed}/student",
                        "checkpoint_dir: ${model_root}/student")
    interp_cfg.write_text(f"model_root: {testbed.root}\n" + text)
    o = lambda name: f"output_dir={tmp / name}"  # noqa: E731

    cases = [
        # --- kd_lora: config mistakes (setup, before any model is loaded) ---
        _case("typo_key", KD + [o("c1"), "kd_ration=0.7"], expect=["kd_ration", "did you mean 'kd_ratio'"]),
        _case("missing_config", ["tune", "run", "recipes/kd_lora.py", "--config", str(tmp / "nope.yaml"), o("c2")],
              expect=["nope.yaml", "not found"]),
        _case("broken_yaml", ["tune", "run", "recipes/kd_lora.py", "--config", str(badyaml), o("c3")],
              expect=["bad.yaml", "not valid YAML at line"]),
        _case("kd_kind", KD + [o("c4"), "kd_loss.kind=forward"], expect=["kd_loss.kind", "forward_kl"]),
        _case("kd_temperature", KD + [o("c5"), "kd_loss.temperature=0"], expect=["kd_loss.temperature", "> 0"]),
        _case("kd_beta", KD + [o("c6"), "kd_loss.beta=2"], expect=["kd_loss.beta", "<= 1"]),
        _case("kd_temperature_text", KD + [o("c6b"), "kd_loss.temperature=hot"], expect=["kd_loss.temperature"]),
        _case("device_cuda", KD + [o("c7"), "device=cuda"], expect=["device='cuda'", "CUDA is not available"]),
        _case("dtype_fp8", KD + [o("c8"), "dtype=fp8"], expect=["dtype='fp8'", "bf16 or fp32"]),
        _case("lr_negative", KD + [o("c9"), "optimizer.lr=-1"], expect=["optimizer", "Invalid learning rate"]),
        _case("optimizer_typo", KD + [o("c10"), "optimizer.lrr=1e-3"],
              expect=["optimizer.lrr", "did you mean optimizer.lr"]),
        _case("tokenizer_path", KD + [o("c11"), "tokenizer.path=/nonexistent/vocab.json"],
              expect=["tokenizer.path", "/nonexistent/vocab.json", "does not exist"]),
        _case("output_unwritable", KD + [f"output_dir={unwritable}"], expect=["output_dir", "not writable"]),
        _case("lora_rank_0", KD + [o("c13"), "model.lora_rank=0"], expect=["model.lora_rank", ">= 1"]),
        _case("max_seq_len_text", KD + [o("c14"), "tokenizer.max_seq_len=abc"],
              expect=["tokenizer.max_seq_len", "integer"]),
        _case("vocab_too_small", KD + [o("c15"), "model.vocab_size=512", "teacher_model.vocab_size=512"],
              expect=["token ids up to 1021", "512 embedding rows"]),
        _case("ignore_index", KD + [o("c16"), "loss.ignore_index=-1"], expect=["loss.ignore_index", "-100"]),
        _case("kd_ratio_range", KD + [o("c17"), "kd_ratio=1.5"], expect=["kd_ratio", "<= 1.0"]),
        _case("batch_size_0", KD + [o("c18"), "batch_size=0"], expect=["batch_size", ">= 1"]),
        _case("bare_override", KD + [o("c19"), "kd_ratio"], expect=["key=value"]),
        _case("remove_missing", KD + [o("c20"), "~no_such_key"], expect=["~no_such_key", "no key"]),
        _case("loss_form", KD + [o("c21"), "loss_form=fast"], expect=["loss_form", "fused"]),
        _case("env_interp", KD + ["output_dir=${oc.env:KD_NO_SUCH_VAR_13}"], expect=["cannot resolve", "KD_NO_SUCH_VAR_13"]),
        _case("teacher_dir", KD + [o("c23"), f"teacher_checkpointer.checkpoint_dir={tmp}/nope"], expect=["does not exist"]),
        # --- kd_lora: data ---
        _case("data_missing", KD + [o("c24"), f"dataset.source={tmp}/nope.json"], expect=["nope.json", "not found"]),
        _case("data_not_utf8", KD + [o("c25"), f"dataset.source={latin}", "dataset.val_size=0"],
              expect=["gbk.json", "not UTF-8"]),
        _case("data_bad_json", KD + [o("c26"), f"dataset.source={badjson}"], expect=["bad.json", "invalid JSON"]),
        _case("all_answers_cut", KD + [o("c27"), "tokenizer.max_seq_len=40"],
              expect=["cuts 108 of 108", "no answer token is left", "record 0 (110 tokens)"]),
        _case("some_answers_cut", KD + [o("c28"), *SHORT, "max_steps_per_epoch=1", "tokenizer.max_seq_len=100"], rc=0,
              warn=["max_seq_len=100 cuts 10 of 108 samples' whole answer and part of 87 more",
                    "longest record 94 (147 tokens)"]),
        # --- kd_lora: never overwrite / resume with other data ---
        _case("fresh_into_used_dir", KD + [f"output_dir={refuse}", *SHORT], expect=["already holds checkpoints",
              "resume_from_checkpoint=True", "overwrite=True"], post="unchanged"),
        _case("resume_batch_size", KD + [f"output_dir={mid}", *SHORT, "resume_from_checkpoint=True", "batch_size=2"],
              expect=["batch_size: checkpoint=4 vs now=2"]),
        _case("resume_max_seq_len", KD + [f"output_dir={mid}", *SHORT, "resume_from_checkpoint=True",
                                          "tokenizer.max_seq_len=200"], expect=["max_seq_len: checkpoint=256 vs now=200"]),
        _case("resume_dataset", KD + [f"output_dir={mid}", *SHORT, "resume_from_checkpoint=True",
                                      "dataset.val_size=0.2"], expect=["dataset.val_size: checkpoint=0.1 vs now=0.2"]),
        _case("resume_bad_teacher", KD + [f"output_dir={mid2}", *SHORT, "resume_from_checkpoint=True",
                                          f"teacher_checkpointer.checkpoint_dir={tmp}/nope"],
              expect=["does not exist"], post="config_kept"),
        _case("resume_nothing", KD + [o("c33"), "resume_from_checkpoint=True"], expect=["no checkpoint was found"]),
        _case("resume_corrupt_state", KD + [f"output_dir={corrupt}", *SHORT[2:], "epochs=3", "max_steps_per_epoch=2",
                                            "resume_from_checkpoint=True"], rc=0,
              warn=[f"{corrupt}/checkpoints/step_0000004/recipe_state.pt cannot be loaded safely",
                    "falling back to the previous complete checkpoint", "step_0000003"]),
        _case("resume_crafted_pickle", KD + [f"output_dir={crafted}", *SHORT[2:], "epochs=3", "max_steps_per_epoch=2",
                                             "resume_from_checkpoint=True"], rc=0,
              warn=["weights_only=True", "falling back"], post="no_pwn"),
        # --- kd_lora: faults during training ---
        _case("diverging_lr", KD + [o("nan_lr"), *SHORT, "max_steps_per_epoch=6", "keep_last_n_checkpoints=1",
                                    "optimizer.lr=1e6"], expect=["training stopped at step", "last finite checkpoint"],
              post="finite_kept"),
        _case("nan_teacher", KD + [o("nan_t"), *SHORT, f"teacher_checkpointer.checkpoint_dir={nan_teacher}"],
              expect=["training stopped at step 1", "teacher's output", "no checkpoint of this run"]),
        _case("disk_full", KD + [o("full"), *SHORT, "max_steps_per_epoch=1"], fsize_limit=200_000,
              expect=["no space left while writing checkpoint", "MiB"]),
        _case("interp_source_key", ["tune", "run", "recipes/kd_lora.py", "--config", str(interp_cfg), o("interp"),
                                    *SHORT, "max_steps_per_epoch=1"], rc=0),
        # --- export ---
        _case("export_nonempty", EXPORT + [f"output_dir={export_out}", f"adapter_dir={adapter}"],
              expect=["merged already exists and is not empty", "overwrite=True"], post="notes_kept"),
        _case("export_no_adapter", EXPORT + [o("e2"), f"adapter_dir={tmp}/nope"], expect=["adapter_config.json"]),
        _case("export_fp8", EXPORT + [o("e3"), f"adapter_dir={adapter}", "dtype=fp8"], expect=["dtype='fp8'"]),
        _case("export_unwritable", EXPORT + [f"output_dir={unwritable}", f"adapter_dir={adapter}"],
              expect=["not writable"]),
        # --- generate_teacher ---
        _case("gen_source_missing", GEN + [o("g1"), f"source={tmp}/nope.json"], expect=["nope.json", "not found"]),
        _case("gen_not_utf8", GEN + [o("g2"), f"source={latin}"], expect=["gbk.json", "not UTF-8"]),
        _case("gen_tokenizer", GEN + [o("g3"), "tokenizer.merges_file=/nonexistent/merges.txt"],
              expect=["tokenizer.merges_file", "does not exist"]),
        _case("gen_unwritable", GEN + [f"output_dir={unwritable}"], expect=["not writable"]),
        _case("gen_cuda", GEN + [o("g5"), "device=cuda"], expect=["CUDA is not available"]),
        # --- evaluate ---
        _case("eval_unwritable", EVAL + [f"output_dir={unwritable}"], expect=["not writable"]),
        _case("eval_tokenizer", EVAL + [o("v2"), "tokenizer.path=/nonexistent/vocab.json"], expect=["tokenizer.path"]),
        _case("eval_fp8", EVAL + [o("v3"), "dtype=fp8"], expect=["dtype='fp8'"]),
        # --- kd plan ---
        _case("plan_world_size_0", PLAN + ["--world-size", "0"], expect=["--world-size", ">= 1"]),
        _case("plan_seq_len_neg", PLAN + ["--seq-len", "-5"], expect=["--seq-len", ">= 1"]),
        _case("plan_memory_neg", PLAN + ["--device-memory-gib", "-3"], expect=["--device-memory-gib", "> 0"]),
        _case("plan_typo", PLAN + ["kd_ration=0.7"], expect=["did you mean 'kd_ratio'"]),
        _case("plan_lr", PLAN + ["optimizer.lr=-1"], expect=["Invalid learning rate"]),
        _case("plan_missing_config", ["kd", "plan", "--config", str(tmp / "nope.yaml")], expect=["not found"]),
        # --- kd preflight ---
        _case("preflight_typo", PREFLIGHT + ["kd_ration=0.7"], expect=["FAIL", "did you mean 'kd_ratio'"]),
        _case("preflight_broken_yaml", ["kd", "preflight", "--config", str(badyaml)], expect=["not valid YAML"]),
        _case("preflight_lora_rank", PREFLIGHT + ["model.lora_rank=0"], expect=["model.lora_rank"]),
        _case("preflight_ok_reports_kernels", PREFLIGHT + [o("pf")], rc=0,
              warn=["kernel all kernels: eager (no CUDA device", "kd preflight: OK"]),
    ]
    results = _drive(cases, tmp, env)
    ctx = {"good": good, "mid2": mid2, "snap": snap, "refuse": refuse, "marker": marker, "nan_lr": tmp / "nan_lr", "export_out": export_out}
    return {c["name"]: (c, results[c["name"]]) for c in cases}, ctx


NAMES = [
    "typo_key", "missing_config", "broken_yaml", "kd_kind", "kd_temperature", "kd_beta", "kd_temperature_text",
    "device_cuda", "dtype_fp8", "lr_negative", "optimizer_typo", "tokenizer_path", "output_unwritable", "lora_rank_0",
    "max_seq_len_text", "vocab_too_small", "ignore_index", "kd_ratio_range", "batch_size_0", "bare_override",
    "remove_missing", "loss_form", "env_interp", "teacher_dir", "data_missing", "data_not_utf8", "data_bad_json",
    "all_answers_cut", "some_answers_cut", "fresh_into_used_dir", "resume_batch_size", "resume_max_seq_len",
    "resume_dataset", "resume_bad_teacher", "resume_nothing", "resume_corrupt_state", "resume_crafted_pickle", "diverging_lr",
    "nan_teacher", "disk_full", "interp_source_key", "export_nonempty", "export_no_adapter", "export_fp8",
    "export_unwritable", "gen_source_missing", "gen_not_utf8", "gen_tokenizer", "gen_unwritable", "gen_cuda",
    "eval_unwritable", "eval_tokenizer", "eval_fp8", "plan_world_size_0", "plan_seq_len_neg", "plan_memory_neg",
    "plan_typo", "plan_lr", "plan_missing_config", "preflight_typo", "preflight_broken_yaml", "preflight_lora_rank",
    "preflight_ok_reports_kernels",
]


def test_battery_has_enough_bad_inputs():
    assert len(NAMES) >= 35 and len(set(NAMES)) == len(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_battery(battery, name):
    cases, ctx = battery
    case, res = cases[name]
    out, err = res["stdout"], res["stderr"]
    detail = f"rc={res['rc']} ({res['seconds']}s)\n--- stderr ---\n{err[-3000:]}\n--- stdout ---\n{out[-1500:]}"
    assert res["rc"] == case["rc"], detail
    assert "Traceback" not in err, detail
    if case["rc"] != 0:
        last = [l for l in err.splitlines() if l.strip()][-1]
        assert last.startswith(("kd: error", "kd plan: error", "kd preflight: FAIL")), detail
        for s in case["expect"]:
            assert s in last, (s, last)
    for s in case["warn"]:
        assert s in out + err, (s, detail)
    post = case["post"]
    if post == "unchanged":  # the refused run touched nothing of the run that owns the directory
        assert _snapshot(ctx["refuse"]) == ctx["snap"]
    elif post == "no_pwn":
        assert not ctx["marker"].exists(), "a crafted recipe_state.pt ran code"
    elif post == "finite_kept":
        from safetensors.torch import load_file

        ck = ctx["nan_lr"] / "checkpoints"
        latest = (ck / "latest").read_text().strip()
        assert [p.name for p in ck.iterdir() if p.name.startswith("step_")] == [latest]
        assert latest in [l for l in err.splitlines() if l.strip()][-1]
        sd = load_file(str(ck / latest / "adapter" / "adapter_model.safetensors"))
        assert all(torch.isfinite(v).all() for v in sd.values())
    elif post == "config_kept":  # a failed start must not rewrite the config of the run it was resuming
        assert (ctx["mid2"] / "torchtune_config.yaml").read_text() == (ctx["good"] / "torchtune_config.yaml").read_text()
    elif post == "notes_kept":
        assert (ctx["export_out"] / "merged" / "my_notes.txt").read_text() == "keep me"
