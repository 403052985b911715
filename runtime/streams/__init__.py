"""Stream plans at run time: executing a checked plan on the CPU emulator or on CUDA streams."""
