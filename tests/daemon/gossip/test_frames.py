"""FrameEncoder: byte-identical to encode_frame, with each message encoded once per batch."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshmerge.daemon.gossip.frames import FrameEncoder
from meshmerge.proto.gossipsub import (
    RPC,
    ControlGraft,
    ControlMessage,
    FrameDecoder,
    Message,
    SubOpts,
    encode_frame,
)
from tests.proto.test_gossipsub_codec import rpcs


@settings(max_examples=100, deadline=None)
@given(st.lists(rpcs, min_size=1, max_size=4))
def test_frames_are_byte_identical_to_encode_frame(batch: list[RPC]) -> None:
    enc = FrameEncoder()
    for rpc in batch:
        assert enc.encode(rpc) == encode_frame(rpc)
    enc.reset()


def test_a_message_shared_by_many_rpcs_is_encoded_once_per_batch() -> None:
    msg = Message(from_peer=b"\x00\x01", data=b"x" * 300, seqno=b"\x00" * 8, topic="t", signature=b"s" * 64)
    other = Message(data=b"other", topic="t")
    rpcs_out = [
        RPC(publish=[msg]),
        RPC(subscriptions=[SubOpts(True, "t")], publish=[msg, other]),
        RPC(publish=[other, msg], control=ControlMessage(graft=[ControlGraft("t")])),
    ]
    enc = FrameEncoder()
    frames = [enc.encode(r) for r in rpcs_out]
    assert frames == [encode_frame(r) for r in rpcs_out]
    assert enc.hits == 3  # msg twice more, other once more
    assert FrameDecoder().feed(b"".join(frames)) == rpcs_out
    enc.reset()
    enc.encode(RPC(publish=[msg]))
    assert enc.hits == 3  # reset forgets: the next batch encodes afresh
