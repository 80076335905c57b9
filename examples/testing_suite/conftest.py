# The memwarden plugin is loaded by its pytest11 entry point once memwarden is installed;
# from a source checkout pass `-p memwarden.testing.plugin`.
import pytest
import torch


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
