"""Verbs transport: clear TransportUnavailable without pyverbs or without a device; real RDMA if present."""

from __future__ import annotations

import sys
import threading
import types

import pytest

from kvproof.runtime.transport import TransportUnavailable, make_transport
from kvproof.runtime.transport import verbs
from kvproof.runtime.transport.tcp import TcpListener

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
