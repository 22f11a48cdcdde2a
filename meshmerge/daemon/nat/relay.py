"""Circuit relay v2: hop service (opt-in, small limits) and client with reservations.

Theory of operation. A peer behind NAT keeps a *reservation* at a public
relay (``RESERVE`` on ``/libp2p/circuit/relay/0.2.0/hop``) and refreshes it
before it expires; others reach it at ``<relay addr>/p2p-circuit/p2p/<peer>``
(``CONNECT``), the relay forwarding bytes within per-circuit limits. The
relayed connection is a stopgap: every relayed connection, in either
direction, is announced to ``on_relayed`` listeners the moment it exists, so
DCUtR can try to upgrade it right away.

What we change relative to stock py-libp2p 0.8.1 (each shown by a test):
- stock hop defaults allow 1 h and 1 GiB per circuit; ours are
  ``RelayServiceConfig`` values (2 min, 128 KiB per circuit, like go-libp2p);
- the stock listener tags inbound relayed connections with its *own* id as
  the relay id (``/p2p/<self>/p2p-circuit/...``); we use the relay's id;
- the stock client side lives in ``CircuitV2Transport`` (relay discovery,
  selection, performance tracking) and its circuit addresses are filtered
  out by the swarm's dialer anyway; ``RelayClient`` is a small explicit
  client: reserve, refresh at a fraction of the granted lifetime (retrying
  until the reservation would expire), dial through a named relay.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Status
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as PbPeer
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from ..advertise import notify_addrs_changed
from .connutil import conns_to, is_circuit_addr

log = logging.getLogger(__name__)

RelayedListener = Callable[[INetConn, bool], None]
"""Called with (connection, inbound) for each new relayed connection."""

__all__ = [
    "HOP_PROTOCOL_ID",
    "STOP_PROTOCOL_ID",
    "RelayClient",
    "RelayClientConfig",
    "RelayError",
    "RelayService",
    "RelayServiceConfig",
    "ReservationInfo",
]


class RelayError(Exception):
    """A reservation or relayed dial failed; ``status`` is the relay's status name if any."""

    def __init__(self, message: str, status: str = "") -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class RelayServiceConfig:
    """Hop-side limits (we relay for others only when this service is enabled).

    circuit_duration_s: a relayed connection is cut after this long.
    circuit_bytes: ...or after this many bytes, both directions together.
    reservation_ttl_s: how long a granted reservation lives without refresh.
    max_reservations: reservations held at once.
    max_circuits_per_peer: concurrent circuits to one reserved peer.
    """

    circuit_duration_s: int = 120
    circuit_bytes: int = 128 * 1024
    reservation_ttl_s: int = 3600
    max_reservations: int = 128
    max_circuits_per_peer: int = 16

    def validate(self) -> None:
        if not 1 <= self.circuit_duration_s <= 3600:
            raise ValueError("RelayServiceConfig.circuit_duration_s must be in [1, 3600]")
        if not 1024 <= self.circuit_bytes <= 64 * 1024 * 1024:
            raise ValueError("RelayServiceConfig.circuit_bytes must be in [1 KiB, 64 MiB]")
        if not 2 <= self.reservation_ttl_s <= 24 * 3600:
            raise ValueError("RelayServiceConfig.reservation_ttl_s must be in [2, 86400]")
        for name in ("max_reservations", "max_circuits_per_peer"):
            if getattr(self, name) < 1:
                raise ValueError(f"RelayServiceConfig.{name} must be >= 1")

    def limits(self) -> RelayLimits:
        return RelayLimits(
            duration=self.circuit_duration_s,
            data=self.circuit_bytes,
            max_circuit_conns=self.max_circuits_per_peer,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl_s,
        )


@dataclasses.dataclass(frozen=True)
class RelayClientConfig:
    """Client-side pacing.

    request_timeout_s: deadline for one RESERVE or CONNECT exchange.
    refresh_fraction: refresh once this fraction of the granted lifetime has passed.
    min_refresh_s: never refresh more often than this.
    retry_s: wait between failed refresh attempts (until the reservation expires).
    """

    request_timeout_s: float = 10.0
    refresh_fraction: float = 0.75
    min_refresh_s: float = 1.0
    retry_s: float = 2.0

    def validate(self) -> None:
        if self.request_timeout_s <= 0:
            raise ValueError("RelayClientConfig.request_timeout_s must be > 0")
        if not 0.1 <= self.refresh_fraction < 1:
            raise ValueError("RelayClientConfig.refresh_fraction must be in [0.1, 1)")
        if self.min_refresh_s <= 0 or self.retry_s <= 0:
            raise ValueError("RelayClientConfig.min_refresh_s and retry_s must be > 0")


def _tag_relayed(conn: INetConn, ma: multiaddr.Multiaddr) -> None:
    """Record the circuit address on the swarm connection (SwarmConn API, not on INetConn)."""
    tag = getattr(conn, "set_transport_info", None)
    if tag is not None:
        tag([ma], ConnectionType.RELAYED)


class _Protocol(CircuitV2Protocol):
    """Stock hop/stop protocol with the relay-id fix and a relayed-connection hook."""

    def __init__(
        self, host: IHost, limits: RelayLimits, allow_hop: bool, on_inbound: Callable[[INetConn], None]
    ) -> None:
        super().__init__(host, limits, allow_hop=allow_hop)
        self._on_inbound = on_inbound

    async def handle_incoming_connection(self, stream: INetStream, remote_peer_id: bytes) -> None:
        relay = stream.muxed_conn.peer_id  # the peer that opened the STOP stream is the relay
        try:
            src = ID(remote_peer_id)
            ma = multiaddr.Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{src}")
        except Exception as exc:
            await stream.reset()
            raise ConnectionError(f"STOP from relay {relay} names an invalid peer: {exc}") from exc
        raw = RawConnection(
            stream=stream, initiator=False, connection_type=ConnectionType.RELAYED, addresses=[ma]
        )
        try:
            muxed = await self.host.upgrade_inbound_connection(raw, ma)
        except Exception as exc:
            await stream.reset()
            raise ConnectionError(f"relayed connection from {src} via {relay} failed: {exc}") from exc
        for conn in conns_to(self.host, muxed.peer_id):
            if getattr(conn, "muxed_conn", None) is muxed:
                _tag_relayed(conn, ma)
                self._on_inbound(conn)
                break


class RelayService:
    """Registers STOP (always) and HOP (when ``hop`` is given) on a host."""

    def __init__(self, host: IHost, hop: RelayServiceConfig | None = None) -> None:
        self.host = host
        self.hop = hop
        if hop is not None:
            hop.validate()
        self._listeners: list[RelayedListener] = []
        limits = (hop or RelayServiceConfig()).limits()
        self.protocol = _Protocol(host, limits, allow_hop=hop is not None, on_inbound=self._inbound)

    def add_listener(self, fn: RelayedListener) -> None:
        self._listeners.append(fn)

    def _inbound(self, conn: INetConn) -> None:
        self.notify(conn, True)

    def notify(self, conn: INetConn, inbound: bool) -> None:
        for fn in list(self._listeners):
            fn(conn, inbound)

    def running(self) -> AbstractAsyncContextManager[Any]:
        """``async with service.running():`` serves for the duration of the block."""
        cm: AbstractAsyncContextManager[Any] = background_trio_service(self.protocol)
        return cm


@dataclasses.dataclass(frozen=True)
class ReservationInfo:
    relay: ID
    expire: int  # unix seconds, as granted by the relay
    relay_addrs: tuple[multiaddr.Multiaddr, ...]

    def circuit_addrs(self, self_id: ID) -> list[multiaddr.Multiaddr]:
        out = []
        for a in self.relay_addrs:
            if is_circuit_addr(a):
                continue
            base = a if f"/p2p/{self.relay}" in str(a) else a.encapsulate(f"/p2p/{self.relay}")
            out.append(base.encapsulate(f"/p2p-circuit/p2p/{self_id}"))
        return out


def _status_name(code: int) -> str:
    try:
        return str(Status.Name(code))  # type: ignore[arg-type]
    except ValueError:
        return f"status {code}"


class RelayClient:
    """Reserves slots at relays, keeps them fresh, and dials peers through relays."""

    def __init__(self, host: IHost, service: RelayService, config: RelayClientConfig | None = None) -> None:
        self.host = host
        self.service = service
        self.config = config or RelayClientConfig()
        self.config.validate()
        self.reservations: dict[ID, ReservationInfo] = {}
        self.refreshes = 0
        self._advertising = False

    async def reserve(self, relay: ID) -> ReservationInfo:
        """One RESERVE exchange; the relay must already be connected."""
        req = HopMessage(type=HopMessage.RESERVE)
        try:
            with trio.fail_after(self.config.request_timeout_s):
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL_ID])
                try:
                    await write_delimited_msg(stream, req)
                    resp = await read_delimited_msg(stream, HopMessage)
                finally:
                    with trio.move_on_after(1):
                        await stream.close()
        except trio.TooSlowError as exc:
            raise RelayError(f"reservation at {relay} timed out") from exc
        except RelayError:
            raise
        except Exception as exc:
            raise RelayError(f"reservation at {relay} failed: {exc!r}") from exc
        if resp.type != HopMessage.STATUS or resp.status != Status.OK:
            raise RelayError(f"relay {relay} refused reservation", _status_name(resp.status))
        if not resp.HasField("reservation") or resp.reservation.expire <= int(time.time()):
            raise RelayError(f"relay {relay} granted no valid reservation")
        addrs = []
        for raw in resp.reservation.addrs[:16]:
            try:
                ma = multiaddr.Multiaddr(raw)
                ma.protocols()  # parsing is lazy: force it so garbage is dropped here
                addrs.append(ma)
            except Exception:
                continue
        if not addrs:
            addrs = [a for a in self.host.get_peerstore().addrs(relay) if not is_circuit_addr(a)]
        info = ReservationInfo(relay, int(resp.reservation.expire), tuple(addrs))
        self.reservations[relay] = info
        return info

    def next_refresh_in(self, info: ReservationInfo, now: float) -> float:
        remaining = info.expire - now
        return max(self.config.min_refresh_s, remaining * self.config.refresh_fraction)

    async def keep_reservation(self, relay: ID, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Reserve, report the first grant via ``task_status``, then refresh before expiry forever.

        Raises RelayError if the first reservation fails or a reservation
        expires without a successful refresh. While it is held, its circuit
        addresses are advertised (``circuit_addrs``); connected peers are told
        by identify push when it is granted and when it ends, however it ends.
        """
        info = await self.reserve(relay)
        try:
            self._advertise(True)
            await notify_addrs_changed(self.host)
            task_status.started(info)
            while True:
                await trio.sleep(self.next_refresh_in(info, time.time()))
                while True:
                    try:
                        info = await self.reserve(relay)
                        self.refreshes += 1
                        break
                    except RelayError as exc:
                        if time.time() + self.config.retry_s >= info.expire:
                            raise RelayError(f"reservation at {relay} expired: {exc}") from exc
                        log.warning("relay: refresh at %s failed (%s); retrying", relay, exc)
                        await trio.sleep(self.config.retry_s)
        finally:
            self.reservations.pop(relay, None)
            if not self.reservations:
                self._advertise(False)
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.request_timeout_s):
                await notify_addrs_changed(self.host)

    def _advertise(self, on: bool) -> None:
        """Make ``circuit_addrs`` part of the host's advertised addresses (AdvertisingHost only)."""
        if on == self._advertising:
            return
        method = getattr(self.host, "add_addr_provider" if on else "remove_addr_provider", None)
        if method is not None:
            method(self.circuit_addrs)
            self._advertising = on

    def circuit_addrs(self) -> list[multiaddr.Multiaddr]:
        """Addresses at which we are reachable through our live reservations."""
        now = time.time()
        out: list[multiaddr.Multiaddr] = []
        for info in self.reservations.values():
            if info.expire > now:
                out.extend(info.circuit_addrs(self.host.get_id()))
        return out

    async def dial(self, peer: ID, relay: ID) -> INetConn:
        """Open a relayed connection to ``peer`` through ``relay`` (which must be connected)."""
        ma = multiaddr.Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{peer}")
        req = HopMessage(type=HopMessage.CONNECT, peer=PbPeer(id=peer.to_bytes()))
        with trio.fail_after(self.config.request_timeout_s):
            try:
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL_ID])
            except Exception as exc:
                raise RelayError(f"cannot open hop stream to {relay}: {exc!r}") from exc
            try:
                await write_delimited_msg(stream, req)
                resp = await read_delimited_msg(stream, HopMessage)
                if resp.type != HopMessage.STATUS or resp.status != Status.OK:
                    raise RelayError(
                        f"relay {relay} refused to connect us to {peer}", _status_name(resp.status)
                    )
                raw = RawConnection(
                    stream=stream, initiator=True, connection_type=ConnectionType.RELAYED, addresses=[ma]
                )
                conn = await self.host.upgrade_outbound_connection(raw, peer)
            except RelayError:
                await stream.reset()
                raise
            except Exception as exc:
                await stream.reset()
                raise RelayError(f"relayed dial to {peer} via {relay} failed: {exc!r}") from exc
        _tag_relayed(conn, ma)
        self.service.notify(conn, False)
        return conn
