import os

# Triton kernels run under the interpreter on machines without a GPU (CI, the dev machines).
# This must be set before triton is first imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # the sched/sim tests need no torch
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
