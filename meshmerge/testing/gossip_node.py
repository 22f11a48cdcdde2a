"""One meshmerge gossip node in its own process (`python -m meshmerge.testing.gossip_node TOPIC`).

Used by scripts/bench/gossip_net.py so the ten meshmerge nodes run as ten processes,
like the ten go nodes.

Control: JSON lines. stdout's first line is {"event": "ready", "peer_id", "addrs"};
then one reply line per stdin request:
  {"op": "connect", "peer_id": b58, "addrs": [..]}   dial a peer
  {"op": "status"}                                    {"topic_peers": n, "mesh": n, "received": n}
  {"op": "publish", "index": i, "size": n}            publish (send time stamped here)
  {"op": "receipts"}                                  [[index, latency_s], ...]
  {"op": "gc", "reset": bool}                         GC pauses since the last reset (GcPauses.summary),
                                                      trio task steps and I/O waits (GOSSIP_NODE_STEPS=1)
stdin EOF stops the node. Logs go to stderr.

GC: the node applies the daemon's GC tuning (:func:`meshmerge.daemon.gctune.tune_gc`) once it is
ready, unless ``GOSSIP_NODE_GC=default`` in the environment (to compare with CPython's defaults).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import struct
import sys
import time
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from meshmerge.daemon.gctune import GcPauses, tune_gc
from meshmerge.daemon.gossip.driver import GossipConfig, GossipService, Validation
from meshmerge.daemon.gossip.params import derive_score_params
from meshmerge.daemon.host import HostConfig, running_host
from meshmerge.daemon.identity import Identity

HEADER = struct.Struct(">IQ")


class _StepCounter(trio.abc.Instrument):
    """Counts trio task steps and scheduler I/O waits (installed if GOSSIP_NODE_STEPS is set)."""

    def __init__(self) -> None:
        self.steps = 0
        self.waits = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def before_io_wait(self, timeout: float) -> None:
        self.waits += 1


async def main(topic: str) -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    score, thresholds = derive_score_params(
        {topic: 100.0}, ip_whitelist=(ipaddress.ip_network("127.0.0.0/8"),)
    )
    ident = Identity.generate()
    receipts: list[list[float]] = []
    async with running_host(HostConfig(), ident) as host, trio.open_nursery() as nursery:
        svc = GossipService(host, ident, GossipConfig(score=score, thresholds=thresholds))
        await nursery.start(svc.run)

        def validator(author: bytes, data: bytes) -> Validation:  # plain: runs inline
            return Validation.ACCEPT

        async def handler(author: bytes, data: bytes) -> None:
            at = time.monotonic()
            if len(data) >= HEADER.size:
                index, sent_ns = HEADER.unpack_from(data)
                receipts.append([index, at - sent_ns / 1e9])

        svc.subscribe(topic, validator, handler)
        out = trio.lowlevel.FdStream(1)
        inp = trio.lowlevel.FdStream(0)

        async def reply(obj: Any) -> None:
            await out.send_all(json.dumps(obj).encode() + b"\n")

        pauses = GcPauses()
        pauses.install()
        steps = _StepCounter()
        if os.environ.get("GOSSIP_NODE_STEPS"):
            trio.lowlevel.add_instrument(steps)
        if os.environ.get("GOSSIP_NODE_GC", "tuned") != "default":
            tune_gc()
        await reply(
            {
                "event": "ready",
                "peer_id": host.get_id().to_base58(),
                "addrs": [str(a) for a in host.get_addrs()],
            }
        )
        buf = b""
        while True:
            chunk = await inp.receive_some(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                op = req["op"]
                if op == "connect":
                    pid = ID.from_base58(req["peer_id"])
                    addrs = [Multiaddr(a.split("/p2p/")[0]) for a in req["addrs"]]
                    await host.connect(PeerInfo(pid, addrs))
                    await reply({"ok": True})
                elif op == "status":
                    r = svc.router
                    await reply(
                        {
                            "topic_peers": len(r.topics.get(topic, ())),
                            "mesh": len(r.mesh.get(topic, ())),
                            "received": len(receipts),
                        }
                    )
                elif op == "publish":
                    data = HEADER.pack(req["index"], time.monotonic_ns())
                    data += b"\x00" * max(0, req["size"] - HEADER.size)
                    await svc.publish(topic, data)
                    await reply({"ok": True})
                elif op == "receipts":
                    await reply(receipts)
                elif op == "gc":
                    await reply({**pauses.summary(), "task_steps": steps.steps, "io_waits": steps.waits})
                    if req.get("reset"):
                        pauses.reset()
                        steps.steps = steps.waits = 0
                else:
                    await reply({"error": f"unknown op {op!r}"})
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
