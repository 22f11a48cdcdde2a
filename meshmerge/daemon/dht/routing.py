"""Kademlia routing table with IP-group diversity limits (no I/O).

Buckets are indexed by the common prefix length of SHA-256(peer id) with our own
id; each holds at most `k` peers. A full bucket keeps its old, proven peers (they
are the ones that are hard for an attacker to displace) unless one of them has
failed a request, in which case the newcomer replaces the failed one.

Eclipse resistance: a single operator tends to own one address block, so at
most `max_per_group_per_bucket` peers of one IP group (/24 IPv4, /48 IPv6) enter
any bucket and at most `max_per_group_table` the whole table. Loopback peers are
exempt when `exempt_loopback` (local test swarms all share 127.0.0.0/24).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field

from ..limits import ip_group
from .keys import common_prefix_len, distance, kad_id


@dataclass
class Entry:
    peer: bytes
    kid: int
    group: str | None
    added: float
    last_ok: float
    failures: int = 0


@dataclass
class RoutingTable:
    self_peer: bytes
    k: int = 20
    max_per_group_per_bucket: int = 2
    max_per_group_table: int = 6
    exempt_loopback: bool = True
    _self_kid: int = field(init=False)
    _buckets: dict[int, dict[bytes, Entry]] = field(init=False, default_factory=dict)
    _groups: Counter[str] = field(init=False, default_factory=Counter)
    rejected_diversity: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._self_kid = kad_id(self.self_peer)

    def _group(self, ips: list[str]) -> str | None:
        """The group of a peer's first public address; None = exempt from diversity."""
        for ip in ips:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                continue
            if self.exempt_loopback and addr.is_loopback:
                return None
            return ip_group(ip)
        return None

    def add(self, peer: bytes, ips: list[str], now: float) -> bool:
        """Add or refresh a peer proven to speak the DHT. True if it is in the table."""
        if peer == self.self_peer:
            return False
        kid = kad_id(peer)
        cpl = common_prefix_len(kid, self._self_kid)
        bucket = self._buckets.setdefault(cpl, {})
        entry = bucket.get(peer)
        if entry is not None:
            entry.last_ok = now
            entry.failures = 0
            return True
        group = self._group(ips)
        if group is not None:
            in_bucket = sum(1 for e in bucket.values() if e.group == group)
            if in_bucket >= self.max_per_group_per_bucket or self._groups[group] >= self.max_per_group_table:
                self.rejected_diversity += 1
                return False
        if len(bucket) >= self.k:
            failed = [e for e in bucket.values() if e.failures > 0]
            if not failed:
                return False
            self._remove(bucket, max(failed, key=lambda e: e.failures).peer)
        bucket[peer] = Entry(peer, kid, group, now, now)
        if group is not None:
            self._groups[group] += 1
        return True

    def _remove(self, bucket: dict[bytes, Entry], peer: bytes) -> None:
        entry = bucket.pop(peer)
        if entry.group is not None:
            self._groups[entry.group] -= 1
            if self._groups[entry.group] <= 0:
                del self._groups[entry.group]

    def remove(self, peer: bytes) -> None:
        cpl = common_prefix_len(kad_id(peer), self._self_kid)
        bucket = self._buckets.get(cpl, {})
        if peer in bucket:
            self._remove(bucket, peer)

    def failed(self, peer: bytes, max_failures: int = 2) -> None:
        """Count a failed request; evict after `max_failures` in a row."""
        cpl = common_prefix_len(kad_id(peer), self._self_kid)
        bucket = self._buckets.get(cpl, {})
        entry = bucket.get(peer)
        if entry is None:
            return
        entry.failures += 1
        if entry.failures >= max_failures:
            self._remove(bucket, peer)

    def closest(self, target: int, count: int) -> list[bytes]:
        entries = [e for b in self._buckets.values() for e in b.values()]
        entries.sort(key=lambda e: distance(e.kid, target))
        return [e.peer for e in entries[:count]]

    def __contains__(self, peer: object) -> bool:
        if not isinstance(peer, bytes):
            return False
        cpl = common_prefix_len(kad_id(peer), self._self_kid)
        return peer in self._buckets.get(cpl, {})

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def peers(self) -> list[bytes]:
        return [p for b in self._buckets.values() for p in b]

    def stale_buckets(self, now: float, older_than: float) -> list[int]:
        """Common-prefix lengths of non-empty buckets with no success for `older_than` seconds."""
        return [
            cpl
            for cpl, b in self._buckets.items()
            if b and max(e.last_ok for e in b.values()) < now - older_than
        ]
