import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _deterministic():
    torch.manual_seed(0)
