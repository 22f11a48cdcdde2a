"""GossipSub RPC codec: exact bytes, round trips, limits, fuzzing, framing."""

from __future__ import annotations

import contextlib
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmerge.proto.gossipsub import (
    RPC,
    CodecLimits,
    ControlGraft,
    ControlIDontWant,
    ControlIHave,
    ControlIWant,
    ControlMessage,
    ControlPrune,
    FrameDecoder,
    GossipCodecError,
    LimitExceededError,
    MalformedError,
    Message,
    PeerInfo,
    SubOpts,
    TruncatedError,
    decode_rpc,
    encode_frame,
    encode_rpc,
)


def test_exact_bytes_of_a_small_rpc() -> None:
    rpc = RPC(
        subscriptions=[SubOpts(True, "t")],
        publish=[Message(from_peer=b"\x01", data=b"hi", seqno=b"\x00\x01", topic="t")],
        control=ControlMessage(graft=[ControlGraft("t")], prune=[ControlPrune("t", [], 60)]),
    )
    # hand-assembled from the field numbers in gossipsub.proto
    sub = b"\x08\x01" + b"\x12\x01t"
    msg = b"\x0a\x01\x01" + b"\x12\x02hi" + b"\x1a\x02\x00\x01" + b"\x22\x01t"
    ctl = b"\x1a\x03" + b"\x0a\x01t" + b"\x22\x05" + b"\x0a\x01t\x18\x3c"
    want = (
        b"\x0a"
        + bytes([len(sub)])
        + sub
        + b"\x12"
        + bytes([len(msg)])
        + msg
        + b"\x1a"
        + bytes([len(ctl)])
        + ctl
    )
    assert encode_rpc(rpc) == want
    assert decode_rpc(want) == rpc


def test_decodes_what_the_reference_protobuf_schema_encodes() -> None:
    """Cross-check against py-libp2p's generated rpc_pb2 (an independent encoder)."""
    rpc_pb2 = pytest.importorskip("libp2p.pubsub.pb.rpc_pb2")
    ref = rpc_pb2.RPC()
    s = ref.subscriptions.add()
    s.subscribe = True
    s.topicid = "topic/ä"
    m = ref.publish.add()
    m.from_id = b"\x00\x24abc"
    m.data = b"payload"
    m.seqno = b"\x00" * 7 + b"\x05"
    m.topicIDs.append("topic/ä")
    m.signature = b"s" * 64
    ih = ref.control.ihave.add()
    ih.topicID = "topic/ä"
    ih.messageIDs.append(b"id1")
    ref.control.iwant.add().messageIDs.append(b"id2")
    ref.control.graft.add().topicID = "g"
    pr = ref.control.prune.add()
    pr.topicID = "p"
    pr.backoff = 60
    pi = pr.peers.add()
    pi.peerID = b"peer"
    pi.signedPeerRecord = b"rec"
    ours = decode_rpc(ref.SerializeToString())
    assert ours.subscriptions == [SubOpts(True, "topic/ä")]
    assert ours.publish[0].from_peer == b"\x00\x24abc"
    assert ours.publish[0].topic == "topic/ä"
    assert ours.control is not None
    assert ours.control.ihave == [ControlIHave("topic/ä", [b"id1"])]
    assert ours.control.iwant == [ControlIWant([b"id2"])]
    assert ours.control.prune == [ControlPrune("p", [PeerInfo(b"peer", b"rec")], 60)]
    # and the other way round: the reference parser reads our bytes identically
    back = rpc_pb2.RPC()
    back.ParseFromString(encode_rpc(ours))
    assert back == ref


rpcs = st.builds(
    RPC,
    subscriptions=st.lists(
        st.builds(SubOpts, st.none() | st.booleans(), st.none() | st.text(max_size=20)), max_size=4
    ),
    publish=st.lists(
        st.builds(
            Message,
            from_peer=st.none() | st.binary(max_size=40),
            data=st.none() | st.binary(max_size=200),
            seqno=st.none() | st.binary(max_size=8),
            topic=st.none() | st.text(max_size=20),
            signature=st.none() | st.binary(max_size=64),
            key=st.none() | st.binary(max_size=40),
        ),
        max_size=4,
    ),
    control=st.none()
    | st.builds(
        ControlMessage,
        ihave=st.lists(
            st.builds(
                ControlIHave, st.none() | st.text(max_size=8), st.lists(st.binary(max_size=40), max_size=5)
            ),
            max_size=3,
        ),
        iwant=st.lists(st.builds(ControlIWant, st.lists(st.binary(max_size=40), max_size=5)), max_size=3),
        graft=st.lists(st.builds(ControlGraft, st.none() | st.text(max_size=8)), max_size=3),
        prune=st.lists(
            st.builds(
                ControlPrune,
                st.none() | st.text(max_size=8),
                st.lists(
                    st.builds(
                        PeerInfo, st.none() | st.binary(max_size=40), st.none() | st.binary(max_size=60)
                    ),
                    max_size=3,
                ),
                st.none() | st.integers(0, 2**64 - 1),
            ),
            max_size=3,
        ),
        idontwant=st.lists(
            st.builds(ControlIDontWant, st.lists(st.binary(max_size=40), max_size=5)), max_size=3
        ),
    ),
)


@given(rpcs)
@settings(max_examples=300, deadline=None)
def test_round_trip(rpc: RPC) -> None:
    assert decode_rpc(encode_rpc(rpc)) == rpc
    dec = FrameDecoder()
    frame = encode_frame(rpc)
    got: list[RPC] = []
    for i in range(len(frame)):  # byte by byte: partial frames are held, not lost
        got += dec.feed(frame[i : i + 1])
    assert got == [rpc] and dec.buffered == 0


@given(st.binary(max_size=4096))
@settings(max_examples=1500, deadline=None)
def test_arbitrary_bytes_only_raise_codec_errors(data: bytes) -> None:
    with contextlib.suppress(GossipCodecError):
        decode_rpc(data)
    with contextlib.suppress(GossipCodecError):
        FrameDecoder().feed(data)


@given(rpcs, st.integers(0, 2**32), st.binary(min_size=1, max_size=8))
@settings(max_examples=400, deadline=None)
def test_mutated_valid_rpcs_only_raise_codec_errors(rpc: RPC, where: int, junk: bytes) -> None:
    data = bytearray(encode_rpc(rpc))
    pos = where % (len(data) + 1)
    data[pos : pos + len(junk)] = junk
    with contextlib.suppress(GossipCodecError):
        decode_rpc(bytes(data))


def test_typed_errors() -> None:
    with pytest.raises(TruncatedError):
        decode_rpc(b"\x12\x05ab")
    with pytest.raises(TruncatedError):
        decode_rpc(b"\x08")
    with pytest.raises(MalformedError):
        decode_rpc(b"\x0b")  # wire type 3 (group start)
    with pytest.raises(MalformedError):
        decode_rpc(b"\x08" + b"\xff" * 10 + b"\x01")  # varint > 10 bytes
    with pytest.raises(MalformedError):
        decode_rpc(b"\x0a\x03\x12\x01\xff")  # topic not UTF-8
    with pytest.raises(MalformedError):
        decode_rpc(b"\x12\x06\x22\x01a\x22\x01b")  # two topics on one message
    with pytest.raises(MalformedError):
        decode_rpc(b"\x00\x00")  # field number 0


def test_limits_are_enforced_while_parsing() -> None:
    lim = CodecLimits(max_message_ids=100, max_rpc_size=1 << 16)
    many_ids = RPC(control=ControlMessage(ihave=[ControlIHave("t", [b"x" * 4] * 101)]))
    with pytest.raises(LimitExceededError, match="message ids"):
        decode_rpc(encode_rpc(many_ids), lim)
    with pytest.raises(LimitExceededError, match="RPC is"):
        decode_rpc(b"\x00" * ((1 << 16) + 1), lim)
    with pytest.raises(LimitExceededError, match="messages"):
        decode_rpc(encode_rpc(RPC(publish=[Message()] * 257)))
    with pytest.raises(LimitExceededError, match="topic"):
        decode_rpc(encode_rpc(RPC(subscriptions=[SubOpts(True, "t" * 1025)])))
    with pytest.raises(LimitExceededError, match="peers"):
        decode_rpc(encode_rpc(RPC(control=ControlMessage(prune=[ControlPrune("t", [PeerInfo(b"p")] * 65)]))))
    with pytest.raises(LimitExceededError, match="frame announces"):
        FrameDecoder(lim).feed(b"\xff\xff\xff\xff\x0f")
    with pytest.raises(ValueError, match="max_messages"):
        CodecLimits(max_messages=0).validate()


def _len_prefixed(tag: int, body: bytes) -> bytes:
    out = bytearray([tag])
    n = len(body)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + body


def test_worst_case_input_is_bounded_in_time_and_memory() -> None:
    """~800 KB of empty IWANT entries: the entry limit trips early; memory stays O(input)."""
    frame = _len_prefixed(0x1A, b"\x12\x00" * 400_000)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(LimitExceededError, match="control entries"):
        decode_rpc(frame)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 5.0  # hang guard
    assert peak < 4 * len(frame)
    # unknown fields are skipped without being stored
    unknown = b"\x78\x01" * 400_000
    tracemalloc.start()
    assert decode_rpc(unknown) == RPC()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * len(unknown)
