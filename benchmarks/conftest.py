"""Benchmark setup: one thread on CPU (these 2-core machines time erratically with two), sizes by
device. Run with ``pytest benchmarks/ --benchmark-only``."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bench_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
