import pytest
import torch

import pykernels


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture
def cpu_path():
    """Runs a test body under each CPU kernel path this machine has, restoring the default."""
    default = pykernels._C.cpu_path()
    yield pykernels._C.set_cpu_path
    pykernels._C.set_cpu_path(default)
