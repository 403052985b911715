"""The throughput helper runs and reports both numbers from the same run."""

from __future__ import annotations

import pytest

from kvproof.runtime.transport.throughput import tcp_throughput


@pytest.mark.timeout(30)
def test_bench_tcp_reports_transport_and_plain_socket_throughput():
    r = tcp_throughput(8 * 1024 * 1024, 256 * 1024, repeats=1)
    assert set(r) == {"total_bytes", "chunk", "repeats", "transport_gbps", "plain_socket_gbps", "ratio"}
    assert r["transport_gbps"] > 0 and r["plain_socket_gbps"] > 0
    assert r["ratio"] == pytest.approx(r["transport_gbps"] / r["plain_socket_gbps"])
    with pytest.raises(ValueError, match="chunk=0"):
        tcp_throughput(1024, 0)
