"""AutoNAT v2 rules without I/O: which address a server dials, what it costs, what the client concludes.

Theory of operation (libp2p/specs autonat/autonat-v2.md). A client sends a
priority-ordered list of its addresses and a random 64-bit nonce. The server
dials *exactly one* address, the first it is willing to dial, from a separate
identity and an ephemeral port, and sends the nonce on
``/libp2p/autonat/2/dial-back``; then it answers with the index it chose and
the dial outcome. If the chosen address's IP differs from the IP the request
came from, the server first asks for ``dial_data_bytes`` of padding
(DialDataRequest), so that making it dial a third party costs the requester
more bandwidth than the handshake it triggers (amplification protection).

The client trusts an "OK" only if the dial-back with *its* nonce actually
arrived (a server cannot claim a dial it did not make), and keeps one vote
per (address, server); an address becomes PUBLIC or PRIVATE once
``threshold`` distinct servers agree and outnumber the dissent, so one lying
or broken server cannot flip it. Votes expire after ``result_ttl_s``.

Everything here is plain state: time is a parameter, the trio drivers live in
``autonat2.py``.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Sequence

import multiaddr

from .autonat import Reachability
from .connutil import is_public_ip


class Refusal(enum.Enum):
    """Why a server does not dial any address of a request."""

    NO_DIALABLE_ADDRESS = "no address we are willing to dial"
    RATE_LIMITED = "rate limited"


@dataclasses.dataclass(frozen=True)
class AutoNATv2Config:
    """Limits and pacing for both roles.

    dial_data_bytes: padding a client must send before we dial an IP other than its own
        (spec: 30k-100k; a TCP+Noise handshake costs < 10 kB).
    max_dial_data_bytes: most padding our client agrees to send for one request.
    dial_timeout_s: server deadline for the dial back (connect + nonce exchange).
    request_timeout_s: client deadline for a whole request, dial data included.
    max_requests_per_peer: requests a server serves per peer within ``peer_window_s``.
    peer_window_s: the window of that per-peer limit.
    max_concurrent: requests a server handles at once; more are rejected.
    allow_private: dial non-public addresses too (loopback tests only; the spec says SHOULD NOT).
    threshold: distinct servers that must agree before an address is classified.
    result_ttl_s: a server's verdict on an address counts for this long.
    max_tracked_addrs: addresses the client keeps verdicts for (oldest dropped first).
    probe_interval_s: client re-check period once every candidate address is classified.
    unknown_probe_interval_s: client re-check period while some candidate is still unknown.
    """

    dial_data_bytes: int = 40_000
    max_dial_data_bytes: int = 100_000
    dial_timeout_s: float = 5.0
    request_timeout_s: float = 15.0
    max_requests_per_peer: int = 12
    peer_window_s: float = 60.0
    max_concurrent: int = 8
    allow_private: bool = False
    threshold: int = 3
    result_ttl_s: float = 1800.0
    max_tracked_addrs: int = 64
    probe_interval_s: float = 900.0
    unknown_probe_interval_s: float = 30.0

    def validate(self) -> None:
        if not 1 <= self.dial_data_bytes <= 1_000_000:
            raise ValueError("AutoNATv2Config.dial_data_bytes must be in [1, 1000000] (spec: 30k-100k)")
        if not 0 <= self.max_dial_data_bytes <= 1_000_000:
            raise ValueError("AutoNATv2Config.max_dial_data_bytes must be in [0, 1000000]")
        for name in (
            "dial_timeout_s",
            "request_timeout_s",
            "result_ttl_s",
            "peer_window_s",
            "probe_interval_s",
            "unknown_probe_interval_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"AutoNATv2Config.{name} must be > 0 seconds")
        for name in ("max_concurrent", "threshold", "max_tracked_addrs", "max_requests_per_peer"):
            if getattr(self, name) < 1:
                raise ValueError(f"AutoNATv2Config.{name} must be >= 1")


@dataclasses.dataclass(frozen=True)
class DialPlan:
    """The server's choice: dial ``addr`` (index ``idx``), after ``data_bytes`` of padding (0: none)."""

    idx: int
    addr: multiaddr.Multiaddr
    data_bytes: int


def dialable(raw: bytes, allow_private: bool) -> multiaddr.Multiaddr | None:
    """``/ip4|ip6/<ip>/tcp/<port>`` we are willing to dial (no circuits, DNS or other transports)."""
    try:
        addr = multiaddr.Multiaddr(raw)
        names = [p.name for p in addr.protocols()]
    except Exception:
        return None
    if names not in (["ip4", "tcp"], ["ip6", "tcp"], ["ip4", "tcp", "p2p"], ["ip6", "tcp", "p2p"]):
        return None
    ip = addr.value_for_protocol(names[0])
    try:
        parsed = ipaddress.ip_address(ip)
        port = int(addr.value_for_protocol("tcp"))
    except ValueError:
        return None
    if port == 0 or parsed.is_unspecified or parsed.is_multicast:
        return None
    if not allow_private and not is_public_ip(ip):
        return None
    return multiaddr.Multiaddr(f"/{names[0]}/{ip}/tcp/{port}")


class ServerPolicy:
    """Decides, per request, whether to dial, which address, and at what cost."""

    def __init__(self, config: AutoNATv2Config) -> None:
        config.validate()
        self.config = config
        self._recent: dict[bytes, list[float]] = {}
        self.active = 0

    def admit(self, peer: bytes, now: float) -> bool:
        """Rate limit per peer (sliding window) and overall; call ``done()`` after an admitted one."""
        if self.active >= self.config.max_concurrent:
            return False
        cutoff = now - self.config.peer_window_s
        times = [t for t in self._recent.get(peer, ()) if t > cutoff]
        if len(times) >= self.config.max_requests_per_peer:
            self._recent[peer] = times
            return False
        times.append(now)
        self._recent[peer] = times
        if len(self._recent) > 4096:
            self._recent = {p: ts for p, ts in self._recent.items() if ts and ts[-1] > cutoff}
        self.active += 1
        return True

    def done(self) -> None:
        self.active -= 1

    def plan(self, addrs: Sequence[bytes], observed_ip: str) -> DialPlan | Refusal:
        """The first address we are willing to dial; padding if its IP is not the requester's."""
        for idx, raw in enumerate(addrs):
            addr = dialable(raw, self.config.allow_private)
            if addr is None:
                continue
            ip = addr.value_for_protocol(addr.protocols()[0].name)
            same = _same_ip(ip, observed_ip)
            return DialPlan(idx, addr, 0 if same else self.config.dial_data_bytes)
        return Refusal.NO_DIALABLE_ADDRESS


def _same_ip(a: str, b: str) -> bool:
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped is not None:
        y = y.ipv4_mapped
    return x == y


class AddressReachability:
    """Per-address votes of servers -> PUBLIC / PRIVATE / UNKNOWN, with hysteresis."""

    def __init__(self, threshold: int, result_ttl_s: float, max_addrs: int = 64) -> None:
        self.threshold = threshold
        self.result_ttl_s = result_ttl_s
        self.max_addrs = max_addrs
        self._votes: dict[str, dict[bytes, tuple[bool, float]]] = {}
        self._status: dict[str, Reachability] = {}

    def record(self, addr: str, server: bytes, reachable: bool, now: float) -> Reachability:
        """Count one server's verdict on ``addr``; returns the address's status afterwards."""
        if addr not in self._votes and len(self._votes) >= self.max_addrs:
            oldest = next(iter(self._votes))
            self._votes.pop(oldest)
            self._status.pop(oldest, None)
        self._votes.setdefault(addr, {})[server] = (reachable, now)
        return self.evaluate(addr, now)

    def evaluate(self, addr: str, now: float) -> Reachability:
        votes = {s: v for s, v in self._votes.get(addr, {}).items() if now - v[1] <= self.result_ttl_s}
        if addr in self._votes:
            self._votes[addr] = votes
        yes = sum(1 for ok, _ in votes.values() if ok)
        no = len(votes) - yes
        status = self._status.get(addr, Reachability.UNKNOWN)
        if yes >= self.threshold and yes > no:
            status = Reachability.PUBLIC
        elif no >= self.threshold and no > yes:
            status = Reachability.PRIVATE
        elif not votes:
            status = Reachability.UNKNOWN
        self._status[addr] = status
        return status

    def status(self, now: float) -> dict[str, Reachability]:
        return {a: self.evaluate(a, now) for a in list(self._votes)}

    def reachable(self, now: float) -> list[str]:
        return [a for a, s in self.status(now).items() if s is Reachability.PUBLIC]


@dataclasses.dataclass
class Pending:
    """A request in flight: the dial-back for ``nonce`` proves the server really dialed."""

    nonce: int
    addrs: tuple[bytes, ...]
    dialed_back_on: str | None = None
    """Address of the connection the dial-back with this nonce arrived on, once it did."""


class NonceBook:
    """Outstanding nonces of the client; a dial-back counts only if its nonce is here."""

    def __init__(self, max_pending: int = 64) -> None:
        self.max_pending = max_pending
        self._pending: dict[int, Pending] = {}

    def open(self, nonce: int, addrs: tuple[bytes, ...]) -> Pending:
        if len(self._pending) >= self.max_pending:
            raise OverflowError(f"more than {self.max_pending} AutoNAT v2 requests in flight")
        entry = Pending(nonce, addrs)
        self._pending[nonce] = entry
        return entry

    def dial_back(self, nonce: int, local_addr: str) -> bool:
        """A dial-back arrived; True if it answers one of our requests."""
        entry = self._pending.get(nonce)
        if entry is None:
            return False
        entry.dialed_back_on = local_addr
        return True

    def close(self, nonce: int) -> None:
        self._pending.pop(nonce, None)
