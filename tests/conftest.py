"""Shared test settings."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The package tests run many steps on small tensors. On a 2-core machine torch's intra-op
    thread pool costs more than it saves there (10-20x slower when other processes compete for
    the cores), so every test runs single-threaded and the previous setting is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
