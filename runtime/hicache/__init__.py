"""HiCache: a host tier under the device KV pool, swapped in layer by layer by a checked stream plan."""
