"""Networked demo: a swarm of real meshmerge daemons on loopback converges.

Starts N daemon processes (`meshmerge daemon --dev`), each with its own data
directory, RPC socket and libp2p host on 127.0.0.1; every node bootstraps
from node 0. One trainer per node defines the same merge set and contributes
a model through the RPC client (tensors passed as a file descriptor). One
trainer then retracts its contribution. The daemons spread announcements by
GossipSub, repair with anti-entropy, fetch each other's tensors (hash-checked)
and finally every node computes the merged model: the demo prints each
node's live count, Merkle root and merged-model sha256 and exits 0 only if
all are identical.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from meshmerge.client import Client, DaemonUnavailable, RpcError
from meshmerge.crdt import tensorfile

SHAPES = {"embed": (512, 64), "block.0.attn": (64, 64), "block.0.mlp": (64, 256), "head": (64, 10)}
SET_NAME = "demo/round-1"


def _say(msg: str) -> None:
    print(msg, flush=True)


class Swarm:
    def __init__(self, base: Path, size: int) -> None:
        self.base = base
        self.size = size
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sockets: list[Path] = []

    def start(self, timeout: float) -> None:
        bootstrap: list[str] = []
        for i in range(self.size):
            home = self.base / f"node-{i}"
            home.mkdir(parents=True)
            cmd = [sys.executable, "-m", "meshmerge.cli", "daemon", "--dev", str(home), "--log-level", "info"]
            for addr in bootstrap:
                cmd += ["--bootstrap", addr]
            log = open(home / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            self.sockets.append(home / "rpc.sock")
            status = self.wait_ready(i, timeout)
            if i == 0:
                bootstrap = [a for a in status.get("listen", []) if "/ip4/127.0.0.1/" in a][:1]
                if not bootstrap:
                    raise RuntimeError(f"node 0 reports no loopback listen address: {status}")
            _say(f"  node-{i}  {status['peer_id']}  pid {status['pid']}")

    def wait_ready(self, i: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"node-{i} exited with {self.procs[i].returncode}; see {self.log(i)}")
            try:
                with Client(self.sockets[i], timeout=5) as c:
                    status = c.status()
                if "listen" in status:
                    return status
            except (DaemonUnavailable, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"node-{i} did not become ready in {timeout:.0f}s; see {self.log(i)}")

    def log(self, i: int) -> Path:
        return self.base / f"node-{i}" / "daemon.log"

    def client(self, i: int) -> Client:
        return Client(self.sockets[i], timeout=120)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _trainer_model(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    return tensorfile.dumps(tensors, dict.fromkeys(SHAPES, "F32"), {"trainer": str(seed)})


def run(nodes: int, timeout: float, keep: bool) -> bool:
    base = Path(tempfile.mkdtemp(prefix="meshmerge-demo-"))
    swarm = Swarm(base, nodes)
    ok = False
    try:
        _say(f"starting {nodes} daemons on 127.0.0.1 (state and logs in {base})")
        swarm.start(timeout=60)
        spec = {n: ("F32", s) for n, s in SHAPES.items()}
        contributed = []
        for i in range(nodes):
            path = base / f"trainer-{i}.safetensors"
            path.write_bytes(_trainer_model(i))
            with swarm.client(i) as c:
                c.create_set(SET_NAME, spec, strategy="linear")
                contributed.append(c.contribute(SET_NAME, path, weight=10 + i, meta={"trainer": i}))
        _say(f"{nodes} trainers contributed through their local daemon's RPC socket")
        with swarm.client(0) as c:
            c.remove(SET_NAME, contributed[0]["id"])
        _say("trainer 0 retracted its contribution")
        expected_live = nodes - 1

        t0 = time.monotonic()
        last = ""
        while True:
            views = []
            for i in range(nodes):
                with swarm.client(i) as c:
                    sets = [s for s in c.sets() if s["name"] == SET_NAME]
                views.append(sets[0] if sets else {"live": 0, "complete": 0, "root": "-"})
            line = "  ".join(f"n{i}:{v['live']}/{v['complete']}" for i, v in enumerate(views))
            if line != last:
                _say(f"  t+{time.monotonic() - t0:5.1f}s  live/complete per node  {line}")
                last = line
            if (
                all(v["live"] == expected_live and v["complete"] == expected_live for v in views)
                and len({v["root"] for v in views}) == 1
            ):
                break
            if time.monotonic() - t0 > timeout:
                _say(f"did not converge within {timeout:.0f}s; logs: {base}/node-*/daemon.log")
                return False
            time.sleep(0.5)
        _say(f"converged in {time.monotonic() - t0:.1f}s\n")

        _say(f"{'node':<7} {'live':>4}  {'merkle root':<18} merged-model sha256")
        digests = set()
        for i in range(nodes):
            with swarm.client(i) as c:
                summary = c.merge(SET_NAME, output=base / f"merged-{i}.safetensors")
            digests.add((summary["root"], summary["sha256"]))
            _say(f"node-{i:<2} {summary['contributions']:>4}  {summary['root'][:16]}… {summary['sha256']}")
        ok = len(digests) == 1
        _say("\nCONVERGED: every node computed the same merged model" if ok else "\nDIVERGED")
        return ok
    except (RuntimeError, RpcError, DaemonUnavailable) as exc:
        _say(f"demo failed: {exc}")
        return False
    finally:
        swarm.stop()
        if ok and not keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            _say(f"state and logs kept in {base}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshmerge-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for convergence")
    parser.add_argument("--keep", action="store_true", help="keep state and logs after a successful run")
    parser.add_argument("--in-process", action="store_true", help="run the in-process CRDT demo instead")
    args, rest = parser.parse_known_args(argv)
    if args.in_process:
        from meshmerge.demo import main as in_process

        return in_process(rest)
    if args.nodes < 2:
        parser.error("need at least 2 nodes")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return 0 if run(args.nodes, args.timeout, args.keep) else 1


if __name__ == "__main__":
    sys.exit(main())
