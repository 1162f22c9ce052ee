"""Fixtures shared by the hardening tests (import them into a test module to use them)."""
import pytest
import torch

__all__ = ["one_thread"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny problems of these tests gain nothing from threads, and on a
    shared, busy CPU spinning OpenMP threads make them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
