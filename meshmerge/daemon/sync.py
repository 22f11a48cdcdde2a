"""Moving merge state and tensors between nodes.

Three mechanisms, each with its own protocol and limits:

* **Announcements** (gossip topic ``/meshmerge/1/set/<set id>``): every local
  operation is published as a small delta (headers, removals, evidence;
  never tensor bytes). The validator decodes and checks signatures and
  schema; a bad message is REJECTed, which costs the sender gossip score.
* **Anti-entropy** (``/meshmerge/sync/1.0.0``): every interval, and at once
  when a peer connects, ask a few peers for their (set id, root) pairs and
  pull the full state of every set whose root differs or that we do not
  know yet. This repairs whatever gossip lost, heals partitions and is how a
  node learns a merge set's schema from its peers. Peers that speak
  ``/meshmerge/sync/1.1.0`` reconcile a set both know by bucket digests
  (:mod:`meshmerge.crdt.reconcile`): the puller fetches only the buckets of
  operations that differ, so one missing op does not cost the whole state.
* **Blob fetch** (``/meshmerge/blob/1.0.0``): for every live contribution
  whose tensors are missing, fetch the safetensors file in bounded chunks
  from connected peers (the author's node first), then from DHT providers;
  resumable, hash-checked by the store before it becomes visible, at most
  ``max_concurrent_fetches`` at once. A completed blob is provided in the DHT.

Every request/response is one length-prefixed canonical-CBOR frame on its own
stream, with a size limit and a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio
from libp2p.peer.id import ID

from meshmerge.crdt import reconcile
from meshmerge.daemon.config import SyncSection
from meshmerge.daemon.node import Node
from meshmerge.daemon.store import QuotaExceeded
from meshmerge.proto import cid as cids
from meshmerge.proto.cbor import CodecError, Limits, decode, encode
from meshmerge.proto.messages import StateMessage
from meshmerge.proto.rpc import HEADER

if TYPE_CHECKING:
    # the trio-stubs that py-libp2p pulls in (trio-typing) predate trio.TaskStatus
    from trio_typing import TaskStatus

log = logging.getLogger("meshmerge.sync")

SYNC_PROTOCOL: Final = "/meshmerge/sync/1.0.0"
#: 1.0.0 plus bucket-digest reconciliation ("digests", "ops"); a peer without it gets full pulls
SYNC_PROTOCOL_RECONCILE: Final = "/meshmerge/sync/1.1.0"
BLOB_PROTOCOL: Final = "/meshmerge/blob/1.0.0"
TOPIC_PREFIX: Final = "/meshmerge/1/set/"
MAX_CONTROL_FRAME: Final = 1 << 20
MAX_STATE_FRAME: Final = 256 << 20
PEERS_PER_ROUND: Final = 3
REQUEST_TIMEOUT: Final = 30.0
#: Seconds before a fetch refused by the blob quota is tried again (a collection may free room).
QUOTA_RETRY: Final = 30.0


class SyncError(Exception):
    """A peer answered badly or not at all; the message says which and why."""


def topic_for(set_id: bytes) -> str:
    return TOPIC_PREFIX + cids.to_text(set_id)


async def read_frame(stream: Any, limit: int) -> Any:
    header = await _read_exactly(stream, HEADER)
    length = int.from_bytes(header, "big")
    if length > limit:
        raise SyncError(f"frame of {length} bytes exceeds the limit of {limit}")
    payload = await _read_exactly(stream, length)
    try:
        return decode(payload, Limits(max_message_bytes=limit, max_bytes_bytes=limit))
    except CodecError as exc:
        raise SyncError(f"undecodable frame: {exc}") from None


async def write_frame(stream: Any, value: Any) -> None:
    payload = encode(value)
    await stream.write(len(payload).to_bytes(HEADER, "big") + payload)


async def _read_exactly(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise SyncError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@dataclass
class SyncStats:
    rounds: int = 0
    states_pulled: int = 0
    #: sets repaired by pulling only the differing buckets, and what those pulls carried
    reconciled: int = 0
    buckets_pulled: int = 0
    ops_pulled: int = 0
    blobs_fetched: int = 0
    blob_bytes: int = 0
    #: fetches put off because the blob quota was full
    quota_refusals: int = 0
    bad_peers: dict[str, int] = field(default_factory=dict)


class SyncService:
    def __init__(
        self, node: Node, host: Any, config: SyncSection, *, gossip: Any = None, dht: Any = None
    ) -> None:
        self.node = node
        self.host = host
        self.config = config
        self.gossip = gossip
        self.dht = dht
        self.stats = SyncStats()
        self._subscribed: set[bytes] = set()
        self._wanted: set[bytes] = set()
        self._fetching: set[bytes] = set()
        self._failed_until: dict[bytes, float] = {}
        self._fetch_slots = trio.Semaphore(config.max_concurrent_fetches)
        self._wake_fetcher = trio.Event()
        self._wake_sync = trio.Event()
        self._known_peers: set[ID] = set()
        self._digest_cache = reconcile.DigestCache()
        self._nursery: trio.Nursery | None = None
        node.on_change(self._on_change)
        node.on_leave(self._on_leave)

    # -- lifecycle ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(SYNC_PROTOCOL, self._serve_sync)
        self.host.set_stream_handler(SYNC_PROTOCOL_RECONCILE, self._serve_sync)
        self.host.set_stream_handler(BLOB_PROTOCOL, self._serve_blob)
        for set_id in self.node.set_ids():
            self._subscribe(set_id)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._anti_entropy_loop)
            nursery.start_soon(self._fetch_loop)
            self._queue_missing_blobs(self.node.set_ids())
            task_status.started()
            await trio.sleep_forever()

    def status(self) -> dict[str, Any]:
        return {
            "sync_rounds": self.stats.rounds,
            "states_pulled": self.stats.states_pulled,
            "sets_reconciled": self.stats.reconciled,
            "ops_pulled": self.stats.ops_pulled,
            "blobs_fetched": self.stats.blobs_fetched,
            "blobs_wanted": len(self._wanted),
            "blob_quota_refusals": self.stats.quota_refusals,
        }

    # -- reacting to the node ---------------------------------------------------------

    def _on_change(self, set_id: bytes, ops: StateMessage, local: bool) -> None:
        self._subscribe(set_id)
        if local and self.gossip is not None and self._nursery is not None and (ops.adds or ops.removals):
            self._nursery.start_soon(self._publish, set_id, ops)
        if ops.adds:
            self._queue_missing_blobs([set_id])

    def _on_leave(self, set_id: bytes) -> None:
        self._digest_cache.forget(set_id)
        if self.gossip is not None and set_id in self._subscribed:
            self._subscribed.discard(set_id)
            self.gossip.unsubscribe(topic_for(set_id))

    async def _publish(self, set_id: bytes, ops: StateMessage) -> None:
        try:
            await self.gossip.publish(topic_for(set_id), encode(ops.to_obj()))
        except Exception as exc:  # publishing is best effort: anti-entropy repairs
            log.info("could not announce on %s: %s", topic_for(set_id), exc)

    def _subscribe(self, set_id: bytes) -> None:
        if self.gossip is None or set_id in self._subscribed:
            return
        self._subscribed.add(set_id)
        self.gossip.subscribe(topic_for(set_id), self._validate_announcement, self._on_announcement)
        if self._nursery is not None:
            self._nursery.start_soon(self._nudge_anti_entropy)

    async def _nudge_anti_entropy(self) -> None:
        """Gossip does not replay history to new subscribers: whatever was announced on a
        topic before our subscription reached the mesh is only repaired by anti-entropy,
        so run a round now and another once our subscription has propagated."""
        for delay in (0.0, 2.0):
            await trio.sleep(delay)
            self._wake_sync.set()

    def _validate_announcement(self, sender: bytes, data: bytes) -> Any:
        from meshmerge.daemon.gossip.driver import Validation

        try:
            msg = StateMessage.from_obj(decode(data))
        except CodecError:
            return Validation.REJECT
        state = self.node.state(msg.set_id)
        if state is None or msg.schema is not None or msg.full:
            return Validation.IGNORE if state is None else Validation.REJECT
        for signed in msg.adds:
            if signed.id not in state.orset.adds and state.check_header(signed) is not None:
                return Validation.REJECT
        for removal in msg.removals:
            if removal.key not in state.orset.removals and state.check_removal(removal) is not None:
                return Validation.REJECT
        for proof in msg.evidence:
            if state.check_evidence(proof) is not None:
                return Validation.REJECT
        return Validation.ACCEPT

    async def _on_announcement(self, sender: bytes, data: bytes) -> None:
        # The driver only delivers messages _validate_announcement accepted, and it
        # checked every new op's signature over these exact bytes.
        msg = StateMessage.from_obj(decode(data))
        await self.node.apply_remote(msg.set_id, msg, verified=True)

    # -- anti-entropy -------------------------------------------------------------------

    def _connected_peers(self) -> list[ID]:
        return list(self.host.get_network().connections.keys())

    async def _anti_entropy_loop(self) -> None:
        while True:
            peers = self._connected_peers()
            new = [p for p in peers if p not in self._known_peers]
            self._known_peers = set(peers)
            targets = new + random.sample(
                [p for p in peers if p not in new], min(PEERS_PER_ROUND, len(peers) - len(new))
            )
            for peer in targets:
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        await self.sync_with(peer)
                except (SyncError, trio.TooSlowError, OSError, Exception) as exc:
                    self._bad(peer, f"anti-entropy: {type(exc).__name__}: {exc}")
            self.stats.rounds += 1
            with trio.move_on_after(self.config.anti_entropy_interval * random.uniform(0.8, 1.2)):
                while set(self._connected_peers()) == self._known_peers and not self._wake_sync.is_set():
                    await trio.sleep(0.2)
            self._wake_sync = trio.Event()

    async def sync_with(self, peer: ID) -> int:
        """Pull every set whose root differs from the peer's; returns how many were pulled."""
        answer = await self._request(peer, SYNC_PROTOCOL, {"t": "roots"}, MAX_CONTROL_FRAME)
        pairs = answer.get("sets") if isinstance(answer, dict) else None
        if not isinstance(pairs, list) or len(pairs) > 10_000:
            raise SyncError("malformed roots answer")
        pulled = 0
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, bytes) for x in pair)):
                raise SyncError("malformed (set, root) pair")
            set_id, root = pair
            if self.node.has_left(set_id):
                continue
            state = self.node.state(set_id)
            if state is not None and state.root() == root:
                continue
            if state is not None and await self._reconcile(peer, set_id, state):
                pulled += 1
                continue
            reply = await self._request(peer, SYNC_PROTOCOL, {"t": "state", "set": set_id}, MAX_STATE_FRAME)
            msg = _state_in(reply, "state", set_id)
            if msg.set_id != set_id or (state is None and msg.schema is None):
                raise SyncError("state answer for the wrong set or without a schema")
            report = await self.node.apply_remote(set_id, msg)
            if report is not None and report.rejected:
                self._bad(peer, f"{len(report.rejected)} invalid op(s) in its state: {report.rejected[0]}")
            self.stats.states_pulled += 1
            pulled += 1
        return pulled

    async def _reconcile(self, peer: ID, set_id: bytes, state: Any) -> bool:
        """Pull only the operations in buckets whose digests differ; False if the peer cannot."""
        try:
            stream = await self.host.new_stream(peer, [SYNC_PROTOCOL_RECONCILE])
        except Exception as exc:  # an older peer: the caller pulls the full state
            log.debug("peer %s does not reconcile by digests: %s", peer, exc)
            return False
        try:
            bits = reconcile.choose_bits(reconcile.op_count(state))
            await write_frame(stream, {"t": "digests", "set": set_id, "bits": bits})
            theirs = _parse_digests(await read_frame(stream, MAX_CONTROL_FRAME), bits)
        finally:
            await _close(stream)
        wanted = reconcile.differing(await self._digests(state, bits), theirs)
        if not wanted:
            return True  # same operations; the roots differed only for a moment
        request = {"t": "ops", "set": set_id, "bits": bits, "buckets": wanted}
        reply = await self._request(peer, SYNC_PROTOCOL_RECONCILE, request, MAX_STATE_FRAME)
        msg = _state_in(reply, "ops", set_id)
        if msg.set_id != set_id or msg.full or msg.schema is not None:
            raise SyncError("ops answer for the wrong set, or not a delta")
        asked = set(wanted)
        if any(reconcile.bucket_of(k, bits) not in asked for k in _keys(msg)):
            raise SyncError("ops answer holds operations outside the buckets asked for")
        report = await self.node.apply_remote(set_id, msg)
        if report is not None and report.rejected:
            self._bad(peer, f"{len(report.rejected)} invalid op(s) in its buckets: {report.rejected[0]}")
        self.stats.reconciled += 1
        self.stats.buckets_pulled += len(wanted)
        self.stats.ops_pulled += len(msg.adds) + len(msg.removals) + len(msg.evidence)
        return True

    async def _serve_sync(self, stream: Any) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await read_frame(stream, MAX_CONTROL_FRAME)
                kind = request.get("t") if isinstance(request, dict) else None
                if kind == "roots":
                    pairs = []
                    for s in self.node.set_ids():
                        state = self.node.state(s)
                        if state is not None:
                            pairs.append([s, state.root()])
                    await write_frame(stream, {"sets": pairs})
                elif kind in ("digests", "ops") and isinstance(request.get("set"), bytes):
                    await write_frame(stream, await self._answer_reconcile(kind, request))
                elif kind == "state" and isinstance(request.get("set"), bytes):
                    state = self.node.state(request["set"])
                    if state is None:
                        await write_frame(stream, {"error": "unknown set"})
                    else:
                        await write_frame(stream, {"state": encode(state.full_state().to_obj())})
                else:
                    await write_frame(stream, {"error": "bad request"})
        except (SyncError, trio.TooSlowError) as exc:
            log.debug("sync request refused: %s", exc)
        except Exception as exc:
            log.debug("sync stream failed: %s", exc)
        finally:
            await _close(stream)

    async def _digests(self, state: Any, bits: int) -> reconcile.Digests:
        """Our bucket digests: cached until the set grows, hashed off the event loop."""
        cached = self._digest_cache.get(state, bits)
        if cached is not None:
            return cached
        counts, keys = reconcile.op_counts(state), reconcile.op_keys(state)
        fresh = await trio.to_thread.run_sync(reconcile.digests_of, keys, bits)
        self._digest_cache.put(state, bits, counts, fresh)
        return fresh

    async def _answer_reconcile(self, kind: str, request: dict[str, Any]) -> dict[str, Any]:
        state = self.node.state(request["set"])
        bits = request.get("bits")
        if state is None:
            return {"error": "unknown set"}
        if type(bits) is not int or not 0 <= bits <= reconcile.MAX_BITS:
            return {"error": f"bits must be an integer in [0, {reconcile.MAX_BITS}]"}
        if kind == "digests":
            mine = await self._digests(state, bits)
            return {"bits": bits, "buckets": [[i, d, n] for i, (d, n) in sorted(mine.items())]}
        buckets = request.get("buckets")
        if (
            not isinstance(buckets, list)
            or len(buckets) > 1 << bits
            or not all(type(i) is int and 0 <= i < 1 << bits for i in buckets)
        ):
            return {"error": "bad bucket list"}
        return {"state": encode(reconcile.ops_in(state, buckets, bits).to_obj())}

    # -- blobs ------------------------------------------------------------------------

    def _queue_missing_blobs(self, set_ids: Iterable[bytes]) -> None:
        for set_id in set_ids:
            state = self.node.state(set_id)
            if state is None:
                continue
            for c in state.live_ids():
                if not self.node.store.has_blob(c):
                    self._wanted.add(c)
        if self._wanted:
            self._wake_fetcher.set()

    async def _fetch_loop(self) -> None:
        assert self._nursery is not None
        while True:
            with trio.move_on_after(2.0):  # also wakes up to retry failed fetches
                await self._wake_fetcher.wait()
            self._wake_fetcher = trio.Event()
            now = trio.current_time()
            for c in sorted(self._wanted - self._fetching):
                if self._failed_until.get(c, 0) > now:
                    continue
                self._fetching.add(c)
                self._nursery.start_soon(self._fetch_one, c)

    def _header(self, c: bytes) -> Any:
        for set_id in self.node.set_ids():
            state = self.node.state(set_id)
            if state is not None and c in state.orset.adds:
                return state.orset.adds[c].header
        return None

    async def _fetch_one(self, c: bytes) -> None:
        async with self._fetch_slots:
            try:
                header = self._header(c)
                if header is None or self.node.store.has_blob(c):
                    self._wanted.discard(c)
                    return
                retry = 5.0
                for peer in await self._candidates(header):
                    try:
                        with trio.fail_after(self.config.fetch_timeout):
                            if await self._fetch_from(peer, header):
                                self._wanted.discard(c)
                                self._failed_until.pop(c, None)
                                await self._provide(c)
                                return
                    except QuotaExceeded as exc:  # our disk budget, not the peer's fault
                        self.stats.quota_refusals += 1
                        log.warning("not fetching tensors of %s: %s", cids.to_text(c)[:24], exc)
                        retry = QUOTA_RETRY
                        break
                    except (SyncError, trio.TooSlowError, OSError, Exception) as exc:
                        log.info("fetch of %s from %s failed: %s", cids.to_text(c)[:20], peer, exc)
                self._failed_until[c] = trio.current_time() + retry
            finally:
                self._fetching.discard(c)
                self._wake_fetcher.set()

    async def _candidates(self, header: Any) -> list[ID]:
        peers = self._connected_peers()
        author = ID(header.author)
        ordered = [author] if author in peers else []
        ordered += [p for p in peers if p != author]
        if self.dht is not None:
            try:
                with trio.move_on_after(10):
                    for info in await self.dht.find_providers(header.id):
                        if info.peer_id not in ordered and info.peer_id != self.host.get_id():
                            self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 600)
                            ordered.append(info.peer_id)
            except Exception as exc:
                log.debug("find_providers failed: %s", exc)
        return ordered

    async def _fetch_from(self, peer: ID, header: Any) -> bool:
        writer = await trio.to_thread.run_sync(self.node.store.blob_writer, header)
        try:
            total = None
            while total is None or writer.offset() < total:
                chunk_len = self.config.fetch_chunk_bytes
                reply = await self._request(
                    peer,
                    BLOB_PROTOCOL,
                    {"id": header.id, "offset": writer.offset(), "length": chunk_len},
                    chunk_len + 4096,
                )
                if not isinstance(reply, dict) or reply.get("ok") is not True:
                    await trio.to_thread.run_sync(writer.abort)
                    return False
                size, data = reply.get("size"), reply.get("data")
                if type(size) is not int or not isinstance(data, bytes) or size > self.config.max_blob_bytes:
                    raise SyncError("malformed blob chunk")
                if total is not None and size != total:
                    raise SyncError("blob size changed between chunks")
                total = size
                if not data and writer.offset() < total:
                    raise SyncError("empty chunk before the end of the blob")
                await trio.to_thread.run_sync(writer.write, writer.offset(), data)
                self.stats.blob_bytes += len(data)
            await trio.to_thread.run_sync(writer.finish)
        except BaseException:
            await trio.to_thread.run_sync(writer.abort)
            raise
        self.stats.blobs_fetched += 1
        log.info("fetched tensors of %s from %s (%d bytes)", cids.to_text(header.id)[:24], peer, total)
        return True

    async def _provide(self, c: bytes) -> None:
        if self.dht is None:
            return
        try:
            with trio.move_on_after(10):
                await self.dht.provide(c)
        except Exception as exc:
            log.debug("provide failed: %s", exc)

    async def _serve_blob(self, stream: Any) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await read_frame(stream, MAX_CONTROL_FRAME)
                c, offset, length = (request.get(k) for k in ("id", "offset", "length"))
                if not (isinstance(c, bytes) and type(offset) is int and type(length) is int) or offset < 0:
                    await write_frame(stream, {"ok": False, "error": "bad request"})
                    return
                length = max(0, min(length, self.config.fetch_chunk_bytes))
                if not self.node.store.has_blob(c):
                    await write_frame(stream, {"ok": False, "error": "not found"})
                    return
                size, data = await trio.to_thread.run_sync(
                    _read_range, self.node.store.blob_path(c), offset, length
                )
                await write_frame(stream, {"ok": True, "size": size, "data": data})
        except Exception as exc:
            log.debug("blob request failed: %s", exc)
        finally:
            await _close(stream)

    # -- plumbing -----------------------------------------------------------------------

    async def _request(self, peer: ID, protocol: str, request: Any, limit: int) -> Any:
        stream = await self.host.new_stream(peer, [protocol])
        try:
            await write_frame(stream, request)
            return await read_frame(stream, limit)
        finally:
            await _close(stream)

    def _bad(self, peer: ID, why: str) -> None:
        key = str(peer)
        self.stats.bad_peers[key] = self.stats.bad_peers.get(key, 0) + 1
        log.info("peer %s: %s", key, why)


def _state_in(reply: Any, what: str, set_id: bytes) -> StateMessage:
    """The StateMessage a peer's ``what`` answer carries under "state"; SyncError if it is bad."""
    raw = reply.get("state") if isinstance(reply, dict) else None
    if not isinstance(raw, bytes):
        raise SyncError(f"malformed {what} answer")
    try:
        return StateMessage.from_obj(decode(raw, Limits(max_message_bytes=MAX_STATE_FRAME)))
    except CodecError as exc:
        raise SyncError(f"bad {what} for {cids.to_text(set_id)}: {exc}") from None


def _parse_digests(answer: Any, bits: int) -> reconcile.Digests:
    """A peer's bucket digests, checked: in-range distinct buckets, 32-byte digests, counts."""
    rows = answer.get("buckets") if isinstance(answer, dict) else None
    if not isinstance(answer, dict) or answer.get("bits") != bits or not isinstance(rows, list):
        raise SyncError("malformed digests answer")
    if len(rows) > 1 << bits:
        raise SyncError(f"{len(rows)} digests for {1 << bits} buckets")
    out: reconcile.Digests = {}
    for row in rows:
        ok = isinstance(row, list) and len(row) == 3
        if ok:
            i, digest, count = row
            ok = (
                type(i) is int
                and 0 <= i < 1 << bits
                and i not in out
                and isinstance(digest, bytes)
                and len(digest) == 32
                and type(count) is int
                and count > 0
            )
        if not ok:
            raise SyncError("malformed bucket digest")
        out[i] = (digest, count)
    return out


def _keys(msg: StateMessage) -> list[bytes]:
    return [a.id for a in msg.adds] + [r.key for r in msg.removals] + [e.key for e in msg.evidence]


def _read_range(path: Any, offset: int, length: int) -> tuple[int, bytes]:
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(min(offset, size))
        return size, fh.read(length)


async def _close(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2), contextlib.suppress(Exception):
        await stream.close()
