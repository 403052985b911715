"""Transport and control-channel tests."""
