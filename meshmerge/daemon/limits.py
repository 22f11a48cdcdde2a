"""Connection and stream limits: the rules, without any I/O.

The host asks this module before it spends anything on a remote: an inbound TCP
connection is admitted only if the inbound rate allows it and neither the total
nor the remote's IP group (/24 for IPv4, /48 for IPv6, so one operator's
address block counts once) is full. After the handshake, when the peer id is
known, the per-peer cap applies. Streams are capped per connection and in total.

Time is a parameter (`now`, seconds, any monotonic origin), so tests drive the
limiter directly and the host feeds it `trio.current_time()`.

Every refusal is a `Refusal` naming the limit and its value; the host turns it
into one log line (throttled, see `LogThrottle`) and closes the offender.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionLimits:
    """Named, validated limits. Defaults suit a daemon with a few hundred peers."""

    max_connections: int = 256
    """Open connections in total (both directions); new ones beyond it are refused."""
    max_connections_per_peer: int = 2
    """Connections to one peer id; a third dial or accept is refused."""
    max_connections_per_ip_group: int = 16
    """Connections (and pending inbound handshakes) from one /24 (IPv4) or /48 (IPv6)."""
    max_pending_inbound: int = 64
    """Inbound connections still in the security/muxer handshake."""
    max_streams_per_connection: int = 128
    """Concurrently open inbound streams on one connection; extra ones are reset."""
    max_inbound_streams: int = 2048
    """Concurrently open inbound streams over all connections."""
    inbound_connection_rate: float = 50.0
    """Token-bucket refill, inbound connections per second."""
    inbound_connection_burst: int = 100
    """Token-bucket size: inbound connections accepted back to back."""
    exempt_loopback: bool = True
    """Loopback peers skip the IP-group cap (local test swarms all share 127.0.0.0/24)."""

    def validate(self) -> None:
        for name in (
            "max_connections",
            "max_connections_per_peer",
            "max_connections_per_ip_group",
            "max_pending_inbound",
            "max_streams_per_connection",
            "max_inbound_streams",
            "inbound_connection_burst",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"limits.{name}: must be an integer >= 1, got {value!r}")
        if not self.inbound_connection_rate > 0:
            raise ValueError(
                "limits.inbound_connection_rate: must be > 0 per second, "
                f"got {self.inbound_connection_rate!r}"
            )
        if self.max_connections_per_peer > self.max_connections:
            raise ValueError("limits.max_connections_per_peer: must not exceed max_connections")
        if self.max_streams_per_connection > self.max_inbound_streams:
            raise ValueError("limits.max_streams_per_connection: must not exceed max_inbound_streams")


@dataclass(frozen=True)
class Refusal:
    """Why something was refused: the limit's name, its value and the subject."""

    limit: str
    value: float
    subject: str

    def __str__(self) -> str:
        return f"limit {self.limit}={self.value:g} reached for {self.subject}"


def ip_group(ip: str) -> str:
    """The address block one operator plausibly controls: /24 for IPv4, /48 for IPv6."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class TokenBucket:
    """Classic token bucket; `take(now)` spends one token if available."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    def take(self, now: float) -> bool:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class ConnectionLimiter:
    """Book-keeping for connections by id: direction-agnostic counts by group and peer.

    The host reports every accepted/closed connection; admission decisions read
    the counts. Pending inbound handshakes are counted separately so a flood of
    half-open connections cannot starve established peers.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        limits.validate()
        self.limits = limits
        self._bucket = TokenBucket(limits.inbound_connection_rate, limits.inbound_connection_burst)
        self._open: dict[int, tuple[str | None, str]] = {}  # conn key -> (ip group, peer)
        self._by_group: Counter[str] = Counter()
        self._by_peer: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._pending_total = 0

    # --- inbound, before the handshake -------------------------------------------------
    def _group(self, ip: str | None) -> str | None:
        if not ip:
            return None
        if self.limits.exempt_loopback and ipaddress.ip_address(ip).is_loopback:
            return None
        return ip_group(ip)

    def admit_inbound(self, ip: str | None, now: float) -> Refusal | None:
        """Decide on a freshly accepted socket. On None the caller must call `end_pending`."""
        lim = self.limits
        group = self._group(ip)
        if self._pending_total >= lim.max_pending_inbound:
            return Refusal("max_pending_inbound", lim.max_pending_inbound, f"inbound from {ip}")
        if len(self._open) + self._pending_total >= lim.max_connections:
            return Refusal("max_connections", lim.max_connections, f"inbound from {ip}")
        if (
            group is not None
            and self._by_group[group] + self._pending[group] >= lim.max_connections_per_ip_group
        ):
            return Refusal("max_connections_per_ip_group", lim.max_connections_per_ip_group, f"group {group}")
        if not self._bucket.take(now):
            return Refusal("inbound_connection_rate", lim.inbound_connection_rate, f"inbound from {ip}")
        self._pending_total += 1
        if group is not None:
            self._pending[group] += 1
        return None

    def end_pending(self, ip: str | None) -> None:
        self._pending_total -= 1
        group = self._group(ip)
        if group is not None:
            self._pending[group] -= 1
            if self._pending[group] <= 0:
                del self._pending[group]

    # --- after the handshake (peer id known) ---------------------------------------------
    def admit_connection(self, peer: str, ip: str | None, inbound: bool) -> Refusal | None:
        lim = self.limits
        if self._by_peer[peer] >= lim.max_connections_per_peer:
            return Refusal("max_connections_per_peer", lim.max_connections_per_peer, f"peer {peer}")
        # Inbound ones were counted as pending, so they already passed the total/group checks.
        if not inbound:
            if len(self._open) + self._pending_total >= lim.max_connections:
                return Refusal("max_connections", lim.max_connections, f"outbound to {peer}")
            group = self._group(ip)
            if group is not None and self._by_group[group] >= lim.max_connections_per_ip_group:
                return Refusal(
                    "max_connections_per_ip_group", lim.max_connections_per_ip_group, f"group {group}"
                )
        return None

    def opened(self, key: int, peer: str, ip: str | None) -> None:
        group = self._group(ip)
        self._open[key] = (group, peer)
        self._by_peer[peer] += 1
        if group is not None:
            self._by_group[group] += 1

    def closed(self, key: int) -> None:
        entry = self._open.pop(key, None)
        if entry is None:
            return
        group, peer = entry
        self._by_peer[peer] -= 1
        if self._by_peer[peer] <= 0:
            del self._by_peer[peer]
        if group is not None:
            self._by_group[group] -= 1
            if self._by_group[group] <= 0:
                del self._by_group[group]

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def pending_count(self) -> int:
        return self._pending_total


class LogThrottle:
    """At most one log line per key per `interval` seconds; counts what it swallowed."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def should_log(self, key: str, now: float) -> tuple[bool, int]:
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] += 1
            return False, 0
        if len(self._last) > 4096:
            self._last.clear()
        self._last[key] = now
        return True, self._suppressed.pop(key, 0)
