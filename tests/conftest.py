"""Test-wide settings: offline, temporary HF cache, deterministic, one thread per process."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Set before transformers/datasets/lerobot are imported anywhere in the session.
_HF_HOME = tempfile.mkdtemp(prefix="vla-test-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MUJOCO_GL", "egl")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny trained policy checkpoint, (pretrained_model dir, run dir), for selector tests (test_rtc.py has its own)."""
    from tests.helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("sel"), 2, 10, "--log_every=1")
