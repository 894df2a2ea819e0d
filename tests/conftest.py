"""Test-session setup. Environment first: Triton reads TRITON_INTERPRET when kernels are decorated, and
huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE at import time."""

import os
import tempfile

_HUB_CACHE = tempfile.mkdtemp(prefix="zoo-hf-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = _HUB_CACHE
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["ZOO_CACHE"] = tempfile.mkdtemp(prefix="zoo-cache-")  # native kernels build here, not in ~/.cache

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Tests run tiny tensors: one intra-op thread is fastest and does not stall when another process holds a core
# (OpenMP barriers made the contract suite 5-10x slower on a busy 2-core machine).
torch.set_num_threads(1)


def _pin_autotune_to_first_config() -> None:
    """Multi-config autotune needs a GPU driver to benchmark; under the interpreter take configs[0]."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import autotuner
    except ImportError:
        return
    original_init = autotuner.Autotuner.__init__

    def init(self, fn, arg_names, configs, *args, **kwargs):
        original_init(self, fn, arg_names, configs[:1], *args, **kwargs)

    autotuner.Autotuner.__init__ = init


_pin_autotune_to_first_config()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP barrier stalls (use with pytest.mark.usefixtures)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def hub_cache() -> str:
    return _HUB_CACHE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
