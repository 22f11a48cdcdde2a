import hashlib

from hypothesis import given
from hypothesis import strategies as st

from meshmerge.crdt.merkle import EMPTY_ROOT, merkle_root


def rfc6962(items: list[bytes]) -> bytes:
    """The RFC's recursive definition, written directly."""
    if not items:
        return hashlib.sha256(b"").digest()
    if len(items) == 1:
        return hashlib.sha256(b"\x00" + items[0]).digest()
    k = 1
    while k * 2 < len(items):
        k *= 2
    return hashlib.sha256(b"\x01" + rfc6962(items[:k]) + rfc6962(items[k:])).digest()


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=70))
def test_matches_rfc6962_recursive_definition(items: list[bytes]) -> None:
    assert merkle_root(items) == rfc6962(items)


def test_empty_root_and_leaf_node_separation() -> None:
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    a, b = b"a" * 36, b"b" * 36
    # A leaf whose bytes look like an inner node does not collide with that node.
    inner = hashlib.sha256(b"\x00" + a).digest() + hashlib.sha256(b"\x00" + b).digest()
    assert merkle_root([a, b]) != merkle_root([inner])
