"""Shared set-up for the kernel tests: the Triton interpreter on CPU, a seeded generator."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; `make test` sets this too.
# Triton reads it when a kernel module is imported, which happens after this file loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator, fresh for each test."""
    return torch.Generator().manual_seed(1234)
