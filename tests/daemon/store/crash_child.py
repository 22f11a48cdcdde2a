"""Child process for the kill -9 tests: works on a store and prints an ACK line
after every call that returned (i.e. is durable). The parent SIGKILLs it at a
random moment and checks that everything ACKed survived.

Usage: python -m tests.daemon.store.crash_child DATA_DIR SEED MODE
MODE "ops" snapshots when the op log passes a small limit; "snapshots"
snapshots after every contribution, so most kills land inside one; "gc"
removes more contributions and collects blob garbage after each one.
Lines: READY | SEQ <n> | OP <cid hex> | REM <target cid hex> | BLOB <cid hex> | SNAP | GC
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from meshmerge.crdt.tensorfile import dumps
from meshmerge.daemon.store import Store, StoreLimits
from meshmerge.proto.messages import StateMessage
from tests.crdt.factories import schema, signer, tensors

#: a small snapshot threshold so kills often land inside a snapshot
LIMITS = StoreLimits(max_oplog_bytes_before_snapshot=6000)


def ack(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(data_dir: Path, seed: int, mode: str) -> None:
    rng = random.Random(seed)
    me = signer(0)
    sch = schema()
    sid = sch.id
    store = Store.open(data_dir, LIMITS, fsync=True)
    store.add_set(sch)
    state = store.load_state(sid)
    last = state.orset.max_seq(me.peer_id)
    ack("READY")
    while True:
        seq = store.next_seq(sid, me.peer_id, at_least=0 if last is None else last + 1)
        ack(f"SEQ {seq}")
        t = tensors(seq)
        signed = state.contribute(me, t, seq=seq)
        store.append(sid, StateMessage(sid, adds=(signed,)))
        ack(f"OP {signed.id.hex()}")
        data = dumps(t, {e.name: e.dtype for e in signed.header.tensors})
        if rng.random() < 0.5:
            store.put_blob(signed.header, data)
        else:
            with store.blob_writer(signed.header) as w:
                for off in range(w.offset(), len(data), 64):
                    w.write(off, data[off : off + 64])
                w.finish()
        ack(f"BLOB {signed.id.hex()}")
        if rng.random() < (0.5 if mode == "gc" else 0.2):
            removal = state.remove(me, signed.id)
            store.append(sid, StateMessage(sid, removals=(removal,)))
            ack(f"REM {signed.id.hex()}")
        if mode == "gc":
            if rng.random() < 0.3:  # a fetch that was interrupted, then its contribution died
                (data_dir / "blobs" / ".partial" / f"{signed.id.hex()}.part").write_bytes(data[:40])
            store.collect_garbage(keep=set(state.live_ids()))
            ack("GC")
        if mode == "snapshots":
            store.snapshot(sid, state)
            ack("SNAP")
        elif store.maybe_snapshot(sid, state):
            ack("SNAP")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
