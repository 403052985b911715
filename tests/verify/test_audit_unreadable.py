"""`kvproof audit` on unreadable input (binary garbage, as a trace or a --streams plan): exit 2 and a
message naming the file and what was expected; 1 stays the INVALID verdict."""
from __future__ import annotations

import os

import pytest

from kvproof.cli import main


@pytest.mark.parametrize("streams", [False, True])
def test_binary_garbage_exits_2_with_a_message(tmp_path, capsys, streams: bool) -> None:
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(b"\x80\xff" + os.urandom(4000))
    code = main(["audit", *(["--streams"] if streams else []), str(bad)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 2, text
    assert "garbage.bin" in text and "not a UTF-8 text file" in text and "Traceback" not in text
    assert ("stream plan" if streams else "JSON Lines") in text
