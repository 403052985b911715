"""Serving tests: Triton runs in its interpreter without CUDA (helpers live in serving_testing.py)."""
from __future__ import annotations

import os

import torch

# Triton reads this when a kernel module is first imported (the triton-backend test).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
