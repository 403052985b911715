"""The DSA decoder: configuration, weights, checkpoints, paged KV cache, tokenizer and prefix index."""
