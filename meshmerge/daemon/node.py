"""The node's local core: merge sets, contributions and merges, backed by the store.

The RPC server and the network services call into one :class:`Node`. It runs
on the trio thread; blocking work (fsync, hashing, merging) goes to worker
threads. Each merge set has a lock, so operations on one set are applied in
a single order and an operation is acknowledged only after the store made it
durable. Network services subscribe to :meth:`Node.changes` to learn about
new local operations (to announce them) and report remote ones through
:meth:`Node.apply_remote`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from meshmerge import __version__
from meshmerge.crdt import (
    Incomplete,
    MergeState,
    MergeStateError,
    SchemaMismatch,
    Signer,
    digest_of_tensors,
    tensorfile,
)
from meshmerge.crdt.strategies import StrategyError
from meshmerge.daemon.store import BlobRejected, QuotaExceeded, Store, StoreError
from meshmerge.proto import cid as cids
from meshmerge.proto.cbor import CodecError
from meshmerge.proto.messages import SetSchema, StateMessage
from meshmerge.proto.peerid import to_base58
from meshmerge.proto.rpc import RpcError

if TYPE_CHECKING:
    # the trio-stubs that py-libp2p pulls in (trio-typing) predate trio.TaskStatus
    from trio_typing import TaskStatus

log = logging.getLogger("meshmerge.node")


def _why(exc: Exception) -> str:
    """A store failure for the user: the OS reason and the file, or the store's own message."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc)


ChangeListener = Callable[[bytes, StateMessage, bool], None]


@dataclass
class SetHandle:
    state: MergeState
    lock: trio.Lock


class Node:
    def __init__(self, store: Store, signer: Signer, *, max_blob_bytes: int) -> None:
        self.store = store
        self.signer = signer
        self.max_blob_bytes = max_blob_bytes
        self.started = time.time()
        self._sets: dict[bytes, SetHandle] = {}
        self._listeners: list[ChangeListener] = []
        self._leave_listeners: list[Callable[[bytes], None]] = []
        self._gc_lock = trio.Lock()
        self.extra_status: list[Callable[[], Mapping[str, Any]]] = []
        for schema in store.sets():
            self._sets[schema.id] = SetHandle(store.load_state(schema.id), trio.Lock())
        if self._sets:
            log.info("loaded %d merge set(s) from %s", len(self._sets), getattr(store, "root", "the store"))

    # -- wiring ------------------------------------------------------------------

    def on_change(self, listener: ChangeListener) -> None:
        """Call `listener(set_id, ops, local)` after every durable change; `local` is False for peers' ops."""
        self._listeners.append(listener)

    def on_leave(self, listener: Callable[[bytes], None]) -> None:
        """Call `listener(set_id)` after the node left a set (to unsubscribe, stop fetching)."""
        self._leave_listeners.append(listener)

    def _notify(self, set_id: bytes, ops: StateMessage, local: bool) -> None:
        for listener in self._listeners:
            listener(set_id, ops, local)

    # -- lookups -----------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return to_base58(self.signer.peer_id)

    def set_ids(self) -> list[bytes]:
        return list(self._sets)

    def has_left(self, set_id: bytes) -> bool:
        """Peers' copies of a set this node left are not pulled or applied until it rejoins."""
        return self.store.has_left(set_id)

    def state(self, set_id: bytes) -> MergeState | None:
        handle = self._sets.get(set_id)
        return handle.state if handle else None

    def resolve_set(self, ref: str) -> SetHandle:
        """A set by its id text (bafy…) or by its name when that name is unique here."""
        if ref.startswith("b"):
            try:
                handle = self._sets.get(cids.from_text(ref))
            except cids.CidError:
                handle = None
            if handle is not None:
                return handle
        named = [h for h in self._sets.values() if h.state.schema.name == ref]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise RpcError("ambiguous_set", f"{len(named)} merge sets are named {ref!r}; use the set id")
        raise RpcError("unknown_set", f"no merge set {ref!r} on this node (see `meshmerge sets`)")

    # -- operations ----------------------------------------------------------------

    async def create_set(self, schema: SetSchema) -> bytes:
        """Create a set, or rejoin one this node left (peers' operations are pulled again)."""
        if schema.id not in self._sets:
            verb = "rejoined" if self.has_left(schema.id) else "created"
            await trio.to_thread.run_sync(self.store.add_set, schema)
            self._sets[schema.id] = SetHandle(MergeState(schema), trio.Lock())
            log.info("%s merge set %s (%s)", verb, schema.name, cids.to_text(schema.id))
            self._notify(schema.id, StateMessage(schema.id, schema=schema), True)
        return schema.id

    async def ensure_set(self, schema: SetSchema) -> SetHandle:
        await self.create_set(schema)
        return self._sets[schema.id]

    async def contribute(
        self, ref: str, data: bytes, *, weight: int, meta: Mapping[str, Any]
    ) -> dict[str, Any]:
        handle = self.resolve_set(ref)
        schema = handle.state.schema
        try:
            tensors, dtypes = tensorfile.loads(data)
        except tensorfile.TensorFileError as exc:
            raise RpcError("bad_tensors", f"not a valid safetensors file: {exc}") from None
        async with handle.lock:
            try:
                known = handle.state.orset.max_seq(self.signer.peer_id)
                floor = 0 if known is None else known + 1  # never below a seq peers already saw from us
                seq = await trio.to_thread.run_sync(
                    lambda: self.store.next_seq(schema.id, self.signer.peer_id, at_least=floor)
                )
                signed = handle.state.make_contribution(
                    self.signer, tensors, weight=weight, dtypes=dtypes, meta=dict(meta), seq=seq
                )
            except SchemaMismatch as exc:
                raise RpcError("schema_mismatch", str(exc)) from None
            except (MergeStateError, CodecError, ValueError) as exc:
                raise RpcError("bad_contribution", str(exc)) from None
            ops = StateMessage(schema.id, adds=(signed,))
            try:
                await trio.to_thread.run_sync(self.store.put_blob, signed.header, data)
            except QuotaExceeded as exc:
                # the reserved seq stays unused: seqs need to be unique, not dense
                raise RpcError("quota_exceeded", str(exc)) from None
            except BlobRejected as exc:
                raise RpcError("bad_contribution", str(exc)) from None
            except (StoreError, OSError) as exc:
                raise RpcError("storage_error", f"could not store the tensors: {_why(exc)}") from None
            await self._persist(handle, ops)
        log.info(
            "contribution %s to %s (seq %d, weight %d)", cids.to_text(signed.id), schema.name, seq, weight
        )
        self._notify(schema.id, ops, True)
        return {"id": cids.to_text(signed.id), "seq": seq, "set": cids.to_text(schema.id)}

    async def remove(self, ref: str, contribution: str) -> dict[str, Any]:
        handle = self.resolve_set(ref)
        try:
            target = cids.from_text(contribution)
        except cids.CidError as exc:
            raise RpcError("bad_request", str(exc)) from None
        async with handle.lock:
            try:
                removal = handle.state.make_removal(self.signer, target)
            except MergeStateError as exc:
                raise RpcError("cannot_remove", str(exc)) from None
            ops = StateMessage(handle.state.set_id, removals=(removal,))
            await self._persist(handle, ops)
        self._notify(handle.state.set_id, ops, True)
        return {"removed": contribution}

    async def _persist(self, handle: SetHandle, ops: StateMessage) -> None:
        """Make local ops durable, then apply them (the caller holds the set's lock).

        A failed write is the caller's error ``storage_error``: nothing was
        applied, so the trainer can retry once the disk has room again.
        """
        try:
            await trio.to_thread.run_sync(self.store.append, handle.state.set_id, ops)
        except (StoreError, OSError) as exc:
            raise RpcError(
                "storage_error", f"could not record the operation (nothing was applied): {_why(exc)}"
            ) from None
        handle.state.apply(ops)
        await self._maybe_snapshot(handle)

    async def _maybe_snapshot(self, handle: SetHandle) -> None:
        """Compact the op log once it passes its size limit (state captured on the trio thread).

        The ops are already durable in the log, so a failed snapshot is only
        logged; the next append tries again.
        """
        set_id = handle.state.set_id
        if self.store.snapshot_due(set_id):
            full = handle.state.full_state()
            try:
                await trio.to_thread.run_sync(self.store.snapshot, set_id, full)
            except (StoreError, OSError) as exc:
                log.warning("snapshot of %s failed, will retry: %s", handle.state.schema.name, _why(exc))
                return
            log.info("snapshot of %s written", handle.state.schema.name)

    async def apply_remote(self, set_id: bytes, ops: StateMessage, *, verified: bool = False) -> Any:
        """Join operations from a peer; returns the ApplyReport (rejections feed peer scores).

        ``verified=True`` only for bytes whose signatures were just checked (the gossip
        validator accepted exactly this message), so they are not checked twice.
        """
        handle = self._sets.get(set_id)
        if handle is None:
            if ops.schema is None or self.has_left(set_id):
                return None
            handle = await self.ensure_set(ops.schema)
        async with handle.lock:
            report = handle.state.apply(ops, trusted=verified)
            if report.new_ops is not None:
                await trio.to_thread.run_sync(self.store.append, set_id, report.new_ops)
                await self._maybe_snapshot(handle)
        if report.new_ops is not None:
            self._notify(set_id, report.new_ops, False)
        return report

    async def merged(
        self, ref: str, strategy: str | None, params: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], bytes]:
        """Merge the live set; returns (summary, safetensors bytes)."""
        handle = self.resolve_set(ref)
        schema = handle.state.schema
        async with handle.lock:
            state = handle.state
            if not state.live_ids():
                raise RpcError("empty_set", f"merge set {schema.name!r} has no live contributions yet")
            t0 = time.perf_counter()
            try:
                merged = await trio.to_thread.run_sync(
                    lambda: state.merged(self.store.get_tensors, strategy, params)
                )
            except Incomplete as exc:
                raise RpcError(
                    "incomplete",
                    f"{len(exc.missing)} live contribution(s) still being fetched; retry shortly",
                ) from None
            except StrategyError as exc:
                raise RpcError("bad_strategy", str(exc)) from None
            root = state.root()
            live = len(state.live_ids())
        dtypes = {t.name: t.dtype for t in schema.tensors}
        data = await trio.to_thread.run_sync(
            lambda: tensorfile.dumps(
                merged, dtypes, {"meshmerge.root": root.hex(), "meshmerge.set": schema.name}
            )
        )
        summary = {
            "set": cids.to_text(schema.id),
            "strategy": strategy or schema.strategy,
            "contributions": live,
            "root": root.hex(),
            "sha256": digest_of_tensors(merged),
            "seconds": round(time.perf_counter() - t0, 4),
            "bytes": len(data),
        }
        return summary, data

    async def leave_set(self, ref: str) -> dict[str, Any]:
        """Stop following a set: forget its operations here and free its tensor blobs.

        Peers keep their copies; this node neither pulls nor applies the set's
        operations again until `create_set` rejoins it. Its own sequence
        numbers stay reserved, so a rejoin can never look like equivocation.
        """
        handle = self.resolve_set(ref)
        set_id, name = handle.state.set_id, handle.state.schema.name
        async with handle.lock:
            if self._sets.get(set_id) is not handle:
                raise RpcError("unknown_set", f"merge set {ref!r} was left meanwhile")
            try:
                await trio.to_thread.run_sync(self.store.leave_set, set_id)
            except (StoreError, OSError) as exc:
                raise RpcError("storage_error", f"could not leave {name!r}: {_why(exc)}") from None
            del self._sets[set_id]
        log.info("left merge set %s (%s)", name, cids.to_text(set_id))
        for listener in self._leave_listeners:
            listener(set_id)
        freed = await self.gc()
        return {"left": cids.to_text(set_id), "name": name, "bytes_freed": freed["bytes_freed"]}

    async def rejoin_set(self, ref: str) -> dict[str, Any]:
        """Follow a set this node left again, by its id text or unique name."""
        every = self.store.left_sets()
        left = [s for s in every if ref in (cids.to_text(s.id), s.name)]
        if len(left) != 1:
            names = sorted(s.name for s in every)
            what = "several" if left else "no"
            raise RpcError("unknown_set", f"{what} left merge set(s) match {ref!r}; left sets: {names}")
        set_id = await self.create_set(left[0])
        return {"id": cids.to_text(set_id), "name": left[0].name}

    # -- blob garbage collection -----------------------------------------------------

    async def gc(self) -> dict[str, Any]:
        """Delete tensor blobs no live contribution references (removed, or author convicted).

        Dead ids never come back to life in the OR-Set, so their blobs are not
        needed again. While the ids to keep are computed every set's lock is
        held, so no contribution is between "blob stored" and "op applied";
        blobs published after that (fetches finishing) are spared by the store.
        """
        async with self._gc_lock:
            async with AsyncExitStack() as stack:
                held: set[bytes] = set()
                while missing := sorted(set(self._sets) - held):  # sets created while we waited
                    for set_id in missing:
                        await stack.enter_async_context(self._sets[set_id].lock)
                        held.add(set_id)
                mark = self.store.begin_blob_collection()
                keep = {cid for handle in self._sets.values() for cid in handle.state.live_ids()}
            report = await trio.to_thread.run_sync(self.store.collect_blobs, keep, mark)
        usage = self.store.blob_usage()
        return {
            "blobs_removed": report.blobs_removed,
            "bytes_freed": report.bytes_freed,
            "partial_writes_removed": report.parts_removed,
            "partial_bytes_freed": report.part_bytes_freed,
            "blobs_kept": report.blobs_kept,
            "blob_bytes": usage.bytes,
            "blob_quota_bytes": usage.quota_bytes,
        }

    async def gc_loop(
        self, interval: float, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Collect on start (stale partial writes, orphans of a crash) and every ``interval`` seconds.

        Started with ``nursery.start``: the first collection finishes before the daemon
        reports ready, so "ready" means start-up housekeeping is done.
        """
        while True:
            try:
                await self.gc()
            except (StoreError, OSError) as exc:  # the node keeps serving; the next run retries
                log.error("blob collection failed: %s", exc)
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await trio.sleep(interval)

    # -- views -----------------------------------------------------------------------

    def summaries(self) -> list[dict[str, Any]]:
        return [self.set_summary(handle) for handle in self._sets.values()]

    def set_summary(self, handle: SetHandle) -> dict[str, Any]:
        state = handle.state
        live = state.live_ids()
        have = sum(1 for c in live if self.store.has_blob(c))
        return {
            "id": cids.to_text(state.set_id),
            "name": state.schema.name,
            "kind": state.schema.kind,
            "strategy": state.schema.strategy,
            "tensors": len(state.schema.tensors),
            "live": len(live),
            "complete": have,
            "known": len(state.orset.adds),
            "convicted": len(state.orset.convicted()),
            "root": state.root().hex(),
        }

    def contributions(self, ref: str) -> list[dict[str, Any]]:
        state = self.resolve_set(ref).state
        out = []
        for cid in sorted(state.orset.adds):
            header = state.orset.adds[cid].header
            out.append(
                {
                    "id": cids.to_text(cid),
                    "author": to_base58(header.author),
                    "seq": header.seq,
                    "weight": header.weight,
                    "live": state.orset.is_live(cid),
                    "convicted": state.orset.is_convicted(header.author),
                    "have_tensors": self.store.has_blob(cid),
                    "meta": dict(header.meta),
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "peer_id": self.peer_id,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "sets": len(self._sets),
            "sets_left": len(self.store.left_sets()),
        }
        usage = self.store.blob_usage()
        info["blobs"] = usage.blobs
        info["blob_bytes"] = usage.bytes
        info["blob_reserved_bytes"] = usage.reserved_bytes
        info["blob_quota_bytes"] = usage.quota_bytes
        for extra in self.extra_status:
            info.update(extra())
        return info
