"""AutoNAT v1 (``/libp2p/autonat/1.0.0``): am I reachable from the internet?

Theory of operation. A client asks a server to dial it back. The answer is
only meaningful if the server opens a *fresh* connection: stock py-libp2p
0.8.1 dials back with ``host.connect``, which returns the connection the
request arrived on, so every client looks publicly reachable even when its
port is closed (tests/daemon/nat/test_autonat.py shows it). Here the server
dials back from a separate dialer host with its own random identity and an
ephemeral port, as go-libp2p does, and only to the observed address of the
request plus requested addresses with the same IP (no amplification).

The client feeds verdicts from several servers into ``ReachabilityTracker``
(a sans-I/O state machine, time is a parameter) and announces a change only
once ``threshold`` distinct servers agree and outnumber the dissent; that
change event is what the DHT uses to switch between server and client mode.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from .connutil import conn_of_stream, is_circuit_addr, is_relayed, public_addrs, tcp_endpoint
from .hostfactory import key_pair, make_host

PROTOCOL_ID = TProtocol("/libp2p/autonat/1.0.0")
log = logging.getLogger(__name__)


class Reachability(enum.Enum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


class AutoNATError(Exception):
    """A probe could not produce a verdict (protocol error, refusal, timeout)."""


@dataclasses.dataclass(frozen=True)
class AutoNATConfig:
    """Limits and pacing for both roles.

    dial_timeout_s: hard deadline of one dial-back (server) — all addresses together.
    request_timeout_s: client deadline for one request/response exchange.
    max_msg_bytes: largest accepted AutoNAT message; bigger ones are rejected unread.
    max_dial_addrs: addresses the server dials per request (observed address first).
    max_concurrent_dials: dial-backs in flight at once on a server.
    peer_min_interval_s: a server answers one peer at most once per this interval.
    threshold: distinct servers that must agree before reachability flips.
    result_ttl_s: a server's verdict counts for this long.
    probe_interval_s: client re-probe period once reachability is known.
    unknown_probe_interval_s: client re-probe period while still unknown.
    """

    dial_timeout_s: float = 5.0
    request_timeout_s: float = 10.0
    max_msg_bytes: int = 4096
    max_dial_addrs: int = 8
    max_concurrent_dials: int = 8
    peer_min_interval_s: float = 5.0
    threshold: int = 3
    result_ttl_s: float = 1800.0
    probe_interval_s: float = 900.0
    unknown_probe_interval_s: float = 15.0

    def validate(self) -> None:
        for name in (
            "dial_timeout_s",
            "request_timeout_s",
            "result_ttl_s",
            "probe_interval_s",
            "unknown_probe_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"AutoNATConfig.{name} must be > 0")
        if self.peer_min_interval_s < 0:
            raise ValueError("AutoNATConfig.peer_min_interval_s must be >= 0")
        for name in ("max_msg_bytes", "max_dial_addrs", "max_concurrent_dials", "threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"AutoNATConfig.{name} must be >= 1")
        if self.max_msg_bytes > 65536:
            raise ValueError("AutoNATConfig.max_msg_bytes must be <= 65536 (messages are tiny)")


class ReachabilityTracker:
    """Sans-I/O vote over servers' verdicts with hysteresis.

    Each server holds one vote (its latest verdict, expiring after
    ``result_ttl_s``). The status becomes PUBLIC/PRIVATE when at least
    ``threshold`` live votes say so and they outnumber the other side;
    otherwise the previous status stands, so one stray answer never flips it.
    """

    def __init__(self, threshold: int, result_ttl_s: float) -> None:
        self.threshold = threshold
        self.result_ttl_s = result_ttl_s
        self.status = Reachability.UNKNOWN
        self._votes: dict[ID, tuple[bool, float]] = {}

    def record(self, server: ID, reachable: bool, now: float) -> Reachability | None:
        """Count a verdict; return the new status if it changed."""
        self._votes[server] = (reachable, now)
        return self.evaluate(now)

    def evaluate(self, now: float) -> Reachability | None:
        self._votes = {s: v for s, v in self._votes.items() if now - v[1] <= self.result_ttl_s}
        yes = sum(1 for ok, _ in self._votes.values() if ok)
        no = len(self._votes) - yes
        new = self.status
        if yes >= self.threshold and yes > no:
            new = Reachability.PUBLIC
        elif no >= self.threshold and no > yes:
            new = Reachability.PRIVATE
        if new is self.status:
            return None
        self.status = new
        return new

    def votes(self) -> dict[ID, bool]:
        return {s: ok for s, (ok, _) in self._votes.items()}


def _encode(msg: Message) -> bytes:
    return encode_varint_prefixed(msg.SerializeToString())


async def _read(stream: INetStream, limit: int) -> Message:
    raw = await read_varint_prefixed_bytes_limited(stream, limit)
    msg = Message()
    try:
        msg.ParseFromString(raw)
    except Exception as exc:
        raise AutoNATError(f"undecodable AutoNAT message: {exc}") from exc
    return msg


def _response(status: int, text: str, addr: bytes | None = None) -> Message:
    msg = Message(type=Message.DIAL_RESPONSE)
    msg.dialResponse.status = status  # type: ignore[assignment]
    msg.dialResponse.statusText = text
    if addr is not None:
        msg.dialResponse.addr = addr
    return msg


class AutoNATServer:
    """Answers dial requests by dialing back from a separate, throwaway identity."""

    def __init__(self, host: IHost, config: AutoNATConfig | None = None) -> None:
        self.host = host
        self.config = config or AutoNATConfig()
        self.config.validate()
        self._dialer: IHost | None = None
        self._sem = trio.Semaphore(self.config.max_concurrent_dials)
        self._last_seen: dict[ID, float] = {}
        self.served = 0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[AutoNATServer]:
        """Start the dialer host and register the handler for the duration."""
        self._dialer = make_host(key_pair())
        async with self._dialer.run([]):
            self.host.set_stream_handler(PROTOCOL_ID, self._handle)
            try:
                yield self
            finally:
                self.host.remove_stream_handler(PROTOCOL_ID)

    async def _handle(self, stream: INetStream) -> None:
        try:
            with trio.fail_after(self.config.request_timeout_s + self.config.dial_timeout_s):
                try:
                    req = await _read(stream, self.config.max_msg_bytes)
                    resp = await self._answer(stream, req)
                except AutoNATError as exc:
                    resp = _response(Message.E_BAD_REQUEST, str(exc))
                except ValueError as exc:  # oversized / bad varint
                    resp = _response(Message.E_BAD_REQUEST, f"bad framing: {exc}")
                await stream.write(_encode(resp))
        except (trio.TooSlowError, Exception) as exc:  # never let a peer crash the handler
            log.debug("autonat: request from %s failed: %s", stream.muxed_conn.peer_id, exc)
        finally:
            with trio.move_on_after(1):
                await stream.close()

    async def _answer(self, stream: INetStream, req: Message) -> Message:
        peer = stream.muxed_conn.peer_id
        if req.type != Message.DIAL or not req.HasField("dial"):
            return _response(Message.E_BAD_REQUEST, "expected DIAL")
        if req.dial.peer.id and req.dial.peer.id != peer.to_bytes():
            return _response(Message.E_BAD_REQUEST, "peer id does not match the connection")
        conn = conn_of_stream(self.host, stream)
        if conn is None or is_relayed(conn):
            return _response(Message.E_DIAL_REFUSED, "refusing requests over relayed connections")
        observed = stream.get_remote_address()
        if not observed:
            return _response(Message.E_DIAL_REFUSED, "observed address unknown")
        now = trio.current_time()
        last = self._last_seen.get(peer)
        if last is not None and now - last < self.config.peer_min_interval_s:
            return _response(Message.E_DIAL_REFUSED, "too many requests")
        self._last_seen[peer] = now
        if len(self._last_seen) > 4096:
            cutoff = now - self.config.peer_min_interval_s
            self._last_seen = {p: t for p, t in self._last_seen.items() if t >= cutoff}
        targets = self._targets(observed, req.dial.peer.addrs)
        if not targets:
            return _response(Message.E_DIAL_ERROR, "no dialable addresses")
        self.served += 1
        async with self._sem:
            ok = await self._dial_back(peer, targets)
        if ok is None:
            return _response(Message.E_DIAL_ERROR, "dial back failed")
        return _response(Message.OK, "OK", ok.to_bytes())

    def _targets(self, observed: tuple[str, int], raw_addrs: Iterable[bytes]) -> list[multiaddr.Multiaddr]:
        obs_ip, obs_port = observed[0], observed[1]
        fam = "ip6" if ":" in obs_ip else "ip4"
        out = [multiaddr.Multiaddr(f"/{fam}/{obs_ip}/tcp/{obs_port}")]
        seen = {str(out[0])}
        for raw in list(raw_addrs)[: 4 * self.config.max_dial_addrs]:
            try:
                ep = tcp_endpoint(multiaddr.Multiaddr(raw))
            except Exception:  # undecodable bytes from the client: skip
                continue
            if ep is None or ep[0] != obs_ip:
                continue
            ma = multiaddr.Multiaddr(f"/{fam}/{ep[0]}/tcp/{ep[1]}")
            if str(ma) not in seen:
                seen.add(str(ma))
                out.append(ma)
        return out[: self.config.max_dial_addrs]

    async def _dial_back(self, peer: ID, targets: list[multiaddr.Multiaddr]) -> multiaddr.Multiaddr | None:
        """Dial all targets at once from the dialer identity; the first to connect wins.

        Parallel, because the observed address of a NATed client is usually a
        dead end (the mapping of its outgoing socket) that would otherwise eat
        the whole deadline before its real listen address is tried.
        """
        assert self._dialer is not None
        network = self._dialer.get_network()
        winner: list[multiaddr.Multiaddr] = []

        async def one(addr: multiaddr.Multiaddr, cancel: trio.CancelScope) -> None:
            try:
                await network.dial_addr(addr, peer)
            except Exception as exc:
                log.debug("autonat: dial-back %s to %s failed: %s", peer, addr, exc)
                return
            winner.append(addr)
            cancel.cancel()

        with trio.move_on_after(self.config.dial_timeout_s):
            async with trio.open_nursery() as nursery:
                for addr in targets:
                    nursery.start_soon(one, addr, nursery.cancel_scope)
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await network.close_peer(peer)
        return winner[0] if winner else None


class AutoNATClient:
    """Probes servers and tracks our reachability; calls listeners on change."""

    def __init__(self, host: IHost, config: AutoNATConfig | None = None) -> None:
        self.host = host
        self.config = config or AutoNATConfig()
        self.config.validate()
        self.tracker = ReachabilityTracker(self.config.threshold, self.config.result_ttl_s)
        self._listeners: list[Callable[[Reachability], None]] = []
        self.changed = trio.Event()

    @property
    def status(self) -> Reachability:
        return self.tracker.status

    def add_listener(self, fn: Callable[[Reachability], None]) -> None:
        """``fn(new_status)`` runs synchronously on every reachability change."""
        self._listeners.append(fn)

    async def watch(self, fn: Callable[[Reachability], Awaitable[None]]) -> None:
        """Await ``fn(status)`` after each change, e.g. ``DHT.set_mode`` (server when PUBLIC).

        Runs until cancelled; if several changes land before ``fn`` returns,
        only the latest status is delivered.
        """
        delivered = Reachability.UNKNOWN
        while True:
            if self.status is not delivered:
                delivered = self.status
                await fn(delivered)
                continue
            await self.changed.wait()

    def _our_addrs(self) -> list[bytes]:
        """Public candidates (observed and predicted) first, then what the host advertises."""
        own = [
            a.decapsulate(multiaddr.Multiaddr(f"/p2p/{self.host.get_id()}"))
            for a in self.host.get_addrs()
            if not is_circuit_addr(a)
        ]
        out: list[bytes] = []
        for a in [*public_addrs(self.host, 8), *own]:
            if a.to_bytes() not in out:
                out.append(a.to_bytes())
        return out[:16]

    async def probe(self, server: ID, addrs: Iterable[multiaddr.Multiaddr] | None = None) -> bool:
        """Ask one server; True = it reached us, False = it could not. Raises AutoNATError.

        ``addrs`` overrides the addresses we ask to be dialed (default: our own).
        """
        req = Message(type=Message.DIAL)
        req.dial.peer.id = self.host.get_id().to_bytes()
        req.dial.peer.addrs.extend([a.to_bytes() for a in addrs] if addrs is not None else self._our_addrs())
        try:
            with trio.fail_after(self.config.request_timeout_s):
                stream = await self.host.new_stream(server, [PROTOCOL_ID])
                try:
                    await stream.write(_encode(req))
                    resp = await _read(stream, self.config.max_msg_bytes)
                finally:
                    with trio.move_on_after(1):
                        await stream.close()
        except AutoNATError:
            raise
        except (trio.TooSlowError, Exception) as exc:
            raise AutoNATError(f"probe via {server} failed: {exc!r}") from exc
        if resp.type != Message.DIAL_RESPONSE or not resp.HasField("dialResponse"):
            raise AutoNATError("server sent no DIAL_RESPONSE")
        status = resp.dialResponse.status
        if status == Message.OK:
            return True
        if status == Message.E_DIAL_ERROR:
            return False
        raise AutoNATError(
            f"server answered {Message.ResponseStatus.Name(status)}: {resp.dialResponse.statusText}"
        )

    def record(self, server: ID, reachable: bool) -> None:
        new = self.tracker.record(server, reachable, trio.current_time())
        if new is not None:
            log.info("autonat: reachability is now %s", new.value)
            self.changed.set()
            self.changed = trio.Event()
            for fn in list(self._listeners):
                fn(new)

    async def check(self, servers: Iterable[ID]) -> Reachability:
        """Probe the given servers concurrently and return the resulting status."""

        async def one(s: ID) -> None:
            try:
                self.record(s, await self.probe(s))
            except AutoNATError as exc:
                log.debug("autonat: %s", exc)

        async with trio.open_nursery() as nursery:
            for s in servers:
                nursery.start_soon(one, s)
        return self.status

    def candidate_servers(self) -> list[ID]:
        """Connected peers that announced the AutoNAT protocol."""
        return peers_speaking(self.host, PROTOCOL_ID)

    async def run(self) -> None:
        """Probe connected servers forever, faster while reachability is unknown."""
        while True:
            servers = self.candidate_servers()
            if servers:
                await self.check(servers[: 2 * self.config.threshold])
            interval = (
                self.config.unknown_probe_interval_s
                if self.status is Reachability.UNKNOWN
                else self.config.probe_interval_s
            )
            await trio.sleep(interval)


def peers_speaking(host: IHost, protocol: str) -> list[ID]:
    """Connected peers whose identify listed ``protocol`` (peers not yet identified are skipped)."""
    out = []
    store = host.get_peerstore()
    for p in host.get_connected_peers():
        try:
            if protocol in (store.get_protocols(p) or []):
                out.append(p)
        except Exception:
            continue
    return out
