from collections.abc import Callable
from typing import Any

COUNTERS: tuple[str, ...]

class TopicStats:
    tp: Any
    in_mesh: bool
    graft_time: float
    mesh_time: float
    first_deliveries: float
    mesh_deliveries: float
    mesh_deliveries_active: bool
    mesh_failure_penalty: float
    invalid_deliveries: float
    def __init__(self, tp: Any) -> None: ...

class PeerStats:
    connected: bool
    expire: float
    topics: dict[str, TopicStats]
    ips: tuple[str, ...]
    behaviour_penalty: float
    def __init__(self) -> None: ...

def topics_score(topics: dict[str, TopicStats]) -> float: ...
def decay_and_score(topics: dict[str, TopicStats], now: float, decay_to_zero: float) -> float: ...
def refresh_peers(
    peers: dict[bytes, PeerStats],
    cache: dict[bytes, float],
    now: float,
    decay_to_zero: float,
    topic_score_cap: float,
    app_specific_weight: float,
    app_specific_score: Callable[[bytes], float],
    ip_penalty: dict[str, float] | None,
    behaviour_penalty_decay: float,
    behaviour_penalty_threshold: float,
    behaviour_penalty_weight: float,
) -> list[bytes]: ...
