"""The deployment secret and the mutual HMAC handshake: both ends prove the secret for one purpose,
impostors are refused and counted while the listener keeps accepting, secrets come only from a
0600 file or the environment."""
from __future__ import annotations

import os
import socket
import threading

import pytest

from kvproof.cli import main as cli_main
from kvproof.runtime.transport.auth import (
    AuthError, RejectCounter, Secret, accept_authenticated, client_handshake, connect_authenticated,
)

pytestmark = pytest.mark.timeout(30)


def _listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def test_both_ends_get_the_same_key_and_a_wrong_purpose_or_secret_fails() -> None:
    s = Secret.generate()
    lst = _listener()
    box: dict = {}
    rejected = RejectCounter()
    t = threading.Thread(target=lambda: box.setdefault("srv", accept_authenticated(lst, s, "data/0", 10, rejected)))
    t.start()
    # an impostor with the right secret but the wrong purpose, then one with a wrong secret, then silence
    for secret, purpose in ((s, "data/1"), (Secret.generate(), "data/0")):
        bad = socket.create_connection(lst.getsockname())
        with pytest.raises(AuthError) as e:
            client_handshake(bad, secret, purpose)
        assert e.value.reason == "eof" and "different deployment secret" in str(e.value)
        bad.close()
    raw = socket.create_connection(lst.getsockname())
    raw.sendall(b"GET / HTTP/1.0\r\n\r\n" * 4)       # 72 bytes of something else entirely
    sock, key = connect_authenticated(lst.getsockname(), s, "data/0")
    t.join(10)
    srv_sock, srv_key = box["srv"]
    assert key == srv_key and len(key) == 32
    assert rejected.snapshot() == {"bad_mac": 3}       # the listener skipped all three and took the real one
    sock.sendall(b"ok")
    assert srv_sock.recv(2) == b"ok"
    for x in (sock, srv_sock, raw, lst):
        x.close()


def test_a_listener_without_the_secret_is_not_trusted() -> None:
    lst = _listener()
    rejected = RejectCounter()
    outcome: list[BaseException] = []

    def serve() -> None:
        try:
            accept_authenticated(lst, Secret.generate(), "ctrl/0", 3, rejected)
        except TimeoutError as e:          # nobody with its secret came
            outcome.append(e)

    t = threading.Thread(target=serve)
    t.start()
    with pytest.raises(AuthError):
        connect_authenticated(lst.getsockname(), Secret.generate(), "ctrl/0", wait_s=1.0)
    t.join(10)
    lst.close()
    assert len(outcome) == 1 and rejected.snapshot().get("bad_mac", 0) >= 1


def test_accept_times_out_naming_the_purpose() -> None:
    lst = _listener()
    with pytest.raises(TimeoutError, match="no authenticated peer for 'client'"):
        accept_authenticated(lst, Secret.generate(), "client", 0.2, RejectCounter())
    lst.close()


def test_secret_sources(tmp_path, monkeypatch, capsys) -> None:
    path = tmp_path / "secret"
    assert cli_main(["secret", str(path)]) == 0
    assert os.stat(path).st_mode & 0o777 == 0o600
    s = Secret.from_file(str(path))
    assert Secret.from_env({"KVPROOF_SECRET_FILE": str(path)}) == s
    assert Secret.from_env({"KVPROOF_SECRET": s.hex()}) == s and Secret.from_env({}) is None
    assert s.hex() not in repr(s)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="mode 0644, expected 0600"):
        Secret.from_file(str(path))
    with pytest.raises(ValueError, match="not hex"):
        Secret.from_hex("zz")
    with pytest.raises(ValueError, match="at least 16"):
        Secret(b"short")
    assert cli_main(["secret", str(path)]) == 2 and "never overwritten" in capsys.readouterr().err
