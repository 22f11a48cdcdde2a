"""Yamux core: wire-exact frames, flow control, limits, and fuzzed input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmerge.daemon.transport.yamux_state import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    INITIAL_WINDOW,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    YamuxParams,
    YamuxProtocolError,
    YamuxState,
    header,
)


def frames(data: bytes) -> list[tuple[int, int, int, int, int]]:
    out, pos = [], 0
    while pos < len(data):
        v, t, f, sid, n = struct.unpack_from(">BBHII", data, pos)
        out.append((v, t, f, sid, n))
        pos += 12 + (n if t == TYPE_DATA else 0)
    return out


def pump(a: YamuxState, b: YamuxState) -> None:
    """Deliver queued output both ways until quiet."""
    for _ in range(10):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.take_output()
            if data:
                dst.receive(data)
                moved = True
        if not moved:
            return


def test_open_is_a_window_update_with_syn_on_an_odd_id_wire_exact() -> None:
    a = YamuxState(initiator=True)
    s = a.open_stream()
    assert s.sid == 1
    assert a.take_output() == bytes.fromhex("00 01 0001 00000001 00000000".replace(" ", ""))
    assert a.open_stream().sid == 3
    b = YamuxState(initiator=False)
    assert b.open_stream().sid == 2


def test_data_flows_and_inbound_stream_is_acked() -> None:
    a, b = YamuxState(True), YamuxState(False)
    s = a.open_stream()
    assert a.send_data(s, b"hello") == 5
    opened, touched = b.receive(a.take_output())
    assert {id(t) for t in touched} == {id(opened[0])}  # SYN frame and DATA frame
    assert [o.sid for o in opened] == [1]
    peer = opened[0]
    assert bytes(peer.buf) == b"hello"
    assert frames(b.take_output()) == [(0, TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0)]


def test_fin_half_closes_and_both_fins_forget_the_stream() -> None:
    a, b = YamuxState(True), YamuxState(False)
    s = a.open_stream()
    a.close_stream(s, now=0.0)
    opened, _ = b.receive(a.take_output())
    peer = opened[0]
    assert peer.remote_closed and not peer.local_closed
    assert b.send_data(peer, b"reply") == 5  # the other direction still works
    b.close_stream(peer, now=0.0)
    assert peer.done and 2 not in b.streams and 1 not in b.streams
    a.receive(b.take_output())
    assert bytes(s.buf) == b"reply" and s.done and not a.streams


def test_reset_marks_both_sides() -> None:
    a, b = YamuxState(True), YamuxState(False)
    s = a.open_stream()
    pump(a, b)
    peer = b.streams[1]
    b.reset_stream(peer)
    assert frames(b.take_output())[-1] == (0, TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0)
    a.receive(header(TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0))
    assert s.reset and not a.streams


def test_sender_stops_at_the_window_and_resumes_on_update() -> None:
    a, b = YamuxState(True), YamuxState(False)
    s = a.open_stream()
    big = b"x" * (INITIAL_WINDOW + 1000)
    assert a.send_data(s, big) == INITIAL_WINDOW
    assert a.send_data(s, big[INITIAL_WINDOW:]) == 0  # blocked: no credit
    opened, _ = b.receive(a.take_output())
    peer = opened[0]
    assert len(peer.buf) == INITIAL_WINDOW
    b.take_output()
    # the reader consumes half a window: one batched update
    del peer.buf[: INITIAL_WINDOW // 2]
    b.consumed(peer, INITIAL_WINDOW // 2 - 1)
    assert b.take_output() == b""  # below the batch threshold
    b.consumed(peer, 1)
    assert frames(b.take_output()) == [(0, TYPE_WINDOW_UPDATE, 0, 1, INITIAL_WINDOW // 2)]
    a.receive(header(TYPE_WINDOW_UPDATE, 0, 1, INITIAL_WINDOW // 2))
    assert a.send_data(s, big[INITIAL_WINDOW:]) == 1000


def test_peer_exceeding_the_window_is_a_protocol_error_before_buffering() -> None:
    b = YamuxState(False)
    b.receive(header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    b.receive(header(TYPE_DATA, 0, 1, INITIAL_WINDOW) + b"z" * INITIAL_WINDOW)
    with pytest.raises(YamuxProtocolError, match="window"):
        b.receive(header(TYPE_DATA, 0, 1, 1) + b"z")
    c = YamuxState(False)
    with pytest.raises(YamuxProtocolError, match="exceeds the window"):
        c.receive(header(TYPE_DATA, FLAG_SYN, 1, INITIAL_WINDOW + 1))  # refused from the header alone


def test_stream_count_and_accept_backlog_are_capped_with_rst() -> None:
    b = YamuxState(False, YamuxParams(max_streams=8, accept_backlog=4))
    opened, _ = b.receive(b"".join(header(TYPE_WINDOW_UPDATE, FLAG_SYN, 2 * i + 1, 0) for i in range(6)))
    assert len(opened) == 4 and b.refused_streams == 2
    rsts = [f for f in frames(b.take_output()) if f[2] == FLAG_RST]
    assert [f[3] for f in rsts] == [9, 11]


def test_bad_frames_are_protocol_errors() -> None:
    with pytest.raises(YamuxProtocolError, match="version"):
        YamuxState(False).receive(b"\x01" + b"\x00" * 11)
    with pytest.raises(YamuxProtocolError, match="unknown frame type"):
        YamuxState(False).receive(header(7, 0, 1, 0))
    with pytest.raises(YamuxProtocolError, match="belongs to our side"):
        YamuxState(True).receive(header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    with pytest.raises(YamuxProtocolError, match="already open"):
        YamuxState(False).receive(header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) * 2)
    with pytest.raises(YamuxProtocolError, match="stream 0"):
        YamuxState(False).receive(header(TYPE_DATA, 0, 0, 0))


def test_ping_is_answered_and_goaway_stops_new_streams() -> None:
    a = YamuxState(True)
    a.receive(header(TYPE_PING, FLAG_SYN, 0, 77))
    assert frames(a.take_output()) == [(0, TYPE_PING, FLAG_ACK, 0, 77)]
    a.receive(header(TYPE_GO_AWAY, 0, 0, 0))
    with pytest.raises(YamuxProtocolError, match="GO_AWAY"):
        a.open_stream()


def test_half_closed_streams_expire() -> None:
    a = YamuxState(True, YamuxParams(close_timeout=10))
    s = a.open_stream()
    a.close_stream(s, now=100.0)
    a.take_output()
    assert a.expire(105.0) == []
    assert a.expire(111.0) == [s]
    assert s.reset and not a.streams
    assert frames(a.take_output()) == [(0, TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0)]


def test_params_validate_names_the_field() -> None:
    with pytest.raises(ValueError, match="window"):
        YamuxParams(window=1000).validate()
    with pytest.raises(ValueError, match="accept_backlog"):
        YamuxParams(max_streams=4, accept_backlog=8).validate()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_random_bytes_give_protocol_errors_only_and_bounded_memory(chunks: list[bytes]) -> None:
    s = YamuxState(False, YamuxParams(max_streams=16, accept_backlog=16))
    for chunk in chunks:
        try:
            s.receive(chunk)
        except YamuxProtocolError:
            return
        assert len(s._in) <= 12 + s.params.window
        assert len(s.streams) <= 16


frame_st = st.tuples(
    st.sampled_from([TYPE_DATA, TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GO_AWAY]),
    st.sampled_from([0, FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST, FLAG_SYN | FLAG_FIN]),
    st.integers(0, 9),
    st.integers(0, 70_000),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frame_st, max_size=40))
def test_structured_frame_fuzz_never_buffers_beyond_the_windows(fs: list[tuple[int, int, int, int]]) -> None:
    s = YamuxState(False, YamuxParams(max_streams=8, accept_backlog=8))
    for typ, flags, sid, n in fs:
        body = b"\x00" * n if typ == TYPE_DATA else b""
        try:
            s.receive(header(typ, flags, sid, n) + body)
        except YamuxProtocolError:
            return
        buffered = sum(len(x.buf) for x in s.streams.values())
        assert buffered <= 8 * s.params.window
        assert all(len(x.buf) <= s.params.window for x in s.streams.values())


def test_a_ping_flood_against_a_full_output_queue_is_not_buffered() -> None:
    s = YamuxState(True, YamuxParams(max_reply_backlog=64 * 1024))
    flood = header(TYPE_PING, FLAG_SYN, 0, 1) * 20_000  # 240 KB of pings, we never send
    s.receive(flood)
    assert len(s.out) <= 64 * 1024 + 12
    assert s.dropped_replies > 0


def test_keepalive_pings_only_a_silent_peer_and_gives_up_on_no_answer() -> None:
    a = YamuxState(True, YamuxParams(keepalive_interval=30, keepalive_timeout=10))
    b = YamuxState(False)
    assert a.keepalive(0.0) and not a.take_output()
    assert a.keepalive(29.0) and not a.take_output(), "not silent for the interval yet"
    a.receive(b"")  # an empty read is no sign of life
    assert a.keepalive(30.0)
    ping = a.take_output()
    assert frames(ping) == [(0, TYPE_PING, FLAG_SYN, 0, 1)]
    b.receive(ping)
    a.receive(b.take_output())  # the ACK
    assert a.keepalive(31.0) and a.ping_sent_at is None
    assert a.keepalive(50.0) and not a.take_output(), "heard at 31 s: the next ping is due at 61 s"
    assert a.keepalive(61.0) and frames(a.take_output()) == [(0, TYPE_PING, FLAG_SYN, 0, 2)]
    assert a.keepalive(70.0), "still within the timeout"
    assert not a.keepalive(71.0), "no answer for 10 s: dead"


def test_keepalive_off_never_pings() -> None:
    a = YamuxState(True, YamuxParams(keepalive_interval=0))
    assert all(a.keepalive(t) for t in (0.0, 100.0, 10_000.0)) and not a.take_output()
    with pytest.raises(ValueError, match="keepalive_interval"):
        YamuxParams(keepalive_interval=0.5).validate()
