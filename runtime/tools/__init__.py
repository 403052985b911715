"""Benches, the stress harness, the load generator and the LayerSplit simulator: nothing in runtime/ imports these."""
