"""LayerSplit: each rank of a group stores only its layers' KV; owners broadcast by a checked plan."""
