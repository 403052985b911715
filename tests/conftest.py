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

# Hypothesis: deterministic by default, so CI verdicts are reproducible; use
# `pytest --hypothesis-profile=explore` to search with fresh random examples.
from hypothesis import settings  # noqa: E402

settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")
