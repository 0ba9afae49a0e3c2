"""Shared test configuration: the `gpu` marker skips tests when no CUDA device (with Triton) is present.

Without CUDA, Triton kernels run under Triton's interpreter. ``triton.jit`` chooses compiled or interpreted when a
kernel module is imported, so ``TRITON_INTERPRET`` is set here, before any test (or the model, which imports the
kernels) is imported.
"""

import os

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
