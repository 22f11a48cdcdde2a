# cython: language_level=3
"""GossipSub peer-score counters of one (peer, topic) and the per-heartbeat decay + score loop.

Why compiled: every router decays and re-scores every peer once per decay
interval (1 s), which dominated the attack simulator (thousands of routers,
dozens of peers each). The arithmetic is the Python formulas of
``meshmerge.daemon.gossip.score`` operation for operation, in IEEE double
without FMA contraction (setup.py's flags), so the results are bit-identical.

``TopicStats`` copies the numbers it needs from its (frozen) topic parameters
once; ``tp`` keeps the parameter object for everything else. Nothing here
knows the daemon: the parameters are read by attribute name.
"""

from libc.math cimport floor

COUNTERS = (
    "first_deliveries",
    "graft_time",
    "in_mesh",
    "invalid_deliveries",
    "mesh_deliveries",
    "mesh_deliveries_active",
    "mesh_failure_penalty",
    "mesh_time",
)


cdef class TopicStats:
    """Counters of one peer in one topic (P1-P4 inputs)."""

    cdef public object tp
    cdef public bint in_mesh
    cdef public double graft_time
    cdef public double mesh_time
    cdef public double first_deliveries
    cdef public double mesh_deliveries
    cdef public bint mesh_deliveries_active
    cdef public double mesh_failure_penalty
    cdef public double invalid_deliveries
    cdef double topic_weight
    cdef double w1, quantum, cap1
    cdef double w2, decay2
    cdef double w3, decay3, threshold3, activation3
    cdef double w3b, decay3b
    cdef double w4, decay4

    def __init__(self, object tp):
        self.tp = tp
        self.in_mesh = False
        self.graft_time = 0.0
        self.mesh_time = 0.0
        self.first_deliveries = 0.0
        self.mesh_deliveries = 0.0
        self.mesh_deliveries_active = False
        self.mesh_failure_penalty = 0.0
        self.invalid_deliveries = 0.0
        self.topic_weight = tp.topic_weight
        self.w1 = tp.time_in_mesh_weight
        self.quantum = tp.time_in_mesh_quantum
        self.cap1 = tp.time_in_mesh_cap
        self.w2 = tp.first_message_deliveries_weight
        self.decay2 = tp.first_message_deliveries_decay
        self.w3 = tp.mesh_message_deliveries_weight
        self.decay3 = tp.mesh_message_deliveries_decay
        self.threshold3 = tp.mesh_message_deliveries_threshold
        self.activation3 = tp.mesh_message_deliveries_activation
        self.w3b = tp.mesh_failure_penalty_weight
        self.decay3b = tp.mesh_failure_penalty_decay
        self.w4 = tp.invalid_message_deliveries_weight
        self.decay4 = tp.invalid_message_deliveries_decay


cdef inline double _weighted(TopicStats ts):
    """topic_weight · (w1·P1 + w2·P2 + w3·P3 + w3b·P3b + w4·P4), in the Python order."""
    cdef double topic_score = 0.0
    cdef double p1, deficit
    if ts.in_mesh:
        p1 = floor(ts.mesh_time / ts.quantum)
        if p1 > ts.cap1:
            p1 = ts.cap1
        topic_score += p1 * ts.w1
    topic_score += ts.first_deliveries * ts.w2
    if ts.mesh_deliveries_active and ts.mesh_deliveries < ts.threshold3:
        deficit = ts.threshold3 - ts.mesh_deliveries
        topic_score += deficit * deficit * ts.w3
    topic_score += ts.mesh_failure_penalty * ts.w3b
    topic_score += ts.invalid_deliveries * ts.invalid_deliveries * ts.w4
    return topic_score * ts.topic_weight


def topics_score(dict topics):
    """Sum of the weighted topic scores of one peer (before TopicScoreCap)."""
    cdef double score = 0.0
    cdef TopicStats ts
    for obj in topics.values():
        ts = <TopicStats>obj
        score += _weighted(ts)
    return score


def decay_and_score(dict topics, double now, double decay_to_zero):
    """Apply one decay interval to every topic of one peer, update its mesh time,
    and return the sum of its weighted topic scores (as :func:`topics_score` would after)."""
    return _decay_and_score(topics, now, decay_to_zero)


cdef inline double _decayed(double value, double decay, double decay_to_zero) noexcept:
    """One decay step of a counter: multiply, then snap to 0 below ``decay_to_zero`` (go's rule)."""
    cdef double x = value * decay
    return 0.0 if x < decay_to_zero else x


cdef double _decay_and_score(dict topics, double now, double decay_to_zero) except? -1.0:
    cdef double score = 0.0
    cdef TopicStats ts
    for obj in topics.values():
        ts = <TopicStats>obj
        ts.first_deliveries = _decayed(ts.first_deliveries, ts.decay2, decay_to_zero)
        ts.mesh_deliveries = _decayed(ts.mesh_deliveries, ts.decay3, decay_to_zero)
        ts.mesh_failure_penalty = _decayed(ts.mesh_failure_penalty, ts.decay3b, decay_to_zero)
        ts.invalid_deliveries = _decayed(ts.invalid_deliveries, ts.decay4, decay_to_zero)
        if ts.in_mesh:
            ts.mesh_time = now - ts.graft_time
            if ts.mesh_time > ts.activation3:
                ts.mesh_deliveries_active = True
        score += _weighted(ts)
    return score


cdef class PeerStats:
    """Everything scored about one peer: its topics plus the peer-wide P6/P7 inputs."""

    cdef public bint connected
    cdef public double expire
    cdef public dict topics
    cdef public tuple ips
    cdef public double behaviour_penalty

    def __init__(self):
        self.connected = True
        self.expire = 0.0
        self.topics = {}
        self.ips = ()
        self.behaviour_penalty = 0.0


def refresh_peers(
    dict peers,
    dict cache,
    double now,
    double decay_to_zero,
    double topic_score_cap,
    double app_specific_weight,
    object app_specific_score,
    object ip_penalty,
    double behaviour_penalty_decay,
    double behaviour_penalty_threshold,
    double behaviour_penalty_weight,
):
    """One decay interval for every connected peer in ``peers`` (peer id -> PeerStats);
    each new score goes into ``cache``. ``ip_penalty`` (IP -> weighted P6 term) is None
    when P6 is off. Returns the disconnected peers whose retention expired."""
    cdef list gone = []
    cdef PeerStats ps
    cdef double score, behaviour, excess
    cdef dict penalties = ip_penalty
    for peer, obj in peers.items():
        ps = <PeerStats>obj
        if not ps.connected:
            if now > ps.expire:
                gone.append(peer)
            continue
        score = _decay_and_score(ps.topics, now, decay_to_zero)
        behaviour = _decayed(ps.behaviour_penalty, behaviour_penalty_decay, decay_to_zero)
        ps.behaviour_penalty = behaviour
        if topic_score_cap > 0 and score > topic_score_cap:
            score = topic_score_cap
        if app_specific_weight != 0:
            score += <double>app_specific_score(peer) * app_specific_weight
        if penalties is not None:
            for ip in ps.ips:
                score += <double>penalties.get(ip, 0.0)
        excess = behaviour - behaviour_penalty_threshold
        if excess > 0:
            score += excess * excess * behaviour_penalty_weight
        cache[peer] = score
    return gone
