"""The trio driver: streams, timeouts and background loops around the DHT core.

One `KademliaDHT` per host, run inside `running_dht(host, config)`, which owns a
nursery for the refresh / re-provide loops and any follow-up work (no task
outlives it). Requests open one stream each, write one frame, read at most one
reply and close the stream normally; inbound streams are served until the remote
closes them (a normal EOF, logged at DEBUG), with a bounded number handled at
once — extra streams are reset immediately, never queued.

Server mode registers `/ipfs/kad/1.0.0` (others may add us to their routing
tables and send us queries); client mode removes it and only queries. AutoNAT
(the nat service) calls `set_mode`.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from ..advertise import strip_peer_suffix
from ..limits import LogThrottle
from ..store.atomic import remove_tmp_files
from ..swarm import remote_ip
from . import persist
from .keys import kad_id, provider_key
from .lookup import Lookup
from .records import (
    PK_NAMESPACE,
    MeshmergeRecordValidator,
    NamespacedValidator,
    PublicKeyValidator,
    RecordRejected,
    Validator,
)
from .routing import RoutingTable
from .store import ProviderStore, StoreFull, ValueStore
from .wire import (
    PROTOCOL_ID,
    FrameReader,
    PeerClosed,
    WireError,
    encode_frame,
    parse_addr,
    parse_peers,
    peer_entry,
)

log = logging.getLogger("meshmerge.dht")
KAD = TProtocol(PROTOCOL_ID)
MAX_CACHED_STREAMS = 128
MAX_LEARNED = 10_000


class _CachedStream:
    """An outbound stream kept open for sequential request/reply exchanges."""

    def __init__(self, stream: Any, max_bytes: int) -> None:
        self.stream = stream
        self.reader = FrameReader(stream, max_bytes)
        self.lock = trio.Lock()

        self.broken = False

    async def send_only(self, msg: Message) -> None:
        """A request that gets no reply (ADD_PROVIDER): the stream stays in step."""
        async with self.lock:
            try:
                await self.stream.write(encode_frame(msg))
            except BaseException:
                self.broken = True
                raise

    async def exchange(self, msg: Message) -> Message:
        """Write one request, read its reply. Any interruption (error or cancellation)
        leaves the stream out of step, so it is marked broken and never reused."""
        async with self.lock:
            ok = False
            try:
                await self.stream.write(encode_frame(msg))
                reply = await self.reader.read()
                # go leaves the key empty in FIND_NODE replies; anything else must echo it
                if reply.type != msg.type or bytes(reply.key) not in (b"", bytes(msg.key)):
                    raise WireError("reply does not match the request (type or key differs)")
                ok = True
                return reply
            finally:
                if not ok:
                    self.broken = True


class DHTMode(Enum):
    SERVER = "server"
    CLIENT = "client"


class DHTError(Exception):
    """A DHT operation could not be carried out; the message says why."""


@dataclass(frozen=True)
class DHTConfig:
    """DHT parameters; `validate()` names the field and the rule."""

    mode: DHTMode = DHTMode.SERVER
    k: int = 20
    """Bucket size and replication factor."""
    alpha: int = 3
    """Concurrent requests per lookup."""
    request_timeout: float = 5.0
    """Seconds for one request (stream open, write, reply)."""
    lookup_timeout: float = 30.0
    """Overall deadline for one iterative lookup."""
    max_lookup_queries: int = 200
    get_quorum: int = 2
    """GET stops after this many peers (the local copy counts as one) returned a valid value."""
    max_inbound_requests: int = 64
    """Inbound streams served at once; more are reset, not queued."""
    inbound_idle_timeout: float = 30.0
    """Seconds an inbound stream may sit idle between requests."""
    max_message_bytes: int = 64 * 1024
    max_key_bytes: int = 256
    max_value_bytes: int = 16 * 1024
    max_records: int = 10_000
    max_record_store_bytes: int = 64 * 1024 * 1024
    record_ttl: float = 36 * 3600.0
    max_provider_keys: int = 100_000
    max_providers_per_key: int = 64
    provider_ttl: float = 48 * 3600.0
    reprovide_interval: float = 12 * 3600.0
    refresh_interval: float = 10 * 60.0
    max_per_group_per_bucket: int = 2
    max_per_group_table: int = 6
    diversity_exempt_loopback: bool = True
    extra_validators: tuple[tuple[bytes, Validator], ...] = field(default=())
    persist_path: Path | None = None
    """File that keeps stored values and provider records across restarts (None: memory only)."""
    persist_interval: float = 300.0
    """Seconds between saves while records changed; also saved on shutdown."""
    persist_max_bytes: int = 32 * 1024 * 1024
    """Largest file written or loaded; bigger files are refused on load (start empty, logged)."""

    def validate(self) -> None:
        ints = {
            "k": (1, 64),
            "alpha": (1, 16),
            "max_lookup_queries": (1, 10_000),
            "get_quorum": (1, 64),
            "max_inbound_requests": (1, 4096),
            "max_message_bytes": (1024, 4 * 1024 * 1024),
            "max_key_bytes": (16, 4096),
            "max_value_bytes": (16, 1024 * 1024),
            "max_records": (1, 10_000_000),
            "max_record_store_bytes": (1024, 1 << 34),
            "max_provider_keys": (1, 10_000_000),
            "max_providers_per_key": (1, 1024),
            "max_per_group_per_bucket": (1, 64),
            "max_per_group_table": (1, 10_000),
            "persist_max_bytes": (4096, 1 << 32),
        }
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"dht.{name}: must be an integer in [{lo}, {hi}], got {v!r}")
        for name in (
            "request_timeout",
            "lookup_timeout",
            "inbound_idle_timeout",
            "record_ttl",
            "provider_ttl",
            "reprovide_interval",
            "refresh_interval",
            "persist_interval",
        ):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"dht.{name}: must be a positive number of seconds, got {v!r}")
        if self.max_value_bytes + self.max_key_bytes + 1024 > self.max_message_bytes:
            raise ValueError("dht.max_message_bytes: must exceed max_value_bytes + max_key_bytes + 1024")
        if self.persist_path is not None and not isinstance(self.persist_path, Path):
            raise ValueError(f"dht.persist_path: must be a pathlib.Path or None, got {self.persist_path!r}")
        if not isinstance(self.mode, DHTMode):
            raise ValueError(f"dht.mode: must be DHTMode.SERVER or DHTMode.CLIENT, got {self.mode!r}")


class KademliaDHT:
    def __init__(self, host: Any, config: DHTConfig) -> None:
        config.validate()
        self.host = host
        self.config = config
        self.self_peer: bytes = host.get_id().to_bytes()
        self.routing = RoutingTable(
            self.self_peer,
            k=config.k,
            max_per_group_per_bucket=config.max_per_group_per_bucket,
            max_per_group_table=config.max_per_group_table,
            exempt_loopback=config.diversity_exempt_loopback,
        )
        validators: dict[bytes, Validator] = {
            b"meshmerge": MeshmergeRecordValidator(),
            PK_NAMESPACE: PublicKeyValidator(),
        }
        validators.update(dict(config.extra_validators))
        self.validator = NamespacedValidator(
            validators, max_key_bytes=config.max_key_bytes, max_value_bytes=config.max_value_bytes
        )
        self.values = ValueStore(
            max_records=config.max_records, max_bytes=config.max_record_store_bytes, ttl=config.record_ttl
        )
        self.providers = ProviderStore(
            max_keys=config.max_provider_keys,
            max_per_key=config.max_providers_per_key,
            ttl=config.provider_ttl,
        )
        self.mode = config.mode
        self._inbound = trio.Semaphore(config.max_inbound_requests)
        self._throttle = LogThrottle(1.0)
        self._provided: dict[bytes, None] = {}
        self._nursery: trio.Nursery | None = None
        self._streams: dict[bytes, _CachedStream] = {}
        self._closing: list[tuple[Any, bool]] = []  # (stream, out of step?)
        self._learned: dict[bytes, tuple[Multiaddr, ...]] = {}
        self.stats: dict[str, int] = {"inbound_reset_busy": 0, "inbound_bad": 0, "inbound_requests": 0}
        self._dirty = False  # stored records changed since the last save

    # ------------------------------------------------------------------ lifecycle
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.config.persist_path is not None:
            self.restore_records(await trio.to_thread.run_sync(self.read_records))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._apply_mode(self.mode)
            nursery.start_soon(self._refresh_loop)
            nursery.start_soon(self._reprovide_loop)
            if self.config.persist_path is not None:
                nursery.start_soon(self._persist_loop)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.host.remove_stream_handler(KAD)
                self._nursery = None
                for peer, entry in list(self._streams.items()):
                    self._drop_stream(peer, entry)
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self._close_dropped()
                if self.config.persist_path is not None and self._dirty:
                    # on shutdown: synchronously, nothing else is left to run
                    self.write_records(self.encode_records())

    # ------------------------------------------------------------------ persistence
    def read_records(self) -> persist.Snapshot | None:
        """Read and check the snapshot file (no trio calls: runs in a worker thread)."""
        path = self.config.persist_path
        assert path is not None
        if path.parent.is_dir():
            remove_tmp_files(path.parent)
        return persist.read(path, time.time(), self.config.persist_max_bytes)

    def restore_records(self, snap: persist.Snapshot | None) -> tuple[int, int]:
        """Put persisted values (re-validated) and providers back; returns (values, providers)."""
        if snap is None:
            return 0, 0
        now = self._now()
        refused = snap.dropped_invalid
        values = providers = 0
        for key, value, remaining in snap.values:
            try:
                self.validator.validate(key, value)
                self.values.restore(key, value, now, remaining)
                values += 1
            except (RecordRejected, StoreFull) as exc:
                refused += 1
                log.debug("persisted DHT value dropped: %s", exc)
        for key, peer, addrs, remaining in snap.providers:
            try:
                ID(peer).to_base58()  # must be a multihash peer id
                self.providers.restore(key, peer, addrs, now, remaining)
                providers += 1
            except Exception as exc:
                refused += 1
                log.debug("persisted DHT provider dropped: %r", exc)
        log.info(
            "DHT records loaded from %s: %d values, %d providers (%d expired, %d refused)",
            self.config.persist_path,
            values,
            providers,
            snap.dropped_expired,
            refused,
        )
        return values, providers

    def encode_records(self) -> bytes:
        """The live values and providers as file bytes (bounded by persist_max_bytes)."""
        now = self._now()
        snap = persist.Snapshot(values=self.values.live(now), providers=self.providers.live(now))
        data, left_out = persist.encode(snap, time.time(), self.config.persist_max_bytes)
        self._dirty = False  # changes from here on mark it dirty again
        if left_out:
            log.warning(
                "DHT records: %d left out of %s (persist_max_bytes=%d)",
                left_out,
                self.config.persist_path,
                self.config.persist_max_bytes,
            )
        return data

    def write_records(self, data: bytes) -> bool:
        """Replace the file atomically (no trio calls: may run in a worker thread)."""
        path = self.config.persist_path
        assert path is not None
        try:
            persist.write(path, data)
            return True
        except OSError as exc:
            log.error("DHT records not saved to %s: %s", path, exc)
            return False

    async def _persist_loop(self) -> None:
        while True:
            await trio.sleep(self.config.persist_interval)
            if self._dirty and not await trio.to_thread.run_sync(self.write_records, self.encode_records()):
                self._dirty = True

    def _apply_mode(self, mode: DHTMode) -> None:
        if mode is DHTMode.SERVER:
            self.host.set_stream_handler(KAD, self._handle_stream)
        else:
            self.host.remove_stream_handler(KAD)

    async def set_mode(self, mode: DHTMode | str) -> None:
        """Switch between answering queries (server) and only asking (client)."""
        new = DHTMode(mode) if isinstance(mode, str) else mode
        if new is self.mode:
            return
        self.mode = new
        self._apply_mode(new)
        log.info("DHT mode is now %s", new.value)
        push = getattr(self.host, "_push_identify_to_all_peers", None)
        if push is not None:
            try:
                await push()
            except Exception as exc:
                log.debug("identify push after mode change failed: %s", exc)

    # ------------------------------------------------------------------ helpers
    def _now(self) -> float:
        return trio.current_time()

    def _peer_ips(self, peer: bytes) -> list[str]:
        ips: list[str] = []
        for conn in self.host.get_network().connections.get(ID(peer), []):
            ip = remote_ip(getattr(conn, "muxed_conn", conn))
            if ip:
                ips.append(ip)
        if ips:
            return ips
        for addr in self._addrs(peer):
            for proto in ("ip4", "ip6"):
                try:
                    ips.append(addr.value_for_protocol(proto))
                    break
                except Exception:
                    continue
        return ips

    def _addrs(self, peer: bytes) -> list[Multiaddr]:
        try:
            return list(self.host.get_peerstore().addrs(ID(peer)))
        except Exception:
            return []

    def _learn_addrs(self, peer: bytes, addrs: Sequence[Multiaddr]) -> None:
        if peer == self.self_peer or not addrs:
            return
        fresh = tuple(addrs)
        if self._learned.get(peer) == fresh:
            return  # replies repeat the same peers; the peerstore already has these
        if len(self._learned) >= MAX_LEARNED:
            self._learned.clear()
        self._learned[peer] = fresh
        self.host.get_peerstore().add_addrs(ID(peer), list(addrs), 0)

    def _connected(self, peer: bytes) -> bool:
        return any(not c.is_closed for c in self.host.get_network().connections.get(ID(peer), []))

    def _entries(self, peers: Sequence[bytes]) -> list[Message.Peer]:
        return [peer_entry(p, self._addrs(p), self._connected(p)) for p in peers]

    def _own_addrs(self) -> list[Multiaddr]:
        """What the host advertises (relay circuit addresses included), without /p2p/<self>."""
        return [strip_peer_suffix(a) for a in self.host.get_addrs()] or list(self.host.get_transport_addrs())

    def _log_throttled(self, key: str, msg: str, *args: object) -> None:
        ok, swallowed = self._throttle.should_log(key, self._now())
        if ok:
            suffix = f" ({swallowed} similar suppressed)" if swallowed else ""
            log.warning(msg + suffix, *args)

    def _seen(self, peer: bytes) -> None:
        """`peer` proved it speaks the DHT: add it, or refresh it (IPs only needed when new)."""
        ips = [] if peer in self.routing else self._peer_ips(peer)
        self.routing.add(peer, ips, self._now())

    def _maybe_add_requester(self, peer: bytes) -> None:
        try:
            protocols = self.host.get_peerstore().get_protocols(ID(peer))
        except Exception:
            return
        if PROTOCOL_ID in protocols:
            self._seen(peer)

    # ------------------------------------------------------------------ inbound
    async def _handle_stream(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            self._inbound.acquire_nowait()
        except trio.WouldBlock:
            self.stats["inbound_reset_busy"] += 1
            self._log_throttled(
                "busy",
                "DHT inbound stream from %s reset: limit max_inbound_requests=%d reached",
                peer,
                self.config.max_inbound_requests,
            )
            await _reset(stream)
            return
        try:
            await self._serve(stream, peer)
        finally:
            self._inbound.release()

    async def _serve(self, stream: Any, peer: ID) -> None:
        reader = FrameReader(stream, self.config.max_message_bytes)
        raw_peer = peer.to_bytes()
        while True:
            try:
                with trio.fail_after(self.config.inbound_idle_timeout):
                    request = await reader.read()
            except PeerClosed:
                log.debug("DHT stream from %s closed by remote", peer)
                await _close(stream)
                return
            except trio.TooSlowError:
                log.debug(
                    "DHT stream from %s idle for %.0fs; closing", peer, self.config.inbound_idle_timeout
                )
                await _close(stream)
                return
            except WireError as exc:
                self.stats["inbound_bad"] += 1
                self._log_throttled("bad", "DHT request from %s rejected: %s", peer, exc)
                await _reset(stream)
                return
            except Exception as exc:
                log.debug("DHT stream from %s ended: %r", peer, exc)
                await _reset(stream)
                return
            self.stats["inbound_requests"] += 1
            self._maybe_add_requester(raw_peer)
            try:
                reply = self._answer(request, raw_peer)
            except (RecordRejected, StoreFull, WireError) as exc:
                self.stats["inbound_bad"] += 1
                self._log_throttled("reject", "DHT %s from %s rejected: %s", _type_name(request), peer, exc)
                await _reset(stream)
                return
            if reply is not None:
                try:
                    await stream.write(encode_frame(reply))
                except Exception as exc:
                    log.debug("DHT reply to %s failed: %r", peer, exc)
                    await _reset(stream)
                    return

    def _answer(self, req: Message, sender: bytes) -> Message | None:
        """Pure request -> reply (state changes only in our stores)."""
        now = self._now()
        key = bytes(req.key)
        if len(key) > self.config.max_key_bytes:
            raise WireError(f"key of {len(key)} bytes exceeds max_key_bytes={self.config.max_key_bytes}")
        reply = Message(type=req.type, key=key)
        if req.type == Message.FIND_NODE:
            target = kad_id(key)
            # Like go-libp2p: a peer we are connected to (or we ourselves) is named with its
            # addresses even when it is no DHT server, so peers behind NAT that hold a relay
            # reservation here can be found by find-peer (their circuit addresses included).
            if key == self.self_peer:
                reply.closerPeers.append(peer_entry(key, self._own_addrs(), True))
            elif key != sender and self._connected(key) and key not in self.routing:
                addrs = self._addrs(key)
                if addrs:
                    reply.closerPeers.append(peer_entry(key, addrs, True))
            reply.closerPeers.extend(self._entries(self.routing.closest(target, self.config.k)))
        elif req.type == Message.GET_VALUE:
            if not key:
                raise WireError("GET_VALUE without a key")
            value = self.values.get(key, now)
            if value is not None:
                # With the record in hand the asker needs no closer peers; building
                # 20 peer entries would double the cost of the reply.
                reply.record.CopyFrom(Record(key=key, value=value))
            else:
                reply.closerPeers.extend(self._entries(self.routing.closest(kad_id(key), self.config.k)))
        elif req.type == Message.PUT_VALUE:
            if not req.HasField("record"):
                raise WireError("PUT_VALUE without a record")
            rkey, value = bytes(req.record.key), bytes(req.record.value)
            if rkey != key:
                raise RecordRejected("PUT_VALUE record key differs from message key")
            self._store_value(rkey, value, now)
            reply = req
        elif req.type == Message.ADD_PROVIDER:
            if not key:
                raise WireError("ADD_PROVIDER without a key")
            for record in parse_peers(req.providerPeers):
                if record.peer != sender:
                    continue  # a peer may only announce itself
                self._learn_addrs(record.peer, record.addrs)
                self.providers.add(key, record.peer, [a.to_bytes() for a in record.addrs], now)
                self._dirty = True
            return None
        elif req.type == Message.GET_PROVIDERS:
            if not key:
                raise WireError("GET_PROVIDERS without a key")
            provs = self.providers.get(key, now)[: self.config.k]
            reply.providerPeers.extend(
                peer_entry(p.peer, self._addrs(p.peer) or _decode_addrs(p.addrs), self._connected(p.peer))
                for p in provs
            )
            reply.closerPeers.extend(self._entries(self.routing.closest(kad_id(key), self.config.k)))
        elif req.type == Message.PING:
            pass
        else:
            raise WireError(f"unknown message type {int(req.type)}")
        return reply

    def _store_value(self, key: bytes, value: bytes, now: float) -> None:
        self.validator.validate(key, value)
        existing = self.values.get(key, now)
        if existing is not None and existing != value:
            best = self.validator.select(key, [existing, value])
            if best == 0:
                raise RecordRejected("an existing record for this key is newer (selector kept it)")
        self.values.put(key, value, now)
        self._dirty = True

    # ------------------------------------------------------------------ outbound
    async def _request(self, peer: bytes, msg: Message, expect_reply: bool = True) -> Message | None:
        """One request/reply; raises DHTError on any failure.

        Replies reuse one cached stream per peer (like go's message sender): a new
        stream costs a multistream-select round trip, about as much as the request.
        A cached stream that turns out dead is dropped and the request retried once
        on a fresh stream. Fire-and-forget requests (ADD_PROVIDER) use their own stream.
        """
        try:
            with trio.fail_after(self.config.request_timeout):
                if not expect_reply:
                    idle = self._streams.get(peer)
                    if idle is not None and not idle.broken and not idle.lock.locked():
                        try:
                            await idle.send_only(msg)
                            return None
                        except Exception as exc:
                            log.debug("cached DHT stream to %s failed (%r); using a new one", ID(peer), exc)
                            self._drop_stream(peer, idle)
                    stream = await self.host.new_stream(ID(peer), [KAD])
                    try:
                        await stream.write(encode_frame(msg))
                        await stream.close()
                    except BaseException:
                        await _reset(stream)
                        raise
                    return None
                cached = self._streams.get(peer)
                if cached is not None and cached.broken:
                    self._drop_stream(peer, cached)
                    cached = None
                if cached is not None and not cached.lock.locked():
                    try:
                        return await cached.exchange(msg)
                    except Exception as exc:
                        log.debug("cached DHT stream to %s failed (%r); retrying on a new one", ID(peer), exc)
                        self._drop_stream(peer, cached)
                    except BaseException:
                        self._drop_stream(peer, cached)
                        raise
                stream = await self.host.new_stream(ID(peer), [KAD])
                fresh = _CachedStream(stream, self.config.max_message_bytes)
                try:
                    reply = await fresh.exchange(msg)
                except BaseException:
                    self._closing.append((stream, True))
                    raise
                await self._keep_stream(peer, fresh)
                return reply
        except trio.TooSlowError as exc:
            raise DHTError(f"request to {ID(peer)} timed out after {self.config.request_timeout}s") from exc
        except DHTError:
            raise
        except Exception as exc:
            raise DHTError(f"request to {ID(peer)} failed: {exc!r}") from exc

    async def _keep_stream(self, peer: bytes, entry: _CachedStream) -> None:
        old = self._streams.get(peer)
        if old is not None and old is not entry:
            if old.lock.locked():
                await _close(entry.stream)  # the cached one is busy and fine; keep it
                return
            self._drop_stream(peer, old)
        self._streams[peer] = entry
        while len(self._streams) > MAX_CACHED_STREAMS:
            victim = next(iter(self._streams))
            self._drop_stream(victim, self._streams[victim])

    def _drop_stream(self, peer: bytes, entry: _CachedStream) -> None:
        if self._streams.get(peer) is entry:
            del self._streams[peer]
        self._closing.append((entry.stream, entry.broken))

    async def _close_dropped(self) -> None:
        """Close idle streams we no longer keep normally; reset the out-of-step ones."""
        while self._closing:
            stream, broken = self._closing.pop()
            await (_reset(stream) if broken else _close(stream))

    def _absorb(self, reply: Message) -> list[bytes]:
        closer = []
        for record in parse_peers(reply.closerPeers):
            self._learn_addrs(record.peer, record.addrs)
            closer.append(record.peer)
        return closer

    async def _lookup(
        self,
        target: int,
        make_request: Callable[[], Message],
        on_reply: Callable[[bytes, Message, Lookup], Awaitable[None]] | None = None,
    ) -> Lookup:
        """Iterative lookup driven by `Lookup`; returns it for `closest()` etc."""
        seeds = self.routing.closest(target, self.config.k)
        lookup = Lookup(
            target,
            seeds,
            self_peer=self.self_peer,
            k=self.config.k,
            alpha=self.config.alpha,
            max_queries=self.config.max_lookup_queries,
        )
        wake_send, wake_recv = trio.open_memory_channel[None](math.inf)

        async def query(peer: bytes) -> None:
            try:
                reply = await self._request(peer, make_request())
            except DHTError as exc:
                log.debug("lookup: %s", exc)
                lookup.on_failure(peer)
                self.routing.failed(peer)
            else:
                assert reply is not None
                closer = self._absorb(reply)
                self._seen(peer)
                if on_reply is not None:
                    await on_reply(peer, reply, lookup)
                lookup.on_success(peer, closer)
            wake_send.send_nowait(None)

        # Queries run in the service's nursery: when the caller stops early (quorum
        # reached) the answers still in flight are read to the end within
        # request_timeout, which keeps their cached streams in step for reuse.
        # Without a running service they run here and are cancelled on stop.
        async with trio.open_nursery() as local:
            owner = self._nursery or local
            with trio.move_on_after(self.config.lookup_timeout) as deadline:
                while True:
                    for peer in lookup.next_to_query():
                        owner.start_soon(query, peer)
                    if lookup.stopped or lookup.done:
                        break
                    await wake_recv.receive()
            if lookup.stopped or deadline.cancelled_caught:
                lookup.stop()
                local.cancel_scope.cancel()
        await self._close_dropped()
        return lookup

    # ------------------------------------------------------------------ public API
    async def bootstrap(self, peers: Sequence[PeerInfo]) -> int:
        """Connect to `peers`, fill the routing table with a self lookup. Returns table size."""

        async def one(info: PeerInfo) -> None:
            raw = info.peer_id.to_bytes()
            self._learn_addrs(raw, info.addrs)
            try:
                reply = await self._request(raw, Message(type=Message.FIND_NODE, key=self.self_peer))
            except DHTError as exc:
                log.warning("DHT bootstrap peer %s unreachable: %s", info.peer_id, exc)
                return
            assert reply is not None
            self._absorb(reply)
            self._seen(raw)

        async with trio.open_nursery() as nursery:
            for info in peers:
                nursery.start_soon(one, info)
        await self.refresh()
        return len(self.routing)

    async def refresh(self) -> None:
        """Self lookup plus one random-key lookup: find our neighbours and fill far buckets."""
        await self.find_closest_peers(self.self_peer)
        await self.find_closest_peers(secrets.token_bytes(32))

    async def find_closest_peers(self, key: bytes) -> list[bytes]:
        lookup = await self._lookup(kad_id(key), lambda: Message(type=Message.FIND_NODE, key=key))
        return lookup.closest()

    async def put_value(self, key: bytes, value: bytes) -> int:
        """Validate, store locally, then PUT to the k closest peers. Returns how many stored it."""
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            raise TypeError("DHT keys and values are bytes")
        self._store_value(key, value, self._now())
        closest = await self.find_closest_peers(key)
        stored = 0

        async def put(peer: bytes) -> None:
            nonlocal stored
            msg = Message(type=Message.PUT_VALUE, key=key, record=Record(key=key, value=value))
            try:
                await self._request(peer, msg)
                stored += 1
            except DHTError as exc:
                log.debug("PUT_VALUE: %s", exc)

        async with trio.open_nursery() as nursery:
            for peer in closest:
                nursery.start_soon(put, peer)
        if closest and not stored:
            raise DHTError(f"no peer accepted the record (asked {len(closest)})")
        return stored

    async def get_value(self, key: bytes, quorum: int | None = None) -> bytes | None:
        """Network lookup (the local copy is one vote); best value by the selector, or None."""
        if not isinstance(key, bytes):
            raise TypeError("DHT keys are bytes")
        self.validator._for(key)  # unknown namespace: fail early with a clear error
        want = quorum or self.config.get_quorum
        found: dict[bytes, bytes] = {}  # peer -> value
        local = self.values.get(key, self._now())
        if local is not None:
            found[self.self_peer] = local

        async def on_reply(peer: bytes, reply: Message, lookup: Lookup) -> None:
            if not reply.HasField("record"):
                return
            value = bytes(reply.record.value)
            try:
                if bytes(reply.record.key) not in (b"", key):
                    raise RecordRejected("record key differs from the requested key")
                if value not in found.values():  # identical bytes were verified already
                    self.validator.validate(key, value)
            except RecordRejected as exc:
                log.debug("GET_VALUE: invalid record from %s: %s", ID(peer), exc)
                return
            found[peer] = value
            if len(found) >= want:
                lookup.stop()

        if len(found) < want:
            await self._lookup(kad_id(key), lambda: Message(type=Message.GET_VALUE, key=key), on_reply)
        if not found:
            return None
        values = list(found.values())
        best = values[self.validator.select(key, values)]
        if best != local:
            with suppress(StoreFull):
                self.values.put(key, best, self._now())  # validated on receipt
                self._dirty = True
        stale = [p for p, v in found.items() if v != best and p != self.self_peer]
        if stale and self._nursery is not None:
            self._nursery.start_soon(self._correct, key, best, stale)
        return best

    async def _correct(self, key: bytes, value: bytes, peers: list[bytes]) -> None:
        """Send the winning value to peers that returned an older one."""
        for peer in peers:
            try:
                await self._request(
                    peer, Message(type=Message.PUT_VALUE, key=key, record=Record(key=key, value=value))
                )
            except DHTError as exc:
                log.debug("record correction: %s", exc)

    async def provide(self, cid: bytes) -> int:
        """Announce that we hold `cid` (CID or multihash) to the k closest peers; re-provided."""
        key = provider_key(cid)
        self.providers.add(key, self.self_peer, [a.to_bytes() for a in self._own_addrs()], self._now())
        self._provided[key] = None
        self._dirty = True
        return await self._announce(key)

    async def _announce(self, key: bytes) -> int:
        closest = await self.find_closest_peers(key)
        me = peer_entry(self.self_peer, self._own_addrs(), True)
        sent = 0

        async def add(peer: bytes) -> None:
            nonlocal sent
            msg = Message(type=Message.ADD_PROVIDER, key=key)
            msg.providerPeers.append(me)
            try:
                await self._request(peer, msg, expect_reply=False)
                sent += 1
            except DHTError as exc:
                log.debug("ADD_PROVIDER: %s", exc)

        async with trio.open_nursery() as nursery:
            for peer in closest:
                nursery.start_soon(add, peer)
        return sent

    async def find_providers(self, cid: bytes, count: int = 20) -> list[PeerInfo]:
        key = provider_key(cid)
        found: dict[bytes, list[Multiaddr]] = {}
        for p in self.providers.get(key, self._now()):
            found[p.peer] = self._addrs(p.peer) or _decode_addrs(p.addrs)
        if len(found) < count:

            async def on_reply(peer: bytes, reply: Message, lookup: Lookup) -> None:
                for record in parse_peers(reply.providerPeers):
                    if record.peer not in found:
                        self._learn_addrs(record.peer, record.addrs)
                        found[record.peer] = list(record.addrs)
                if len(found) >= count:
                    lookup.stop()

            await self._lookup(kad_id(key), lambda: Message(type=Message.GET_PROVIDERS, key=key), on_reply)
        return [PeerInfo(ID(p), addrs) for p, addrs in list(found.items())[:count]]

    async def find_peer(self, peer_id: ID) -> PeerInfo | None:
        raw = peer_id.to_bytes()
        if self._connected(raw) or raw in self.routing:
            addrs = self._addrs(raw)
            if addrs:
                return PeerInfo(peer_id, addrs)
        hit: list[Multiaddr] = []

        async def on_reply(peer: bytes, reply: Message, lookup: Lookup) -> None:
            for record in parse_peers(reply.closerPeers):
                if record.peer == raw and record.addrs:
                    hit.extend(record.addrs)
                    lookup.stop()

        await self._lookup(kad_id(raw), lambda: Message(type=Message.FIND_NODE, key=raw), on_reply)
        return PeerInfo(peer_id, hit) if hit else None

    # ------------------------------------------------------------------ loops
    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self.config.refresh_interval)
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("DHT refresh failed: %r", exc)
            self.values.expire(self._now())
            self.providers.expire(self._now())
            log.debug("DHT refreshed: %d peers in routing table", len(self.routing))

    async def _reprovide_loop(self) -> None:
        while True:
            await trio.sleep(self.config.reprovide_interval)
            keys = list(self._provided)
            for key in keys:
                self.providers.add(
                    key, self.self_peer, [a.to_bytes() for a in self._own_addrs()], self._now()
                )
                try:
                    await self._announce(key)
                except Exception as exc:
                    log.warning("DHT re-provide of %s failed: %r", key.hex()[:16], exc)
            if keys:
                log.info("DHT re-provided %d key(s)", len(keys))


def _decode_addrs(raw: list[bytes]) -> list[Multiaddr]:
    return [a for a in map(parse_addr, raw) if a is not None]


def _type_name(msg: Message) -> str:
    try:
        return str(Message.MessageType.Name(msg.type))
    except Exception:
        return f"type {int(msg.type)}"


async def _close(stream: Any) -> None:
    try:
        await stream.close()
    except Exception:
        await _reset(stream)


async def _reset(stream: Any) -> None:
    with trio.CancelScope(shield=True), suppress(Exception):
        await stream.reset()


@asynccontextmanager
async def running_dht(host: Any, config: DHTConfig | None = None) -> AsyncIterator[KademliaDHT]:
    dht = KademliaDHT(host, config or DHTConfig())
    async with trio.open_nursery() as nursery:
        await nursery.start(dht.run)
        try:
            yield dht
        finally:
            nursery.cancel_scope.cancel()
