"""Bounded caches the router uses: the message window cache and the seen-id time cache."""

from __future__ import annotations

from collections import deque

from meshmerge.proto.gossipsub import Message

__all__ = ["MessageCache", "SeenCache"]


class MessageCache:
    """Messages of the last ``history`` heartbeats, for IWANT; ids of the last ``gossip`` for IHAVE.

    Memory is bounded by what the router accepted in ``history`` heartbeats; each
    message also counts how often each peer asked for it (GossipRetransmission).
    """

    __slots__ = ("_gossip", "_msgs", "_requests", "_windows")

    def __init__(self, history: int, gossip: int) -> None:
        self._gossip = gossip
        self._windows: deque[list[tuple[bytes, str]]] = deque([[] for _ in range(history)], maxlen=history)
        self._msgs: dict[bytes, Message] = {}
        self._requests: dict[bytes, dict[bytes, int]] = {}

    def put(self, mid: bytes, msg: Message) -> None:
        if mid in self._msgs:
            return
        self._msgs[mid] = msg
        self._windows[0].append((mid, msg.topic or ""))

    def get(self, mid: bytes) -> Message | None:
        return self._msgs.get(mid)

    def get_for_peer(self, mid: bytes, peer: bytes) -> tuple[Message | None, int]:
        msg = self._msgs.get(mid)
        if msg is None:
            return None, 0
        counts = self._requests.setdefault(mid, {})
        counts[peer] = counts.get(peer, 0) + 1
        return msg, counts[peer]

    def gossip_ids(self, topic: str) -> list[bytes]:
        out: list[bytes] = []
        for i, window in enumerate(self._windows):
            if i >= self._gossip:
                break
            out += [mid for mid, t in window if t == topic]
        return out

    def gossip_ids_by_topic(self) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        for i, window in enumerate(self._windows):
            if i >= self._gossip:
                break
            for mid, t in window:
                out.setdefault(t, []).append(mid)
        return out

    def shift(self) -> None:
        oldest = self._windows[-1]
        for mid, _ in oldest:
            self._msgs.pop(mid, None)
            self._requests.pop(mid, None)
        self._windows.appendleft([])

    def __len__(self) -> int:
        return len(self._msgs)


class SeenCache:
    """Message ids seen in the last ``ttl`` seconds (first-seen expiry, like go's default)."""

    __slots__ = ("_expiry", "_ttl", "ids")

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self.ids: set[bytes] = set()  # live view for hot membership tests; never replaced
        self._expiry: deque[tuple[float, bytes]] = deque()

    def add(self, mid: bytes, now: float) -> bool:
        """Mark ``mid`` seen; False if it already was."""
        if mid in self.ids:
            return False
        self.ids.add(mid)
        self._expiry.append((now + self._ttl, mid))
        return True

    def __contains__(self, mid: bytes) -> bool:
        return mid in self.ids

    def expire(self, now: float) -> None:
        q = self._expiry
        while q and q[0][0] <= now:
            self.ids.discard(q.popleft()[1])

    def __len__(self) -> int:
        return len(self.ids)
