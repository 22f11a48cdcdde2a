"""GossipSub router and peer-score parameters, with validation that explains itself.

Defaults are go-libp2p-pubsub's. Score parameter validation mirrors go-libp2p-pubsub
(finite numbers, weight signs, decays in (0, 1), threshold ordering) and adds one
rule of our own: **per topic, the worst P3 penalty must outweigh the best P1 + P2
reward**, i.e. ``|w3|·threshold² > w1·cap1 + w2·cap2``.

Why: the formal ACL2s model of GossipSub v1.1 (Kumar, von Hippel, Manolios,
Nita-Rotaru, "Formal Model-Driven Analysis of Resilience of GossipSub to Attacks
from Misbehaving Peers", IEEE S&P 2024) showed that under Ethereum's parameters a
peer that joins meshes and never forwards anything keeps a positive score: P3 is
bounded by ``|w3|·threshold²`` while time in mesh (P1) and first deliveries it got
early (P2) keep rewarding it, so it is never pruned. Parameter sets with that
property are refused instead of copied.

All durations are seconds (floats); "ticks" are heartbeats.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields

__all__ = [
    "GossipSubParams",
    "ParamsError",
    "PeerScoreParams",
    "PeerScoreThresholds",
    "TopicScoreParams",
    "bootstrap_app_score",
    "decay_convergence",
    "derive_score_params",
    "derive_topic_params",
    "score_parameter_decay",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ParamsError(ValueError):
    """A parameter violates a rule; the message names the field and the rule."""


def _finite(obj: object) -> None:
    for f in fields(obj):  # type: ignore[arg-type]
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ParamsError(f"{type(obj).__name__}.{f.name} must be finite, got {v!r}")


@dataclass(frozen=True, slots=True)
class GossipSubParams:
    """Router parameters (mesh degrees, gossip, backoffs, limits)."""

    d: int = 6  # target mesh degree
    d_lo: int = 5  # graft when the mesh has fewer peers
    d_hi: int = 12  # prune when the mesh has more peers
    d_score: int = 4  # peers kept by score when pruning an oversubscribed mesh
    d_out: int = 2  # outbound peers the mesh keeps
    d_lazy: int = 6  # minimum peers that receive IHAVE gossip per topic
    gossip_factor: float = 0.25  # fraction of non-mesh peers that receive gossip
    gossip_retransmission: int = 3  # IWANT replies per message per peer
    history_length: int = 5  # heartbeats of messages kept for IWANT
    history_gossip: int = 3  # heartbeats of messages advertised in IHAVE
    heartbeat_interval: float = 1.0
    fanout_ttl: float = 60.0
    prune_peers: int = 16  # peers offered in PX
    prune_backoff: float = 60.0
    unsubscribe_backoff: float = 10.0
    max_backoff: float = 3600.0  # clamp for backoffs requested by remote PRUNEs
    graft_flood_threshold: float = 10.0
    opportunistic_graft_ticks: int = 60
    opportunistic_graft_peers: int = 2
    max_ihave_length: int = 5000  # message ids requested from one peer per heartbeat
    max_ihave_messages: int = 10  # IHAVE messages accepted from one peer per heartbeat
    max_idontwant_length: int = 10  # message ids honoured per IDONTWANT
    max_idontwant_messages: int = 1000  # IDONTWANT messages accepted from one peer per heartbeat
    idontwant_message_threshold: int = 1024  # only messages at least this big trigger IDONTWANT
    idontwant_message_ttl: int = 3  # heartbeats an IDONTWANT is remembered
    iwant_followup_time: float = 3.0
    seen_ttl: float = 120.0
    max_message_size: int = 1 << 20
    flood_publish: bool = True
    do_px: bool = False  # offer PX in our PRUNEs
    max_pending_validations_per_peer: int = 64
    max_pending_validations: int = 4096
    max_peer_queue_messages: int = 512  # outgoing frames queued for one peer
    max_peer_queue_bytes: int = 8 << 20  # outgoing bytes queued for one peer
    max_topics: int = 4096  # distinct topics tracked for remote subscriptions
    max_px_connect: int = 16

    @classmethod
    def bootstrapper(cls, **overrides: object) -> GossipSubParams:
        """Parameters of a bootstrap node (spec v1.1, "Recommendations for Network Operators"):
        no mesh (``D = D_lo = D_hi = D_out = 0``), PX on. It answers every GRAFT with a
        PRUNE carrying PX, so joiners learn peers from it without it carrying a mesh."""
        base: dict[str, object] = {"d": 0, "d_lo": 0, "d_hi": 0, "d_score": 0, "d_out": 0, "do_px": True}
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    @property
    def is_bootstrapper(self) -> bool:
        """No mesh at all (``D_hi = 0``): every GRAFT is pruned, with PX if ``do_px``."""
        return self.d_hi == 0

    def validate(self) -> None:
        _finite(self)
        if not (0 <= self.d_lo <= self.d <= self.d_hi):
            raise ParamsError("GossipSubParams.d must satisfy d_lo <= d <= d_hi")
        if not (0 <= self.d_score <= self.d_hi):
            raise ParamsError("GossipSubParams.d_score must be in [0, d_hi]")
        if self.d_hi == 0:
            if self.d_out != 0:
                raise ParamsError(
                    "GossipSubParams.d_out must be 0 when d_hi = 0 (a bootstrapper has no mesh)"
                )
        elif not (0 <= self.d_out < self.d_lo and self.d_out <= self.d // 2):
            raise ParamsError("GossipSubParams.d_out must be < d_lo and <= d/2")
        if not 0 <= self.gossip_factor <= 1:
            raise ParamsError("GossipSubParams.gossip_factor must be in [0, 1]")
        if not 0 < self.history_gossip <= self.history_length:
            raise ParamsError("GossipSubParams.history_gossip must be in (0, history_length]")
        for name in ("heartbeat_interval", "fanout_ttl", "prune_backoff", "unsubscribe_backoff", "seen_ttl"):
            if getattr(self, name) <= 0:
                raise ParamsError(f"GossipSubParams.{name} must be > 0")
        if self.max_backoff < max(self.prune_backoff, self.unsubscribe_backoff):
            raise ParamsError("GossipSubParams.max_backoff must be >= prune_backoff and unsubscribe_backoff")
        for name in (
            "opportunistic_graft_ticks",
            "max_ihave_length",
            "max_ihave_messages",
            "max_message_size",
            "max_pending_validations_per_peer",
            "max_pending_validations",
            "max_peer_queue_messages",
            "max_peer_queue_bytes",
            "max_topics",
            "idontwant_message_ttl",
            "gossip_retransmission",
        ):
            if getattr(self, name) <= 0:
                raise ParamsError(f"GossipSubParams.{name} must be > 0")
        if self.max_peer_queue_bytes < self.max_message_size:
            raise ParamsError("GossipSubParams.max_peer_queue_bytes must hold at least one max-size message")


@dataclass(frozen=True, slots=True)
class PeerScoreThresholds:
    """Score thresholds (spec §Score Thresholds); the first three are <= 0 and ordered."""

    gossip_threshold: float = 0.0  # below: no gossip to or from the peer
    publish_threshold: float = 0.0  # below: no flood publishing to the peer
    graylist_threshold: float = 0.0  # below: all RPCs from the peer are ignored
    accept_px_threshold: float = 0.0  # PX accepted only from peers at or above (>= 0)
    opportunistic_graft_threshold: float = 0.0  # median mesh score that triggers opportunistic grafting

    def validate(self) -> None:
        _finite(self)
        if self.gossip_threshold > 0:
            raise ParamsError("PeerScoreThresholds.gossip_threshold must be <= 0")
        if self.publish_threshold > 0 or self.publish_threshold > self.gossip_threshold:
            raise ParamsError("PeerScoreThresholds.publish_threshold must be <= 0 and <= gossip_threshold")
        if self.graylist_threshold > 0 or self.graylist_threshold > self.publish_threshold:
            raise ParamsError("PeerScoreThresholds.graylist_threshold must be <= 0 and <= publish_threshold")
        if self.accept_px_threshold < 0:
            raise ParamsError("PeerScoreThresholds.accept_px_threshold must be >= 0")
        if self.opportunistic_graft_threshold < 0:
            raise ParamsError("PeerScoreThresholds.opportunistic_graft_threshold must be >= 0")


@dataclass(frozen=True, slots=True)
class TopicScoreParams:
    """Per-topic score parameters; the topic score is

    ``topic_weight · (w1·P1 + w2·P2 + w3·P3 + w3b·P3b + w4·P4)`` where
    P1 = min(floor(time_in_mesh / quantum), cap1)                       (w1 >= 0)
    P2 = first message deliveries, capped at cap2, decaying             (w2 >= 0)
    P3 = (threshold − mesh deliveries)² once active and below threshold (w3 <= 0)
    P3b = sticky mesh failure penalty added on prune, decaying          (w3b <= 0)
    P4 = invalid message deliveries², decaying                          (w4 <= 0)
    """

    topic_weight: float = 1.0
    time_in_mesh_weight: float = 0.0
    time_in_mesh_quantum: float = 1.0
    time_in_mesh_cap: float = 0.0
    first_message_deliveries_weight: float = 0.0
    first_message_deliveries_decay: float = 0.5
    first_message_deliveries_cap: float = 0.0
    mesh_message_deliveries_weight: float = 0.0
    mesh_message_deliveries_decay: float = 0.5
    mesh_message_deliveries_cap: float = 0.0
    mesh_message_deliveries_threshold: float = 0.0
    mesh_message_deliveries_window: float = 0.01
    mesh_message_deliveries_activation: float = 1.0
    mesh_failure_penalty_weight: float = 0.0
    mesh_failure_penalty_decay: float = 0.5
    invalid_message_deliveries_weight: float = 0.0
    invalid_message_deliveries_decay: float = 0.5

    def validate(self, topic: str = "?") -> None:
        def err(name: str, rule: str) -> ParamsError:
            return ParamsError(f"TopicScoreParams[{topic!r}].{name} {rule}")

        _finite(self)
        if self.topic_weight < 0:
            raise err("topic_weight", "must be >= 0")
        if self.time_in_mesh_quantum <= 0:
            raise err("time_in_mesh_quantum", "must be > 0")
        if self.time_in_mesh_weight < 0:
            raise err("time_in_mesh_weight", "must be >= 0 (P1 is a reward)")
        if self.time_in_mesh_weight != 0 and self.time_in_mesh_cap <= 0:
            raise err("time_in_mesh_cap", "must be > 0 when P1 is weighted")
        if self.first_message_deliveries_weight < 0:
            raise err("first_message_deliveries_weight", "must be >= 0 (P2 is a reward)")
        if self.first_message_deliveries_weight != 0:
            _decay(self.first_message_deliveries_decay, err, "first_message_deliveries_decay")
            if self.first_message_deliveries_cap <= 0:
                raise err("first_message_deliveries_cap", "must be > 0 when P2 is weighted")
        if self.mesh_message_deliveries_weight > 0:
            raise err("mesh_message_deliveries_weight", "must be <= 0 (P3 is a penalty)")
        if self.mesh_message_deliveries_weight != 0:
            _decay(self.mesh_message_deliveries_decay, err, "mesh_message_deliveries_decay")
            if self.mesh_message_deliveries_cap <= 0:
                raise err("mesh_message_deliveries_cap", "must be > 0 when P3 is weighted")
            if self.mesh_message_deliveries_threshold <= 0:
                raise err("mesh_message_deliveries_threshold", "must be > 0 when P3 is weighted")
            if self.mesh_message_deliveries_window < 0:
                raise err("mesh_message_deliveries_window", "must be >= 0")
            if self.mesh_message_deliveries_activation < 1.0:
                raise err("mesh_message_deliveries_activation", "must be at least 1 s")
        if self.mesh_failure_penalty_weight > 0:
            raise err("mesh_failure_penalty_weight", "must be <= 0 (P3b is a penalty)")
        if self.mesh_failure_penalty_weight != 0:
            _decay(self.mesh_failure_penalty_decay, err, "mesh_failure_penalty_decay")
        if self.invalid_message_deliveries_weight > 0:
            raise err("invalid_message_deliveries_weight", "must be <= 0 (P4 is a penalty)")
        _decay(self.invalid_message_deliveries_decay, err, "invalid_message_deliveries_decay")
        self._refuse_non_forwarder_weakness(err)

    def max_reward(self) -> float:
        """Largest P1 + P2 contribution (before the topic weight): w1·cap1 + w2·cap2."""
        return (
            self.time_in_mesh_weight * self.time_in_mesh_cap
            + self.first_message_deliveries_weight * self.first_message_deliveries_cap
        )

    def max_delivery_penalty(self) -> float:
        """Largest P3 magnitude (before the topic weight): |w3|·threshold²."""
        return abs(self.mesh_message_deliveries_weight) * self.mesh_message_deliveries_threshold**2

    def _refuse_non_forwarder_weakness(self, err: Callable[[str, str], ParamsError]) -> None:
        reward, penalty = self.max_reward(), self.max_delivery_penalty()
        if reward > 0 and not penalty > reward:
            raise err(
                "mesh_message_deliveries_weight",
                f"is too weak: |w3|·threshold² = {penalty:.6g} must exceed w1·cap1 + w2·cap2 = {reward:.6g}, "
                "otherwise a mesh peer that never forwards keeps a positive score and is never pruned "
                "(non-forwarding attack found by the formal ACL2s analysis of GossipSub v1.1, "
                "Kumar et al., IEEE S&P 2024)",
            )


def _decay(value: float, err: Callable[[str, str], ParamsError], name: str) -> None:
    if not 0 < value < 1:
        raise err(name, "must be in (0, 1)")


def _zero_app_score(_peer: bytes) -> float:
    return 0.0


@dataclass(frozen=True, slots=True)
class PeerScoreParams:
    """Peer-wide score parameters; the score is

    ``min(Σ topic scores, topic_score_cap if > 0) + w5·P5 + w6·P6 + w7·P7`` where
    P5 = app_specific_score(peer)                                         (any sign)
    P6 = Σ over the peer's non-whitelisted IPs of max(0, peers on IP − threshold)²  (w6 <= 0)
    P7 = max(0, behaviour penalty − threshold)², decaying                  (w7 <= 0)
    """

    topics: Mapping[str, TopicScoreParams] = field(default_factory=dict)
    topic_score_cap: float = 0.0
    app_specific_score: Callable[[bytes], float] = _zero_app_score
    app_specific_weight: float = 0.0
    ip_colocation_factor_weight: float = 0.0
    ip_colocation_factor_threshold: int = 1
    ip_colocation_factor_whitelist: tuple[IPNetwork, ...] = ()
    behaviour_penalty_weight: float = 0.0
    behaviour_penalty_threshold: float = 0.0
    behaviour_penalty_decay: float = 0.5
    decay_interval: float = 1.0
    decay_to_zero: float = 0.01
    retain_score: float = 3600.0

    def validate(self) -> None:
        _finite(self)
        for topic, tp in self.topics.items():
            tp.validate(topic)
        if self.topic_score_cap < 0:
            raise ParamsError("PeerScoreParams.topic_score_cap must be >= 0 (0 = no cap)")
        if not callable(self.app_specific_score):
            raise ParamsError("PeerScoreParams.app_specific_score must be callable")
        if self.ip_colocation_factor_weight > 0:
            raise ParamsError("PeerScoreParams.ip_colocation_factor_weight must be <= 0 (P6 is a penalty)")
        if self.ip_colocation_factor_weight != 0 and self.ip_colocation_factor_threshold < 1:
            raise ParamsError("PeerScoreParams.ip_colocation_factor_threshold must be >= 1")
        if self.behaviour_penalty_weight > 0:
            raise ParamsError("PeerScoreParams.behaviour_penalty_weight must be <= 0 (P7 is a penalty)")
        if self.behaviour_penalty_weight != 0 and not 0 < self.behaviour_penalty_decay < 1:
            raise ParamsError("PeerScoreParams.behaviour_penalty_decay must be in (0, 1)")
        if self.behaviour_penalty_threshold < 0:
            raise ParamsError("PeerScoreParams.behaviour_penalty_threshold must be >= 0")
        if self.decay_interval < 1.0:
            raise ParamsError("PeerScoreParams.decay_interval must be at least 1 s")
        if not 0 < self.decay_to_zero < 1:
            raise ParamsError("PeerScoreParams.decay_to_zero must be in (0, 1)")
        if self.retain_score < 0:
            raise ParamsError("PeerScoreParams.retain_score must be >= 0")


# --------------------------------------------------------------------------- derivation


class _BootstrapScore:
    """P5 hook: a fixed bonus for bootstrap peers on top of another app score (a class, not
    a closure, so it can be inspected and compared in tests and reprs)."""

    __slots__ = ("base", "bonus", "peers")

    def __init__(self, peers: frozenset[bytes], bonus: float, base: Callable[[bytes], float]) -> None:
        self.peers = peers
        self.bonus = bonus
        self.base = base

    def __call__(self, peer: bytes) -> float:
        extra = self.bonus if peer in self.peers else 0.0
        return self.base(peer) + extra

    def __repr__(self) -> str:
        return f"bootstrap_app_score({len(self.peers)} peers, bonus={self.bonus:g})"


def bootstrap_app_score(
    peers: Collection[bytes], bonus: float, base: Callable[[bytes], float] = _zero_app_score
) -> Callable[[bytes], float]:
    """Application score (P5) that adds ``bonus`` for the given bootstrap peer ids.

    Why: the spec has the application vouch for its bootstrappers through P5 so that
    their PX clears the accept-PX threshold while nobody else's does.
    """
    ids = frozenset(peers)
    for pid in ids:
        if not isinstance(pid, bytes) or not pid:
            raise ParamsError(f"bootstrappers: every entry must be a non-empty peer id (bytes), got {pid!r}")
    if not math.isfinite(bonus) or bonus <= 0:
        raise ParamsError(f"bootstrap bonus must be a positive finite number, got {bonus!r}")
    return _BootstrapScore(ids, float(bonus), base)


def score_parameter_decay(
    decay_time: float, decay_interval: float = 1.0, decay_to_zero: float = 0.01
) -> float:
    """Per-interval decay factor that takes a counter of 1 to ``decay_to_zero`` in ``decay_time``."""
    ticks = decay_time / decay_interval
    if ticks <= 0:
        raise ParamsError("decay_time must be > 0")
    return float(math.pow(decay_to_zero, 1.0 / ticks))


def decay_convergence(decay: float, per_interval: float) -> float:
    """Steady-state value of a counter that gains ``per_interval`` and is multiplied by ``decay``."""
    return per_interval / (1.0 - decay)


def derive_topic_params(
    messages_per_second: float,
    *,
    topic_weight: float = 1.0,
    d: int = 6,
    decay_interval: float = 1.0,
    decay_to_zero: float = 0.01,
    max_in_mesh_score: float = 10.0,
    max_first_delivery_score: float = 40.0,
    time_in_mesh_quantum: float = 1.0,
    time_in_mesh_cap_seconds: float = 3600.0,
    first_delivery_decay_time: float = 600.0,
    mesh_delivery_decay_time: float = 60.0,
    mesh_delivery_fraction: float = 0.1,
    mesh_delivery_window: float = 2.0,
    mesh_delivery_activation: float | None = None,
    invalid_decay_time: float = 3600.0,
    p3_margin: float = 2.0,
) -> TopicScoreParams:
    """Score parameters for a topic expected to carry ``messages_per_second``.

    Follows the recipe Ethereum consensus clients use (rewards scaled so P1 tops at
    ``max_in_mesh_score`` and P2 at ``max_first_delivery_score``; counters' caps and
    thresholds from their steady-state values at the expected rate), except that
    the P3 weight is chosen so ``|w3|·threshold² = p3_margin · (w1·cap1 + w2·cap2)``:
    a mesh peer delivering less than ``mesh_delivery_fraction`` of the expected
    traffic ends up negative however long it has been in the mesh.
    """
    if not messages_per_second > 0:
        raise ParamsError("messages_per_second must be > 0")
    if not p3_margin > 1:
        raise ParamsError("p3_margin must be > 1 (equality still lets a non-forwarder break even)")
    per_interval = messages_per_second * decay_interval
    cap1 = time_in_mesh_cap_seconds / time_in_mesh_quantum
    w1 = max_in_mesh_score / cap1
    decay2 = score_parameter_decay(first_delivery_decay_time, decay_interval, decay_to_zero)
    cap2 = decay_convergence(decay2, 2.0 * per_interval / d)
    w2 = max_first_delivery_score / cap2
    decay3 = score_parameter_decay(mesh_delivery_decay_time, decay_interval, decay_to_zero)
    threshold3 = decay_convergence(decay3, per_interval * mesh_delivery_fraction) * decay3
    cap3 = max(2.0 * threshold3, decay_convergence(decay3, per_interval))
    w3 = -p3_margin * (w1 * cap1 + w2 * cap2) / threshold3**2
    activation = mesh_delivery_activation
    if activation is None:
        activation = max(10.0, 5.0 / messages_per_second, mesh_delivery_decay_time / 6.0)
    return TopicScoreParams(
        topic_weight=topic_weight,
        time_in_mesh_weight=w1,
        time_in_mesh_quantum=time_in_mesh_quantum,
        time_in_mesh_cap=cap1,
        first_message_deliveries_weight=w2,
        first_message_deliveries_decay=decay2,
        first_message_deliveries_cap=cap2,
        mesh_message_deliveries_weight=w3,
        mesh_message_deliveries_decay=decay3,
        mesh_message_deliveries_cap=cap3,
        mesh_message_deliveries_threshold=threshold3,
        mesh_message_deliveries_window=mesh_delivery_window,
        mesh_message_deliveries_activation=activation,
        mesh_failure_penalty_weight=w3,
        mesh_failure_penalty_decay=decay3,
        invalid_message_deliveries_weight=-(max_in_mesh_score + max_first_delivery_score) / topic_weight,
        invalid_message_deliveries_decay=score_parameter_decay(
            invalid_decay_time, decay_interval, decay_to_zero
        ),
    )


def derive_score_params(
    topic_rates: Mapping[str, float],
    *,
    topic_weights: Mapping[str, float] | None = None,
    d: int = 6,
    decay_interval: float = 1.0,
    decay_to_zero: float = 0.01,
    app_specific_score: Callable[[bytes], float] = _zero_app_score,
    ip_colocation_threshold: int = 8,
    ip_whitelist: tuple[IPNetwork, ...] = (),
    behaviour_penalty_threshold: float = 6.0,
    behaviour_penalty_decay_time: float = 600.0,
    retain_score: float = 3600.0,
    bootstrappers: Collection[bytes] = (),
) -> tuple[PeerScoreParams, PeerScoreThresholds]:
    """Peer score parameters and thresholds for topics with expected message rates (msgs/s).

    Thresholds sit far below the largest positive score (Ethereum's -4000 / -8000 /
    -16000 scale relative to a max positive score of 50 per unit of topic weight),
    so only real misbehaviour, not a slow link, reaches them.

    Accept-PX: PX lets a peer choose whom we dial, so (spec v1.1, "Recommendations for
    Network Operators") it is accepted only from peers at a score "attainable only by
    the bootstrappers". Topic behaviour is capped at ``topic_score_cap``, so the threshold
    is ``2 · topic_score_cap``: no peer reaches it by relaying well (a covert-flash Sybil
    included); it takes P5, the application's vouching. ``bootstrappers`` (peer ids, e.g.
    the configured bootstrap nodes) get P5 = ``2 · accept_px_threshold`` (weight 1): their
    PX is accepted until P4/P6/P7 penalties cost them more than the threshold itself.
    """
    weights = dict(topic_weights or {})
    topics = {
        t: derive_topic_params(
            rate,
            topic_weight=weights.get(t, 1.0),
            d=d,
            decay_interval=decay_interval,
            decay_to_zero=decay_to_zero,
        )
        for t, rate in topic_rates.items()
    }
    max_positive = sum(tp.max_reward() * tp.topic_weight for tp in topics.values())
    topic_cap = max_positive / 2.0
    accept_px = max(2.0 * topic_cap, 1.0)
    thresholds = PeerScoreThresholds(
        gossip_threshold=-4000.0,
        publish_threshold=-8000.0,
        graylist_threshold=-16000.0,
        accept_px_threshold=accept_px,
        opportunistic_graft_threshold=5.0,
    )
    if bootstrappers:
        app_specific_score = bootstrap_app_score(bootstrappers, 2.0 * accept_px, app_specific_score)
    behaviour_decay = score_parameter_decay(behaviour_penalty_decay_time, decay_interval, decay_to_zero)
    # 10 penalties above the threshold bring an otherwise neutral peer to the gossip threshold
    behaviour_weight = thresholds.gossip_threshold / 10.0**2
    params = PeerScoreParams(
        topics=topics,
        topic_score_cap=topic_cap,
        app_specific_score=app_specific_score,
        app_specific_weight=1.0,
        ip_colocation_factor_weight=-max(max_positive, 1.0),
        ip_colocation_factor_threshold=ip_colocation_threshold,
        ip_colocation_factor_whitelist=ip_whitelist,
        behaviour_penalty_weight=behaviour_weight,
        behaviour_penalty_threshold=behaviour_penalty_threshold,
        behaviour_penalty_decay=behaviour_decay,
        decay_interval=decay_interval,
        decay_to_zero=decay_to_zero,
        retain_score=retain_score,
    )
    params.validate()
    thresholds.validate()
    return params, thresholds
