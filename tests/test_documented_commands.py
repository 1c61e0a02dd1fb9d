"""Every command the README and the config headers give is parsed out of them and run:

- ``bash launch/*.sh ...``: the script exists and answers ``--help`` (exit 0); ``run_node.sh``'s config and
  overrides pass the recipe's validation (``kd plan`` with the same arguments) and its launcher flags parse;
- ``python -m kd.testing.testbed ...``: ``--help``; the README's pytest line: collected with ``--co``;
- ``tune run ... configs/tiny/...``: run for real in a scratch directory (the documented order: generate ->
  SFT -> evaluate, KD -> export), shortened by a few appended overrides (steps, samples), placeholders such as
  ``step_0000040`` replaced by the checkpoint the earlier command wrote; each must exit 0;
- ``tune run ... configs/qwen2_5/...``: the models are not here, so the command (with ``device=cpu``) must get
  through parsing and key validation and stop with a one-line error about the missing model/data file; the
  kd_lora ones are also planned with ``kd plan`` (exit 0), and torchrun flags are parsed by torchrun's parser;
- ``huggingface-cli download``: needs the network; only checked to target the config's checkpoint_dir;
- ``vllm serve <dir>``: vLLM is not here; the folder must be a ``quantized-<scheme>`` the export writes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_utils import REPO, free_port

DRIVER = REPO / "tests" / "cli_driver.py"
SHORT_KD = ["epochs=1", "max_steps_per_epoch=2", "eval_every_n_steps=2", "max_eval_batches=1", "progress_bar=False"]
SHORT = {"kd_lora.yaml": SHORT_KD, "sft_lora.yaml": SHORT_KD, "generate.yaml": ["max_samples=24"],
         "evaluate.yaml": ["max_samples=8", "max_new_tokens=8"], "export.yaml": []}
_CMD_START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(tune|bash|python|torchrun|kd|huggingface-cli|\.venv/bin/python)\b")


def _join_continuations(lines):
    out, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
        else:
            out.append((cur + line).strip())
            cur = ""
    if cur:
        out.append(cur.strip())
    return out


def documented_commands():
    """[(source, command)] from README.md's bash blocks and every config's header comment."""
    cmds = []
    readme = (REPO / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        lines = [l for l in block.splitlines() if l.strip() and not l.strip().startswith("#")]
        for c in _join_continuations(lines):
            for part in c.split("&&"):
                cmds.append(("README.md", part.strip()))
    for cfg in sorted((REPO / "configs").rglob("*.yaml")):
        header = []
        for line in cfg.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line[1:])
        body = [l for l in header if l.startswith("   ")]
        for c in _join_continuations(body):
            c = re.sub(r"^[a-z ]+:\s+(?=tune )", "", c)  # "several GPUs: tune run ..."
            c = c.split("  #")[0].strip()
            if _CMD_START.match(c):
                cmds.append((str(cfg.relative_to(REPO)), c))
    return cmds


def _split(cmd):
    cmd = cmd.replace("<ip of node 0>", "127.0.0.1").replace("$NODE_RANK", "0")
    cmd = cmd.replace("$MASTER_ADDR", "127.0.0.1").replace("$MASTER_PORT", "29500")
    toks = [t for t in shlex.split(cmd) if t != "..."]
    env = {}
    while toks and re.match(r"^[A-Z_]+=", toks[0]):
        k, v = toks.pop(0).split("=", 1)
        env[k] = v
    return env, toks


def _tune_parts(toks):
    """tune run [launcher flags] RECIPE --config CFG [overrides] -> (launcher, recipe, cfg, overrides)."""
    assert toks[:2] == ["tune", "run"], toks
    i = next(j for j, t in enumerate(toks) if t.endswith(".py"))
    launcher, recipe = toks[2:i], toks[i]
    rest = toks[i + 1:]
    k = rest.index("--config")
    return launcher, recipe, rest[k + 1], rest[:k] + rest[k + 2:]


def test_readme_and_headers_name_real_files():
    cmds = documented_commands()
    srcs = {s for s, _ in cmds}
    assert "README.md" in srcs and len(srcs) >= 8, srcs
    assert any("launch/run_node.sh configs/qwen2_5/72B_to_7B_kd_lora.yaml" in c for _, c in cmds)
    for src, c in cmds:
        for tok in shlex.split(c.replace("<ip of node 0>", "x")):
            if re.match(r"^(launch|recipes|configs)/\S+\.(sh|py|yaml)$", tok):
                assert (REPO / tok).is_file(), f"{src}: {c!r} names {tok}, which does not exist"


def test_documented_scripts_answer_help_and_launcher_flags_parse():
    """The fast part (default suite): every script answers --help; every torchrun flag set parses."""
    from torch.distributed.run import get_args_parser

    n = 0
    for src, c in documented_commands():
        _, toks = _split(c)
        if toks[0] == "bash":
            r = subprocess.run(["bash", toks[1], "--help"], cwd=REPO, capture_output=True, text=True)
            assert r.returncode == 0 and "--help" not in r.stderr and r.stdout.strip(), (src, c, r.stderr)
            n += 1
        elif toks[0] == "tune":
            launcher = _tune_parts(toks)[0]
            if launcher:
                get_args_parser().parse_args([*launcher, "x.py"])
                n += 1
    assert n >= 6


@pytest.mark.slow  # ~4 min on 2 shared cores: generation, SFT, evaluation, KD (1 and 2 processes), export, plans
def test_every_documented_command_runs(testbed, tmp_path):
    env = dict(os.environ, KD_TESTBED_DIR=str(testbed.root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(k, None)
    scratch = tmp_path / "work"  # relative outputs/ of the tiny configs land here, not in the repository
    scratch.mkdir()
    for d in ("recipes", "configs", "launch", "kd"):
        (scratch / d).symlink_to(REPO / d)

    tiny, qwen, checked = [], [], []
    for src, c in documented_commands():
        e, toks = _split(c)
        head = toks[0]
        if head == "bash":
            r = subprocess.run(["bash", toks[1], "--help"], cwd=REPO, capture_output=True, text=True, env=env)
            assert r.returncode == 0 and r.stdout.strip(), (src, c, r.stderr)
            if toks[1] == "launch/run_node.sh":
                cfg = next(t for t in toks[2:] if t.endswith(".yaml"))
                over = [t for t in toks[2:] if "=" in t]
                qwen.append(("plan", src, c, ["kd", "plan", "--config", cfg, *over, "--gb10"]))
            checked.append(c)
        elif toks[:3] == ["python", "-m", "kd.testing.testbed"]:
            r = subprocess.run([sys.executable, "-m", "kd.testing.testbed", "--help"], cwd=REPO, capture_output=True,
                               text=True, env=env)
            assert r.returncode == 0, (src, c, r.stderr)
            checked.append(c)
        elif head == ".venv/bin/python" and toks[1:3] == ["-m", "pytest"]:
            r = subprocess.run([sys.executable, *toks[1:], "--co", "-q"], cwd=REPO, capture_output=True, text=True,
                               env=env, timeout=300)
            assert r.returncode == 0 and "tests/test_battery.py" in r.stdout, (src, c, r.stdout[-2000:])
            checked.append(c)
        elif head == "huggingface-cli":
            target = toks[toks.index("--local-dir") + 1]
            body = "\n".join(l for l in (REPO / src).read_text().splitlines() if not l.startswith("#"))
            assert f"checkpoint_dir: {target}" in body, (src, c)  # downloads where the config reads
            checked.append(c)
        elif head == "tune":
            launcher, recipe, cfg, over = _tune_parts(toks)
            if launcher:
                from torch.distributed.run import get_args_parser

                get_args_parser().parse_args([*launcher, "x.py"])  # the torchrun flags are valid
            (tiny if cfg.startswith("configs/tiny/") else qwen).append(("run", src, c, (launcher, recipe, cfg, over)))
        elif head == "pip" and toks[1:3] == ["install", "-e"]:
            import tomllib

            extras = re.findall(r"\[(.*?)\]", toks[3])
            opt = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
            assert extras and all(x in opt for x in ",".join(extras).split(",")), (src, c)  # the extra exists
            checked.append(c)
        elif head == "kd":
            # kd plan runs as written, --time too: on a fresh machine (empty HOME and kd cache, no /models, no data
            # file) it counts with kd's offline Qwen2.5 tokenizer and says so on its first line
            fresh = tmp_path / "fresh_home"
            fresh.mkdir(exist_ok=True)
            kenv = {k: v for k, v in env.items() if k != "KD_CACHE_DIR"}
            kenv.update(HOME=str(fresh), KD_CACHE_DIR=str(fresh / ".cache" / "kd"))
            r = subprocess.run([str(Path(sys.executable).parent / "kd"), *toks[1:]], cwd=REPO, capture_output=True,
                               text=True, env=kenv, timeout=600)
            assert r.returncode == 0 and r.stdout.strip(), (src, c, r.stderr[-2000:])
            if "--time" in toks:
                assert r.stdout.startswith("tokens counted with: "), (src, c, r.stdout[:500])
            checked.append(c)
        elif toks[:2] == ["vllm", "serve"]:
            # vLLM is not installed here (and NVFP4 needs a Blackwell GPU): the folder served must be one the export
            # writes, quantized-<a scheme of kd.train.quantize.SCHEMES>
            from kd.train.quantize import SCHEMES

            folder = Path(toks[2]).name
            assert folder.startswith("quantized-") and folder[len("quantized-"):] in SCHEMES, (src, c)
            checked.append(c)
        else:
            pytest.fail(f"{src}: no way to check {c!r}")

    # ---- tiny commands: really run, in the documented order -------------------------------------------
    order = ["generate.yaml", "sft_lora.yaml", "evaluate.yaml", "kd_lora.yaml", "export.yaml"]
    seen, tiny_runs = set(), []
    rank = lambda name: order.index(name) if name in order else len(order)  # noqa: E731 (others after)
    for _, src, c, parts in sorted(tiny, key=lambda x: rank(Path(x[3][2]).name)):
        if c in seen:
            continue
        seen.add(c)
        if Path(parts[2]).name in ("kd_full.yaml", "export_full.yaml"):
            # the full fine-tune chain (2 processes, sharded checkpoints, export) is run by tests/test_full_finetune.py
            assert (REPO / parts[2]).is_file(), (src, c)
            checked.append(c)
            continue
        tiny_runs.append((src, c, parts))
    assert {Path(p[2]).name for _, _, p in tiny_runs} == set(order)
    latest = lambda run: (scratch / "outputs" / run / "checkpoints" / "latest").read_text().strip()  # noqa: E731
    results = {}
    for i, (src, c, (launcher, recipe, cfg, over)) in enumerate(tiny_runs):
        name = Path(cfg).name
        extra = list(SHORT[name])
        if recipe.endswith("kd_lora.py") and (scratch / "outputs" / "tiny_kd_lora" / "checkpoints").exists() \
                and name == "kd_lora.yaml":
            extra.append("overwrite=True")  # the header's second (two-process) variant of the same run
        fixed = []
        for t in over:
            m = re.search(r"outputs/(\w+)/checkpoints/(step_\d{7}|step_X+)/", t)
            if m:
                t = t.replace(m.group(2), latest(m.group(1)))
            fixed.append(t)
        if name == "export.yaml" and (scratch / "outputs" / "tiny_export" / "merged").exists():
            fixed.append("overwrite=True")  # the README's export after the header's: same output_dir
        if name == "export.yaml" and not any(t.startswith("adapter_dir=") for t in fixed):
            fixed.append(f"adapter_dir=outputs/tiny_kd_lora/checkpoints/{latest('tiny_kd_lora')}/adapter")
        if launcher:
            launcher = [*launcher, "--master-port", str(free_port())]
        argv = ["tune", "run", *launcher, recipe, "--config", cfg, *fixed, *extra]
        case = {"name": f"tiny{i}", "argv": argv, "cwd": str(scratch), "timeout": 600, "env": {}}
        res = _drive([case], tmp_path, env)[case["name"]]
        results[c] = res
        assert res["rc"] == 0, f"{src}: {c}\n(ran: {' '.join(argv)})\n{res['stderr'][-4000:]}\n{res['stdout'][-2000:]}"
        checked.append(c)
    assert (scratch / "outputs" / "tiny_export" / "merged" / "config.json").is_file()
    assert (scratch / "outputs" / "tiny_evaluate" / "eval_report.md").is_file()

    # ---- qwen2_5 commands: parse + validate, stop at the missing model files ---------------------------
    cases = []
    for j, (kind, src, c, parts) in enumerate(qwen):
        if kind == "plan":
            cases.append({"name": f"q{j}", "argv": parts, "cwd": str(REPO), "timeout": 300, "env": {},
                          "src": src, "c": c, "kind": "plan"})
            continue
        launcher, recipe, cfg, over = parts
        cases.append({"name": f"q{j}", "argv": ["tune", "run", recipe, "--config", cfg, *over, "device=cpu",
                                                 f"output_dir={tmp_path / f'q{j}'}"],
                      "cwd": str(REPO), "timeout": 300, "env": {}, "src": src, "c": c, "kind": "run"})
        from omegaconf import OmegaConf

        if recipe.endswith("kd_lora.py") and OmegaConf.load(REPO / cfg).get("teacher_model") is not None:
            cases.append({"name": f"q{j}p", "argv": ["kd", "plan", "--config", cfg, *over, "--gb10"],
                          "cwd": str(REPO), "timeout": 300, "env": {}, "src": src, "c": c, "kind": "plan"})
    res = _drive(cases, tmp_path, env)
    for case in cases:
        r = res[case["name"]]
        what = f"{case['src']}: {case['c']}\n(ran: {' '.join(case['argv'])})\n{r['stderr'][-3000:]}"
        assert "Traceback" not in r["stderr"], what
        if case["kind"] == "plan":
            assert r["rc"] == 0 and "PEAK" in r["stdout"], what
        else:
            last = [l for l in r["stderr"].splitlines() if l.strip()][-1]
            assert r["rc"] == 2 and last.startswith("kd: error"), what
            assert "/models/" in last or "/data/" in last, what  # stopped at a file that lives on the GPU nodes
            assert "Unknown key" not in last and "override" not in last, what
        checked.append(case["c"])
    assert set(checked) >= {c for _, c in documented_commands()}


def _drive(cases, tmp: Path, env) -> dict:
    cj, rj = tmp / "doc_cases.json", tmp / "doc_results.json"
    cj.write_text(json.dumps([{k: v for k, v in c.items() if k not in ("src", "c", "kind")} for c in cases]))
    subprocess.run([sys.executable, str(DRIVER), str(cj), str(rj)], cwd=REPO, env=env, check=True, timeout=3600)
    return json.loads(rj.read_text())
