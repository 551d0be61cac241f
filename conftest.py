"""Hooks shared by tests/ and benchmarks/ (pytest loads this file for both)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests and benchmarks marked ``gpu`` skip, with the reason, on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
