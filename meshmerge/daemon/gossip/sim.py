"""Discrete-event simulator for GossipSub routers: virtual time, in-memory links.

Why: attack scenarios need hundreds or thousands of nodes and minutes of
protocol time; with the router being sans-I/O, a heap of timed events drives
them in seconds, deterministically from a seed.

Model: every node has an uplink of ``bandwidth`` bytes/s (None = unlimited)
drained frame by frame from its router's per-peer queues (round robin), so a
busy node's queues fill and the router's own bounds apply. Each link has a
one-way latency drawn once per link; each frame is lost with probability
``loss``. Every frame is the router's real encoding and is decoded with the
real codec (:func:`meshmerge.proto.gossipsub.decode_rpc`) at the receiver.
Decoding is a pure function of the bytes, so byte-identical frames (one message
forwarded by many nodes, one IHAVE sent to many peers) are decoded once and the
result is shared from a small bounded memo (``decode_cache``; 0 turns it off);
routers never mutate the RPCs they receive. Likewise a signature verdict is a
pure function of the message fields, so routers that verify signatures share a
:class:`SignatureMemo` (real hosts verify every message they accept).

The event queue is a calendar of 1 ms buckets: events of later buckets wait in
plain lists, only the current bucket is a heap, so the per-event heap work is
that of a few dozen entries, not of every frame in flight. Events still run in
exactly (time, insertion) order.

Nodes without a router ("raw" nodes) only record what they receive and send
whatever a test scripts with :meth:`Simulator.inject`, for protocol attacks.

PX is dialled as the trio driver does on real hosts: the router hands over the
entries it accepted (at most ``max_px_connect`` per PRUNE, only from peers at or
above the accept-PX threshold), and each node runs at most ``max_concurrent_dials``
dials at once with up to ``max_pending_dials`` more waiting (the rest are dropped),
the driver's defaults. A dial takes ``dial_rtts`` round trips of the new link's
latency (TCP + security + muxer handshakes) before the link exists.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from meshmerge.daemon.gossip.router import MESHSUB_12, GossipSubRouter
from meshmerge.proto.gossipsub import RPC, GossipCodecError, Message, decode_rpc, encode_frame
from meshmerge.proto.gossipsub_sign import verify_message

__all__ = ["Network", "SignatureMemo", "SimNode", "Simulator"]

_HEARTBEAT, _FRAME, _PUMP, _CALL = range(4)
_BUCKETS_PER_S = 1000.0  # calendar queue resolution (ordering never depends on it)

_Event = tuple[float, int, int, object]  # (time, insertion seq, kind, payload)


class SignatureMemo:
    """:func:`verify_message` that remembers the messages that passed.

    Keyed by every field the check reads, so a forged copy of a known message
    (other data, other signature) is a different key and is verified. Failures
    are not remembered: they raise as before. Bounded: cleared when full.
    """

    __slots__ = ("_limit", "_ok", "checks", "hits")

    def __init__(self, limit: int = 65536) -> None:
        self._ok: set[tuple[bytes | str | None, ...]] = set()
        self._limit = limit
        self.checks = 0  # signatures actually verified
        self.hits = 0

    def verify(self, msg: Message) -> None:
        key = (msg.from_peer, msg.seqno, msg.topic, msg.data, msg.signature, msg.key)
        if key in self._ok:
            self.hits += 1
            return
        verify_message(msg)
        self.checks += 1
        if len(self._ok) >= self._limit:
            self._ok.clear()
        self._ok.add(key)


@dataclass(slots=True)
class Network:
    latency: tuple[float, float] = (0.005, 0.05)  # one-way latency range per link, seconds
    loss: float = 0.0
    bandwidth: float | None = None  # uplink bytes/s per node


@dataclass(slots=True)
class SimNode:
    index: int
    peer_id: bytes
    ip: str
    router: GossipSubRouter | None
    honest: bool = True
    uplink_free: float = 0.0
    pump_pending: bool = False
    links: dict[bytes, float] = field(default_factory=dict)  # peer id -> latency
    dialing: set[bytes] = field(default_factory=set)  # PX dials in progress
    dial_queue: list[bytes] = field(default_factory=list)  # PX dials waiting for a slot
    px_dials: int = 0  # PX dials completed
    inbox: list[tuple[float, bytes, RPC]] = field(default_factory=list)  # raw nodes only
    decode_errors: int = 0


class Simulator:
    """Event loop over :class:`SimNode` routers; time only advances by popping events."""

    def __init__(
        self,
        network: Network | None = None,
        *,
        seed: int = 0,
        keep_raw_inbox: int = 10000,
        decode_cache: int = 4096,
        dial_px: bool = True,
        max_concurrent_dials: int = 4,
        max_pending_dials: int = 32,
        dial_rtts: float = 3.0,
        signature_memo: int = 65536,
    ) -> None:
        self.net = network or Network()
        self.dial_px = dial_px
        self.max_concurrent_dials = max_concurrent_dials
        self.max_pending_dials = max_pending_dials
        self.dial_rtts = dial_rtts
        self.px_dials_dropped = 0
        self.rng = random.Random(seed)
        self.now = 0.0
        self.nodes: list[SimNode] = []
        self.by_id: dict[bytes, SimNode] = {}
        # calendar queue: _cur is a heap holding every event of buckets <= _cur_bucket;
        # later events sit unsorted in _buckets, whose keys are also in the heap _bucket_ids
        self._cur: list[_Event] = []
        self._cur_bucket = -1
        self._buckets: dict[int, list[_Event]] = {}
        self._bucket_ids: list[int] = []
        self._seq = 0
        self.published: dict[bytes, tuple[float, int]] = {}  # mid -> (time, publisher index)
        self.delivered: dict[bytes, dict[int, float]] = {}  # mid -> node index -> time
        self.on_delivery: Callable[[SimNode, bytes, str, bytes], None] | None = None
        self.frames = 0
        self.bytes = 0
        self.events = 0
        self._keep_raw = keep_raw_inbox
        self._decoded: dict[bytes, RPC] = {}
        self._decode_cache = decode_cache
        self.decodes = 0  # frames actually run through the codec (the rest hit the memo)
        self.signatures = SignatureMemo(signature_memo) if signature_memo else None

    # ------------------------------------------------------------------ setup

    def _push(self, at: float, kind: int, payload: object) -> None:
        self._seq += 1
        b = int(at * _BUCKETS_PER_S)
        if b <= self._cur_bucket:
            heapq.heappush(self._cur, (at, self._seq, kind, payload))
            return
        lst = self._buckets.get(b)
        if lst is None:
            self._buckets[b] = [(at, self._seq, kind, payload)]
            heapq.heappush(self._bucket_ids, b)
        else:
            lst.append((at, self._seq, kind, payload))

    def _next_time(self) -> float | None:
        """Time of the earliest pending event (moving to the next bucket if needed)."""
        cur = self._cur
        while not cur:
            if not self._bucket_ids:
                return None
            b = heapq.heappop(self._bucket_ids)
            cur = self._buckets.pop(b)
            heapq.heapify(cur)
            self._cur = cur
            self._cur_bucket = b
        return cur[0][0]

    def add_node(
        self, router: GossipSubRouter | None, *, peer_id: bytes | None = None, ip: str, honest: bool = True
    ) -> SimNode:
        pid = router.peer_id if router is not None else peer_id
        if pid is None:
            raise ValueError("a raw node needs a peer_id")
        node = SimNode(len(self.nodes), pid, ip, router, honest)
        self.nodes.append(node)
        self.by_id[pid] = node
        if router is not None and router.verify_signatures and self.signatures is not None:
            router.verify = self.signatures.verify
        if router is not None:
            interval = router.params.heartbeat_interval
            self._push(self.now + self.rng.uniform(0.0, interval), _HEARTBEAT, node)
        return node

    def connect(
        self, a: SimNode, b: SimNode, *, protocol: str = MESHSUB_12, latency: float | None = None
    ) -> None:
        """``a`` dials ``b`` (outbound for a, inbound for b)."""
        if b.peer_id in a.links or a is b:
            return
        lat = latency if latency is not None else self.rng.uniform(*self.net.latency)
        a.links[b.peer_id] = lat
        b.links[a.peer_id] = lat
        if a.router is not None:
            a.router.add_peer(b.peer_id, protocol, True, b.ip, self.now)
            self._pump(a)
        if b.router is not None:
            b.router.add_peer(a.peer_id, protocol, False, a.ip, self.now)
            self._pump(b)

    def disconnect(self, a: SimNode, b: SimNode) -> None:
        if b.peer_id not in a.links:
            return
        del a.links[b.peer_id]
        del b.links[a.peer_id]
        for x, y in ((a, b), (b, a)):
            if x.router is not None:
                x.router.remove_peer(y.peer_id, self.now)

    def _dial(self, node: SimNode, peer: bytes) -> None:
        """Bounded dial, as the driver's: ``max_concurrent_dials`` running, a bounded queue."""
        if peer == node.peer_id or peer in node.links or peer in node.dialing or peer not in self.by_id:
            return
        if len(node.dialing) >= self.max_concurrent_dials:
            if peer in node.dial_queue:
                return
            if len(node.dial_queue) >= self.max_pending_dials:
                self.px_dials_dropped += 1
                return
            node.dial_queue.append(peer)
            return
        node.dialing.add(peer)
        lat = self.rng.uniform(*self.net.latency)
        self._push(self.now + 2.0 * lat * self.dial_rtts, _CALL, lambda: self._dialled(node, peer, lat))

    def _dialled(self, node: SimNode, peer: bytes, lat: float) -> None:
        node.dialing.discard(peer)
        other = self.by_id.get(peer)
        if other is not None and peer not in node.links:
            self.connect(node, other, latency=lat)
            node.px_dials += 1
            self.flush_node(node)
            self.flush_node(other)
        while node.dial_queue and len(node.dialing) < self.max_concurrent_dials:
            self._dial(node, node.dial_queue.pop(0))

    def call_at(self, at: float, fn: Callable[[], None]) -> None:
        self._push(at, _CALL, fn)

    # ------------------------------------------------------------------ traffic

    def publish(self, node: SimNode, topic: str, data: bytes) -> bytes:
        assert node.router is not None
        mid = node.router.publish(topic, data, self.now)
        self.published[mid] = (self.now, node.index)
        self.delivered.setdefault(mid, {})
        self.flush_node(node)
        return mid

    def inject(self, src: SimNode, dst: SimNode, rpc: RPC, *, at: float | None = None) -> None:
        """Send a scripted RPC from ``src`` (usually a raw node) over the link to ``dst``."""
        lat = src.links.get(dst.peer_id)
        if lat is None:
            return
        frame = encode_frame(rpc)
        self._push((self.now if at is None else at) + lat, _FRAME, (src.peer_id, dst, frame))

    def _pump(self, node: SimNode) -> None:
        r = node.router
        if r is None:
            return
        bw = self.net.bandwidth
        while True:
            ready = r.peers_with_output()
            if not ready:
                return
            if bw is not None and node.uplink_free > self.now:
                if not node.pump_pending:
                    node.pump_pending = True
                    self._push(node.uplink_free, _PUMP, node)
                return
            for peer in ready:
                frame = r.pop_frame(peer)
                if frame is None:
                    continue
                lat = node.links.get(peer)
                if lat is None:
                    continue
                depart = self.now
                if bw is not None:
                    depart = max(self.now, node.uplink_free) + len(frame) / bw
                    node.uplink_free = depart
                self.frames += 1
                self.bytes += len(frame)
                if self.net.loss and self.rng.random() < self.net.loss:
                    continue
                dst = self.by_id.get(peer)
                if dst is not None:
                    self._push(depart + lat, _FRAME, (node.peer_id, dst, frame))
                if bw is not None and node.uplink_free > self.now:
                    break

    def flush_node(self, node: SimNode) -> None:
        r = node.router
        if r is None:
            return
        # this runs after every event and the take_* calls allocate, so peek at the
        # router's action lists first (same package)
        if r._deliveries:
            for d in r.take_deliveries():
                per = self.delivered.get(d.mid)
                if per is not None and node.index not in per:
                    per[node.index] = self.now
                if self.on_delivery is not None:
                    self.on_delivery(node, d.mid, d.topic, d.data)
        if r._disconnects:
            for peer in r.take_disconnects():
                other = self.by_id.get(peer)
                if other is not None:
                    self.disconnect(node, other)
        if r._connects:
            r.take_connects()  # direct-peer redials are not modelled; the topology is the scenario's
        if r._px:
            offers = r.take_px()
            if self.dial_px:
                for _src, pi in offers:
                    if pi.peer_id:
                        self._dial(node, pi.peer_id)
        if r._ready:
            self._pump(node)

    # ------------------------------------------------------------------ loop

    def run_until(self, t_end: float) -> None:
        decoded = self._decoded
        heappop = heapq.heappop
        next_time = self._next_time
        events = 0
        while True:
            cur = self._cur
            if not cur:
                t = next_time()
                if t is None:
                    break
                cur = self._cur
            if cur[0][0] > t_end:
                break
            at, _, kind, payload = heappop(cur)
            self.now = at
            events += 1
            if kind == _FRAME:
                src: bytes
                dst: SimNode
                frame: bytes
                src, dst, frame = payload  # type: ignore[misc]
                if src not in dst.links:
                    continue  # link closed while in flight
                rpc = decoded.get(frame)
                if rpc is None:
                    try:
                        rpc = _decode_frame(frame)
                    except GossipCodecError:
                        dst.decode_errors += 1
                        continue
                    self.decodes += 1
                    if self._decode_cache:
                        if len(decoded) >= self._decode_cache:
                            decoded.clear()
                        decoded[frame] = rpc
                if dst.router is None:
                    if len(dst.inbox) < self._keep_raw:
                        dst.inbox.append((at, src, rpc))
                    continue
                dst.router.on_rpc(src, rpc, at)
                self.flush_node(dst)
            elif kind == _HEARTBEAT:
                node: SimNode = payload  # type: ignore[assignment]
                assert node.router is not None
                node.router.on_heartbeat(at)
                self.flush_node(node)
                self._push(at + node.router.params.heartbeat_interval, _HEARTBEAT, node)
            elif kind == _PUMP:
                node = payload  # type: ignore[assignment]
                node.pump_pending = False
                self._pump(node)
            else:
                fn: Callable[[], None] = payload  # type: ignore[assignment]
                fn()
        self.events += events
        self.now = max(self.now, t_end)

    # ------------------------------------------------------------------ metrics

    def delivery_stats(
        self,
        honest_only: bool = True,
        mids: list[bytes] | None = None,
        exclude: frozenset[int] = frozenset(),
    ) -> dict[str, float]:
        """Delivery ratio over (message, honest subscriber) pairs and latency percentiles
        (nodes whose index is in ``exclude``, e.g. bootstrappers, are not counted)."""
        targets = [
            n
            for n in self.nodes
            if n.router is not None and (n.honest or not honest_only) and n.index not in exclude
        ]
        lat: list[float] = []
        want = got = 0
        for mid in mids if mids is not None else list(self.published):
            t0, src = self.published[mid]
            per = self.delivered.get(mid, {})
            for n in targets:
                if n.index == src:
                    continue
                want += 1
                t = per.get(n.index)
                if t is not None:
                    got += 1
                    lat.append(t - t0)
        lat.sort()

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

        return {
            "pairs": float(want),
            "delivered": float(got),
            "ratio": got / want if want else 1.0,
            "p50": pct(0.5),
            "p99": pct(0.99),
            "max": lat[-1] if lat else float("nan"),
        }


def _decode_frame(frame: bytes) -> RPC:
    n = 0
    shift = 0
    i = 0
    while True:
        b = frame[i]
        n |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            break
        shift += 7
    if i + n != len(frame):
        raise GossipCodecError("frame length mismatch")
    return decode_rpc(frame[i:])
