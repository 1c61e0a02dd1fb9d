"""Shared pytest fixtures: the tiny KD test bed (built once, cached) and mark handling."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tests start `tune` / `torchrun` subprocesses: use the ones of the interpreter running pytest, also when the
# venv is not activated (CI runs `.venv/bin/python -m pytest`).
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def _testbed_dir() -> Path:
    return Path(os.environ.get("KD_TESTBED_DIR", REPO_ROOT / ".cache" / "testbed"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def testbed():
    """The tiny test bed (kd.testing.testbed.Testbed): tiny tokenizer, trained tiny teacher (sharded HF
    checkpoint), random tiny student, demo data. Cached under $KD_TESTBED_DIR or <repo>/.cache/testbed."""
    from kd.testing.testbed import build_testbed

    return build_testbed(_testbed_dir())


@pytest.fixture(scope="session")
def tiny_tokenizer(testbed):
    """torchtune Qwen2_5Tokenizer on the tiny vocab (no max_seq_len)."""
    return testbed.tokenizer()
