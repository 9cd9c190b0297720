"""pytest setup for the vLLM-driven connector tests.

The environment must be fixed before anything imports vllm, because vLLM picks its
platform and reads several variables once, at import time.
"""

import os
import sys
from pathlib import Path

# No network here and no model weights: a config-only model dir is used, and the
# HF hub must never be asked (otherwise ModelConfig retries for ~100 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The PyPI vllm wheel is the CUDA build; on a machine without a GPU it would resolve
# to UnspecifiedPlatform. CpuPlatform is what vLLM's own CPU CI uses; it also turns
# async scheduling off, so the plain v1 Scheduler is what runs.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
# Keep the tests from phoning home.
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Test modules import `harness` as a plain module.
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import pytest  # noqa: E402


@pytest.fixture
def rpc_base_path(tmp_path_factory, monkeypatch):
    """A private VLLM_RPC_BASE_PATH for one test.

    The lookup service between scheduler and worker listens on a local socket under
    this directory; a per-test directory keeps parallel or repeated runs from
    colliding on a stale socket file.
    """
    path = tmp_path_factory.mktemp("rpc")
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(path))
    return path
