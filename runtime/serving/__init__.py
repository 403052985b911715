"""The single-process serving engine and the OpenAI-compatible HTTP server in front of any engine."""
