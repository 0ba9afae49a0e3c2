"""Shared test configuration: the `gpu` marker skips tests when no CUDA device (with Triton) is present.

Without CUDA, Triton kernels run under Triton's interpreter. ``triton.jit`` chooses compiled or interpreted when a
kernel module is imported, so ``TRITON_INTERPRET`` is set here, before any test (or the model, which imports the
kernels) is imported.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A Python process where this repository is not importable (everything must come from a saved folder), offline.
CLEAN_PRELUDE = textwrap.dedent(
    """
    import sys
    class _Block:  # this repository must not be importable: everything comes from the folder
        def find_spec(self, name, path=None, target=None):
            if name == "keye_vl" or name.startswith("keye_vl."):
                raise ImportError("blocked " + name)
    sys.meta_path.insert(0, _Block())
    """
)


def run_clean_process(code: str, cwd, timeout=300, home=None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with ``keye_vl`` blocked, ``HF_HUB_OFFLINE=1`` and a private HF_HOME
    under ``home`` (default: ``cwd``); assert it exits 0 (its stderr tail is the failure message)."""
    home = Path(cwd if home is None else home)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HF_HOME": str(home / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", CLEAN_PRELUDE + textwrap.dedent(code)], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture()
def run_clean():
    """:func:`run_clean_process` as a fixture (test modules cannot import each other in importlib mode)."""
    return run_clean_process


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random checkpoint folder (``tiny_config()``, seed 0, ``save_pretrained``), one per test module; its
    path as a string."""
    from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    KeyeVL2MoeForConditionalGeneration(tiny_config()).save_pretrained(path)
    return str(path)
