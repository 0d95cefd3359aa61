import os

# Triton kernels run under the interpreter on machines without a GPU (CI, the dev machines).
# This must be set before triton is first imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
    # The test models are tiny: one thread is as fast, and avoids OpenMP spin-waits thrashing a
    # busy 2-core machine (seen: 25x slower steps).
    torch.set_num_threads(1)
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
