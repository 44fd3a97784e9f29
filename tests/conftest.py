import pytest
import torch
import transformers

from ct_fast.testing import TINY_ARCHS, random_batch, tiny_model

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
