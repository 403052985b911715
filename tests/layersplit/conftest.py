"""Set-up for the LayerSplit tests: the Triton interpreter on CPU (read when kernel modules are imported)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
