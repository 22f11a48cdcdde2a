"""GossipSub v1.1 peer scoring (P1–P7), sans-I/O: every event carries ``now``.

Theory of operation
-------------------
The router reports what happens (peer added/removed, GRAFT/PRUNE, a message
validated, rejected or seen again, a protocol misbehaviour) and asks for
``score(peer)``. Counters follow go-libp2p-pubsub exactly:

* P1 uses the mesh time measured at the last decay tick, in whole quanta, capped.
* P2 counts first deliveries of valid messages (capped on increment).
* P3 counts first and near-first (within ``mesh_message_deliveries_window`` of
  validation, or while validation was still running) deliveries by mesh peers;
  it turns into a penalty only after the peer has been in the mesh for the
  activation period, and only while below the threshold.
* P3b: on PRUNE (or disconnect while in the mesh) an active deficit² becomes a
  sticky penalty that decays.
* P4: invalid messages, squared. P7: behaviour penalty above a threshold, squared.
* P5 is the application's hook (e.g. the reputation layer); P6 penalises the
  surplus of peers sharing an IP, squared, unless the IP is whitelisted.
* ``tick(now)`` applies decay once per ``decay_interval`` (not per heartbeat) and
  forgets disconnected peers whose retention expired. Counters of disconnected
  peers are not decayed, so disconnecting does not wash a bad score; only
  non-positive scores are retained, as in go.

Scores are cached per peer and invalidated by every change to that peer's
counters; P5 comes from outside, so the application calls :meth:`invalidate`
when its own opinion changes.

The per-topic counters and the P1–P4 arithmetic (decay, then
``topic_weight · (w1·P1 + w2·P2 + w3·P3 + w3b·P3b + w4·P4)``) are compiled in
:mod:`meshmerge.cext.gossip_score`: every router re-scores every peer once per
decay interval, which dominated the attack simulator. The compiled code does the
same double operations in the same order (tests compare it with the formulas in
Python, bit for bit).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable

from meshmerge.cext.gossip_score import COUNTERS, refresh_peers, topics_score
from meshmerge.cext.gossip_score import PeerStats as _PeerStats
from meshmerge.cext.gossip_score import TopicStats as _TopicStats
from meshmerge.daemon.gossip.params import PeerScoreParams

__all__ = ["PeerScore", "RejectReason"]


class RejectReason:
    """Why a message was rejected; decides who is penalised (as in go-libp2p-pubsub)."""

    MISSING_SIGNATURE = "missing signature"
    INVALID_SIGNATURE = "invalid signature"
    SELF_ORIGIN = "self origin"
    VALIDATION_QUEUE_FULL = "validation queue full"
    VALIDATION_THROTTLED = "validation throttled"
    VALIDATION_IGNORED = "validation ignored"
    VALIDATION_FAILED = "validation failed"
    # reasons that penalise the forwarder directly without a delivery record
    _UNTRACKED = frozenset({MISSING_SIGNATURE, INVALID_SIGNATURE, SELF_ORIGIN})


_UNKNOWN, _VALID, _INVALID, _THROTTLED, _IGNORED = range(5)


class _DeliveryRecord:
    __slots__ = ("peers", "status", "validated")

    def __init__(self) -> None:
        self.status = _UNKNOWN
        self.validated = 0.0
        self.peers: set[bytes] | None = set()


class PeerScore:
    """Score state for all peers a router knows, under one :class:`PeerScoreParams`."""

    def __init__(
        self, params: PeerScoreParams, *, now: float = 0.0, delivery_record_ttl: float = 120.0
    ) -> None:
        params.validate()
        self.params = params
        self._peers: dict[bytes, _PeerStats] = {}
        self._peer_ips: dict[str, set[bytes]] = {}
        self._whitelisted: dict[str, bool] = {}
        self._ip_penalty: dict[str, float] = {}  # weighted P6 term of each over-shared IP
        self._deliveries: dict[bytes, _DeliveryRecord] = {}
        self._delivery_expiry: deque[tuple[float, bytes]] = deque()
        self._delivery_ttl = delivery_record_ttl
        self._next_decay = now + params.decay_interval
        self._cache: dict[bytes, float] = {}

    # ------------------------------------------------------------------ queries

    def score(self, peer: bytes) -> float:
        cached = self._cache.get(peer)
        if cached is not None:
            return cached
        value = self._compute(peer)
        self._cache[peer] = value
        return value

    def invalidate(self, peer: bytes | None = None) -> None:
        """Drop cached scores (all, or one peer's), e.g. after P5 changed."""
        if peer is None:
            self._cache.clear()
        else:
            self._cache.pop(peer, None)

    def known_peers(self) -> int:
        return len(self._peers)

    def delivery_records(self) -> int:
        return len(self._deliveries)

    def behaviour_penalty(self, peer: bytes) -> float:
        ps = self._peers.get(peer)
        return ps.behaviour_penalty if ps else 0.0

    def topic_counters(self, peer: bytes, topic: str) -> dict[str, float | bool]:
        """Raw per-topic counters (for tests, metrics and the CLI)."""
        ps = self._peers.get(peer)
        ts = ps.topics.get(topic) if ps else None
        if ts is None:
            return {}
        return {name: getattr(ts, name) for name in COUNTERS}

    def _compute(self, peer: bytes) -> float:
        ps = self._peers.get(peer)
        if ps is None:
            return 0.0
        p = self.params
        score = topics_score(ps.topics)  # P1-P4, weighted
        if p.topic_score_cap > 0 and score > p.topic_score_cap:
            score = p.topic_score_cap
        if p.app_specific_weight != 0:
            score += p.app_specific_score(peer) * p.app_specific_weight
        if p.ip_colocation_factor_weight != 0:
            ip_penalty = self._ip_penalty
            for ip in ps.ips:
                score += ip_penalty.get(ip, 0.0)
        excess = ps.behaviour_penalty - p.behaviour_penalty_threshold
        if excess > 0:
            score += excess * excess * p.behaviour_penalty_weight
        return score

    # ------------------------------------------------------------------ peers

    def add_peer(self, peer: bytes, ips: Iterable[str] = (), now: float = 0.0) -> None:
        ps = self._peers.get(peer)
        if ps is None:
            ps = self._peers[peer] = _PeerStats()
        ps.connected = True
        self._set_ips(peer, ps, tuple(ips))
        self._cache.pop(peer, None)

    def set_ips(self, peer: bytes, ips: Iterable[str]) -> None:
        ps = self._peers.get(peer)
        if ps is not None:
            self._set_ips(peer, ps, tuple(ips))

    def _set_ips(self, peer: bytes, ps: _PeerStats, ips: tuple[str, ...]) -> None:
        if ips == ps.ips:
            return
        for ip in ps.ips:
            members = self._peer_ips.get(ip)
            if members is not None:
                members.discard(peer)
                if not members:
                    del self._peer_ips[ip]
                    self._whitelisted.pop(ip, None)
            self._update_ip_penalty(ip)
        for ip in ips:
            self._peer_ips.setdefault(ip, set()).add(peer)
            if ip not in self._whitelisted:
                self._whitelisted[ip] = self._is_whitelisted(ip)
            self._update_ip_penalty(ip)
        ps.ips = ips
        self._cache.clear()  # P6 of every peer sharing these IPs changed

    def _update_ip_penalty(self, ip: str) -> None:
        """Recompute w6 · surplus² for one IP (P6), so scoring a peer is a lookup per IP."""
        p = self.params
        surplus = len(self._peer_ips.get(ip, ())) - p.ip_colocation_factor_threshold
        if surplus > 0 and not self._whitelisted.get(ip, False):
            self._ip_penalty[ip] = float(surplus * surplus) * p.ip_colocation_factor_weight
        else:
            self._ip_penalty.pop(ip, None)

    def _is_whitelisted(self, ip: str) -> bool:
        nets = self.params.ip_colocation_factor_whitelist
        if not nets:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr.version == net.version and addr in net for net in nets)

    def remove_peer(self, peer: bytes, now: float) -> None:
        ps = self._peers.get(peer)
        if ps is None:
            return
        if self.score(peer) > 0:
            self._set_ips(peer, ps, ())
            del self._peers[peer]
            self._cache.pop(peer, None)
            return
        for ts in ps.topics.values():
            ts.first_deliveries = 0.0
            threshold = ts.tp.mesh_message_deliveries_threshold
            if ts.in_mesh and ts.mesh_deliveries_active and ts.mesh_deliveries < threshold:
                deficit = threshold - ts.mesh_deliveries
                ts.mesh_failure_penalty += deficit * deficit
            ts.in_mesh = False
        ps.connected = False
        ps.expire = now + self.params.retain_score
        self._cache.pop(peer, None)

    def _topic(self, peer: bytes, topic: str) -> _TopicStats | None:
        ps = self._peers.get(peer)
        if ps is None:
            return None
        ts = ps.topics.get(topic)
        if ts is None:
            tp = self.params.topics.get(topic)
            if tp is None:
                return None
            ts = ps.topics[topic] = _TopicStats(tp)
        return ts

    def graft(self, peer: bytes, topic: str, now: float) -> None:
        ts = self._topic(peer, topic)
        if ts is None:
            return
        ts.in_mesh = True
        ts.graft_time = now
        ts.mesh_time = 0.0
        ts.mesh_deliveries_active = False
        self._cache.pop(peer, None)

    def prune(self, peer: bytes, topic: str) -> None:
        ts = self._topic(peer, topic)
        if ts is None:
            return
        threshold = ts.tp.mesh_message_deliveries_threshold
        if ts.mesh_deliveries_active and ts.mesh_deliveries < threshold:
            deficit = threshold - ts.mesh_deliveries
            ts.mesh_failure_penalty += deficit * deficit
        ts.in_mesh = False
        self._cache.pop(peer, None)

    def add_penalty(self, peer: bytes, count: int = 1) -> None:
        ps = self._peers.get(peer)
        if ps is not None:
            ps.behaviour_penalty += count
            self._cache.pop(peer, None)

    # ------------------------------------------------------------------ messages

    def _record(self, mid: bytes, now: float) -> _DeliveryRecord:
        rec = self._deliveries.get(mid)
        if rec is None:
            rec = self._deliveries[mid] = _DeliveryRecord()
            self._delivery_expiry.append((now + self._delivery_ttl, mid))
        return rec

    def validate_message(self, mid: bytes, now: float) -> None:
        """Validation of a first-seen message starts."""
        self._record(mid, now)

    def deliver_message(self, source: bytes, mid: bytes, topic: str, now: float) -> None:
        """The first copy (from ``source``) validated."""
        self._mark_first_delivery(source, topic)
        rec = self._record(mid, now)
        if rec.status != _UNKNOWN:
            return
        rec.status = _VALID
        rec.validated = now
        for p in rec.peers or ():
            if p != source:
                self._mark_duplicate(p, topic, None, now)

    def reject_message(self, source: bytes, mid: bytes, topic: str, reason: str, now: float) -> None:
        if reason in RejectReason._UNTRACKED:
            self._mark_invalid(source, topic)
            return
        if reason == RejectReason.VALIDATION_QUEUE_FULL:
            return
        rec = self._record(mid, now)
        if rec.status != _UNKNOWN:
            return
        if reason == RejectReason.VALIDATION_THROTTLED:
            rec.status, rec.peers = _THROTTLED, None
            return
        if reason == RejectReason.VALIDATION_IGNORED:
            rec.status, rec.peers = _IGNORED, None
            return
        rec.status = _INVALID
        self._mark_invalid(source, topic)
        for p in rec.peers or ():
            self._mark_invalid(p, topic)
        rec.peers = None

    def duplicate_message(self, source: bytes, mid: bytes, topic: str, now: float) -> None:
        rec = self._record(mid, now)
        if rec.peers is not None and source in rec.peers:
            return
        if rec.status == _UNKNOWN:
            assert rec.peers is not None
            rec.peers.add(source)
        elif rec.status == _VALID:
            assert rec.peers is not None
            rec.peers.add(source)
            self._mark_duplicate(source, topic, rec.validated, now)
        elif rec.status == _INVALID:
            self._mark_invalid(source, topic)

    def _mark_first_delivery(self, peer: bytes, topic: str) -> None:
        ts = self._topic(peer, topic)
        if ts is None:
            return
        tp = ts.tp
        ts.first_deliveries = min(ts.first_deliveries + 1, tp.first_message_deliveries_cap)
        if ts.in_mesh:
            ts.mesh_deliveries = min(ts.mesh_deliveries + 1, tp.mesh_message_deliveries_cap)
        self._cache.pop(peer, None)

    def _mark_duplicate(self, peer: bytes, topic: str, validated: float | None, now: float) -> None:
        ts = self._topic(peer, topic)
        if ts is None or not ts.in_mesh:
            return
        tp = ts.tp
        if validated is not None and now > validated + tp.mesh_message_deliveries_window:
            return
        ts.mesh_deliveries = min(ts.mesh_deliveries + 1, tp.mesh_message_deliveries_cap)
        self._cache.pop(peer, None)

    def _mark_invalid(self, peer: bytes, topic: str) -> None:
        ts = self._topic(peer, topic)
        if ts is not None:
            ts.invalid_deliveries += 1
            self._cache.pop(peer, None)

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> bool:
        """Apply every decay interval that has elapsed by ``now``; True if any did."""
        ran = False
        while now >= self._next_decay:
            self._refresh(now)
            self._next_decay += self.params.decay_interval
            ran = True
        self._gc_deliveries(now)
        return ran

    def _refresh(self, now: float) -> None:
        """Decay every connected peer's counters and, in the same pass, cache its new score.

        Decay changes every score and the router's heartbeat asks for nearly all of
        them right after, so each peer's score is computed here while its counters
        are at hand: the same operations in the same order as :meth:`_compute`
        (tests check the two agree bit for bit).
        """
        p = self.params
        self._cache.clear()
        gone = refresh_peers(
            self._peers,
            self._cache,
            now,
            p.decay_to_zero,
            p.topic_score_cap,
            p.app_specific_weight,
            p.app_specific_score,
            self._ip_penalty if p.ip_colocation_factor_weight != 0 else None,
            p.behaviour_penalty_decay,
            p.behaviour_penalty_threshold,
            p.behaviour_penalty_weight,
        )
        for peer in gone:
            self._set_ips(peer, self._peers[peer], ())  # clears the cache (P6 may change)
            del self._peers[peer]

    def _gc_deliveries(self, now: float) -> None:
        q = self._delivery_expiry
        while q and q[0][0] < now:
            _, mid = q.popleft()
            self._deliveries.pop(mid, None)
