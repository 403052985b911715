"""Suite-wide set-up: Triton kernels run under the interpreter unless a GPU is present."""
import os

# Triton reads this when a kernel module is first imported; set it before any test imports one.
try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:        # pragma: no cover - torch is a hard dependency
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
