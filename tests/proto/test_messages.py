import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmerge.proto import cid
from meshmerge.proto.cbor import CodecError, decode, encode
from meshmerge.proto.messages import SetSchema, SignedHeader, StateMessage, loads_header, loads_state
from meshmerge.proto.peerid import from_base58, to_base58
from tests.crdt.factories import schema, signer, state, tensors


def signed_header() -> SignedHeader:
    return state().contribute(signer(1), tensors(1), weight=3, meta={"step": 7})


def test_header_roundtrip_and_id_recomputed() -> None:
    sh = signed_header()
    again = loads_header(encode(sh.to_obj()))
    assert again == sh
    assert again.id == sh.id == cid.cid_of(sh.header.encoded)
    assert cid.from_text(cid.to_text(sh.id)) == sh.id


def test_peer_id_text_form_roundtrips() -> None:
    pid = signer(1).peer_id
    text = to_base58(pid)
    assert text.startswith("12D3KooW")
    assert from_base58(text) == pid


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("h", "seq"), 1.0, r"\$\.h\.seq: expected an unsigned integer, got float"),
        (("h", "weight"), 0, r"\$\.h\.weight: 0 outside"),
        (("h", "seq"), True, r"\$\.h\.seq: expected an unsigned integer, got bool"),
        (("h", "kind"), "gradients", r"\$\.h\.kind: unknown kind"),
        (("h", "v"), 2, r"\$\.h\.v: unsupported format version"),
        (("h", "author"), b"short", r"\$\.h\.author: expected an Ed25519 peer id"),
        (("h", "set"), b"\x00" * 36, r"\$\.h\.set: expected a dag-cbor"),
        (("h", "extra"), 1, r"\$\.h\.extra: unknown field"),
        (("s",), b"\x00" * 10, r"\$\.s: expected 64 bytes"),
    ],
)
def test_field_errors_name_the_field(path: tuple[str, ...], value: object, fragment: str) -> None:
    obj = signed_header().to_obj()
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(CodecError, match=fragment):
        loads_header(encode(obj))


def test_manifest_checks() -> None:
    obj = signed_header().to_obj()
    obj["h"]["tensors"][0]["size"] += 4
    with pytest.raises(CodecError, match=r"tensors\[0\]\.size: .* do not match"):
        loads_header(encode(obj))
    obj = signed_header().to_obj()
    obj["h"]["tensors"].reverse()
    with pytest.raises(CodecError, match="unique and sorted"):
        loads_header(encode(obj))
    obj = signed_header().to_obj()
    obj["h"]["tensors"][1]["shape"] = [1.5]
    with pytest.raises(CodecError, match=r"shape\[0\]: expected an unsigned integer, got float"):
        loads_header(encode(obj))


def test_state_message_roundtrip_and_schema_binding() -> None:
    st_ = state()
    st_.contribute(signer(1), tensors(1))
    sh = st_.contribute(signer(2), tensors(2))
    st_.remove(signer(2), sh.id)
    msg = st_.full_state()
    again = loads_state(encode(msg.to_obj()))
    assert again == msg
    obj = msg.to_obj()
    obj["schema"]["name"] = "test/other"
    with pytest.raises(CodecError, match="schema does not hash to the set id"):
        loads_state(encode(obj))


def test_schema_roundtrip() -> None:
    s = schema(strategy="linear", params={"normalize": True})
    assert SetSchema.from_obj(decode(s.encoded)) == s
    assert s.id == cid.cid_of(s.encoded)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_state_messages_only_raise_codec_error(data: st.DataObject) -> None:
    st_ = state()
    st_.contribute(signer(1), tensors(1))
    raw = bytearray(encode(st_.full_state().to_obj()))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        msg = loads_state(bytes(raw))
    except CodecError:
        return
    assert isinstance(msg, StateMessage)
