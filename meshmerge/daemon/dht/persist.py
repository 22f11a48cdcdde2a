"""DHT records on disk: stored values and provider records survive a restart.

Why: a DHT server that forgets everything on restart drops every record it was
asked to keep until their publishers happen to re-put or re-provide (hours),
and a small swarm may have only a few holders of each key.

Format (one file, replaced atomically: tmp, fsync, rename, fsync dir)::

    b"MMDHTv1\\n" ‖ sha-256(body) ‖ body
    body = canonical CBOR {"saved": unix ms,
                           "values": [[key, value, expires unix ms], ...],
                           "providers": [[key, peer, [addr bytes...], expires unix ms], ...]}

Expiry is stored as wall-clock time, so time spent down counts against a
record's lifetime; in memory the stores keep trio (monotonic) time and the
conversion happens here. Loading is defensive: a file that is too big, cut
short, fails its checksum or does not decode is logged with the reason and the
DHT starts empty (the file is left for inspection, then overwritten by the next
save); each value is re-checked by the DHT's validator (signatures included)
and each provider entry must parse, so a tampered file cannot inject a record
the network would refuse. Sizes are bounded by ``max_bytes`` on both sides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from multiaddr import Multiaddr

from meshmerge.proto import cbor

from ..store.atomic import make_dirs, write_atomic

log = logging.getLogger("meshmerge.dht.persist")

MAGIC = b"MMDHTv1\n"
_HEAD = len(MAGIC) + 32


class SnapshotError(ValueError):
    """The file is not a usable snapshot; the message says why."""


@dataclasses.dataclass
class Snapshot:
    """Records with *remaining* lifetimes in seconds (relative to load time)."""

    values: list[tuple[bytes, bytes, float]] = dataclasses.field(default_factory=list)
    providers: list[tuple[bytes, bytes, list[bytes], float]] = dataclasses.field(default_factory=list)
    dropped_expired: int = 0
    dropped_invalid: int = 0


def encode(snapshot: Snapshot, now_wall: float, max_bytes: int) -> tuple[bytes, int]:
    """File bytes for ``snapshot`` (lifetimes relative to ``now_wall``), and how many records
    were left out to stay within ``max_bytes`` (values first, then providers, in the given order)."""
    budget = max_bytes - _HEAD - 64
    values: list[list[Any]] = []
    providers: list[list[Any]] = []
    left_out = 0
    for key, value, ttl in snapshot.values:
        cost = len(key) + len(value) + 16
        if ttl <= 0:
            continue
        if cost > budget:
            left_out += 1
            continue
        budget -= cost
        values.append([key, value, int((now_wall + ttl) * 1000)])
    for key, peer, addrs, ttl in snapshot.providers:
        cost = len(key) + len(peer) + sum(len(a) + 3 for a in addrs) + 20
        if ttl <= 0:
            continue
        if cost > budget:
            left_out += 1
            continue
        budget -= cost
        providers.append([key, peer, list(addrs), int((now_wall + ttl) * 1000)])
    body = cbor.encode({"saved": int(now_wall * 1000), "values": values, "providers": providers})
    return MAGIC + hashlib.sha256(body).digest() + body, left_out


def decode(data: bytes, now_wall: float, max_bytes: int) -> Snapshot:
    """Parse file bytes; raises SnapshotError for anything but a well-formed snapshot.

    Expired entries are counted and dropped; malformed entries inside a well-formed
    file are counted in ``dropped_invalid`` (the rest still loads).
    """
    if len(data) > max_bytes:
        raise SnapshotError(f"file is {len(data)} bytes, more than persist_max_bytes={max_bytes}")
    if len(data) < _HEAD or not data.startswith(MAGIC):
        raise SnapshotError("not a meshmerge DHT snapshot (bad magic or truncated header)")
    body = data[_HEAD:]
    if hashlib.sha256(body).digest() != data[len(MAGIC) : _HEAD]:
        raise SnapshotError("checksum mismatch (torn or corrupted write)")
    limits = cbor.Limits(
        max_message_bytes=max(len(body), 1),
        max_depth=6,
        max_items=max(len(body), 1),
        max_container_len=max(len(body), 1),
        max_bytes_bytes=max(len(body), 1),
    )
    try:
        doc = cbor.decode(body, limits)
    except cbor.CodecError as exc:
        raise SnapshotError(f"body does not decode: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("values"), list):
        raise SnapshotError("body is not a snapshot map")
    if not isinstance(doc.get("providers"), list):
        raise SnapshotError("body is not a snapshot map")
    out = Snapshot()
    for item in doc["values"]:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], bytes)
            and isinstance(item[1], bytes)
            and type(item[2]) is int
        ):
            out.dropped_invalid += 1
            continue
        ttl = item[2] / 1000 - now_wall
        if ttl <= 0:
            out.dropped_expired += 1
            continue
        out.values.append((item[0], item[1], ttl))
    for item in doc["providers"]:
        if not (
            isinstance(item, list)
            and len(item) == 4
            and isinstance(item[0], bytes)
            and isinstance(item[1], bytes)
            and isinstance(item[2], list)
            and all(isinstance(a, bytes) for a in item[2])
            and type(item[3]) is int
        ):
            out.dropped_invalid += 1
            continue
        ttl = item[3] / 1000 - now_wall
        if ttl <= 0:
            out.dropped_expired += 1
            continue
        addrs = []
        for raw in item[2]:
            try:
                Multiaddr(raw).protocols()
                addrs.append(raw)
            except Exception:
                continue
        out.providers.append((item[0], item[1], addrs, ttl))
    return out


def read(path: Path, now_wall: float, max_bytes: int) -> Snapshot | None:
    """The snapshot at ``path``; None when there is none or it is unusable (logged, never raised)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise SnapshotError(f"file is {size} bytes, more than persist_max_bytes={max_bytes}")
            data = f.read(max_bytes + 1)
        return decode(data, now_wall, max_bytes)
    except FileNotFoundError:
        return None
    except (OSError, SnapshotError) as exc:
        log.error("DHT records in %s not loaded, starting empty: %s", path, exc)
        return None


def write(path: Path, data: bytes) -> None:
    make_dirs(path.parent, fsync=True)
    write_atomic(path, data, fsync=True)
