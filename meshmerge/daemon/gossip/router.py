"""GossipSub v1.1/v1.2 router as a sans-I/O state machine.

Theory of operation
-------------------
Rule 1: every GossipSub rule (mesh, fanout, gossip, GRAFT/PRUNE/backoff, PX,
IHAVE/IWANT/IDONTWANT limits, score thresholds, validation bookkeeping) lives
in this module. Rule 2: it does no I/O and reads no clock: every event carries
``now`` (seconds), and randomness comes from the ``rng`` it is given, so a
simulator can replay a run exactly.

Events in::

    add_peer(peer, protocol, outbound, ip, now)   remove_peer(peer, now)
    on_rpc(peer, rpc, now)                        on_heartbeat(now)
    subscribe(topic, now) / unsubscribe(topic, now)
    publish(topic, data, now)                     report_validation(mid, result, now)

Actions out (the driver drains them after each event)::

    pop_frame(peer)      length-prefixed RPC bytes to write to the peer's stream
    take_disconnects()   peers to drop (graylist is not enough: slow or over-limit peers)
    take_connects()      direct peers to (re)dial
    take_px()            (source, PeerInfo) offered by PX from peers above accept-PX, to verify and dial
    take_deliveries()    validated messages for the application
    take_validations()   messages waiting for an asynchronous validator verdict

Every outgoing queue is bounded in frames and bytes; a peer whose queue
overflows is disconnected rather than buffered without limit. Pending
validations are bounded per peer and in total; per-heartbeat counters bound
IHAVE/IWANT/IDONTWANT work, so a spamming peer costs O(limits) per heartbeat.

Scores come from :class:`~meshmerge.daemon.gossip.score.PeerScore`; the
thresholds gate what the spec says they gate: gossip (IHAVE/IWANT both ways),
publish (flood/fanout targets), graylist (whole RPCs ignored), accept-PX and
the opportunistic-grafting median.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshmerge.daemon.gossip.caches import MessageCache, SeenCache
from meshmerge.daemon.gossip.frames import FrameEncoder
from meshmerge.daemon.gossip.params import GossipSubParams, PeerScoreParams, PeerScoreThresholds
from meshmerge.daemon.gossip.score import PeerScore, RejectReason
from meshmerge.proto.gossipsub import (
    RPC,
    ControlGraft,
    ControlIDontWant,
    ControlIHave,
    ControlIWant,
    ControlMessage,
    ControlPrune,
    Message,
    PeerInfo,
    SubOpts,
)
from meshmerge.proto.gossipsub_sign import (
    Ed25519Identity,
    SignatureError,
    message_id,
    sign_message,
    verify_message,
)

__all__ = [
    "FLOODSUB",
    "MESHSUB_10",
    "MESHSUB_11",
    "MESHSUB_12",
    "Delivery",
    "GossipSubRouter",
    "PendingValidation",
    "Validation",
]

MESHSUB_12 = "/meshsub/1.2.0"
MESHSUB_11 = "/meshsub/1.1.0"
MESHSUB_10 = "/meshsub/1.0.0"
FLOODSUB = "/floodsub/1.0.0"
PROTOCOLS = (MESHSUB_12, MESHSUB_11, MESHSUB_10, FLOODSUB)


class Validation(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"  # invalid: penalise the sender (P4)
    IGNORE = "ignore"  # drop without penalty


@dataclass(frozen=True, slots=True)
class Delivery:
    """A validated message handed to the application."""

    mid: bytes
    topic: str
    data: bytes
    author: bytes
    received_from: bytes
    at: float


@dataclass(frozen=True, slots=True)
class PendingValidation:
    mid: bytes
    topic: str
    message: Message
    received_from: bytes


Validator = Callable[[str, Message, bytes], "Validation | None"]
RecordLookup = Callable[[bytes], "bytes | None"]
"""``peer id -> signed peer record`` (marshalled envelope) to attach to the PX entries we send."""


class _Peer:
    __slots__ = (
        "counters_tick",
        "dontwant",
        "gossipsub",
        "iasked",
        "idontwant_count",
        "ihave_count",
        "ips",
        "outbound",
        "pending_validations",
        "protocol",
        "queue",
        "queue_bytes",
        "topics",
        "v11",
        "v12",
    )

    def __init__(self, protocol: str, outbound: bool, ips: tuple[str, ...]) -> None:
        self.protocol = protocol
        self.outbound = outbound
        self.ips = ips
        self.topics: set[str] = set()
        self.queue: deque[bytes] = deque()
        self.queue_bytes = 0
        self.pending_validations = 0
        self.ihave_count = 0
        self.iasked = 0
        self.idontwant_count = 0
        self.counters_tick = 0  # heartbeat the three per-heartbeat counters above belong to
        self.dontwant: dict[bytes, int] = {}  # mid -> heartbeat tick after which it is forgotten
        self.gossipsub = protocol != FLOODSUB
        self.v11 = protocol in (MESHSUB_11, MESHSUB_12)
        self.v12 = protocol == MESHSUB_12


@dataclass(slots=True)
class RouterStats:
    """Counters for metrics and tests; every drop has a named reason."""

    rpcs_in: int = 0
    rpcs_graylisted: int = 0
    messages_invalid_signature: int = 0
    messages_duplicate: int = 0
    messages_not_subscribed: int = 0
    messages_throttled: int = 0
    messages_delivered: int = 0
    ihave_ignored: int = 0
    iwant_ignored: int = 0
    graft_unknown_topic: int = 0
    graft_backoff_violations: int = 0
    idontwant_ignored: int = 0
    slow_peer_disconnects: int = 0
    frames_out: int = 0
    bytes_out: int = 0


class GossipSubRouter:
    """One node's GossipSub router. See the module docstring for the event/action contract."""

    def __init__(
        self,
        identity: Ed25519Identity,
        *,
        params: GossipSubParams | None = None,
        score_params: PeerScoreParams | None = None,
        thresholds: PeerScoreThresholds | None = None,
        validator: Validator | None = None,
        direct_peers: Iterable[bytes] = (),
        rng: random.Random | None = None,
        now: float = 0.0,
        verify_signatures: bool = True,
        peer_record: RecordLookup | None = None,
    ) -> None:
        self.params = params or GossipSubParams()
        self.params.validate()
        self.thresholds = thresholds or PeerScoreThresholds()
        self.thresholds.validate()
        self.identity = identity
        self.peer_id = identity.peer_id
        self.score: PeerScore | None = (
            PeerScore(score_params, now=now, delivery_record_ttl=self.params.seen_ttl)
            if score_params
            else None
        )
        self.validator = validator
        self.direct = set(direct_peers)
        self.rng = rng or random.Random()
        self.verify_signatures = verify_signatures
        # the signature check; a simulator may swap in a memo shared by its routers
        # (the verdict is a pure function of the message fields)
        self.verify: Callable[[Message], None] = verify_message
        self.peer_record = peer_record
        self.stats = RouterStats()

        self.peers: dict[bytes, _Peer] = {}
        self.topics: dict[str, set[bytes]] = {}  # remote subscriptions
        self.subscriptions: set[str] = set()
        self.mesh: dict[str, set[bytes]] = {}
        self.fanout: dict[str, set[bytes]] = {}
        self.fanout_lastpub: dict[str, float] = {}
        self.backoff: dict[str, dict[bytes, float]] = {}
        self.mcache = MessageCache(self.params.history_length, self.params.history_gossip)
        self.seen = SeenCache(self.params.seen_ttl)
        self.promises: dict[bytes, dict[bytes, float]] = {}  # mid -> peer -> deadline
        self.pending: dict[bytes, tuple[PendingValidation, float]] = {}
        self.heartbeat_ticks = 0
        self._seqno = int(now * 1e9) & ((1 << 63) - 1)
        self._out: dict[bytes, RPC] = {}
        self._frames = FrameEncoder()  # a message sent to many peers in one flush is encoded once
        self._ready: dict[bytes, None] = {}  # peers with queued frames, in arrival order
        self._disconnects: list[bytes] = []
        self._connects: list[bytes] = []
        self._px: list[tuple[bytes, PeerInfo]] = []
        self._deliveries: list[Delivery] = []
        self._validations: list[PendingValidation] = []
        self._dontwant_peers: set[bytes] = set()  # peers with IDONTWANT entries to expire
        self._floodsub_peers: set[bytes] = set()  # never mesh, gossip or fanout candidates

    # ================================================================== helpers

    def peer_score(self, peer: bytes) -> float:
        return self.score.score(peer) if self.score is not None else 0.0

    def _rpc(self, peer: bytes) -> RPC:
        rpc = self._out.get(peer)
        if rpc is None:
            rpc = self._out[peer] = RPC()
        return rpc

    def _ctl(self, peer: bytes) -> ControlMessage:
        rpc = self._rpc(peer)
        if rpc.control is None:
            rpc.control = ControlMessage()
        return rpc.control

    def _flush(self) -> None:
        out, self._out = self._out, {}
        p = self.params
        for peer, rpc in out.items():
            st = self.peers.get(peer)
            if st is None or rpc.is_empty():
                continue
            frame = self._frames.encode(rpc)
            if (
                len(st.queue) + 1 > p.max_peer_queue_messages
                or st.queue_bytes + len(frame) > p.max_peer_queue_bytes
            ):
                self.stats.slow_peer_disconnects += 1
                st.queue.clear()
                st.queue_bytes = 0
                self._ready.pop(peer, None)
                if peer not in self._disconnects:
                    self._disconnects.append(peer)
                continue
            st.queue.append(frame)
            st.queue_bytes += len(frame)
            self._ready[peer] = None
        self._frames.reset()

    def _reset_counters(self, st: _Peer) -> None:
        """Per-heartbeat IHAVE/IWANT/IDONTWANT counters start at zero on each heartbeat
        (reset on first use rather than for every peer on every heartbeat)."""
        if st.counters_tick != self.heartbeat_ticks:
            st.counters_tick = self.heartbeat_ticks
            st.ihave_count = st.iasked = st.idontwant_count = 0

    def _backoff_active(self, topic: str, peer: bytes, now: float) -> bool:
        exp = self.backoff.get(topic, {}).get(peer)
        return exp is not None and now < exp

    def _add_backoff(self, peer: bytes, topic: str, seconds: float, now: float) -> None:
        seconds = min(max(seconds, 0.0), self.params.max_backoff)
        per_topic = self.backoff.setdefault(topic, {})
        exp = now + seconds
        if per_topic.get(peer, 0.0) < exp:
            per_topic[peer] = exp

    def _make_prune(
        self, peer: bytes, topic: str, do_px: bool, unsubscribe: bool, now: float
    ) -> ControlPrune:
        st = self.peers[peer]
        if not st.v11:
            return ControlPrune(topic=topic)
        backoff = self.params.unsubscribe_backoff if unsubscribe else self.params.prune_backoff
        px: list[PeerInfo] = []
        if do_px and self.params.do_px:
            members = self.topics.get(topic, ())
            score = self.peer_score
            cands = sorted(p for p in members if p != peer and p in self.peers and score(p) >= 0)
            self.rng.shuffle(cands)
            # best-scoring first, ties in random order (go picks at random among score >= 0):
            # a bootstrapper has no mesh, so its only evidence is who delivered messages to it
            # (P2 from flood publishes and IWANT replies); Sybils that relay nothing stay at 0
            # and are offered only when there are not enough proven peers
            cands.sort(key=score, reverse=True)
            lookup = self.peer_record
            px = [
                PeerInfo(peer_id=p, signed_peer_record=lookup(p) if lookup is not None else None)
                for p in cands[: self.params.prune_peers]
            ]
        return ControlPrune(topic=topic, peers=px, backoff=int(backoff))

    def _graft(self, peer: bytes, topic: str, now: float) -> None:
        self.mesh[topic].add(peer)
        if self.score is not None:
            self.score.graft(peer, topic, now)
        self._ctl(peer).graft.append(ControlGraft(topic))

    def _prune(
        self, peer: bytes, topic: str, now: float, *, do_px: bool = True, unsubscribe: bool = False
    ) -> None:
        self.mesh[topic].discard(peer)
        if self.score is not None:
            self.score.prune(peer, topic)
        self._add_backoff(
            peer, topic, self.params.unsubscribe_backoff if unsubscribe else self.params.prune_backoff, now
        )
        self._ctl(peer).prune.append(self._make_prune(peer, topic, do_px, unsubscribe, now))

    def _candidates(self, topic: str, exclude: set[bytes], pred: Callable[[bytes], bool]) -> list[bytes]:
        members = self.topics.get(topic)
        if not members:
            return []
        skip = exclude | self.direct if self.direct else exclude
        if self._floodsub_peers:
            skip = skip | self._floodsub_peers
        # sorted first so a seeded rng gives the same choice in every process (bytes hashing is salted)
        out = sorted([p for p in members if p not in skip and pred(p)])
        self.rng.shuffle(out)
        return out

    # ================================================================== peers

    def add_peer(
        self, peer: bytes, protocol: str, outbound: bool, ip: str | Iterable[str] = (), now: float = 0.0
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unsupported pubsub protocol {protocol!r}")
        ips = (ip,) if isinstance(ip, str) else tuple(ip)
        if peer in self.peers:
            return
        self.peers[peer] = st = _Peer(protocol, outbound, ips)
        if not st.gossipsub:
            self._floodsub_peers.add(peer)
        if self.score is not None:
            self.score.add_peer(peer, ips, now)
        if self.subscriptions:
            self._rpc(peer).subscriptions.extend(SubOpts(True, t) for t in sorted(self.subscriptions))
        self._flush()

    def remove_peer(self, peer: bytes, now: float) -> None:
        st = self.peers.pop(peer, None)
        if st is None:
            return
        self._floodsub_peers.discard(peer)
        self._dontwant_peers.discard(peer)
        for topic in st.topics:
            members = self.topics.get(topic)
            if members is not None:
                members.discard(peer)
                if not members:
                    del self.topics[topic]
        for group in (self.mesh, self.fanout):
            for members in group.values():
                members.discard(peer)
        if self.score is not None:
            self.score.remove_peer(peer, now)
        self._out.pop(peer, None)
        self._ready.pop(peer, None)

    # ================================================================== output side

    def pop_frame(self, peer: bytes) -> bytes | None:
        st = self.peers.get(peer)
        if st is None or not st.queue:
            return None
        frame = st.queue.popleft()
        st.queue_bytes -= len(frame)
        if not st.queue:
            self._ready.pop(peer, None)
        self.stats.frames_out += 1
        self.stats.bytes_out += len(frame)
        return frame

    def peers_with_output(self) -> list[bytes]:
        return list(self._ready)

    def queued_bytes(self, peer: bytes) -> int:
        st = self.peers.get(peer)
        return st.queue_bytes if st else 0

    def take_disconnects(self) -> list[bytes]:
        out, self._disconnects = self._disconnects, []
        return out

    def take_connects(self) -> list[bytes]:
        out, self._connects = self._connects, []
        return out

    def take_px(self) -> list[tuple[bytes, PeerInfo]]:
        out, self._px = self._px, []
        return out

    def take_deliveries(self) -> list[Delivery]:
        out, self._deliveries = self._deliveries, []
        return out

    def take_validations(self) -> list[PendingValidation]:
        out, self._validations = self._validations, []
        return out

    # ================================================================== subscriptions

    def subscribe(self, topic: str, now: float) -> None:
        if topic in self.subscriptions:
            return
        self.subscriptions.add(topic)
        for peer in self.peers:
            self._rpc(peer).subscriptions.append(SubOpts(True, topic))
        mesh: set[bytes] = set()
        self.mesh[topic] = mesh
        fan = self.fanout.pop(topic, set())
        self.fanout_lastpub.pop(topic, None)
        for p in sorted(fan):
            if (
                len(mesh) < self.params.d
                and p in self.peers
                and self.peer_score(p) >= 0
                and not self._backoff_active(topic, p, now)
            ):
                self._graft(p, topic, now)
        if len(mesh) < self.params.d:
            more = self._candidates(
                topic, mesh, lambda p: self.peer_score(p) >= 0 and not self._backoff_active(topic, p, now)
            )
            for p in more[: self.params.d - len(mesh)]:
                self._graft(p, topic, now)
        self._flush()

    def unsubscribe(self, topic: str, now: float) -> None:
        if topic not in self.subscriptions:
            return
        self.subscriptions.discard(topic)
        for peer in self.peers:
            self._rpc(peer).subscriptions.append(SubOpts(False, topic))
        for p in sorted(self.mesh.get(topic, ())):
            self._prune(p, topic, now, unsubscribe=True)
        self.mesh.pop(topic, None)
        self._flush()

    # ================================================================== publishing

    def publish(self, topic: str, data: bytes, now: float) -> bytes:
        """Sign and send our own message; returns its message id."""
        if len(data) > self.params.max_message_size:
            raise ValueError(
                f"message is {len(data)} bytes, max_message_size is {self.params.max_message_size}"
            )
        self._seqno = (self._seqno + 1) & ((1 << 64) - 1)
        msg = sign_message(
            self.identity, Message(data=data, seqno=self._seqno.to_bytes(8, "big"), topic=topic)
        )
        mid = message_id(msg)
        self.seen.add(mid, now)
        self.mcache.put(mid, msg)
        self._forward(msg, mid, topic, self.peer_id, now)
        self._flush()
        return mid

    def _forward(self, msg: Message, mid: bytes, topic: str, source: bytes, now: float) -> None:
        p = self.params
        members = self.topics.get(topic, set())
        to: set[bytes] = set()
        if p.flood_publish and source == self.peer_id:
            pt = self.thresholds.publish_threshold
            to = {q for q in members if q in self.direct or self.peer_score(q) >= pt}
        else:
            to |= members & self.direct
            for q in members:
                if not self.peers[q].gossipsub and self.peer_score(q) >= self.thresholds.publish_threshold:
                    to.add(q)
            mesh = self.mesh.get(topic)
            if mesh is None:
                fan = self.fanout.get(topic)
                if not fan:
                    cands = self._candidates(
                        topic, set(), lambda q: self.peer_score(q) >= self.thresholds.publish_threshold
                    )
                    fan = set(cands[: p.d])
                    if fan:
                        self.fanout[topic] = fan
                self.fanout_lastpub[topic] = now
                mesh = fan or set()
            to |= mesh
        author = msg.from_peer
        for q in sorted(to):
            if q in (source, author):
                continue
            st = self.peers.get(q)
            if st is None or mid in st.dontwant:
                continue
            self._rpc(q).publish.append(msg)

    # ================================================================== incoming

    def on_rpc(self, peer: bytes, rpc: RPC, now: float) -> None:
        st = self.peers.get(peer)
        if st is None:
            return
        self.stats.rpcs_in += 1
        if peer not in self.direct and self.peer_score(peer) < self.thresholds.graylist_threshold:
            self.stats.rpcs_graylisted += 1
            return
        for sub in rpc.subscriptions:
            self._handle_subscription(peer, st, sub, now)
        for msg in rpc.publish:
            self._handle_message(peer, msg, now)
        ctl = rpc.control
        if ctl is not None and st.gossipsub:
            iwant = self._handle_ihave(peer, st, ctl.ihave, now)
            if iwant:
                self._ctl(peer).iwant.append(ControlIWant(iwant))
            self._handle_iwant(peer, ctl.iwant, now)
            self._handle_graft(peer, st, ctl.graft, now)
            self._handle_prune(peer, st, ctl.prune, now)
            self._handle_idontwant(peer, st, ctl.idontwant)
        self._flush()

    def _handle_subscription(self, peer: bytes, st: _Peer, sub: SubOpts, now: float) -> None:
        topic = sub.topic
        if topic is None:
            return
        if sub.subscribe:
            if topic not in self.topics and len(self.topics) >= self.params.max_topics:
                return
            self.topics.setdefault(topic, set()).add(peer)
            st.topics.add(topic)
        else:
            st.topics.discard(topic)
            members = self.topics.get(topic)
            if members is not None:
                members.discard(peer)
                if not members:
                    del self.topics[topic]
            mesh = self.mesh.get(topic)
            if mesh is not None and peer in mesh:
                mesh.discard(peer)
                if self.score is not None:
                    self.score.prune(peer, topic)
            fan = self.fanout.get(topic)
            if fan is not None:
                fan.discard(peer)

    def _handle_message(self, peer: bytes, msg: Message, now: float) -> None:
        topic = msg.topic
        if topic is None or topic not in self.subscriptions:
            self.stats.messages_not_subscribed += 1
            return
        mid = message_id(msg)
        sc = self.score
        if msg.from_peer == self.peer_id:
            if sc is not None:
                sc.reject_message(peer, mid, topic, RejectReason.SELF_ORIGIN, now)
            return
        if mid in self.seen.ids:
            self.stats.messages_duplicate += 1
            if sc is not None:
                sc.duplicate_message(peer, mid, topic, now)
            return
        if len(msg.data or b"") > self.params.max_message_size:
            if sc is not None:
                sc.reject_message(peer, mid, topic, RejectReason.INVALID_SIGNATURE, now)
            return
        if self.verify_signatures:
            try:
                self.verify(msg)
            except SignatureError as exc:
                self.stats.messages_invalid_signature += 1
                if sc is not None:
                    sc.reject_message(peer, mid, topic, exc.reason, now)
                return
        st = self.peers[peer]
        if (
            st.pending_validations >= self.params.max_pending_validations_per_peer
            or len(self.pending) >= self.params.max_pending_validations
        ):
            self.stats.messages_throttled += 1
            return
        self.seen.add(mid, now)
        if sc is not None:
            sc.validate_message(mid, now)
        if len(msg.data or b"") >= self.params.idontwant_message_threshold:
            for q in self.mesh.get(topic, ()):
                if q != peer and q != msg.from_peer and self.peers[q].v12:
                    self._ctl(q).idontwant.append(ControlIDontWant([mid]))
        verdict = Validation.ACCEPT if self.validator is None else self.validator(topic, msg, peer)
        if verdict is None:
            pv = PendingValidation(mid, topic, msg, peer)
            self.pending[mid] = (pv, now)
            st.pending_validations += 1
            self._validations.append(pv)
            return
        self._finish(mid, topic, msg, peer, verdict, now)

    def report_validation(self, mid: bytes, result: Validation, now: float) -> None:
        """Verdict of an asynchronous validator for a message from :meth:`take_validations`."""
        entry = self.pending.pop(mid, None)
        if entry is None:
            return
        pv, _ = entry
        st = self.peers.get(pv.received_from)
        if st is not None:
            st.pending_validations -= 1
        self._finish(mid, pv.topic, pv.message, pv.received_from, result, now)
        self._flush()

    def _finish(
        self, mid: bytes, topic: str, msg: Message, source: bytes, result: Validation, now: float
    ) -> None:
        sc = self.score
        self.promises.pop(mid, None)
        if result is Validation.ACCEPT:
            if sc is not None:
                sc.deliver_message(source, mid, topic, now)
            self.mcache.put(mid, msg)
            self.stats.messages_delivered += 1
            self._deliveries.append(Delivery(mid, topic, msg.data or b"", msg.from_peer or b"", source, now))
            if topic in self.subscriptions:
                self._forward(msg, mid, topic, source, now)
        elif result is Validation.REJECT:
            if sc is not None:
                sc.reject_message(source, mid, topic, RejectReason.VALIDATION_FAILED, now)
        elif sc is not None:
            sc.reject_message(source, mid, topic, RejectReason.VALIDATION_IGNORED, now)

    def _handle_ihave(self, peer: bytes, st: _Peer, ihaves: list[ControlIHave], now: float) -> list[bytes]:
        if not ihaves:
            return []
        p = self.params
        if self.peer_score(peer) < self.thresholds.gossip_threshold:
            self.stats.ihave_ignored += len(ihaves)
            return []
        self._reset_counters(st)
        st.ihave_count += 1
        if st.ihave_count > p.max_ihave_messages or st.iasked >= p.max_ihave_length:
            self.stats.ihave_ignored += len(ihaves)
            return []
        want: dict[bytes, None] = {}
        budget = p.max_ihave_length - st.iasked
        seen = self.seen.ids
        for ih in ihaves:
            if ih.topic is None or ih.topic not in self.mesh:
                continue
            for mid in ih.message_ids[: p.max_ihave_length]:
                if mid not in seen and mid not in want:
                    want[mid] = None
                    if len(want) >= budget:
                        break
            if len(want) >= budget:
                break
        if not want:
            return []
        ids = list(want)
        self.rng.shuffle(ids)
        st.iasked += len(ids)
        # promise tracking: one random id per IWANT must arrive within the follow-up time
        self.promises.setdefault(ids[0], {}).setdefault(peer, now + p.iwant_followup_time)
        return ids

    def _handle_iwant(self, peer: bytes, iwants: list[ControlIWant], now: float) -> None:
        if not iwants:
            return
        if self.peer_score(peer) < self.thresholds.gossip_threshold:
            self.stats.iwant_ignored += len(iwants)
            return
        sent: set[bytes] = set()
        for iw in iwants:
            for mid in iw.message_ids:
                if mid in sent:
                    continue
                msg, count = self.mcache.get_for_peer(mid, peer)
                if msg is None:
                    continue
                if count > self.params.gossip_retransmission:
                    self.stats.iwant_ignored += 1
                    continue
                sent.add(mid)
                self._rpc(peer).publish.append(msg)

    def _handle_graft(self, peer: bytes, st: _Peer, grafts: list[ControlGraft], now: float) -> None:
        if not grafts:
            return
        p = self.params
        score = self.peer_score(peer)
        prune: list[str] = []
        do_px = p.do_px
        for gr in grafts:
            topic = gr.topic
            mesh = self.mesh.get(topic) if topic is not None else None
            if topic is None or mesh is None:
                self.stats.graft_unknown_topic += 1
                do_px = False  # do not leak peers for topics we do not know
                continue
            if peer in mesh:
                continue
            if peer in self.direct:
                prune.append(topic)
                do_px = False
                continue
            exp = self.backoff.get(topic, {}).get(peer)
            if exp is not None and now < exp:
                self.stats.graft_backoff_violations += 1
                if self.score is not None:
                    self.score.add_penalty(peer, 1)
                    if now < exp + p.graft_flood_threshold - p.prune_backoff:
                        self.score.add_penalty(peer, 1)  # flooding GRAFTs right after a PRUNE
                do_px = False
                self._add_backoff(peer, topic, p.prune_backoff, now)
                prune.append(topic)
                continue
            if score < 0:
                do_px = False
                self._add_backoff(peer, topic, p.prune_backoff, now)
                prune.append(topic)
                continue
            if len(mesh) >= p.d_hi and (not st.outbound or p.d_hi == 0):
                # full; outbound peers may exceed D_hi (spec), except at a bootstrapper (no mesh)
                self._add_backoff(peer, topic, p.prune_backoff, now)
                prune.append(topic)
                continue
            mesh.add(peer)
            if self.score is not None:
                self.score.graft(peer, topic, now)
        for topic in prune:
            self._ctl(peer).prune.append(self._make_prune(peer, topic, do_px, False, now))

    def _handle_prune(self, peer: bytes, st: _Peer, prunes: list[ControlPrune], now: float) -> None:
        for pr in prunes:
            topic = pr.topic
            mesh = self.mesh.get(topic) if topic is not None else None
            if topic is None or mesh is None:
                continue
            if peer in mesh:
                mesh.discard(peer)
                if self.score is not None:
                    self.score.prune(peer, topic)
            backoff = float(pr.backoff) if pr.backoff else self.params.prune_backoff
            self._add_backoff(peer, topic, backoff, now)
            if pr.peers and self.peer_score(peer) >= self.thresholds.accept_px_threshold:
                known = {pi.peer_id for _, pi in self._px}
                cands = [
                    pi
                    for pi in pr.peers
                    if pi.peer_id and pi.peer_id not in self.peers and pi.peer_id != self.peer_id
                ]
                self.rng.shuffle(cands)
                for pi in cands[: self.params.max_px_connect]:
                    if pi.peer_id not in known and len(self._px) < self.params.max_px_connect:
                        known.add(pi.peer_id)
                        self._px.append((peer, pi))

    def _handle_idontwant(self, peer: bytes, st: _Peer, idws: list[ControlIDontWant]) -> None:
        if not idws:
            return
        p = self.params
        self._reset_counters(st)
        st.idontwant_count += 1
        if st.idontwant_count > p.max_idontwant_messages:
            self.stats.idontwant_ignored += len(idws)
            return
        taken = 0
        expire = self.heartbeat_ticks + p.idontwant_message_ttl
        for idw in idws:
            for mid in idw.message_ids:
                if taken >= p.max_idontwant_length:
                    self.stats.idontwant_ignored += 1
                    return
                taken += 1
                st.dontwant[mid] = expire
                self._dontwant_peers.add(peer)

    # ================================================================== heartbeat

    def on_heartbeat(self, now: float) -> None:
        p = self.params
        th = self.thresholds
        self.heartbeat_ticks += 1
        tick = self.heartbeat_ticks
        if self.score is not None:
            self.score.tick(now)
        self._apply_broken_promises(now)
        for q in list(self._dontwant_peers):
            st = self.peers.get(q)
            if st is not None:
                st.dontwant = {m: e for m, e in st.dontwant.items() if e > tick}
            if st is None or not st.dontwant:
                self._dontwant_peers.discard(q)
        # scores are computed once per heartbeat (as go does): decay just changed all of them,
        # and nearly every peer is looked at below
        sc = self.score
        scores = dict.fromkeys(self.peers, 0.0) if sc is None else {q: sc.score(q) for q in self.peers}
        score = scores.__getitem__
        gossip_ids = self.mcache.gossip_ids_by_topic()

        for topic, mesh in self.mesh.items():
            for q in sorted(q for q in mesh if score(q) < 0):
                self._prune(q, topic, now, do_px=False)
            backoff = self.backoff.get(topic, {})

            def free(q: bytes, _m: set[bytes] = mesh, _b: dict[bytes, float] = backoff) -> bool:
                return q not in _m and not (q in _b and now < _b[q])

            if len(mesh) < p.d_lo:
                for q in self._candidates(topic, mesh, lambda q: free(q) and score(q) >= 0)[
                    : p.d - len(mesh)
                ]:
                    self._graft(q, topic, now)
            if len(mesh) > p.d_hi:
                plst = sorted(mesh)
                self.rng.shuffle(plst)
                plst.sort(key=score, reverse=True)
                rest = plst[p.d_score :]
                self.rng.shuffle(rest)
                plst[p.d_score :] = rest
                keep = plst[: p.d]
                outbound = sum(1 for q in keep if self.peers[q].outbound)
                if outbound < p.d_out:
                    # keep Dout outbound peers: swap in the best outbound peers beyond D for the
                    # lowest-ranked inbound ones (outbound links are the ones Sybils cannot force)
                    extra = [q for q in plst[p.d :] if self.peers[q].outbound][: p.d_out - outbound]
                    inbound = [q for q in keep if not self.peers[q].outbound]
                    dropped = set(inbound[len(inbound) - len(extra) :]) if extra else set()
                    keep = [q for q in keep if q not in dropped] + extra
                kept = set(keep)
                for q in plst:
                    if q not in kept:
                        self._prune(q, topic, now)
            if len(mesh) >= p.d_lo:
                outbound = sum(1 for q in mesh if self.peers[q].outbound)
                if outbound < p.d_out:
                    cands = self._candidates(
                        topic, mesh, lambda q: free(q) and self.peers[q].outbound and score(q) >= 0
                    )
                    for q in cands[: p.d_out - outbound]:
                        self._graft(q, topic, now)
            if tick % p.opportunistic_graft_ticks == 0 and len(mesh) > 1:
                ranked = sorted(sorted(mesh), key=score)
                median = score(ranked[len(ranked) // 2])
                if median < th.opportunistic_graft_threshold:
                    above = {q for q in self.topics.get(topic, ()) if score(q) > median}

                    def above_median(q: bytes, _ok: set[bytes] = above) -> bool:
                        return free(q) and q in _ok

                    cands = self._candidates(topic, mesh, above_median)
                    for q in cands[: p.opportunistic_graft_peers]:
                        self._graft(q, topic, now)
            self._emit_gossip(topic, mesh, gossip_ids.get(topic, []), score)

        for topic in [t for t, last in self.fanout_lastpub.items() if last + p.fanout_ttl < now]:
            self.fanout.pop(topic, None)
            self.fanout_lastpub.pop(topic, None)
        for topic, fan in self.fanout.items():
            members = self.topics.get(topic, set())
            for q in [q for q in fan if q not in members or score(q) < th.publish_threshold]:
                fan.discard(q)
            if len(fan) < p.d:
                cands = self._candidates(topic, fan, lambda q: score(q) >= th.publish_threshold)
                fan.update(cands[: p.d - len(fan)])
            self._emit_gossip(topic, fan, gossip_ids.get(topic, []), score)

        if tick % 15 == 0:
            for topic in list(self.backoff):
                per = {q: e for q, e in self.backoff[topic].items() if e + 2 * p.heartbeat_interval > now}
                if per:
                    self.backoff[topic] = per
                else:
                    del self.backoff[topic]
        if tick % 300 == 0:
            for q in self.direct:
                if q not in self.peers and q not in self._connects:
                    self._connects.append(q)
        self._expire_pending(now)
        self.seen.expire(now)
        self.mcache.shift()
        self._flush()

    def _emit_gossip(
        self, topic: str, exclude: set[bytes], mids: list[bytes], score: Callable[[bytes], float]
    ) -> None:
        if not mids:
            return
        p = self.params
        gt = self.thresholds.gossip_threshold
        cands = self._candidates(topic, exclude, lambda q: score(q) >= gt)
        target = max(p.d_lazy, int(p.gossip_factor * len(cands)))
        shared: ControlIHave | None = None  # one object for every target: encoded once per flush
        for q in cands[:target]:
            if len(mids) > p.max_ihave_length:
                ih = ControlIHave(topic, self.rng.sample(mids, p.max_ihave_length))
            else:
                if shared is None:
                    shared = ControlIHave(topic, list(mids))
                ih = shared
            self._ctl(q).ihave.append(ih)

    def _apply_broken_promises(self, now: float) -> None:
        if not self.promises:
            return
        broken: dict[bytes, int] = {}
        for mid in list(self.promises):
            per = self.promises[mid]
            for q in [q for q, deadline in per.items() if deadline < now]:
                broken[q] = broken.get(q, 0) + 1
                del per[q]
            if not per:
                del self.promises[mid]
        if self.score is not None:
            for q, n in broken.items():
                self.score.add_penalty(q, n)

    def _expire_pending(self, now: float) -> None:
        limit = self.params.seen_ttl
        for mid in [m for m, (_, t) in self.pending.items() if now - t > limit]:
            self.report_validation(mid, Validation.IGNORE, now)
