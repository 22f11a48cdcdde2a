"""In-process convergence demo: replicas that hear things in different orders agree.

Trainers contribute models; each replica receives the announcements in its own
random order, with duplicates and losses, through the real wire format. One
trainer retracts a contribution and one equivocates (signs two different
contributions with the same sequence number). Anti-entropy with random peers
repairs the losses, tensors are fetched from peers and checked against the
signed manifests, and every replica prints the same Merkle root and the same
merged-model digest.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshmerge.crdt import MergeState, Signer, digest_of_tensors, verify_tensors
from meshmerge.proto import cid
from meshmerge.proto.cbor import encode
from meshmerge.proto.messages import SetSchema, StateMessage, TensorEntry, loads_state

SHAPES = {"embed": (256, 64), "block.0.attn": (64, 64), "block.0.mlp": (64, 256), "head": (64, 10)}


@dataclass
class Replica:
    name: str
    state: MergeState
    blobs: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    inbox: list[bytes] = field(default_factory=list)


def _trainer_tensors(rng: np.random.Generator) -> dict[str, Any]:
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def run(replicas: int, trainers: int, loss: float, seed: int, out: Any = sys.stdout) -> bool:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    schema = SetSchema(
        name="demo/round-1",
        kind="weights",
        tensors=tuple(TensorEntry(n, "F32", s) for n, s in sorted(SHAPES.items())),
        strategy="linear",
    )
    nodes = [Replica(f"node-{i}", MergeState(schema)) for i in range(replicas)]
    signers = [Signer(hashlib.sha256(f"demo-trainer-{seed}-{t}".encode()).digest()) for t in range(trainers)]
    print(f"merge set {schema.name}  id {cid.to_text(schema.id)[:24]}…", file=out)
    print(f"{replicas} replicas, {trainers} trainers, {loss:.0%} message loss", file=out)

    announcements: list[tuple[int, bytes]] = []
    for t, signer in enumerate(signers):
        home = nodes[t % replicas]
        tensors = _trainer_tensors(nrng)
        signed = home.state.contribute(signer, tensors, weight=rng.randint(1, 10))
        home.blobs[signed.id] = tensors
        announcements.append((t % replicas, encode(StateMessage(schema.id, adds=(signed,)).to_obj())))
    retract_home = nodes[0]
    retracted = retract_home.state.live_ids()[0]
    author = retract_home.state.header(retracted).author
    who = next(s for s in signers if s.peer_id == author)
    removal = retract_home.state.remove(who, retracted)
    announcements.append((0, encode(StateMessage(schema.id, removals=(removal,)).to_obj())))
    cheat_home = nodes[-1]
    cheat_tensors = _trainer_tensors(nrng)
    twin = cheat_home.state.contribute(signers[-1], cheat_tensors, seq=0)
    cheat_home.blobs[twin.id] = cheat_tensors
    announcements.append((replicas - 1, encode(StateMessage(schema.id, adds=(twin,)).to_obj())))
    print(
        f"{len(announcements)} announcements: {trainers} contributions, 1 retraction, 1 equivocation",
        file=out,
    )

    sent = delivered = 0
    for origin, wire in announcements:
        for i, node in enumerate(nodes):
            if i == origin:
                continue
            copies = 0 if rng.random() < loss else (2 if rng.random() < 0.2 else 1)
            node.inbox += [wire] * copies
            sent += 1
    for node in nodes:
        rng.shuffle(node.inbox)
        for wire in node.inbox:
            node.state.apply(loads_state(wire))
            delivered += 1
        node.inbox.clear()
    print(f"gossip: {sent} sends, {delivered} deliveries (shuffled, duplicated, lost)", file=out)

    rounds = 0
    t0 = time.perf_counter()
    while len({n.state.root() for n in nodes}) > 1:
        rounds += 1
        for node in nodes:
            peer = rng.choice([p for p in nodes if p is not node])
            node.state.apply(loads_state(encode(peer.state.full_state().to_obj())))
        if rounds > 50:
            print("anti-entropy did not converge in 50 rounds", file=out)
            return False
    print(
        f"anti-entropy: roots equal after {rounds} round(s) ({(time.perf_counter() - t0) * 1e3:.1f} ms)",
        file=out,
    )

    fetched = 0
    for node in nodes:
        for live in node.state.live_ids():
            if live in node.blobs:
                continue
            holder = next(p for p in nodes if live in p.blobs)
            tensors = holder.blobs[live]
            verify_tensors(node.state.header(live), tensors)
            node.blobs[live] = tensors
            fetched += 1
    print(f"blob fetch: {fetched} contributions fetched from peers, all sha-256 verified", file=out)

    print(f"\n{'replica':<8} {'live':>4} {'convicted':>9}  {'merkle root':<18} merged-model sha256", file=out)
    digests = set()
    for node in nodes:
        merged = node.state.merged(node.blobs.get)
        digest = digest_of_tensors(merged)
        digests.add((node.state.root(), digest))
        print(
            f"{node.name:<8} {len(node.state.live_ids()):>4} {len(node.state.orset.convicted()):>9}  "
            f"{node.state.root().hex()[:16]}… {digest}",
            file=out,
        )
    ok = len(digests) == 1
    print("\nCONVERGED: identical roots and merged-model digests" if ok else "\nDIVERGED", file=out)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshmerge-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=5)
    parser.add_argument("--trainers", type=int, default=12)
    parser.add_argument("--loss", type=float, default=0.3, help="fraction of announcements lost")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.replicas < 2 or args.trainers < 2 or not 0 <= args.loss < 1:
        parser.error("need >= 2 replicas, >= 2 trainers and 0 <= loss < 1")
    return 0 if run(args.replicas, args.trainers, args.loss, args.seed) else 1


if __name__ == "__main__":
    sys.exit(main())
