"""Verbs transport: clear TransportUnavailable without pyverbs or without a device; real RDMA if present."""

from __future__ import annotations

import socket
import sys
import threading
import types

import pytest

from kvproof.runtime.transport import (
    Status, TransportClosed, TransportError, TransportUnavailable, make_transport, verbs,
)
from kvproof.runtime.transport.tcp import TcpListener

from .conftest import wait_until

pytestmark = pytest.mark.timeout(30)


class _FakeRDMAError(Exception):
    pass


def _install_fake_pyverbs(monkeypatch, get_device_list) -> None:
    pkg = types.ModuleType("pyverbs")
    pkg.device = types.ModuleType("pyverbs.device")
    pkg.device.get_device_list = get_device_list
    pkg.enums = types.ModuleType("pyverbs.enums")
    pkg.pyverbs_error = types.ModuleType("pyverbs.pyverbs_error")
    pkg.pyverbs_error.PyverbsRDMAError = _FakeRDMAError
    for name, mod in (("pyverbs", pkg), ("pyverbs.device", pkg.device), ("pyverbs.enums", pkg.enums),
                      ("pyverbs.pyverbs_error", pkg.pyverbs_error)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_missing_pyverbs_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyverbs", None)  # makes `import pyverbs` fail
    with pytest.raises(TransportUnavailable) as err:
        make_transport("verbs", connect=("127.0.0.1", 1))
    msg = str(err.value)
    assert "apt-get install python3-pyverbs" in msg and "/usr/lib/python3/dist-packages/pyverbs" in msg
    assert "rdma-core" in msg


def test_device_list_error_is_no_rdma_device(monkeypatch):
    def boom():
        raise _FakeRDMAError("Failed to get devices list")

    _install_fake_pyverbs(monkeypatch, boom)
    with pytest.raises(TransportUnavailable, match="no RDMA device found: get_device_list.. failed"):
        make_transport("verbs", connect=("127.0.0.1", 1))


def test_empty_device_list_is_no_rdma_device(monkeypatch):
    _install_fake_pyverbs(monkeypatch, lambda: [])
    with pytest.raises(TransportUnavailable, match="no RDMA device found: get_device_list.. returned no devices"):
        verbs.rdma_devices()


def test_unavailability_is_raised_before_any_network_use(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyverbs", None)
    with pytest.raises(TransportUnavailable):
        verbs.VerbsTransport.connect(("203.0.113.1", 9))  # would hang if it tried to connect first


def test_verbs_config_validation():
    with pytest.raises(ValueError, match="path_mtu=1500"):
        verbs.VerbsConfig(path_mtu=1500)


def _devices_or_skip() -> list[str]:
    try:
        return verbs.rdma_devices()
    except TransportUnavailable as e:
        pytest.skip(f"needs pyverbs and an RDMA device: {e}")


def test_real_environment_gives_devices_or_a_clear_error():
    """Whatever is installed here, the answer is a device list or TransportUnavailable, nothing else."""
    try:
        names = verbs.rdma_devices()
    except TransportUnavailable as e:
        assert "pyverbs" in str(e) or "no RDMA device found" in str(e)
    else:
        assert names and all(isinstance(n, str) for n in names)


@pytest.mark.rdma
def test_rdma_write_with_imm_lands_on_real_hardware():
    _devices_or_skip()
    with TcpListener() as lst:
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault("b", verbs.VerbsTransport(lst.accept_socket(20))))
        th.start()
        a = verbs.VerbsTransport.connect(lst.address)
        th.join(20)
    b = box["b"]
    try:
        import torch

        src = torch.arange(64, dtype=torch.uint8)
        dst = torch.zeros(128, dtype=torch.uint8)
        a.register(src)
        b.register(dst, region_id=7)
        a.wait_remote_region(7)
        a.post_write(src, 7, 32, tag=(1, 2, 3), imm=11)
        (c,) = a.poll(timeout=5)
        assert c.ok and c.tag == (1, 2, 3)
        assert torch.equal(dst[32:96], src) and not dst[:32].any()
        assert b.poll_recv(timeout=5)[0].imm == 11
    finally:
        a.close_and_drain()
        b.close_and_drain()


# -- the verbs code path on the software NIC of fake_pyverbs ----------------------------

@pytest.fixture
def fake_pair(monkeypatch):
    """Two VerbsTransports bootstrapped over TCP, running on the fake NIC."""
    from . import fake_pyverbs

    fabric = fake_pyverbs.install(monkeypatch)
    with TcpListener() as lst:
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault("b", verbs.VerbsTransport(lst.accept_socket(10))))
        th.start()
        a = make_transport("verbs", connect=lst.address)
        th.join(10)
    b = box["b"]
    yield a, b, fabric
    a.close_and_drain()
    b.close_and_drain()


def test_fake_nic_write_with_imm_lands_and_completes(fake_pair):
    import torch

    a, b, _ = fake_pair
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(128, dtype=torch.uint8)
    a.register(src)
    b.register(dst, region_id=7)
    a.wait_remote_region(7)
    wr = a.post_write(src, 7, 32, tag=(1, 2, 3), imm=0xABCD)
    (c,) = a.poll(timeout=5)
    assert (c.wr_id, c.tag, c.ok) == (wr, (1, 2, 3), True)
    assert torch.equal(dst[32:96], src) and not dst[:32].any() and not dst[96:].any()
    (ev,) = b.poll_recv(timeout=5)
    assert (ev.imm, ev.length) == (0xABCD, 64)


def test_fake_nic_argument_errors(fake_pair):
    a, b, _ = fake_pair
    src = bytearray(16)
    a.register(src)
    b.register(bytearray(8), region_id=1)
    a.wait_remote_region(1)
    with pytest.raises(ValueError, match="region=5 is not announced by the peer"):
        a.post_write(src, 5, 0)
    with pytest.raises(ValueError, match="beyond region 1 of 8 bytes"):
        a.post_write(src, 1, 0)
    with pytest.raises(ValueError, match="not inside a region registered"):
        a.post_write(bytearray(4), 1, 0)
    with pytest.raises(TransportError, match="on_land cannot be observed"):
        verbs.VerbsTransport(socket.socket(), on_land=lambda *x: None)


def test_fake_nic_invalidated_window_fences_a_late_write(fake_pair):
    a, b, _ = fake_pair
    src = bytearray(b"late-kv!")
    a.register(src)
    pool = bytearray(64)
    b.register(pool, region_id=0)
    b.bind_window(0, 16, 8, window_id=100)  # slot 2 of the pool, exposed on its own
    a.wait_remote_region(100)
    a.post_write(src, 100, 0)
    assert a.poll(timeout=5)[0].ok and pool[16:24] == b"late-kv!"
    pool[16:24] = bytes(8)
    stale_view = a._remote[100]  # what a writer that missed the withdrawal still believes
    b.invalidate_window(100)  # the slot is reclaimed: the fence is up when this returns
    wait_until(lambda: 100 not in a._remote, what="window withdrawal reaching the writer")
    a._remote[100] = stale_view
    a.post_write(src, 100, 0)
    (c,) = a.poll(timeout=5)
    assert c.status is Status.ERROR and pool == bytearray(64), "the late write must not land"
    wait_until(lambda: a.is_dead, what="the writer's QP error")


def test_fake_nic_peer_close_is_detected_and_nothing_lands_after_drain(fake_pair):
    a, b, _ = fake_pair
    src = bytearray(b"x" * 8)
    a.register(src)
    dst = bytearray(8)
    b.register(dst, region_id=0)
    a.wait_remote_region(0)
    b.close_and_drain()
    wait_until(lambda: a.is_dead, what="bootstrap EOF or close message")
    assert "peer closed" in a.dead_reason
    with pytest.raises(TransportClosed):
        a.post_write(src, 0, 0)
    assert dst == bytearray(8)


def test_bootstrap_channel_tracks_the_peers_regions_and_its_close():
    """The side channel (no RDMA needed): announcements and withdrawals reach the peer's region table;
    the peer's close ends the receive loop with on_dead; a silent peer is a TimeoutError naming the region."""
    from kvproof.runtime.transport.verbs_device import Bootstrap

    a_sock, b_sock = socket.socketpair()
    a, b = Bootstrap(a_sock, threading.Lock()), Bootstrap(b_sock, threading.Lock())
    stop, dead = threading.Event(), []
    t = threading.Thread(target=b.serve, args=(stop, dead.append, lambda: False), daemon=True)
    t.start()
    a.announce(7, 0x1000, 42, 4096)
    b.wait_region(7, timeout=5)
    assert b.remote == {7: (0x1000, 42, 4096)}
    a.withdraw(7)
    wait_until(lambda: 7 not in b.remote, what="withdrawal reaching the peer")
    with pytest.raises(TimeoutError, match="region=8"):
        b.wait_region(8, timeout=0.05)
    a.send({"op": "close"})
    t.join(5)
    assert dead == ["peer closed the connection"]
    a_sock.close()
    b_sock.close()
