"""Real daemons (host, DHT, gossip, sync) on 127.0.0.1 in one trio run."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import trio

from meshmerge.crdt import tensorfile
from meshmerge.daemon.config import Config, StoreSection, dev_config
from meshmerge.daemon.main import run
from meshmerge.daemon.network import start_network
from meshmerge.daemon.node import Node
from meshmerge.daemon.store import StoreLimits
from meshmerge.proto.messages import SetSchema, TensorEntry

SHAPES = {"w": (32, 8), "b": (8,)}
SCHEMA = SetSchema("test/net", "weights", tuple(TensorEntry(n, "F32", s) for n, s in sorted(SHAPES.items())))


def model(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return tensorfile.dumps(
        {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()},
        dict.fromkeys(SHAPES, "F32"),
    )


def config(base: Path, bootstrap: tuple[str, ...], anti_entropy: float) -> Config:
    c = dev_config(base, bootstrap=bootstrap)
    return dataclasses.replace(c, sync=dataclasses.replace(c.sync, anti_entropy_interval=anti_entropy))


async def start(
    nursery: trio.Nursery, base: Path, bootstrap: tuple[str, ...] = (), anti_entropy: float = 3600.0
) -> Node:
    node: Node = await nursery.start(
        lambda task_status: run(
            config(base, bootstrap, anti_entropy), network=start_network, task_status=task_status
        )
    )
    return node


def loopback_addr(node: Node) -> str:
    return next(a for a in node.status()["listen"] if "/ip4/127.0.0.1/" in a)


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    with trio.move_on_after(timeout) as scope:
        while not predicate():
            await trio.sleep(0.1)
    assert not scope.cancelled_caught, f"timed out after {timeout}s waiting for {what}"


def live(node: Node) -> int:
    state = node.state(SCHEMA.id)
    return 0 if state is None else len(state.live_ids())


def complete(node: Node) -> int:
    state = node.state(SCHEMA.id)
    return 0 if state is None else sum(node.store.has_blob(c) for c in state.live_ids())


def test_gossip_announcements_and_blob_fetch(tmp_path: Path) -> None:
    """Anti-entropy runs once per new peer only (interval 1 h): later ops must arrive by gossip."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a = await start(nursery, tmp_path / "a")
            b = await start(nursery, tmp_path / "b", (loopback_addr(a),))
            c = await start(nursery, tmp_path / "c", (loopback_addr(a),))
            for n in (a, b, c):
                await n.create_set(SCHEMA)
            await wait_for(
                lambda: all(n.status()["connected_peers"] >= 2 for n in (a, b, c)), 30, "full mesh"
            )
            await trio.sleep(3)  # let the gossip mesh form (heartbeat 1 s) and the nudged rounds finish
            pulled_before = [n.status()["states_pulled"] for n in (a, b, c)]
            for i, n in enumerate((a, b, c)):
                await n.contribute(SCHEMA.name, model(i), weight=1 + i, meta={})
            await wait_for(
                lambda: all(live(n) == 3 and complete(n) == 3 for n in (a, b, c)), 30, "3 live, complete"
            )
            # Nothing was pulled by anti-entropy after the contributions: they came by gossip.
            assert [n.status()["states_pulled"] for n in (a, b, c)] == pulled_before
            summaries = [(await n.merged(SCHEMA.name, None, None))[0] for n in (a, b, c)]
            assert len({s["sha256"] for s in summaries}) == 1
            assert len({s["root"] for s in summaries}) == 1
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_late_joiner_catches_up_by_anti_entropy(tmp_path: Path) -> None:
    """A node that was not there for any announcement learns the set, its schema and the tensors."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a = await start(nursery, tmp_path / "a")
            await a.create_set(SCHEMA)
            for i in range(3):
                await a.contribute(SCHEMA.name, model(i), weight=1, meta={})
            late = await start(nursery, tmp_path / "late", (loopback_addr(a),))
            assert late.state(SCHEMA.id) is None
            await wait_for(lambda: live(late) == 3 and complete(late) == 3, 30, "late joiner to catch up")
            assert late.state(SCHEMA.id).root() == a.state(SCHEMA.id).root()  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_full_node_puts_fetches_off_with_a_warning(tmp_path: Path, caplog: Any) -> None:
    """The blob quota refuses a fetch before any byte is written; the peer is not blamed."""
    limits = StoreLimits()
    payload = sum(4 * int(np.prod(s)) for s in SHAPES.values())
    one_fetch = 8 + payload + limits.max_blob_header_base + limits.max_blob_header_per_tensor * len(SHAPES)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a = await start(nursery, tmp_path / "a")
            await a.create_set(SCHEMA)
            for i in range(2):
                await a.contribute(SCHEMA.name, model(i), weight=1, meta={})
            base = config(tmp_path / "full", (loopback_addr(a),), 3600.0)
            full_config = base.with_overrides(store=StoreSection(blob_quota_bytes=one_fetch + 1))
            full: Node = await nursery.start(
                lambda task_status: run(full_config, network=start_network, task_status=task_status)
            )
            await wait_for(lambda: live(full) == 2 and complete(full) == 1, 30, "one of two blobs fetched")
            await wait_for(lambda: full.status()["blob_quota_refusals"] >= 1, 30, "a quota refusal")
            await trio.sleep(1)
            assert complete(full) == 1 and full.status()["blob_bytes"] <= one_fetch
            assert full.status()["blob_quota_bytes"] == one_fetch + 1
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, logger="meshmerge.sync"):
        trio.run(main)
    assert any(
        "not fetching tensors of" in r.getMessage() and "quota" in r.getMessage() for r in caplog.records
    )


def test_one_missing_op_is_repaired_without_pulling_the_state(tmp_path: Path) -> None:
    """Anti-entropy between 1.1.0 peers pulls the differing buckets only."""
    from meshmerge.crdt import MergeState, Signer
    from meshmerge.proto.messages import StateMessage

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a = await start(nursery, tmp_path / "a")
            await a.create_set(SCHEMA)
            for i in range(80):
                await a.contribute(SCHEMA.name, model(i), weight=1, meta={})
            b = await start(nursery, tmp_path / "b", (loopback_addr(a),), anti_entropy=1.0)
            await wait_for(
                lambda: live(b) == 80 and b.status()["states_pulled"] == 1, 30, "b to pull the state once"
            )
            pulled = b.status()["states_pulled"]
            # an op only a knows (applied as a remote op, so a does not announce it)
            outsider = MergeState(SCHEMA).make_contribution(
                Signer(bytes(range(32))), tensorfile.loads(model(99))[0], weight=1, seq=0
            )
            await a.apply_remote(SCHEMA.id, StateMessage(SCHEMA.id, adds=(outsider,)))
            await wait_for(
                lambda: (
                    live(b) == 81 and (b.status()["sets_reconciled"] or b.status()["states_pulled"] > pulled)
                ),
                30,
                "b to repair the missing op",
            )
            state_a, state_b = a.state(SCHEMA.id), b.state(SCHEMA.id)
            assert state_a is not None and state_b is not None and state_a.root() == state_b.root()
            status = b.status()
            assert status["states_pulled"] == pulled, "the full state was pulled again"
            assert status["sets_reconciled"] >= 1 and 1 <= status["ops_pulled"] < 40, status
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_peer_without_digest_reconciliation_gets_full_pulls(tmp_path: Path, monkeypatch: Any) -> None:
    """Wire compatibility: against a 1.0.0-only peer the puller falls back to the full state."""
    from meshmerge.crdt import MergeState, Signer
    from meshmerge.daemon import sync as sync_mod
    from meshmerge.proto.messages import StateMessage

    real_run = sync_mod.SyncService.run
    old_hosts: list[Any] = []

    async def run_as_old_peer(self: Any, **kw: Any) -> None:
        if not old_hosts:  # the first node started speaks only 1.0.0
            old_hosts.append(self.host)
            register = self.host.set_stream_handler

            def only_v1(protocol: Any, handler: Any) -> None:
                if str(protocol) != sync_mod.SYNC_PROTOCOL_RECONCILE:
                    register(protocol, handler)

            self.host.set_stream_handler = only_v1
        await real_run(self, **kw)

    monkeypatch.setattr(sync_mod.SyncService, "run", run_as_old_peer)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            old = await start(nursery, tmp_path / "old")
            await old.create_set(SCHEMA)
            await old.contribute(SCHEMA.name, model(0), weight=1, meta={})
            new = await start(nursery, tmp_path / "new", (loopback_addr(old),), anti_entropy=1.0)
            await wait_for(lambda: live(new) == 1 and new.status()["states_pulled"] == 1, 30, "first pull")
            outsider = MergeState(SCHEMA).make_contribution(
                Signer(bytes(range(32))), tensorfile.loads(model(99))[0], weight=1, seq=0
            )
            await old.apply_remote(SCHEMA.id, StateMessage(SCHEMA.id, adds=(outsider,)))
            await wait_for(
                lambda: live(new) == 2 and new.status()["states_pulled"] == 2, 30, "the repair by a full pull"
            )
            status = new.status()
            assert status["sets_reconciled"] == 0, status
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_left_set_stays_left_until_rejoined(tmp_path: Path) -> None:
    """Anti-entropy and gossip from a peer that still has the set do not bring it back."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a = await start(nursery, tmp_path / "a", anti_entropy=0.5)
            await a.create_set(SCHEMA)
            await a.contribute(SCHEMA.name, model(0), weight=1, meta={})
            b = await start(nursery, tmp_path / "b", (loopback_addr(a),), anti_entropy=0.5)
            await wait_for(lambda: live(b) == 1 and complete(b) == 1, 30, "b to follow the set")
            mine = await b.contribute(SCHEMA.name, model(1), weight=1, meta={})
            await wait_for(lambda: live(a) == 2, 30, "a to learn b's contribution")
            left = await b.leave_set(SCHEMA.name)
            assert left["bytes_freed"] > 0 and b.state(SCHEMA.id) is None
            assert b.status()["sets_left"] == 1 and b.status()["blob_bytes"] == 0
            rounds = b.status()["sync_rounds"]
            await a.contribute(SCHEMA.name, model(2), weight=1, meta={})  # gossiped to b
            await wait_for(lambda: b.status()["sync_rounds"] >= rounds + 3, 30, "three sync rounds")
            assert b.state(SCHEMA.id) is None, "neither gossip nor anti-entropy re-created it"
            again = await b.rejoin_set(SCHEMA.name)
            assert again["name"] == SCHEMA.name and b.status()["sets_left"] == 0
            await wait_for(lambda: live(b) == 3 and complete(b) == 3, 30, "b to catch up after rejoining")
            later = await b.contribute(SCHEMA.name, model(3), weight=1, meta={})
            assert later["seq"] > mine["seq"], "a rejoin never reuses a sequence number"
            await wait_for(lambda: live(a) == 4, 30, "a to accept b's new contribution")
            assert not a.state(SCHEMA.id).orset.convicted()  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()

    trio.run(main)
