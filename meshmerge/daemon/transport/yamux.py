"""trio driver for `yamux_state`: py-libp2p's `IMuxedConn` / `IMuxedStream` on one session.

Why our own: py-libp2p 0.8.1's Yamux takes a lock and formats a debug f-string per
frame, awaits one socket write per frame (header and body separately for small
writes), keeps per-stream events in dicts and spends most of a DHT request or a
gossip message in that bookkeeping (see BENCHMARKS.md `## host`).

Here one reader task feeds whatever the secure channel delivers into the state
machine and wakes the streams it touched; one writer task sends everything the
state machine queued since its last send in ONE secure-channel write (one Noise
frame per 64 KiB, one TCP send). Stream reads and writes never take a lock: they
read the stream's buffer or queue bytes and wake the writer. A writer that gets
ahead of the socket waits once the queue passes `OUTPUT_HIGH_WATER`; a stream out
of send window waits for that stream's window update only, so a slow reader
stalls its own stream and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import trio
from libp2p.abc import IMuxedConn, IMuxedStream, ISecureConn
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError, IOException
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import (
    MuxedConnUnavailable,
    MuxedStreamClosed,
    MuxedStreamEOF,
    MuxedStreamError,
    MuxedStreamReset,
)
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream

from .noise_state import NoiseError
from .yamux_state import (
    GO_AWAY_INTERNAL_ERROR,
    GO_AWAY_NORMAL,
    GO_AWAY_PROTOCOL_ERROR,
    StreamState,
    YamuxParams,
    YamuxProtocolError,
    YamuxState,
)

log = logging.getLogger("meshmerge.transport")

PROTOCOL_ID = TProtocol("/yamux/1.0.0")
OUTPUT_HIGH_WATER = 1024 * 1024
"""Queued output bytes beyond which stream writers wait for the socket."""
CLOSE_GRACE = 10.0
"""Seconds the closing of a session (GO_AWAY, socket, swarm close hook) may take."""
_PLAIN_READ = 256 * 1024


class YamuxStream(IMuxedStream):
    """One stream; reads return what is buffered (at most `n` bytes), EOF as `MuxedStreamEOF`."""

    def __init__(self, conn: YamuxConn, st: StreamState, is_initiator: bool) -> None:
        self.muxed_conn = conn
        self.conn = conn
        self._st = st
        self.stream_id = st.sid
        self.is_initiator = is_initiator
        self._lot = trio.lowlevel.ParkingLot()
        self._receiver: Callable[[bytes], None] | None = None
        self._receiver_ended = False
        st.waker = self

    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            await trio.lowlevel.checkpoint()
            return b""
        st = self._st
        while True:
            buf = st.buf
            if buf:
                if n is None or n < 0 or n >= len(buf):
                    out = bytes(buf)
                    buf.clear()
                else:
                    out = bytes(buf[:n])
                    del buf[:n]
                self.conn._consumed(st, len(out))
                await trio.lowlevel.checkpoint_if_cancelled()
                return out
            if st.reset:
                raise MuxedStreamReset(f"stream {st.sid} was reset")
            if st.remote_closed:
                raise MuxedStreamEOF(f"stream {st.sid}: the peer closed its side")
            await self._lot.park()

    async def write(self, data: bytes) -> None:
        st = self._st
        conn = self.conn
        total = len(data)
        view = memoryview(data) if total > conn.state.params.max_frame else data
        pos = 0
        while pos < total:
            if st.reset:
                raise MuxedStreamReset(f"stream {st.sid} was reset")
            if st.local_closed:
                raise MuxedStreamClosed(f"stream {st.sid} is closed for writing")
            sent = conn.state.send_data(st, view[pos:] if pos else view)
            if sent:
                pos += sent
                conn._kick()
            else:
                await self._lot.park()  # out of send window: wait for this stream's update
        await conn._backpressure()

    def set_receiver(self, receiver: Callable[[bytes], None] | None) -> None:
        """Push this stream's data to `receiver` instead of waiting for :meth:`read`.

        The session's reader task calls ``receiver(data)`` with every chunk as it arrives
        (bytes already buffered are handed over at once, from the caller's task), and
        ``receiver(b"")`` once when the peer closes or resets the stream. It saves waking
        a reader task per chunk. The receiver must not block or raise (an exception is
        logged and resets the stream); data it takes is credited to the peer's window, so
        a receiver that falls behind should detach (``set_receiver(None)``): bytes then
        stay buffered up to the window, and the peer waits.
        """
        self._receiver = receiver
        if receiver is not None:
            self._touched()

    def _touched(self) -> None:
        """The session changed this stream (data, window update, FIN, reset): wake or push."""
        if self._lot:
            self._lot.unpark_all()
        receiver = self._receiver
        if receiver is None:
            return
        st = self._st
        try:
            if st.buf:
                data = bytes(st.buf)
                st.buf.clear()
                self.conn._consumed(st, len(data))
                receiver(data)
            if (st.reset or st.remote_closed) and not self._receiver_ended and self._receiver is receiver:
                self._receiver_ended = True
                receiver(b"")
        except Exception:
            log.exception("yamux: the receiver of stream %d raised; resetting the stream", st.sid)
            self._receiver = None
            self.conn._reset_stream(st)

    def write_nowait(self, data: bytes) -> bool:
        """Queue all of `data` without waiting, or nothing: False if that would need a wait.

        For a caller that runs outside a task of its own (the gossip driver writes a
        peer's frames straight from the event that produced them): it saves waking a
        writer task per message. It refuses, leaving the stream untouched, when the
        stream is reset or closed, the session is dead, the send window is smaller
        than `data`, or the session's output is above `OUTPUT_HIGH_WATER`; the caller
        then uses :meth:`write`, which waits and raises as usual.
        """
        if not self.can_write_nowait(len(data)):
            return False
        conn = self.conn
        conn.state.send_data(self._st, data)
        conn._kick()
        return True

    def can_write_nowait(self, n: int) -> bool:
        """Whether :meth:`write_nowait` would take `n` bytes now."""
        st = self._st
        conn = self.conn
        return not (
            st.reset
            or st.local_closed
            or conn._dead
            or n > st.send_window
            or len(conn.state.out) > OUTPUT_HIGH_WATER
        )

    async def close(self) -> None:
        """Half-close (FIN); reading stays possible until the peer closes too."""
        self.conn._close_stream(self._st)
        await trio.lowlevel.checkpoint()

    close_write = close

    async def reset(self) -> None:
        self.conn._reset_stream(self._st)
        await trio.lowlevel.checkpoint()

    def set_deadline(self, ttl: int) -> None:
        raise NotImplementedError("yamux streams have no deadlines; use trio cancel scopes")

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.conn.get_remote_address()

    async def __aenter__(self) -> YamuxStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class YamuxConn(IMuxedConn):
    """A yamux session over a secure channel (ours or any `ISecureConn`)."""

    def __init__(
        self,
        secured_conn: ISecureConn,
        peer_id: ID,
        is_initiator: bool | None = None,
        on_close: Callable[[], Awaitable[Any]] | None = None,
        params: YamuxParams | None = None,
    ) -> None:
        self.secured_conn = secured_conn
        self.peer_id = peer_id
        self._initiator = secured_conn.is_initiator if is_initiator is None else is_initiator
        self.state = YamuxState(self._initiator, params)
        self.on_close = on_close
        self.event_started = trio.Event()
        self.event_closed = trio.Event()
        self._accept_q: deque[YamuxStream] = deque()
        self._accept_lot = trio.lowlevel.ParkingLot()
        self._out_lot = trio.lowlevel.ParkingLot()
        self._drain_lot = trio.lowlevel.ParkingLot()
        self._dead = False
        self._closing = False
        self._nursery: trio.Nursery | None = None
        read_available = getattr(secured_conn, "read_available", None)
        self._read: Callable[[], Awaitable[bytes]] = read_available or self._read_fallback

    # --- IMuxedConn ---------------------------------------------------------------------------
    @property
    def is_initiator(self) -> bool:
        return self._initiator

    @property
    def is_established(self) -> bool:
        return self.event_started.is_set() and not self._dead

    @property
    def is_closed(self) -> bool:
        return self.event_closed.is_set()

    def get_transport_addresses(self) -> Any:
        return self.secured_conn.get_transport_addresses()

    def get_connection_type(self) -> Any:
        return self.secured_conn.get_connection_type()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.secured_conn.get_remote_address()

    async def start(self) -> None:
        """Run the session until it ends (the swarm runs this as a task)."""
        if self.event_started.is_set():
            return
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._sweeper)
                if self.state.params.keepalive_interval:
                    nursery.start_soon(self._keepalive)
                self.event_started.set()
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            # shielded so the swarm learns of the closure even when we were cancelled,
            # bounded so a stuck close hook cannot hold the task forever
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_GRACE):
                await self.close()

    async def open_stream(self) -> YamuxStream:
        if self._dead:
            raise MuxedConnUnavailable("yamux session is closed")
        try:
            st = self.state.open_stream()
        except YamuxProtocolError as exc:
            raise MuxedStreamError(str(exc)) from exc
        self._kick()
        await trio.lowlevel.checkpoint()
        return YamuxStream(self, st, True)

    async def accept_stream(self) -> IMuxedStream:
        while not self._accept_q:
            if self._dead:
                raise MuxedConnUnavailable("yamux session is closed")
            await self._accept_lot.park()
        self.state.pending_accept -= 1
        return self._accept_q.popleft()

    async def close(self, error_code: int = GO_AWAY_NORMAL) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._dead:
            self.state.go_away(error_code)
            with trio.move_on_after(1.0), contextlib.suppress(Exception):
                data = self.state.take_output()
                if data:
                    await self.secured_conn.write(data)
        self._mark_dead()
        with contextlib.suppress(Exception):
            await self.secured_conn.close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        self.event_closed.set()
        if self.on_close is not None:
            with contextlib.suppress(Exception):
                await self.on_close()

    # --- driver internals -------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._out_lot:
            self._out_lot.unpark_all()

    async def _backpressure(self) -> None:
        if len(self.state.out) > OUTPUT_HIGH_WATER and not self._dead:
            await self._drain_lot.park()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    def _consumed(self, st: StreamState, n: int) -> None:
        before = len(self.state.out)
        self.state.consumed(st, n)
        if len(self.state.out) != before:
            self._kick()

    def _close_stream(self, st: StreamState) -> None:
        if not self._dead:
            self.state.close_stream(st, trio.current_time())
            self._kick()

    def _reset_stream(self, st: StreamState) -> None:
        if self._dead:
            st.reset = True
        else:
            self.state.reset_stream(st)
            self._kick()
        self._wake(st)

    @staticmethod
    def _wake(st: StreamState) -> None:
        stream = st.waker
        if stream is not None:
            stream._touched()  # type: ignore[attr-defined]

    def _mark_dead(self) -> None:
        if self._dead:
            return
        self._dead = True
        for st in list(self.state.streams.values()):
            st.reset = True
            self._wake(st)
        self.state.streams.clear()
        for stream in self._accept_q:
            stream._st.reset = True
        self._accept_lot.unpark_all()
        self._drain_lot.unpark_all()
        self._out_lot.unpark_all()

    async def _read_fallback(self) -> bytes:
        try:
            return await self.secured_conn.read(_PLAIN_READ)
        except (ConnectionClosedError, IOException, trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def _reader(self) -> None:
        state = self.state
        read = self._read
        wake = self._wake
        try:
            while True:
                data = await read()
                if not data:
                    return
                opened, touched = state.receive(data)
                for st in touched:
                    wake(st)
                if opened:
                    for st in opened:
                        self._accept_q.append(YamuxStream(self, st, False))
                    self._accept_lot.unpark_all()
                if state.out:
                    self._kick()
        except YamuxProtocolError as exc:
            log.info("yamux: closing the connection to %s: %s", self.peer_id, exc)
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_GRACE):
                await self.close(GO_AWAY_PROTOCOL_ERROR)
        except NoiseError as exc:
            log.info("yamux: closing the connection to %s: secure channel failed: %s", self.peer_id, exc)
        except (ConnectionClosedError, IOException, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _writer(self) -> None:
        state = self.state
        write = self.secured_conn.write
        try:
            while not self._dead:
                if not state.out:
                    await self._out_lot.park()
                    continue
                await write(state.take_output())
                if self._drain_lot:
                    self._drain_lot.unpark_all()
        except Exception as exc:
            log.debug("yamux: write to %s failed: %r", self.peer_id, exc)
            self._mark_dead()
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    async def _sweeper(self) -> None:
        period = min(30.0, self.state.params.close_timeout / 4)
        while True:
            await trio.sleep(period)
            for st in self.state.expire(trio.current_time()):
                self._wake(st)
            self._kick()


    async def _keepalive(self) -> None:
        """Ping a silent peer; end the session when it stays silent (see `YamuxState.keepalive`)."""
        params = self.state.params
        tick = min(params.keepalive_interval, params.keepalive_timeout) / 4
        while True:
            await trio.sleep(tick)
            if not self.state.keepalive(trio.current_time()):
                log.info(
                    "yamux: %s did not answer a keepalive ping within %.0f s; closing the connection",
                    self.peer_id,
                    params.keepalive_timeout,
                )
                with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_GRACE):
                    await self.close(GO_AWAY_INTERNAL_ERROR)
                return
            if self.state.out:  # a ping was queued
                self._kick()


class YamuxMultistream(MuxerMultistream):
    """Muxer negotiation that builds the negotiated class (stock 0.8.1 always builds its own Yamux)."""

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, transport_class = await self._selector.select(conn, conn.is_initiator, self.negotiate_timeout)
        muxed = transport_class(conn, peer_id)
        return self._annotate_connection(muxed, conn, protocol)
