"""Our subclass of py-libp2p 0.8.1's Swarm: prompt dials and enforced limits.

Shortfalls of the stock Swarm fixed here (each has a test in tests/daemon/test_host.py):

* Dial latency. `Swarm.dial_peer` starts each address's dial and then waits up to
  250 ms (its happy-eyeballs delay) for that dial to *fail* before moving on; a
  success does not end the wait, so every connect to a single-address peer takes
  >= 250 ms. Our `dial_peer` waits on "this dial finished, either way" and
  returns on the first success; the stagger only applies between addresses.
* Limits. The stock inbound cap is a bare count; there is no per-IP-group cap,
  no inbound rate limit, no per-peer cap on accept, and stream floods queue on a
  semaphore instead of being refused. We consult `limits.ConnectionLimiter` before
  the handshake (inbound) and before registering a connection (both directions),
  and cap inbound streams per connection and in total, each refusal logged once
  per second per limit.
* Auto-dialing. The stock `AutoConnector` dials peers from the peerstore until
  the connection count reaches the midpoint of the watermarks (with default
  watermarks: 200 dials). Peers the DHT merely heard of would be dialed blindly;
  we disable it — the DHT and gossip layers choose whom to connect to.
* Shutdown. `Swarm.close` closes connections one after another and each close
  sleeps 100 ms, so a node with 20 peers takes over 2 s to stop. We close them
  concurrently first.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import IMuxedConn, INetConn, INetStream
from libp2p.io.abc import ReadWriteCloser
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.exceptions import SwarmException
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.utils.address_validation import is_relay_address
from multiaddr import Multiaddr

from .limits import ConnectionLimiter, ConnectionLimits, LogThrottle, Refusal

log = logging.getLogger("meshmerge.host")

StreamHandler = Callable[[INetStream], Awaitable[None]]


class LimitRefused(SwarmException):
    """A connection was refused by one of our `ConnectionLimits`."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(f"connection refused: {refusal}")
        self.refusal = refusal


def remote_ip(obj: Any) -> str | None:
    """Best effort: the remote IP of a raw, secured or muxed connection."""
    try:
        addr = obj.get_remote_address()
    except Exception:
        return None
    if not addr:
        return None
    return str(addr[0])


def _endpoint(obj: Any) -> tuple[str, int] | None:
    try:
        addr = obj.get_remote_address()
    except Exception:
        return None
    return (str(addr[0]), int(addr[1])) if addr else None


def _rank(addr: Multiaddr) -> int:
    names = {p.name for p in addr.protocols()}
    if "quic-v1" in names:
        return 0
    if "tcp" in names and not names & {"ws", "wss"}:
        return 1
    return 2


class _NoAutoConnect(AutoConnector):
    async def start(self) -> None:
        self._started = False

    async def maybe_connect(self) -> None:
        return None


class MeshSwarm(Swarm):
    def __init__(
        self,
        *args: Any,
        limits: ConnectionLimits,
        dial_stagger: float = 0.25,
        max_dial_addrs: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.auto_connector = _NoAutoConnect(swarm=self)
        self.limiter = ConnectionLimiter(limits)
        self.dial_stagger = dial_stagger
        self.max_dial_addrs = max_dial_addrs
        self._throttle = LogThrottle(1.0)
        self._tracked: dict[int, INetConn] = {}
        self._inbound_streams = 0
        self._streams_by_conn: dict[int, int] = {}
        self.refusals: dict[str, int] = {}
        self._pending_inbound: dict[tuple[str, int], Callable[[], None]] = {}

    # --- logging -----------------------------------------------------------------------
    def _refused(self, refusal: Refusal, action: str) -> None:
        self.refusals[refusal.limit] = self.refusals.get(refusal.limit, 0) + 1
        ok, swallowed = self._throttle.should_log(refusal.limit, trio.current_time())
        if ok:
            extra = f" ({swallowed} more refused since last line)" if swallowed else ""
            log.warning("%s: %s%s", action, refusal, extra)

    # --- dialing -----------------------------------------------------------------------
    async def dial_peer(self, peer_id: ID) -> list[INetConn]:
        live = [c for c in self.get_connections(peer_id) if not c.is_closed]
        if live:
            return live
        ongoing = self._ongoing_dials.get(peer_id)
        if ongoing is not None:
            await ongoing.wait()
            live = [c for c in self.get_connections(peer_id) if not c.is_closed]
            if live:
                return live
        done = trio.Event()
        self._ongoing_dials[peer_id] = done
        try:
            return await self._dial_addrs(peer_id, await self._dialable_addrs(peer_id))
        finally:
            done.set()
            self._ongoing_dials.pop(peer_id, None)

    async def _dialable_addrs(self, peer_id: ID) -> list[Multiaddr]:
        try:
            addrs = list(self.peerstore.addrs(peer_id))
        except Exception as exc:
            raise SwarmException(f"no known addresses for peer {peer_id}") from exc
        usable: list[Multiaddr] = []
        for addr in addrs:
            if is_relay_address(addr) or not await self.connection_gate.is_allowed(addr):
                continue
            try:
                if self.transport_manager.transport_for_dialing(addr) is None:
                    continue
            except Exception:
                continue
            if addr not in usable:
                usable.append(addr)
        if not usable:
            raise SwarmException(f"no dialable address for peer {peer_id} (known: {len(addrs)})")
        usable.sort(key=_rank)
        return usable[: self.max_dial_addrs]

    async def _dial_addrs(self, peer_id: ID, addrs: list[Multiaddr]) -> list[INetConn]:
        """Staggered parallel dial: next address starts after `dial_stagger` or a failure."""
        won: list[INetConn] = []
        errors: list[str] = []
        async with trio.open_nursery() as nursery:
            for addr in addrs:
                finished = trio.Event()

                async def attempt(addr: Multiaddr = addr, finished: trio.Event = finished) -> None:
                    try:
                        conn = await self._dial_addr_single_attempt(addr, peer_id)
                    except Exception as exc:
                        errors.append(f"{addr}: {exc}")
                    else:
                        if won:
                            await conn.close()
                        else:
                            won.append(conn)
                            nursery.cancel_scope.cancel()
                    finally:
                        finished.set()

                nursery.start_soon(attempt)
                with trio.move_on_after(self.dial_stagger):
                    await finished.wait()
                if won:
                    break
        if not won:
            raise SwarmException(
                f"dial to {peer_id} failed on all {len(addrs)} address(es): {'; '.join(errors)}"
            )
        return won

    # --- inbound admission ---------------------------------------------------------------
    async def _handle_inbound_connection(self, read_write_closer: ReadWriteCloser, maddr: Multiaddr) -> None:
        ip = remote_ip(read_write_closer)
        refusal = self.limiter.admit_inbound(ip, trio.current_time())
        if refusal is not None:
            self._refused(refusal, "inbound connection refused")
            with contextlib.suppress(Exception):
                await read_write_closer.close()
            return
        pending = True

        def end_pending() -> None:
            nonlocal pending
            if pending:
                pending = False
                self.limiter.end_pending(ip)

        endpoint = _endpoint(read_write_closer)
        if endpoint is not None:
            self._pending_inbound[endpoint] = end_pending
        try:
            await super()._handle_inbound_connection(read_write_closer, maddr)
        finally:
            if endpoint is not None:
                self._pending_inbound.pop(endpoint, None)
            end_pending()

    async def add_conn(self, muxed_conn: IMuxedConn, direction: str = "unknown") -> Any:
        peer = str(muxed_conn.peer_id)
        ip = remote_ip(muxed_conn)
        inbound = direction == "inbound"
        refusal = self.limiter.admit_connection(peer, ip, inbound)
        if refusal is not None:
            self._refused(refusal, f"{direction} connection refused")
            with contextlib.suppress(Exception):
                await muxed_conn.close()
            raise LimitRefused(refusal)
        if inbound:
            # The handshake is over: this connection stops counting as pending.
            endpoint = _endpoint(muxed_conn)
            end_pending = self._pending_inbound.pop(endpoint, None) if endpoint else None
            if end_pending is not None:
                end_pending()
        key = id(muxed_conn)
        self.limiter.opened(key, peer, ip)
        try:
            conn = await super().add_conn(muxed_conn, direction=direction)
        except BaseException:
            self.limiter.closed(key)
            raise
        self._tracked[key] = conn
        return conn

    async def notify_disconnected(self, conn: INetConn) -> None:
        key = id(getattr(conn, "muxed_conn", conn))
        if self._tracked.pop(key, None) is not None:
            self.limiter.closed(key)
        self._streams_by_conn.pop(key, None)
        await super().notify_disconnected(conn)

    async def close(self) -> None:
        conns = [c for cs in list(self.connections.values()) for c in list(cs)]

        async def close_one(conn: INetConn) -> None:
            with contextlib.suppress(Exception):
                await conn.close()

        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(close_one, conn)
        await super().close()

    # --- streams -----------------------------------------------------------------------
    def wrap_stream_handler(self, inner: StreamHandler) -> StreamHandler:
        """Cap concurrently handled inbound streams, per connection and in total."""
        lim = self.limiter.limits

        async def handler(stream: INetStream) -> None:
            conn_key = id(getattr(stream.muxed_conn, "muxed_conn", stream.muxed_conn))
            per_conn = self._streams_by_conn.get(conn_key, 0)
            refusal = None
            if per_conn >= lim.max_streams_per_connection:
                refusal = Refusal(
                    "max_streams_per_connection",
                    lim.max_streams_per_connection,
                    f"peer {stream.muxed_conn.peer_id}",
                )
            elif self._inbound_streams >= lim.max_inbound_streams:
                refusal = Refusal(
                    "max_inbound_streams", lim.max_inbound_streams, f"peer {stream.muxed_conn.peer_id}"
                )
            if refusal is not None:
                self._refused(refusal, "inbound stream reset")
                with contextlib.suppress(Exception):
                    await stream.reset()
                return
            self._streams_by_conn[conn_key] = per_conn + 1
            self._inbound_streams += 1
            try:
                await inner(stream)
            finally:
                self._inbound_streams -= 1
                left = self._streams_by_conn.get(conn_key, 1) - 1
                if left > 0:
                    self._streams_by_conn[conn_key] = left
                else:
                    self._streams_by_conn.pop(conn_key, None)

        return handler
