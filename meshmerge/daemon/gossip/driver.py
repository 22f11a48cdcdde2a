"""Thin trio driver: runs a :class:`GossipSubRouter` on py-libp2p streams.

All protocol decisions stay in the router; this module only moves bytes and
time. Per peer it keeps one outbound stream (opened when the connection
appears, negotiating /meshsub/1.2.0 → 1.1.0 → 1.0.0 → /floodsub/1.0.0) with a
writer task that drains the router's bounded queue, and it reads every inbound
pubsub stream through the strict :class:`~meshmerge.proto.gossipsub.FrameDecoder`.
A stream that sends undecodable bytes is reset and the peer removed. Every task
lives in the service's nursery.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio

from meshmerge.daemon.gossip.router import PROTOCOLS, Delivery, GossipSubRouter
from meshmerge.proto.gossipsub import FrameDecoder, GossipCodecError

__all__ = ["GossipService"]

log = logging.getLogger(__name__)


def _peer_ip(stream: Any) -> str:
    try:
        addr = stream.muxed_conn.secured_conn.get_remote_address()
        if addr:
            return str(addr[0])
    except Exception:  # the transport may not expose an address (relay, tests)
        pass
    return ""


class _Notifee:
    """libp2p network notifee forwarding connection events into the service."""

    def __init__(self, service: GossipService) -> None:
        self._svc = service

    async def connected(self, network: Any, conn: Any) -> None:
        self._svc._on_connected(conn.muxed_conn.peer_id)
        await trio.lowlevel.checkpoint()

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._svc._on_disconnected(conn.muxed_conn.peer_id)
        await trio.lowlevel.checkpoint()

    async def opened_stream(self, network: Any, stream: Any) -> None:
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network: Any, stream: Any) -> None:
        await trio.lowlevel.checkpoint()

    async def listen(self, network: Any, multiaddr: Any) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        await trio.lowlevel.checkpoint()


class GossipService:
    """Owns the router for one libp2p host; use :meth:`running` as an async context manager."""

    def __init__(
        self,
        host: Any,
        router: GossipSubRouter,
        *,
        clock: Callable[[], float] = trio.current_time,
        delivery_buffer: int = 1024,
        read_chunk: int = 64 * 1024,
    ) -> None:
        self.host = host
        self.router = router
        self._clock = clock
        self._chunk = read_chunk
        self._nursery: trio.Nursery | None = None
        self._wake: dict[bytes, trio.Event] = {}
        self._libp2p_ids: dict[bytes, Any] = {}
        self._send, self.deliveries = trio.open_memory_channel[Delivery](delivery_buffer)
        self.dropped_deliveries = 0

    # ------------------------------------------------------------------ lifecycle

    @asynccontextmanager
    async def running(self) -> AsyncIterator[GossipService]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for proto in PROTOCOLS:
                self.host.set_stream_handler(proto, self._inbound)
            self.host.get_network().register_notifee(_Notifee(self))
            for pid in self.host.get_connected_peers():
                self._on_connected(pid)
            nursery.start_soon(self._heartbeat)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
                self._nursery = None

    # ------------------------------------------------------------------ API

    def subscribe(self, topic: str) -> None:
        self.router.subscribe(topic, self._clock())
        self._after()

    def unsubscribe(self, topic: str) -> None:
        self.router.unsubscribe(topic, self._clock())
        self._after()

    def publish(self, topic: str, data: bytes) -> bytes:
        mid = self.router.publish(topic, data, self._clock())
        self._after()
        return mid

    # ------------------------------------------------------------------ internals

    def _after(self) -> None:
        r = self.router
        for d in r.take_deliveries():
            try:
                self._send.send_nowait(d)
            except trio.WouldBlock:
                self.dropped_deliveries += 1  # the application is not keeping up; never block the router
        for peer in r.take_disconnects():
            pid = self._libp2p_ids.get(peer)
            r.remove_peer(peer, self._clock())
            if pid is not None and self._nursery is not None:
                self._nursery.start_soon(self._disconnect, pid)
        r.take_connects()  # dialing PX candidates needs addresses from signed records: not done yet
        for peer in r.peers_with_output():
            ev = self._wake.get(peer)
            if ev is not None:
                ev.set()

    async def _disconnect(self, pid: Any) -> None:
        with trio.move_on_after(5):
            await self.host.disconnect(pid)

    async def _heartbeat(self) -> None:
        interval = self.router.params.heartbeat_interval
        await trio.sleep(0.1)
        while True:
            self.router.on_heartbeat(self._clock())
            self._after()
            await trio.sleep(interval)

    def _on_connected(self, pid: Any) -> None:
        key = pid.to_bytes()
        if key in self._libp2p_ids or self._nursery is None:
            return
        self._libp2p_ids[key] = pid
        self._nursery.start_soon(self._outbound, pid)

    def _on_disconnected(self, pid: Any) -> None:
        if self.host.get_network().connections.get(pid):
            return  # another connection to the same peer is still up
        key = pid.to_bytes()
        self._libp2p_ids.pop(key, None)
        self.router.remove_peer(key, self._clock())
        ev = self._wake.pop(key, None)
        if ev is not None:
            ev.set()
        self._after()

    async def _outbound(self, pid: Any) -> None:
        key = pid.to_bytes()
        stream = None
        for attempt in range(5):
            try:
                with trio.fail_after(10):
                    stream = await self.host.new_stream(pid, list(PROTOCOLS))
                break
            except Exception as exc:  # peer without pubsub, or muxer not ready yet
                log.debug("pubsub stream to %s failed (attempt %d): %s", pid, attempt, exc)
                await trio.sleep(0.2 * (attempt + 1))
        if stream is None:
            self._libp2p_ids.pop(key, None)
            return
        outbound = self._is_outbound(pid)
        self.router.add_peer(key, str(stream.get_protocol()), outbound, _peer_ip(stream), self._clock())
        ev = self._wake[key] = trio.Event()
        self._after()
        try:
            while key in self.router.peers:
                frame = self.router.pop_frame(key)
                if frame is None:
                    await ev.wait()
                    if key not in self.router.peers:
                        break
                    ev = self._wake[key] = trio.Event()
                    continue
                await stream.write(frame)
        except Exception as exc:
            log.debug("pubsub writer to %s ended: %s", pid, exc)
        finally:
            self._wake.pop(key, None)
            with trio.CancelScope(shield=True), trio.move_on_after(1), suppress(Exception):
                await stream.close()

    def _is_outbound(self, pid: Any) -> bool:
        try:
            conns = self.host.get_network().connections.get(pid) or []
            conn = conns[0] if isinstance(conns, list) else conns
            return bool(getattr(conn.muxed_conn, "is_initiator", False))
        except Exception:
            return False

    async def _inbound(self, stream: Any) -> None:
        pid = stream.muxed_conn.peer_id
        key = pid.to_bytes()
        decoder = FrameDecoder()
        try:
            while True:
                chunk = await stream.read(self._chunk)
                if not chunk:
                    return
                try:
                    rpcs = decoder.feed(chunk)
                except GossipCodecError as exc:
                    log.info("undecodable pubsub bytes from %s: %s", pid, exc)
                    await stream.reset()
                    self.router.remove_peer(key, self._clock())
                    self._after()
                    return
                if key not in self.router.peers:
                    self._on_connected(pid)
                    for _ in range(50):  # the outbound stream registers the peer
                        if key in self.router.peers:
                            break
                        await trio.sleep(0.02)
                now = self._clock()
                for rpc in rpcs:
                    self.router.on_rpc(key, rpc, now)
                self._after()
        except Exception as exc:
            log.debug("pubsub reader from %s ended: %s", pid, exc)
