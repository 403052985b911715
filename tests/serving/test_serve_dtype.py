"""`kvproof serve --dtype`: float64 presets serve in float32 by default; an explicit dtype wins."""
from __future__ import annotations

import argparse

import pytest

from kvproof.runtime.serving.serve_cli import add_serve_args, engine_config


def _cfg(*argv: str):
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return engine_config(p.parse_args(list(argv)))


def test_tiny_serves_in_float32_unless_asked() -> None:
    assert _cfg().model.dtype == "float32"                       # the preset itself is float64
    assert _cfg("--dtype", "float64").model.dtype == "float64"   # bit-exactness runs pin it
    assert _cfg("--model", "small").model.dtype == "bfloat16"    # a non-float64 preset keeps its own


def test_unknown_dtype_is_refused() -> None:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "int8"])
