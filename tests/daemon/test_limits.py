"""ConnectionLimiter rules, driven directly (time is a parameter)."""

from __future__ import annotations

import pytest

from meshmerge.daemon.limits import ConnectionLimiter, ConnectionLimits, LogThrottle, TokenBucket, ip_group


def test_ip_groups() -> None:
    assert ip_group("192.0.2.77") == "192.0.2.0/24"
    assert ip_group("2001:db8:aa:bb::1") == "2001:db8:aa::/48"
    assert ip_group("::ffff:198.51.100.9") == "198.51.100.0/24"


def test_total_per_peer_and_group_caps() -> None:
    lim = ConnectionLimiter(
        ConnectionLimits(
            max_connections=3,
            max_connections_per_peer=1,
            max_connections_per_ip_group=2,
            exempt_loopback=False,
            max_streams_per_connection=1,
            max_inbound_streams=1,
        )
    )
    assert lim.admit_inbound("192.0.2.1", 0.0) is None
    assert lim.admit_connection("peerA", "192.0.2.1", inbound=True) is None
    lim.end_pending("192.0.2.1")
    lim.opened(1, "peerA", "192.0.2.1")
    # a second connection from the same peer id is refused
    refusal = lim.admit_connection("peerA", "203.0.113.5", inbound=False)
    assert refusal is not None and refusal.limit == "max_connections_per_peer"
    assert "max_connections_per_peer=1" in str(refusal)
    assert lim.admit_inbound("192.0.2.2", 0.0) is None  # second from the /24, pending
    refusal = lim.admit_inbound("192.0.2.3", 0.0)
    assert refusal is not None and refusal.limit == "max_connections_per_ip_group"
    assert lim.admit_connection("peerB", "203.0.113.5", inbound=False) is None
    lim.opened(2, "peerB", "203.0.113.5")
    refusal = lim.admit_inbound("198.51.100.1", 0.0)
    assert refusal is not None and refusal.limit == "max_connections"
    lim.end_pending("192.0.2.2")
    lim.closed(1)
    lim.closed(1)  # idempotent
    assert lim.open_count == 1 and lim.pending_count == 0
    assert lim.admit_inbound("192.0.2.3", 0.0) is None


def test_pending_cap_and_rate() -> None:
    lim = ConnectionLimiter(
        ConnectionLimits(max_pending_inbound=2, inbound_connection_rate=1.0, inbound_connection_burst=3)
    )
    assert lim.admit_inbound("127.0.0.1", 0.0) is None
    assert lim.admit_inbound("127.0.0.1", 0.0) is None
    r = lim.admit_inbound("127.0.0.1", 0.0)
    assert r is not None and r.limit == "max_pending_inbound"
    lim.end_pending("127.0.0.1")
    lim.end_pending("127.0.0.1")
    assert lim.admit_inbound("127.0.0.1", 0.0) is None  # third token
    lim.end_pending("127.0.0.1")
    r = lim.admit_inbound("127.0.0.1", 0.1)
    assert r is not None and r.limit == "inbound_connection_rate"
    lim_ok = lim.admit_inbound("127.0.0.1", 1.2)  # refilled
    assert lim_ok is None


def test_token_bucket_and_log_throttle() -> None:
    b = TokenBucket(rate=2.0, burst=2)
    assert [b.take(0.0) for _ in range(3)] == [True, True, False]
    assert b.take(0.5)
    t = LogThrottle(1.0)
    assert t.should_log("x", 0.0) == (True, 0)
    assert t.should_log("x", 0.5) == (False, 0)
    assert t.should_log("x", 0.6) == (False, 0)
    assert t.should_log("x", 1.1) == (True, 2)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_connections", 0),
        ("max_connections_per_peer", -1),
        ("max_streams_per_connection", True),
        ("inbound_connection_rate", 0.0),
    ],
)
def test_limits_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"limits.{field}"):
        ConnectionLimits(**{field: value}).validate()  # type: ignore[arg-type]
