"""DCUtR (``/libp2p/dcutr``): upgrade a relayed connection to a direct one by TCP hole punching.

Theory of operation (libp2p DCUtR spec). A is the peer that *received* the
relayed connection, B the one that dialed it. The moment the relay layer
reports the inbound relayed connection (no polling), A opens a DCUtR stream
over it and sends CONNECT with its public addresses, B answers CONNECT with
its own; A measures the round trip, sends SYNC and dials B after RTT/2,
while B dials A as soon as SYNC arrives. Both dials leave from the listen
port (SO_REUSEPORT), so each NAT sees an outgoing packet to exactly the
endpoint the other side is sending from and lets the crossing SYNs through;
TCP simultaneous open merges them into one connection. B is the Noise
initiator and A the responder on every punched connection, whichever
socket wins, so the handshake roles always match.

Only public addresses are exchanged and dialed, all in parallel: LAN
addresses are useless across NATs and dialing them one by one is what made
stock py-libp2p take ~11 s. Every attempt has a hard deadline; on failure
the relayed connection simply stays in use.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from .connutil import direct_conn, is_public_ip, public_addrs, relayed_conn, tcp_endpoint
from .relay import RelayService

PROTOCOL_ID = TProtocol("/libp2p/dcutr")
log = logging.getLogger(__name__)


class DCUtRError(Exception):
    """A hole-punch attempt failed; the relayed connection stays in place."""


@dataclasses.dataclass(frozen=True)
class DCUtRConfig:
    """Hole-punch pacing and limits.

    attempt_deadline_s: hard limit for one attempt (exchange + dials + handshake).
    max_attempts: attempts per relayed connection before settling for the relay.
    retry_pause_s: pause between attempts.
    max_addrs: addresses sent and dialed per attempt.
    max_msg_bytes: largest accepted DCUtR message.
    max_sync_delay_s: cap on the RTT/2 wait before A dials.
    max_concurrent: hole punches in flight at once.
    close_relayed_after_s: close the relayed connection this long after a
        direct one exists (None keeps it until the relay cuts it).
    max_records: per-peer upgrade timelines kept for inspection (oldest dropped).
    """

    attempt_deadline_s: float = 4.0
    max_attempts: int = 2
    retry_pause_s: float = 0.2
    max_addrs: int = 8
    max_msg_bytes: int = 4096
    max_sync_delay_s: float = 0.5
    max_concurrent: int = 16
    close_relayed_after_s: float | None = 2.0
    max_records: int = 1024

    def validate(self) -> None:
        if not 0.5 <= self.attempt_deadline_s <= 60:
            raise ValueError("DCUtRConfig.attempt_deadline_s must be in [0.5, 60]")
        if not 1 <= self.max_attempts <= 5:
            raise ValueError("DCUtRConfig.max_attempts must be in [1, 5]")
        for name in ("max_addrs", "max_msg_bytes", "max_concurrent", "max_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"DCUtRConfig.{name} must be >= 1")
        if self.retry_pause_s < 0 or self.max_sync_delay_s < 0:
            raise ValueError("DCUtRConfig.retry_pause_s and max_sync_delay_s must be >= 0")
        if self.close_relayed_after_s is not None and self.close_relayed_after_s < 0:
            raise ValueError("DCUtRConfig.close_relayed_after_s must be >= 0 or None")


@dataclasses.dataclass
class PunchRecord:
    """Timeline of one relayed connection's upgrade (monotonic seconds)."""

    peer: ID
    relayed_at: float
    direct_at: float | None = None
    attempts: int = 0
    outcome: str = "pending"  # pending | direct | failed
    error: str = ""


def _decode_addrs(raw: Iterable[bytes], limit: int) -> list[multiaddr.Multiaddr]:
    out: list[multiaddr.Multiaddr] = []
    seen: set[tuple[str, int]] = set()
    for b in list(raw)[: 4 * limit]:
        try:
            ep = tcp_endpoint(multiaddr.Multiaddr(b))
        except Exception:  # undecodable bytes from the peer: skip
            continue
        if ep is None or not is_public_ip(ep[0]) or ep in seen:
            continue
        seen.add(ep)
        fam = "ip6" if ":" in ep[0] else "ip4"
        out.append(multiaddr.Multiaddr(f"/{fam}/{ep[0]}/tcp/{ep[1]}"))
    return out[:limit]


class DCUtRService:
    """Runs both DCUtR roles on a host and hole-punches every inbound relayed connection."""

    def __init__(self, host: IHost, relay: RelayService, config: DCUtRConfig | None = None) -> None:
        self.host = host
        self.config = config or DCUtRConfig()
        self.config.validate()
        self.records: dict[ID, PunchRecord] = {}
        self._send, self._recv = trio.open_memory_channel[ID](self.config.max_concurrent)
        self._busy: set[ID] = set()
        self._nursery: trio.Nursery | None = None
        relay.add_listener(self._on_relayed)

    # ---- triggering -------------------------------------------------------
    def _on_relayed(self, conn: INetConn, inbound: bool) -> None:
        peer = conn.muxed_conn.peer_id
        self.records.pop(peer, None)
        self.records[peer] = PunchRecord(peer, time.monotonic())
        while len(self.records) > self.config.max_records:  # oldest first (insertion order)
            del self.records[next(iter(self.records))]
        if not inbound or peer in self._busy:
            return  # the inbound side (spec: A) initiates
        try:
            self._send.send_nowait(peer)
        except trio.WouldBlock:
            self.records[peer].outcome = "failed"
            self.records[peer].error = "too many hole punches in flight"

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the protocol and drive hole punches until cancelled."""
        self.host.set_stream_handler(PROTOCOL_ID, self._handle)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                async for peer in self._recv:
                    if peer not in self._busy:
                        self._busy.add(peer)
                        nursery.start_soon(self._upgrade_task, peer)
        finally:
            self.host.remove_stream_handler(PROTOCOL_ID)

    async def _upgrade_task(self, peer: ID) -> None:
        try:
            await self.upgrade(peer)
        except DCUtRError as exc:
            log.info("dcutr: staying relayed to %s: %s", peer, exc)
        finally:
            self._busy.discard(peer)

    # ---- A: initiator -------------------------------------------------------
    async def upgrade(self, peer: ID) -> INetConn:
        """Hole-punch to ``peer`` (connected via relay); return the direct connection."""
        rec = self.records.setdefault(peer, PunchRecord(peer, time.monotonic()))
        last = "no attempt"
        for attempt in range(self.config.max_attempts):
            if (c := direct_conn(self.host, peer)) is not None:
                return self._done(rec, c)
            if relayed_conn(self.host, peer) is None:
                last = "relayed connection is gone"
                break
            rec.attempts = attempt + 1
            try:
                with trio.fail_after(self.config.attempt_deadline_s):
                    conn = await self._attempt(peer)
                return self._done(rec, conn)
            except trio.TooSlowError:
                last = f"attempt {attempt + 1} hit the {self.config.attempt_deadline_s} s deadline"
            except DCUtRError as exc:
                last = str(exc)
            except Exception as exc:  # stream/muxer errors from the peer or the relay
                last = f"attempt {attempt + 1} failed: {exc!r}"
            if (c := direct_conn(self.host, peer)) is not None:
                return self._done(rec, c)
            await trio.sleep(self.config.retry_pause_s)
        rec.outcome, rec.error = "failed", last
        raise DCUtRError(last)

    def _done(self, rec: PunchRecord, conn: INetConn) -> INetConn:
        if rec.direct_at is None:
            rec.direct_at = time.monotonic()
        rec.outcome = "direct"
        return conn

    async def _attempt(self, peer: ID) -> INetConn:
        rconn = relayed_conn(self.host, peer)
        if rconn is None:
            raise DCUtRError("no relayed connection")
        ours = public_addrs(self.host, self.config.max_addrs)
        stream = await self.host.new_stream(peer, [PROTOCOL_ID])  # only the relayed connection exists
        try:
            t0 = time.monotonic()
            await self._write(stream, HolePunch.CONNECT, ours)
            msg = await self._read(stream)
            rtt = time.monotonic() - t0
            if msg.type != HolePunch.CONNECT:
                raise DCUtRError("peer did not answer CONNECT")
            theirs = _decode_addrs(msg.ObsAddrs, self.config.max_addrs)
            if not theirs:
                raise DCUtRError("peer offered no public address")
            await self._write(stream, HolePunch.SYNC, [])
        finally:
            with trio.move_on_after(0.5):
                await stream.close()
        await trio.sleep(min(rtt / 2, self.config.max_sync_delay_s))
        return await self._dial_all(peer, theirs, as_responder=True)

    # ---- B: responder -------------------------------------------------------
    async def _handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(self.config.attempt_deadline_s):
                msg = await self._read(stream)
                if msg.type != HolePunch.CONNECT:
                    raise DCUtRError("expected CONNECT")
                theirs = _decode_addrs(msg.ObsAddrs, self.config.max_addrs)
                await self._write(stream, HolePunch.CONNECT, public_addrs(self.host, self.config.max_addrs))
                msg = await self._read(stream)
                if msg.type != HolePunch.SYNC:
                    raise DCUtRError("expected SYNC")
                if theirs:
                    conn = await self._dial_all(peer, theirs, as_responder=False)
                    rec = self.records.setdefault(peer, PunchRecord(peer, time.monotonic()))
                    self._done(rec, conn)
        except (trio.TooSlowError, DCUtRError, Exception) as exc:
            log.debug("dcutr: responder side with %s ended: %r", peer, exc)
        finally:
            with trio.move_on_after(0.5):
                await stream.close()

    # ---- shared ---------------------------------------------------------
    async def _write(self, stream: INetStream, kind: int, addrs: list[multiaddr.Multiaddr]) -> None:
        msg = HolePunch(type=kind, ObsAddrs=[a.to_bytes() for a in addrs])  # type: ignore[arg-type]
        await stream.write(encode_varint_prefixed(msg.SerializeToString()))

    async def _read(self, stream: INetStream) -> HolePunch:
        try:
            raw = await read_varint_prefixed_bytes_limited(stream, self.config.max_msg_bytes)
            msg = HolePunch()
            msg.ParseFromString(raw)
        except Exception as exc:
            raise DCUtRError(f"bad DCUtR message: {exc!r}") from exc
        return msg

    async def _dial_all(self, peer: ID, addrs: list[multiaddr.Multiaddr], *, as_responder: bool) -> INetConn:
        """Dial every address at once from the listen port; first direct connection wins."""
        network = self.host.get_network()
        source = listen_source(self.host)
        done = trio.Event()
        errors: list[str] = []

        async def one(addr: multiaddr.Multiaddr) -> None:
            try:
                if as_responder:
                    await network.dial_addr_as_responder(addr, peer, source)
                else:
                    await network.dial_addr(addr, peer, source)
                done.set()
            except Exception as exc:
                errors.append(f"{addr}: {exc!r}")

        async def watch() -> None:
            # a punched connection may also arrive through our listener
            while direct_conn(self.host, peer) is None:
                await trio.sleep(0.02)
            done.set()

        async with trio.open_nursery() as nursery:
            for a in addrs:
                nursery.start_soon(one, a)
            nursery.start_soon(watch)

            async def stop_when_done() -> None:
                await done.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_when_done)
        conn = direct_conn(self.host, peer)
        if conn is None:
            raise DCUtRError("no direct connection: " + "; ".join(errors[-3:]))
        if self.config.close_relayed_after_s is not None and self._nursery is not None:
            rc = relayed_conn(self.host, peer)
            if rc is not None:
                self._nursery.start_soon(_close_later, rc, self.config.close_relayed_after_s)
        return conn


def listen_source(host: IHost) -> tuple[str, int] | None:
    """(ip, port) of our first IPv4 TCP listen address: hole-punch SYNs must leave from it
    so each NAT maps them to the endpoint the other side dials (any TCP transport whose
    listeners set SO_REUSEPORT, as py-libp2p 0.8.1's do, can share the port)."""
    for a in host.get_transport_addrs():
        ep = tcp_endpoint(a)
        if ep is not None and ":" not in ep[0]:
            return ep
    return None


async def _close_later(conn: INetConn, delay: float) -> None:
    await trio.sleep(delay)
    try:
        await conn.close()
    except Exception as exc:
        log.debug("dcutr: closing relayed connection failed: %r", exc)
