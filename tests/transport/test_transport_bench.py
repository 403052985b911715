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


@pytest.mark.timeout(60)
def test_bench_transports_puts_tcp_mooncake_and_plain_socket_side_by_side():
    from kvproof.runtime.transport.throughput import bench_transports

    r = bench_transports(4 * 1024 * 1024, 256 * 1024, repeats=1)
    assert r["tcp_gbps"] > 0 and r["plain_socket_gbps"] > 0
    assert r["tcp_over_plain_socket"] == pytest.approx(r["tcp_gbps"] / r["plain_socket_gbps"], rel=1e-3)
    if "mooncake" in r:  # the extra is not installed: the report says why instead of a number
        assert r["mooncake"].startswith("not measured") and "mooncake_gbps" not in r
    else:
        assert r["mooncake_gbps"] > 0 and r["mooncake_engine_gbps"] > 0
