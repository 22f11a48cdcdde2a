"""Every decoder of peer- or disk-supplied bytes not fuzzed next to its own tests.

Hostile input must give the decoder's own typed error (or a documented
"None"/drop), never another exception: an unexpected ``struct.error`` or
``ValueError`` escaping a parser is a crash path for the task that called it.
Inputs are random bytes and mutations of a valid encoding, so the fuzzer gets
past the first length or magic check.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshmerge.daemon.dht import persist
from meshmerge.daemon.dht.records import (
    MeshmergeRecordValidator,
    NamespacedValidator,
    PublicKeyValidator,
    RecordRejected,
)
from meshmerge.daemon.dht.wire import parse_addr
from meshmerge.daemon.gossip.peer_record import PeerRecordError, open_px_record
from meshmerge.daemon.nat import autonat2_wire as an2
from meshmerge.daemon.nat import upnp
from meshmerge.daemon.store.errors import CorruptRecord
from meshmerge.daemon.store.records import FileKind, encode_file_header, parse_file_header
from meshmerge.daemon.transport.noise import NoiseProtocolError, decode_payload
from meshmerge.proto.rpc import FrameReader, ProtocolError, RpcError, frame, parse_request, parse_response


@st.composite
def _mutations(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a few bytes flipped, cut short, or extended."""
    out = bytearray(valid)
    for _ in range(draw(st.integers(0, 4))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(out)))
    return bytes(out[:cut]) + draw(st.binary(max_size=16))


def _inputs(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), _mutations(valid))


def _check(decoder: Callable[[bytes], Any], allowed: tuple[type[BaseException], ...], data: bytes) -> None:
    with contextlib.suppress(*allowed):
        decoder(data)


_DIAL_REQUEST = an2.encode(an2.DialRequest((b"\x04\x7f\x00\x00\x01\x06\x10\x00",), 7))


@settings(max_examples=300)
@given(_inputs(_DIAL_REQUEST))
def test_autonat_v2_messages(data: bytes) -> None:
    for decoder in (an2.decode, an2.decode_dial_back, an2.decode_dial_back_response):
        _check(decoder, (an2.WireError,), data)


_DESCRIPTION = (
    b'<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0"><device><serviceList>'
    b"<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>"
    b"<controlURL>/ctl/IPConn</controlURL></service></serviceList></device></root>"
)
_HTTP = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


@settings(max_examples=300)
@given(_inputs(_DESCRIPTION), _inputs(_HTTP), st.binary(max_size=20), st.sampled_from([0, 1, 2]))
@example(
    _DESCRIPTION.replace(b"/ctl/IPConn", b"http://[::1"),
    _HTTP.replace(b"5\r\n", b"zz\r\n"),
    b"\0\x80" + bytes(7),
    0,
)
def test_upnp_and_nat_pmp_answers(xml: bytes, http: bytes, pmp: bytes, op: int) -> None:
    _check(lambda d: upnp.parse_description(d, "http://192.0.2.1:5000/desc.xml"), (upnp.PortMapError,), xml)
    _check(lambda d: upnp.parse_soap(200, d), (upnp.PortMapError,), xml)
    _check(upnp.parse_http_response, (upnp.PortMapError,), http)
    _check(lambda d: upnp.parse_natpmp(d, op), (upnp.PortMapError,), pmp)
    location = upnp.parse_ssdp_location(http)
    assert location is None or location.startswith("http://")


def test_upnp_billion_laughs_is_refused() -> None:
    """expat (>= 2.4) stops entity amplification; the parser must turn that into PortMapError."""
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
        + b"".join(
            b'<!ENTITY %c "&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;">' % ((c,) + (c - 1,) * 10)
            for c in b"bcdefghij"
        )
        + b"]><r>&j;</r>"
    )
    with pytest.raises(upnp.PortMapError):
        upnp.parse_description(bomb, "http://192.0.2.1/")


_VALIDATOR = NamespacedValidator(
    {b"meshmerge": MeshmergeRecordValidator(), b"pk": PublicKeyValidator()},
    max_key_bytes=512,
    max_value_bytes=4096,
)


@settings(max_examples=300)
@given(st.binary(max_size=200), st.binary(max_size=300))
def test_dht_record_validation(key: bytes, value: bytes) -> None:
    for k in (key, b"/meshmerge/" + key, b"/pk/" + key):
        _check(lambda v, k=k: _VALIDATOR.validate(k, v), (RecordRejected,), value)


@settings(max_examples=300)
@given(_inputs(b"\x04\x7f\x00\x00\x01\x06\x10\x00"))
def test_dht_multiaddr(data: bytes) -> None:
    addr = parse_addr(data)
    assert addr is None or addr.to_bytes() == data


_NOW = time.time()
_SNAPSHOT, _ = persist.encode(
    persist.Snapshot(values=[(b"/pk/k", b"v", 60.0)], providers=[(b"key", b"peer", [b"addr"], 60.0)]),
    _NOW,
    1 << 20,
)


@settings(max_examples=300)
@given(_inputs(_SNAPSHOT))
def test_dht_snapshot_file(data: bytes) -> None:
    _check(lambda d: persist.decode(d, _NOW, 1 << 20), (persist.SnapshotError,), data)


@settings(max_examples=300)
@given(st.binary(max_size=600), st.binary(max_size=40))
def test_px_peer_record(data: bytes, peer: bytes) -> None:
    _check(lambda d: open_px_record(d, peer), (PeerRecordError,), data)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_noise_handshake_payload(data: bytes) -> None:
    _check(decode_payload, (NoiseProtocolError,), data)


_HEADER = encode_file_header(FileKind.OPLOG, 3, b"\x01" * 16)


@settings(max_examples=300)
@given(_inputs(_HEADER), st.sampled_from(list(FileKind)))
def test_store_file_header(data: bytes, kind: FileKind) -> None:
    _check(lambda d: parse_file_header(d, kind), (CorruptRecord,), data)


_REQUEST = frame({"id": 1, "method": "status", "params": {}, "fds": 0})


@settings(max_examples=300)
@given(_inputs(_REQUEST), st.integers(1, 7))
def test_rpc_frames(data: bytes, split: int) -> None:
    reader = FrameReader(max_frame_bytes=1 << 16)
    try:
        bodies = reader.feed(data[:split]) + reader.feed(data[split:])
    except ProtocolError:
        return
    for body in bodies:
        _check(parse_request, (ProtocolError, RpcError), body)
        _check(parse_response, (ProtocolError,), body)
