"""Prefill/decode disaggregation: the two workers that fire the KV slot spec, their messages, processes and engine."""
