"""Iterative Kademlia lookup as a state machine (no I/O).

Theory of operation: candidates are kept sorted by XOR distance to the target.
The driver asks `next_to_query()` for up to `alpha` peers in flight, reports each
answer with `on_success(peer, closer_peers)` or `on_failure(peer)`, and stops
when `done`: the `k` closest peers not known to have failed have all answered
(or nothing is left to ask), or the caller called `stop()` (e.g. a value quorum
was reached). `max_queries` bounds the total work of a lookup whatever peers
claim, so a lookup against lying peers still ends.
"""

from __future__ import annotations

from enum import Enum

from .keys import distance, kad_id


class PeerState(Enum):
    HEARD = 0
    WAITING = 1
    SUCCEEDED = 2
    FAILED = 3


class Lookup:
    def __init__(
        self,
        target: int,
        seeds: list[bytes],
        *,
        self_peer: bytes,
        k: int = 20,
        alpha: int = 3,
        max_queries: int = 200,
        max_candidates: int = 400,
    ) -> None:
        self.target = target
        self.k = k
        self.alpha = alpha
        self.max_queries = max_queries
        self.max_candidates = max_candidates
        self.self_peer = self_peer
        self.state: dict[bytes, PeerState] = {}
        self._dist: dict[bytes, int] = {}
        self.queries = 0
        self.stopped = False
        for peer in seeds:
            self._learn(peer)

    def _learn(self, peer: bytes) -> None:
        if peer == self.self_peer or peer in self.state:
            return
        if len(self.state) >= self.max_candidates:
            return
        self.state[peer] = PeerState.HEARD
        self._dist[peer] = distance(kad_id(peer), self.target)

    def _ordered(self) -> list[bytes]:
        return sorted(self.state, key=self._dist.__getitem__)

    @property
    def in_flight(self) -> int:
        return sum(1 for s in self.state.values() if s is PeerState.WAITING)

    def next_to_query(self) -> list[bytes]:
        """Peers to ask now (marked WAITING); empty when nothing should start."""
        if self.stopped:
            return []
        budget = min(self.alpha - self.in_flight, self.max_queries - self.queries)
        chosen: list[bytes] = []
        live_seen = 0
        for peer in self._ordered():
            st = self.state[peer]
            if st is PeerState.FAILED:
                continue
            live_seen += 1
            if live_seen > self.k or len(chosen) >= budget:
                break
            if st is PeerState.HEARD:
                chosen.append(peer)
        for peer in chosen:
            self.state[peer] = PeerState.WAITING
        self.queries += len(chosen)
        return chosen

    def on_success(self, peer: bytes, closer: list[bytes]) -> None:
        if self.state.get(peer) is PeerState.WAITING:
            self.state[peer] = PeerState.SUCCEEDED
        for p in closer:
            self._learn(p)

    def on_failure(self, peer: bytes) -> None:
        if self.state.get(peer) is PeerState.WAITING:
            self.state[peer] = PeerState.FAILED

    def stop(self) -> None:
        self.stopped = True

    @property
    def done(self) -> bool:
        if self.stopped:
            return self.in_flight == 0
        if self.in_flight:
            return False
        if self.queries >= self.max_queries:
            return True
        live = [p for p in self._ordered() if self.state[p] is not PeerState.FAILED][: self.k]
        return all(self.state[p] is PeerState.SUCCEEDED for p in live)

    def closest(self, count: int | None = None) -> list[bytes]:
        """The closest peers that answered, nearest first."""
        ok = [p for p in self._ordered() if self.state[p] is PeerState.SUCCEEDED]
        return ok[: count or self.k]
