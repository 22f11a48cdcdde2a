"""Yamux (`/yamux/1.0.0`, hashicorp spec as go-/js-libp2p speak it) session state, no I/O.

Theory of operation: bytes received from the secure channel go into
`YamuxState.receive()`, which parses whole frames (12-byte header
``version, type, flags, stream id, length``, big-endian) and updates the per-stream
`StreamState` (receive buffer, windows, half-close flags). It returns the
streams the peer opened and the streams whose state changed, so a driver
knows whom to wake. Everything to send — SYN/ACK, data, window updates,
FIN/RST, ping replies, GO_AWAY — is appended to `out` as wire bytes; the
driver sends `take_output()` in one write, so many frames cost one socket send.

Flow control: each side grants the other a per-stream receive window
(256 KiB initially, as the spec and go-yamux do). A DATA frame larger than the
credit left is a protocol error, so a peer can never make us buffer more than
the window per stream; the number of streams per session is capped as well.
Credit is returned in batches once the application has read half a window.
Time arrives as an argument (`close_stream(now)`, `expire(now)`): streams we
half-closed whose peer never finishes are reset after `close_timeout`, and
`keepalive(now)` pings a peer silent for `keepalive_interval` and reports it
dead when the ping goes unanswered for `keepalive_timeout`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VERSION = 0
TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3
FLAG_SYN = 1
FLAG_ACK = 2
FLAG_FIN = 4
FLAG_RST = 8
HEADER = struct.Struct(">BBHII")
HEADER_SIZE = 12
INITIAL_WINDOW = 256 * 1024
GO_AWAY_NORMAL = 0
GO_AWAY_PROTOCOL_ERROR = 1
GO_AWAY_INTERNAL_ERROR = 2
_U32 = 2**32 - 1


class YamuxProtocolError(Exception):
    """The peer broke the yamux protocol; the session must end. The message says how."""


@dataclass(frozen=True)
class YamuxParams:
    """Limits of one session; `validate()` names the field and the rule."""

    window: int = INITIAL_WINDOW
    """Receive window per stream (bytes). Must be >= 256 KiB: peers assume the spec's initial window."""
    max_streams: int = 1024
    """Streams open at once per session, both directions; inbound SYNs beyond it are reset."""
    accept_backlog: int = 256
    """Inbound streams not yet taken by the application; SYNs beyond it are reset."""
    max_frame: int = 64 * 1024
    """Largest DATA payload we send in one frame (go-yamux sends at most 64 KiB too)."""
    close_timeout: float = 300.0
    """Seconds a stream we closed may wait for the peer's FIN before it is reset."""
    max_reply_backlog: int = 1024 * 1024
    """Queued output (bytes) beyond which replies the peer provokes (ping ACKs, RSTs of
    refused streams) are dropped: a peer that floods pings but never reads cannot grow
    our output queue without bound."""
    keepalive_interval: float = 30.0
    """Seconds of silence from the peer after which we ping it (go-yamux's default), so a
    dead peer or a NAT that dropped the mapping is noticed and idle mappings stay open; 0 = off."""
    keepalive_timeout: float = 30.0
    """Seconds a keepalive ping may go unanswered, with nothing else heard, before the
    session is declared dead."""

    def validate(self) -> None:
        if not INITIAL_WINDOW <= self.window <= 16 * 1024 * 1024:
            raise ValueError(f"window: must be in [{INITIAL_WINDOW}, 16 MiB] bytes, got {self.window!r}")
        if not 1 <= self.max_streams <= 65536:
            raise ValueError(f"max_streams: must be in [1, 65536], got {self.max_streams!r}")
        if not 1 <= self.accept_backlog <= self.max_streams:
            raise ValueError(f"accept_backlog: must be in [1, max_streams], got {self.accept_backlog!r}")
        if not 1024 <= self.max_frame <= INITIAL_WINDOW:
            raise ValueError(f"max_frame: must be in [1024, {INITIAL_WINDOW}] bytes, got {self.max_frame!r}")
        if not 0 < self.close_timeout <= 3600:
            raise ValueError(f"close_timeout: must be in (0, 3600] seconds, got {self.close_timeout!r}")
        if not 64 * 1024 <= self.max_reply_backlog <= 64 * 1024 * 1024:
            raise ValueError(f"max_reply_backlog: must be in [64 KiB, 64 MiB], got {self.max_reply_backlog!r}")
        if not (self.keepalive_interval == 0 or 1 <= self.keepalive_interval <= 3600):
            raise ValueError(
                f"keepalive_interval: must be 0 (off) or in [1, 3600] seconds, got {self.keepalive_interval!r}"
            )
        if not 1 <= self.keepalive_timeout <= 3600:
            raise ValueError(f"keepalive_timeout: must be in [1, 3600] seconds, got {self.keepalive_timeout!r}")


class StreamState:
    """One stream's state; the driver's stream object holds it and reads `buf`."""

    __slots__ = (
        "buf",
        "closed_at",
        "local_closed",
        "recv_credit",
        "remote_closed",
        "reset",
        "send_window",
        "sid",
        "unacked",
        "waker",
    )

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.buf = bytearray()
        self.recv_credit = INITIAL_WINDOW
        """Bytes the peer may still send before our next window update."""
        self.unacked = 0
        """Bytes the application read that the peer has not been credited for yet."""
        self.send_window = INITIAL_WINDOW
        self.local_closed = False
        self.remote_closed = False
        self.reset = False
        self.closed_at = -1.0
        self.waker: object = None
        """Driver-owned (e.g. a parking lot); the state machine never touches it."""

    @property
    def done(self) -> bool:
        return self.reset or (self.local_closed and self.remote_closed)


def header(typ: int, flags: int, sid: int, length: int) -> bytes:
    return HEADER.pack(VERSION, typ, flags, sid, length)


class YamuxState:
    """Both directions of one yamux session (see the module docstring)."""

    def __init__(self, initiator: bool, params: YamuxParams | None = None) -> None:
        self.params = params or YamuxParams()
        self.params.validate()
        self.initiator = initiator
        self.next_sid = 1 if initiator else 2
        self.streams: dict[int, StreamState] = {}
        self.out = bytearray()
        self._in = bytearray()
        self.pending_accept = 0
        self.remote_goaway: int | None = None
        self.local_goaway = False
        self.refused_streams = 0
        self.dropped_replies = 0
        self.heard = False
        """Anything arrived since the last `keepalive` call (any frame proves the peer alive)."""
        self.last_heard: float | None = None
        self.ping_id = 0
        self.ping_sent_at: float | None = None
        """When our unanswered keepalive ping left (None: none outstanding)."""

    # --- output ------------------------------------------------------------------------------
    def take_output(self) -> bytes:
        out = bytes(self.out)
        self.out.clear()
        return out

    def _frame(self, typ: int, flags: int, sid: int, length: int) -> None:
        self.out += HEADER.pack(VERSION, typ, flags, sid, length)

    def _reply(self, typ: int, flags: int, sid: int, length: int) -> None:
        if len(self.out) > self.params.max_reply_backlog:
            self.dropped_replies += 1
            return
        self._frame(typ, flags, sid, length)

    # --- local actions -------------------------------------------------------------------------
    def open_stream(self) -> StreamState:
        if self.remote_goaway is not None:
            raise YamuxProtocolError(f"the peer sent GO_AWAY (code {self.remote_goaway}); no new streams")
        if self.local_goaway:
            raise YamuxProtocolError("session is closing; no new streams")
        if len(self.streams) >= self.params.max_streams:
            raise YamuxProtocolError(f"max_streams ({self.params.max_streams}) streams already open")
        sid = self.next_sid
        if sid > _U32:
            raise YamuxProtocolError("stream ids exhausted")
        self.next_sid += 2
        st = StreamState(sid)
        self.streams[sid] = st
        self._frame(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, self._extra_credit(st))
        return st

    def _extra_credit(self, st: StreamState) -> int:
        extra = self.params.window - INITIAL_WINDOW
        st.recv_credit += extra
        return extra

    def send_data(self, st: StreamState, data: bytes | memoryview) -> int:
        """Queue up to the send window of `data`; returns how many bytes were taken (0: wait)."""
        if st.reset or st.local_closed:
            return 0
        n = min(len(data), st.send_window)
        if n <= 0:
            return 0
        max_frame = self.params.max_frame
        pos = 0
        while pos < n:
            k = min(n - pos, max_frame)
            self.out += HEADER.pack(VERSION, TYPE_DATA, 0, st.sid, k)
            self.out += data[pos : pos + k]
            pos += k
        st.send_window -= n
        return n

    def consumed(self, st: StreamState, n: int) -> None:
        """The application read `n` bytes of `st.buf`: credit the peer in batches."""
        st.unacked += n
        if st.unacked >= self.params.window // 2 and not st.reset and not st.remote_closed:
            self._frame(TYPE_WINDOW_UPDATE, 0, st.sid, st.unacked)
            st.recv_credit += st.unacked
            st.unacked = 0

    def close_stream(self, st: StreamState, now: float) -> None:
        """Half-close: FIN; the stream stays readable until the peer's FIN."""
        if st.local_closed or st.reset:
            return
        st.local_closed = True
        st.closed_at = now
        self._frame(TYPE_WINDOW_UPDATE, FLAG_FIN, st.sid, 0)
        self._forget_if_done(st)

    def reset_stream(self, st: StreamState) -> None:
        if st.reset:
            return
        already_done = st.done
        st.reset = True
        if not already_done:
            self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, st.sid, 0)
        self.streams.pop(st.sid, None)

    def keepalive(self, now: float) -> bool:
        """Call every few seconds; False once the peer must be considered dead.

        After `keepalive_interval` of silence this queues a PING; if neither its ACK
        nor anything else arrives within `keepalive_timeout`, the session is dead.
        """
        p = self.params
        if not p.keepalive_interval:
            return True
        if self.heard or self.last_heard is None:
            self.heard = False
            self.last_heard = now
            self.ping_sent_at = None
            return True
        if self.ping_sent_at is not None:
            return now - self.ping_sent_at < p.keepalive_timeout
        if now - self.last_heard >= p.keepalive_interval:
            self.ping_id = (self.ping_id + 1) & _U32
            self._frame(TYPE_PING, FLAG_SYN, 0, self.ping_id)
            self.ping_sent_at = now
        return True

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        if not self.local_goaway:
            self.local_goaway = True
            self._frame(TYPE_GO_AWAY, 0, 0, code)

    def expire(self, now: float) -> list[StreamState]:
        """Reset streams we closed more than `close_timeout` ago whose peer never sent FIN."""
        limit = now - self.params.close_timeout
        stale = [st for st in self.streams.values() if st.local_closed and 0 <= st.closed_at < limit]
        for st in stale:
            self.reset_stream(st)
        return stale

    def _forget_if_done(self, st: StreamState) -> None:
        if st.done:
            self.streams.pop(st.sid, None)

    # --- input ----------------------------------------------------------------------------
    def receive(self, data: bytes) -> tuple[list[StreamState], list[StreamState]]:
        """Feed received bytes; returns (streams the peer opened, streams whose state changed).

        Raises `YamuxProtocolError` on a violation; the session is then unusable.
        """
        buf = self._in
        buf += data
        if data:
            self.heard = True
        opened: list[StreamState] = []
        touched: list[StreamState] = []
        pos, end = 0, len(buf)
        unpack = HEADER.unpack_from
        try:
            while end - pos >= HEADER_SIZE:
                version, typ, flags, sid, length = unpack(buf, pos)
                if version != VERSION:
                    raise YamuxProtocolError(f"unsupported yamux version {version}")
                if typ == TYPE_DATA:
                    if length > self.params.window:
                        raise YamuxProtocolError(
                            f"DATA frame of {length} bytes on stream {sid} exceeds the window ({self.params.window})"
                        )
                    if end - pos - HEADER_SIZE < length:
                        break
                    start = pos + HEADER_SIZE
                    pos = start + length
                    st = self._stream_for(sid, flags, opened)
                    if st is None:
                        continue  # late frame for a stream already gone: dropped
                    if length:
                        if length > st.recv_credit:
                            raise YamuxProtocolError(
                                f"stream {sid}: peer sent {length} bytes with {st.recv_credit} bytes of window left"
                            )
                        if st.remote_closed:
                            raise YamuxProtocolError(f"stream {sid}: DATA after FIN")
                        st.recv_credit -= length
                        st.buf += buf[start:pos]
                    self._flags(st, flags)
                    touched.append(st)
                elif typ == TYPE_WINDOW_UPDATE:
                    pos += HEADER_SIZE
                    st = self._stream_for(sid, flags, opened)
                    if st is None:
                        continue
                    if length:
                        st.send_window = min(st.send_window + length, _U32)
                    self._flags(st, flags)
                    touched.append(st)
                elif typ == TYPE_PING:
                    pos += HEADER_SIZE
                    if sid != 0:
                        raise YamuxProtocolError(f"PING on stream {sid} (must be 0)")
                    if flags & FLAG_SYN:
                        self._reply(TYPE_PING, FLAG_ACK, 0, length)

                elif typ == TYPE_GO_AWAY:
                    pos += HEADER_SIZE
                    self.remote_goaway = length
                else:
                    raise YamuxProtocolError(f"unknown frame type {typ}")
        finally:
            if pos:
                del buf[:pos]
        if len(buf) > HEADER_SIZE + self.params.window:
            raise YamuxProtocolError("receive buffer beyond one frame (internal limit)")
        return opened, touched

    def _stream_for(self, sid: int, flags: int, opened: list[StreamState]) -> StreamState | None:
        if sid == 0:
            raise YamuxProtocolError("DATA/WINDOW_UPDATE on stream 0")
        st = self.streams.get(sid)
        if flags & FLAG_SYN:
            if st is not None:
                raise YamuxProtocolError(f"SYN for stream {sid}, which is already open")
            if (sid & 1) == (1 if self.initiator else 0):
                raise YamuxProtocolError(f"SYN for stream {sid}: that id belongs to our side")
            if (
                self.local_goaway
                or len(self.streams) >= self.params.max_streams
                or self.pending_accept >= self.params.accept_backlog
            ):
                self.refused_streams += 1
                self._reply(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)
                return None
            st = StreamState(sid)
            self.streams[sid] = st
            self.pending_accept += 1
            self._frame(TYPE_WINDOW_UPDATE, FLAG_ACK, sid, self._extra_credit(st))
            opened.append(st)
        return st

    def _flags(self, st: StreamState, flags: int) -> None:
        if flags & FLAG_RST:
            st.reset = True
            self.streams.pop(st.sid, None)
        elif flags & FLAG_FIN:
            st.remote_closed = True
            self._forget_if_done(st)
