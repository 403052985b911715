"""Executing checked stream plans: a CPU emulator and CUDA streams/events."""
