"""Bounded local stores for values and provider records (no I/O; time is a parameter).

Both stores are capped in items and bytes. When full, *new* keys are refused
(the offender's put fails) and nothing already stored is evicted early; expired
entries are dropped lazily and by `expire(now)`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class StoreFull(Exception):
    """A store limit was hit; the message names it."""


@dataclass
class StoredValue:
    value: bytes
    expires: float


class ValueStore:
    def __init__(self, *, max_records: int, max_bytes: int, ttl: float) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._items: dict[bytes, StoredValue] = {}
        self._bytes = 0

    def get(self, key: bytes, now: float) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item.expires <= now:
            self._drop(key)
            return None
        return item.value

    def put(self, key: bytes, value: bytes, now: float) -> None:
        old = self._items.get(key)
        grow = len(key) + len(value) - (len(key) + len(old.value) if old else 0)
        if old is None and len(self._items) >= self.max_records:
            self.expire(now)
            if len(self._items) >= self.max_records:
                raise StoreFull(f"value store full: max_records={self.max_records}")
        if self._bytes + grow > self.max_bytes:
            self.expire(now)
            if self._bytes + grow > self.max_bytes:
                raise StoreFull(f"value store full: max_bytes={self.max_bytes}")
        self._items[key] = StoredValue(value, now + self.ttl)
        self._bytes += grow

    def _drop(self, key: bytes) -> None:
        item = self._items.pop(key)
        self._bytes -= len(key) + len(item.value)

    def expire(self, now: float) -> int:
        dead = [k for k, v in self._items.items() if v.expires <= now]
        for k in dead:
            self._drop(k)
        return len(dead)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def live(self, now: float) -> list[tuple[bytes, bytes, float]]:
        """(key, value, remaining seconds) of every unexpired record, for persisting."""
        return [(k, v.value, v.expires - now) for k, v in self._items.items() if v.expires > now]

    def restore(self, key: bytes, value: bytes, now: float, remaining: float) -> None:
        """Put a persisted record back with the lifetime it had left (capped at ttl)."""
        self.put(key, value, now)
        self._items[key].expires = now + min(remaining, self.ttl)


@dataclass
class Provider:
    peer: bytes
    addrs: list[bytes]
    expires: float


class ProviderStore:
    """key -> providers (most recently refreshed last), bounded per key and overall."""

    def __init__(self, *, max_keys: int, max_per_key: int, ttl: float) -> None:
        self.max_keys = max_keys
        self.max_per_key = max_per_key
        self.ttl = ttl
        self._items: dict[bytes, OrderedDict[bytes, Provider]] = {}

    def add(self, key: bytes, peer: bytes, addrs: list[bytes], now: float) -> None:
        providers = self._items.get(key)
        if providers is None:
            if len(self._items) >= self.max_keys:
                self.expire(now)
                if len(self._items) >= self.max_keys:
                    raise StoreFull(f"provider store full: max_keys={self.max_keys}")
            providers = self._items[key] = OrderedDict()
        if peer not in providers and len(providers) >= self.max_per_key:
            self._expire_key(key, now)
            if len(providers) >= self.max_per_key:
                # Keep the established providers; refuse the newcomer.
                raise StoreFull(f"provider store: max_per_key={self.max_per_key} for this key")
        providers[peer] = Provider(peer, addrs, now + self.ttl)
        providers.move_to_end(peer)

    def get(self, key: bytes, now: float) -> list[Provider]:
        if key not in self._items:
            return []
        self._expire_key(key, now)
        return list(self._items.get(key, {}).values())

    def _expire_key(self, key: bytes, now: float) -> None:
        providers = self._items[key]
        for peer in [p for p, v in providers.items() if v.expires <= now]:
            del providers[peer]
        if not providers:
            del self._items[key]

    def expire(self, now: float) -> None:
        for key in list(self._items):
            self._expire_key(key, now)

    def __len__(self) -> int:
        return len(self._items)

    def live(self, now: float) -> list[tuple[bytes, bytes, list[bytes], float]]:
        """(key, peer, addrs, remaining seconds) of every unexpired provider, for persisting."""
        return [
            (key, p.peer, list(p.addrs), p.expires - now)
            for key, providers in self._items.items()
            for p in providers.values()
            if p.expires > now
        ]

    def restore(self, key: bytes, peer: bytes, addrs: list[bytes], now: float, remaining: float) -> None:
        """Add a persisted provider back with the lifetime it had left (capped at ttl)."""
        self.add(key, peer, addrs, now)
        self._items[key][peer].expires = now + min(remaining, self.ttl)
