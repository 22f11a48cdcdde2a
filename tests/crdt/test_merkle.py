import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmerge.crdt.merkle import EMPTY_ROOT, MerkleTree, merkle_root


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


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["ins", "del", "root"]), st.integers(0, 2**16), st.binary(min_size=1, max_size=8)
        ),
        max_size=120,
    )
)
def test_incremental_tree_matches_a_full_recompute(ops: list[tuple[str, int, bytes]]) -> None:
    tree, items = MerkleTree(), []
    for op, where, item in ops:
        if op == "ins":
            pos = where % (len(items) + 1)
            items.insert(pos, item)
            tree.insert(pos, item)
        elif op == "del" and items:
            pos = where % len(items)
            del items[pos]
            tree.delete(pos)
        else:
            assert tree.root() == merkle_root(items)
    assert len(tree) == len(items)
    assert tree.root() == merkle_root(items)


def test_growing_and_shrinking_through_every_size_matches() -> None:
    tree, items = MerkleTree(), []
    for i in range(70):
        items.append(b"%d" % i)
        tree.insert(len(items) - 1, items[-1])
        assert tree.root() == rfc6962(items)
    while items:
        del items[0]
        tree.delete(0)
        assert tree.root() == rfc6962(items)
    assert tree.root() == EMPTY_ROOT


def test_a_change_rehashes_only_the_subtrees_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import meshmerge.crdt.merkle as merkle_mod

    n = 4096
    tree = MerkleTree()
    for i in range(n):
        tree.insert(i, i.to_bytes(4, "big"))
    tree.root()
    calls = {"n": 0}
    real = merkle_mod.node_hash

    def counting(left: bytes, right: bytes) -> bytes:
        calls["n"] += 1
        return real(left, right)

    monkeypatch.setattr(merkle_mod, "node_hash", counting)
    costs = {}
    for pos in (n, 3 * n // 4, 0):
        tree.insert(pos, b"new %d" % pos)
        calls["n"] = 0
        tree.root()
        costs[pos] = calls["n"]
    # appending at the end: one path (log n); at 3/4: about a quarter of the tree; at 0: all of it
    assert costs[n] <= 2 * 13, costs
    assert costs[3 * n // 4] <= n // 4 + 2 * 13, costs
    assert n - 13 <= costs[0] <= n + 2 * 13, costs


def test_positions_outside_the_list_are_refused() -> None:
    tree = MerkleTree()
    with pytest.raises(IndexError):
        tree.insert(1, b"x")
    with pytest.raises(IndexError):
        tree.delete(0)
