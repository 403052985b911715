"""kvproof: a verified runtime for the KV-cache lifecycle of disaggregated LLM serving."""
