"""AutoNAT v2 without sockets: the wire codec (checked against protobuf itself), the server's
address choice and amplification cost, rate limits, and the client's per-address verdicts."""

from __future__ import annotations

import random

import multiaddr
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from meshmerge.daemon.nat import autonat2_wire as wire
from meshmerge.daemon.nat.autonat import Reachability
from meshmerge.daemon.nat.autonat2 import AutoNATv2Client
from meshmerge.daemon.nat.autonat2_core import (
    AddressReachability,
    AutoNATv2Config,
    DialPlan,
    NonceBook,
    Refusal,
    ServerPolicy,
    dialable,
)


def _schema() -> dict[str, type]:
    """The spec's .proto built at run time with the protobuf library, as the reference encoder."""
    f = descriptor_pb2.FileDescriptorProto(name="autonatv2_test.proto", package="t", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name: str, *fields: tuple[str, int, int, str]) -> None:
        m = f.message_type.add(name=name)
        for fname, num, ftype, tname in fields:
            label = T.LABEL_REPEATED if fname == "addrs" else T.LABEL_OPTIONAL
            fd = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                fd.type_name = tname
            if name == "Message":
                fd.oneof_index = 0
        if name == "Message":
            m.oneof_decl.add(name="msg")

    msg(
        "Message",
        ("dialRequest", 1, T.TYPE_MESSAGE, ".t.DialRequest"),
        ("dialResponse", 2, T.TYPE_MESSAGE, ".t.DialResponse"),
        ("dialDataRequest", 3, T.TYPE_MESSAGE, ".t.DialDataRequest"),
        ("dialDataResponse", 4, T.TYPE_MESSAGE, ".t.DialDataResponse"),
    )
    msg("DialRequest", ("addrs", 1, T.TYPE_BYTES, ""), ("nonce", 2, T.TYPE_FIXED64, ""))
    msg("DialDataRequest", ("addrIdx", 1, T.TYPE_UINT32, ""), ("numBytes", 2, T.TYPE_UINT64, ""))
    msg(
        "DialResponse",
        ("status", 1, T.TYPE_UINT32, ""),
        ("addrIdx", 2, T.TYPE_UINT32, ""),
        ("dialStatus", 3, T.TYPE_UINT32, ""),
    )
    msg("DialDataResponse", ("data", 1, T.TYPE_BYTES, ""))
    msg("DialBack", ("nonce", 1, T.TYPE_FIXED64, ""))
    msg("DialBackResponse", ("status", 1, T.TYPE_UINT32, ""))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return {
        n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"t.{n}"))
        for n in ("Message", "DialBack", "DialBackResponse")
    }


PB = _schema()
A1 = multiaddr.Multiaddr("/ip4/203.0.113.5/tcp/4001").to_bytes()
A2 = multiaddr.Multiaddr("/ip4/198.51.100.7/tcp/4002").to_bytes()


def test_wire_matches_protobuf_both_ways() -> None:
    ref = PB["Message"]()
    ref.dialRequest.addrs.extend([A1, A2])
    ref.dialRequest.nonce = 0xFEEDFACECAFEBEEF
    assert wire.encode(wire.DialRequest((A1, A2), 0xFEEDFACECAFEBEEF)) == ref.SerializeToString()
    assert wire.decode(ref.SerializeToString()) == wire.DialRequest((A1, A2), 0xFEEDFACECAFEBEEF)

    ref = PB["Message"]()
    ref.dialDataRequest.addrIdx, ref.dialDataRequest.numBytes = 1, 40_000
    assert wire.decode(ref.SerializeToString()) == wire.DialDataRequest(1, 40_000)
    assert wire.encode(wire.DialDataRequest(1, 40_000)) == ref.SerializeToString()

    parsed = PB["Message"].FromString(wire.encode(wire.DialResponse(200, 1, 100)))
    assert (parsed.dialResponse.status, parsed.dialResponse.addrIdx, parsed.dialResponse.dialStatus) == (200, 1, 100)
    parsed = PB["Message"].FromString(wire.encode(wire.DialDataResponse(b"x" * 4096)))
    assert parsed.dialDataResponse.data == b"x" * 4096

    ref_back = PB["DialBack"](nonce=7)
    assert wire.encode_dial_back(wire.DialBack(7)) == ref_back.SerializeToString()
    assert wire.decode_dial_back(ref_back.SerializeToString()) == wire.DialBack(7)
    assert wire.decode_dial_back_response(PB["DialBackResponse"]().SerializeToString()).status == 0


def test_wire_refuses_bad_input_with_wire_error_only() -> None:
    for bad, reason in [
        (b"", "no known msg"),
        (b"\x0a\x05\x01", "truncated"),
        (b"\x0f", "wire type"),
        (b"\x0a" + b"\xff" * 11, "varint"),
        (wire.encode(wire.DialDataResponse(b"y" * 5000)), "limit 4096"),
        (wire.encode(wire.DialRequest(tuple([A1] * 65), 1)), "more than 64"),
    ]:
        with pytest.raises(wire.WireError, match=reason):
            wire.decode(bad)
    with pytest.raises(wire.WireError, match="without a nonce"):
        wire.decode_dial_back(b"")
    rng = random.Random(5)
    for _ in range(3000):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        try:
            wire.decode(blob)
            wire.decode_dial_back(blob)
        except wire.WireError:
            pass


def test_dialable_takes_public_tcp_only() -> None:
    ok = dialable(A1, allow_private=False)
    assert str(ok) == "/ip4/203.0.113.5/tcp/4001"
    for text in (
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/100.100.1.2/tcp/4001",
        "/ip4/203.0.113.5/udp/4001/quic-v1",
        "/ip4/203.0.113.5/tcp/0",
        f"/ip4/203.0.113.5/tcp/4001/p2p/{'12D3KooWQ4b1dW5sVCLqkS1Nq7mN6E9mF9mGx8n2q4mD5g3p5Qjw'}/p2p-circuit",
        "/dns4/example.com/tcp/4001",
    ):
        assert dialable(multiaddr.Multiaddr(text).to_bytes(), allow_private=False) is None, text
    assert dialable(b"\xff\xfe garbage", allow_private=True) is None
    assert dialable(multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4001").to_bytes(), allow_private=True) is not None


def test_server_dials_the_first_acceptable_address_and_charges_for_other_ips() -> None:
    policy = ServerPolicy(AutoNATv2Config(dial_data_bytes=30_000))
    private = multiaddr.Multiaddr("/ip4/100.100.1.2/tcp/4001").to_bytes()
    same = policy.plan([private, A1, A2], observed_ip="203.0.113.5")
    assert same == DialPlan(1, multiaddr.Multiaddr("/ip4/203.0.113.5/tcp/4001"), 0)
    other = policy.plan([A2, A1], observed_ip="203.0.113.5")
    assert isinstance(other, DialPlan) and other.idx == 0 and other.data_bytes == 30_000
    mapped = policy.plan([A1], observed_ip="::ffff:203.0.113.5")
    assert isinstance(mapped, DialPlan) and mapped.data_bytes == 0
    assert policy.plan([private], observed_ip="203.0.113.5") is Refusal.NO_DIALABLE_ADDRESS


def test_server_rate_limits_per_peer_and_overall() -> None:
    policy = ServerPolicy(AutoNATv2Config(max_requests_per_peer=2, peer_window_s=10, max_concurrent=3))
    assert policy.admit(b"p", 0.0) and policy.admit(b"p", 1.0)
    assert not policy.admit(b"p", 2.0)
    assert policy.admit(b"q", 2.0)
    assert not policy.admit(b"r", 2.0)  # 3 in flight
    policy.done()
    policy.done()
    policy.done()
    assert policy.admit(b"p", 11.5)  # the first request left the window


def test_config_validation_names_fields() -> None:
    with pytest.raises(ValueError, match="dial_data_bytes"):
        AutoNATv2Config(dial_data_bytes=0).validate()
    with pytest.raises(ValueError, match="threshold"):
        AutoNATv2Config(threshold=0).validate()
    with pytest.raises(ValueError, match="peer_window_s"):
        AutoNATv2Config(peer_window_s=0).validate()


def test_per_address_verdicts_need_agreeing_servers() -> None:
    r = AddressReachability(threshold=2, result_ttl_s=100)
    pub, nat = "/ip4/203.0.113.5/tcp/4001", "/ip4/203.0.113.100/tcp/4001"
    assert r.record(pub, b"s1", True, 0) is Reachability.UNKNOWN
    assert r.record(pub, b"s2", True, 1) is Reachability.PUBLIC
    assert r.record(nat, b"s1", False, 1) is Reachability.UNKNOWN
    assert r.record(nat, b"s2", False, 2) is Reachability.PRIVATE
    # one dissenting server does not flip an address; the same server voting twice counts once
    assert r.record(pub, b"s3", False, 3) is Reachability.PUBLIC
    assert r.record(nat, b"s1", True, 4) is Reachability.PRIVATE
    assert r.record(nat, b"s1", True, 5) is Reachability.PRIVATE
    assert r.reachable(6) == [pub]
    assert r.status(200) == {pub: Reachability.UNKNOWN, nat: Reachability.UNKNOWN}  # votes expired


def test_tracked_addresses_are_bounded() -> None:
    r = AddressReachability(threshold=1, result_ttl_s=100, max_addrs=3)
    for i in range(10):
        r.record(f"/ip4/203.0.113.{i}/tcp/1", b"s", True, 0)
    assert len(r.status(0)) == 3


def test_nonce_book_counts_only_its_own_nonces() -> None:
    book = NonceBook(max_pending=2)
    entry = book.open(42, (A1,))
    assert not book.dial_back(43, "/ip4/203.0.113.9/tcp/1")
    assert book.dial_back(42, "/ip4/203.0.113.9/tcp/1") and entry.dialed_back_on
    book.open(1, (A1,))
    with pytest.raises(OverflowError):
        book.open(2, (A1,))
    book.close(42)
    assert not book.dial_back(42, "x")


def test_client_discards_a_claimed_dial_without_its_nonce() -> None:
    from libp2p.peer.id import ID

    server = ID.from_base58("12D3KooWQ4b1dW5sVCLqkS1Nq7mN6E9mF9mGx8n2q4mD5g3p5Qjw")
    ok = wire.DialResponse(wire.ResponseStatus.OK, 0, wire.DialStatus.OK)
    assert AutoNATv2Client._verdict(server, ok, 1, dialed_back=True) is True
    with pytest.raises(Exception, match="never arrived"):
        AutoNATv2Client._verdict(server, ok, 1, dialed_back=False)
    fail = wire.DialResponse(wire.ResponseStatus.OK, 0, wire.DialStatus.E_DIAL_ERROR)
    assert AutoNATv2Client._verdict(server, fail, 1, dialed_back=False) is False
    back_err = wire.DialResponse(wire.ResponseStatus.OK, 0, wire.DialStatus.E_DIAL_BACK_ERROR)
    assert AutoNATv2Client._verdict(server, back_err, 1, dialed_back=False) is None
    with pytest.raises(Exception, match="address #3 of 1"):
        AutoNATv2Client._verdict(server, wire.DialResponse(200, 3, 200), 1, dialed_back=True)
    with pytest.raises(Exception, match="E_DIAL_REFUSED"):
        AutoNATv2Client._verdict(server, wire.DialResponse(101), 1, dialed_back=False)
    with pytest.raises(Exception, match="status 77"):
        AutoNATv2Client._verdict(server, wire.DialResponse(77), 1, dialed_back=False)
