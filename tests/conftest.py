import os

import pytest
import torch

from composer import load_config


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def compose():
    """compose("model.top_k=4", ...) -> a validated ComposerConfig on the CPU."""

    def make(*overrides: str):
        return load_config(None, ["device=cpu", *overrides])

    return make


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)
