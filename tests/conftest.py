import os

import torch

# Triton kernels run on CPU under the interpreter (small fp32 cases, marker `triton`); it must be set before
# the first Triton kernel is defined, i.e. before ct_fast.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402

from ct_fast.testing import TINY_ARCHS, random_batch, tiny_model  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(params=TINY_ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


@pytest.fixture
def batch():
    return random_batch(37)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
