"""A libp2p node driven over stdin/stdout JSON lines, for tests inside network namespaces.

Run inside a namespace:  ip netns exec NS .venv/bin/python scripts/netns/nodeagent.py --seed 3 ...
The ``Agent`` class below starts one and calls it; one JSON object per line each way.

Modes: ``ours`` uses meshmerge.daemon.nat (relay, AutoNAT, DCUtR); ``stock``
uses py-libp2p 0.8.1's own CircuitV2Protocol STOP handler and DCUtRProtocol
(for comparison in scripts/bench/nat.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ECHO = "/meshmerge/test/echo/1"


class AgentError(RuntimeError):
    pass


class Agent:
    """Parent-side handle of a nodeagent process (started through nsharness.Topology.popen)."""

    def __init__(
        self,
        topo: Any,
        node: str,
        seed: int,
        *,
        flags: Sequence[str] = (),
        port: int = 4001,
        log_dir: Path | None = None,
    ) -> None:
        py = os.environ.get("MM_PY", str(ROOT / ".venv" / "bin" / "python"))
        self.node = node
        log_dir = log_dir or Path("/tmp")
        self.log_path = log_dir / f"nodeagent-{topo.prefix}-{node}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        argv = [py, str(Path(__file__).resolve()), "--seed", str(seed), "--port", str(port), *flags]
        self.proc = topo.popen(node, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self.info = self.call("info", timeout=60)
        self.id: str = self.info["id"]

    def call(self, op: str, timeout: float = 30, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"{self.node}: {op} timed out after {timeout}s (log {self.log_path})")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AgentError(f"{self.node}: agent exited (log {self.log_path}): {self.tail()}")
                buf += chunk
        reply = json.loads(buf)
        if "error" in reply:
            raise AgentError(f"{self.node}: {op}: {reply['error']}")
        return dict(reply)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call("quit", timeout=5)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


# --------------------------------------------------------------------------- agent side
def _peer_id_of_seed(seed: int) -> str:
    from libp2p.peer.id import ID

    from meshmerge.daemon.nat.hostfactory import key_pair

    return str(ID.from_pubkey(key_pair(seed.to_bytes(32, "big")).public_key))


async def _agent(args: argparse.Namespace) -> None:
    import multiaddr
    import trio
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from meshmerge.daemon.nat import autonat, autonat2, connutil, dcutr, relay
    from meshmerge.daemon.nat.hostfactory import key_pair, running_host

    kp = key_pair(args.seed.to_bytes(32, "big"))
    listen = [f"/ip4/0.0.0.0/tcp/{args.port}"]
    stdin = trio.lowlevel.FdStream(os.dup(0))
    out = sys.stdout

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    from contextlib import AsyncExitStack

    if args.mode == "stockhost":
        # py-libp2p's own defaults end to end: new_host's transports and security
        from libp2p import new_host

        addrs = [multiaddr.Multiaddr(a) for a in listen]
        plain = new_host(key_pair=kp, listen_addrs=addrs)
        host_cm: Any = _run_plain(plain, addrs)
    elif args.host == "main":
        # the daemon's host layer (meshmerge.daemon.host): stock TCP transport, explicit listen IP
        from meshmerge.daemon.host import HostConfig
        from meshmerge.daemon.host import running_host as daemon_host
        from meshmerge.daemon.identity import Identity

        host_cm = daemon_host(
            HostConfig(listen_addrs=(f"/ip4/{args.listen_ip}/tcp/{args.port}",)),
            Identity(args.seed.to_bytes(32, "big")),
        )
    else:
        host_cm = running_host(listen, kp)
    async with host_cm as host, AsyncExitStack() as stack:
        svc = relay.RelayService(host, relay.RelayServiceConfig() if args.hop else None)
        relayed_at: dict[str, float] = {}
        stock_dcutr = None
        if args.mode in ("stock", "stockhost"):
            from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
            from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
            from libp2p.tools.anyio_service import background_trio_service

            # stock STOP handler (tags relayed conns itself) and stock DCUtR with its auto-drive loop
            stock_proto = CircuitV2Protocol(host, allow_hop=False)
            stock_dcutr = DCUtRProtocol(host)
            await stack.enter_async_context(background_trio_service(stock_proto))
            await stack.enter_async_context(background_trio_service(stock_dcutr))
        if args.autonat_server:
            nat_server = autonat.AutoNATServer(host, autonat.AutoNATConfig(peer_min_interval_s=0))
            await stack.enter_async_context(nat_server.running())
            # 2 s: NAT routers here drop unsolicited SYNs, and the LAN answers in microseconds
            nat2_server = autonat2.AutoNATv2Server(host, autonat2.AutoNATv2Config(dial_timeout_s=2))
            await stack.enter_async_context(nat2_server.running())
        nat2_client = autonat2.AutoNATv2Client(
            host, autonat2.AutoNATv2Config(threshold=args.autonat_threshold)
        )
        nursery = await stack.enter_async_context(trio.open_nursery())
        punch = None
        if args.mode == "ours":
            await nursery.start(_run_service, svc)
            punch = dcutr.DCUtRService(host, svc, dcutr.DCUtRConfig()) if args.dcutr else None
            if punch is not None:
                await nursery.start(punch.run)
        client = relay.RelayClient(host, svc)
        nat_client = autonat.AutoNATClient(host, autonat.AutoNATConfig(threshold=args.autonat_threshold))
        mappers: dict[str, Any] = {}
        held: dict[Any, Any] = {}  # relay id -> cancel scope of the task holding the reservation
        dht: Any = None
        buf = b""
        while True:
            while b"\n" not in buf:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    nursery.cancel_scope.cancel()
                    return
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            cmd = json.loads(line)
            op = cmd.pop("op")
            try:
                if op == "info":
                    reply({"id": str(host.get_id()), "addrs": [str(a) for a in host.get_addrs()]})
                elif op == "quit":
                    reply({"ok": True})
                    nursery.cancel_scope.cancel()
                    return
                elif op == "connect":
                    t0 = time.monotonic()
                    with trio.fail_after(cmd.get("timeout", 10)):
                        await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(cmd["addr"])))
                    reply({"ok": True, "s": time.monotonic() - t0})
                elif op == "autonat":
                    servers = [ID.from_base58(s) for s in cmd["servers"]]
                    results: dict[str, Any] = {}

                    async def probe_one(s: Any, results: dict[str, Any] = results) -> None:
                        try:
                            ok = await nat_client.probe(s)
                            nat_client.record(s, ok)
                            results[str(s)] = ok
                        except autonat.AutoNATError as exc:
                            results[str(s)] = str(exc)

                    async with trio.open_nursery() as probes:
                        for s in servers:
                            probes.start_soon(probe_one, s)
                    reply({"status": nat_client.status.value, "results": results})
                elif op == "autonat2":
                    servers = [ID.from_base58(s) for s in cmd["servers"]]
                    if cmd.get("addrs"):
                        check = [multiaddr.Multiaddr(a) for a in cmd["addrs"]]
                    else:
                        check = connutil.public_addrs(host, 8)
                    with trio.fail_after(cmd.get("timeout", 50)):
                        verdicts = await nat2_client.check_each(servers, check)
                    reply({"status": {a: r.value for a, r in verdicts.items()}})
                elif op == "autonat_stock":
                    from libp2p.host.autonat.autonat import AutoNATService, AutoNATStatus

                    stock = AutoNATService(host, serve=False, confirmations=len(cmd["servers"]))
                    st = await stock.check_reachability([ID.from_base58(s) for s in cmd["servers"]])
                    names = {
                        AutoNATStatus.UNKNOWN: "unknown",
                        AutoNATStatus.PUBLIC: "public",
                        AutoNATStatus.PRIVATE: "private",
                    }
                    reply({"status": names.get(st, str(st))})
                elif op == "serve_stock_autonat":
                    from libp2p.host.autonat.autonat import AutoNATService

                    AutoNATService(host)
                    reply({"ok": True})
                elif op == "reserve":
                    rid = ID.from_base58(cmd["relay"])
                    if rid not in held:
                        held[rid] = trio.CancelScope()

                        async def hold(*, task_status: Any, r: Any = rid, sc: Any = held[rid]) -> None:
                            with sc:
                                await client.keep_reservation(r, task_status=task_status)

                        await nursery.start(hold)
                    info = client.reservations[rid]
                    reply({"expire": info.expire, "circuit": [str(a) for a in client.circuit_addrs()]})
                elif op == "unreserve":
                    held.pop(ID.from_base58(cmd["relay"])).cancel()
                    with trio.fail_after(10):
                        while ID.from_base58(cmd["relay"]) in client.reservations:
                            await trio.sleep(0.02)
                    reply({"ok": True})
                elif op == "addrs":
                    reply({"addrs": [str(a) for a in host.get_addrs()]})
                elif op == "peer_addrs":
                    known = host.get_peerstore().addrs(ID.from_base58(cmd["peer"]))
                    reply({"addrs": [str(a) for a in known]})
                elif op == "dht":
                    from meshmerge.daemon.dht.service import DHTConfig, DHTMode, KademliaDHT

                    dht = KademliaDHT(host, DHTConfig(mode=DHTMode(cmd.get("mode", "client"))))
                    await nursery.start(dht.run)
                    if cmd.get("bootstrap"):
                        infos = [info_from_p2p_addr(multiaddr.Multiaddr(a)) for a in cmd["bootstrap"]]
                        for bi in infos:
                            with trio.fail_after(10):
                                await host.connect(bi)
                        await dht.bootstrap(infos)
                    reply({"ok": True})
                elif op == "find_peer":
                    assert dht is not None, "start the DHT first"
                    with trio.fail_after(cmd.get("timeout", 20)):
                        found = await dht.find_peer(ID.from_base58(cmd["peer"]))
                    reply({"addrs": [str(a) for a in found.addrs] if found else []})
                elif op == "dial_addrs":
                    from libp2p.peer.peerinfo import PeerInfo

                    from meshmerge.daemon.nat import circuit

                    t0 = time.monotonic()
                    target = PeerInfo(
                        ID.from_base58(cmd["peer"]), [multiaddr.Multiaddr(a) for a in cmd["addrs"]]
                    )
                    conn = await circuit.connect(host, client, target)
                    reply(
                        {
                            "relayed": connutil.is_relayed(conn),
                            "addrs": [str(a) for a in conn.get_transport_addresses()],
                            "s": time.monotonic() - t0,
                        }
                    )
                elif op == "disconnect":
                    with trio.fail_after(10):
                        await host.disconnect(ID.from_base58(cmd["peer"]))
                    reply({"ok": True})
                elif op == "dial_relay":
                    t0 = time.monotonic()
                    conn = await client.dial(ID.from_base58(cmd["peer"]), ID.from_base58(cmd["relay"]))
                    relayed_at[cmd["peer"]] = time.monotonic()
                    reply({"ok": True, "relayed": connutil.is_relayed(conn), "s": time.monotonic() - t0})
                elif op == "echo":
                    from libp2p.custom_types import TProtocol

                    s = await host.new_stream(ID.from_base58(cmd["peer"]), [TProtocol(ECHO)])
                    await s.write(cmd["data"].encode())
                    with trio.fail_after(10):
                        data = await s.read(65536)
                    await s.close()
                    reply({"data": data.decode()})
                elif op == "serve_echo":
                    from libp2p.custom_types import TProtocol

                    async def echo(stream: Any) -> None:
                        try:
                            while d := await stream.read(65536):
                                await stream.write(d)
                        except Exception:
                            pass
                        finally:
                            await stream.close()

                    host.set_stream_handler(TProtocol(ECHO), echo)
                    reply({"ok": True})
                elif op == "wait_direct":
                    peer = ID.from_base58(cmd["peer"])
                    t0 = time.monotonic()
                    with trio.move_on_after(cmd.get("timeout", 10)):
                        while connutil.direct_conn(host, peer) is None:
                            await trio.sleep(0.01)
                    direct = connutil.direct_conn(host, peer) is not None
                    base = relayed_at.get(cmd["peer"], t0)
                    reply(
                        {
                            "direct": direct,
                            "after_relayed_s": time.monotonic() - base,
                            "relayed_open": connutil.relayed_conn(host, peer) is not None,
                        }
                    )
                elif op == "punch_record":
                    peer = ID.from_base58(cmd["peer"])
                    rec = punch.records.get(peer) if punch is not None else None
                    if rec is None:
                        reply({"record": None})
                    else:
                        took = None if rec.direct_at is None else rec.direct_at - rec.relayed_at
                        reply(
                            {
                                "record": {
                                    "outcome": rec.outcome,
                                    "attempts": rec.attempts,
                                    "error": rec.error,
                                    "s": took,
                                }
                            }
                        )
                elif op == "conns":
                    peer = ID.from_base58(cmd["peer"])
                    reply(
                        {
                            "conns": [
                                {
                                    "relayed": connutil.is_relayed(c),
                                    "addrs": [str(a) for a in c.get_transport_addresses()],
                                }
                                for c in connutil.conns_to(host, peer)
                            ]
                        }
                    )
                elif op == "portmap":
                    from meshmerge.daemon.nat import upnp

                    cfg = upnp.PortMapConfig(
                        lease_s=cmd.get("lease_s", 3600),
                        use_natpmp=cmd.get("natpmp", True),
                        use_upnp=cmd.get("upnp", True),
                    )
                    mapper = upnp.PortMapper(args.port, cfg)
                    scope = trio.CancelScope()
                    mappers[cmd.get("name", "default")] = (mapper, scope)

                    async def keep(*, task_status: Any, m: Any = mapper, sc: Any = scope) -> None:
                        with sc:
                            await m.run(task_status=task_status)

                    mapping = await nursery.start(keep)
                    reply({"mapping": dataclasses.asdict(mapping)})
                elif op == "portmap_stop":
                    mapper, scope = mappers.pop(cmd.get("name", "default"))
                    scope.cancel()
                    with trio.fail_after(10):
                        while mapper.mapping is not None:
                            await trio.sleep(0.05)
                    reply({"ok": True, "renewals": mapper.renewals})
                elif op == "observed":
                    m = getattr(host, "_observed_addr_manager", None)
                    reply(
                        {
                            "observed": [str(a) for a in (m.addrs(min_observers=1) if m else [])],
                            "public": [str(a) for a in dcutr.public_addrs(host, 8)],
                        }
                    )
                else:
                    reply({"error": f"unknown op {op}"})
            except Exception as exc:
                reply({"error": repr(exc)})


@contextlib.asynccontextmanager
async def _run_plain(host: Any, addrs: Any) -> Any:
    async with host.run(addrs):
        yield host


async def _run_service(svc: Any, *, task_status: Any) -> None:
    import trio

    async with svc.running():
        task_status.started()
        await trio.sleep_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--port", type=int, default=4001)
    ap.add_argument("--hop", action="store_true")
    ap.add_argument("--autonat-server", action="store_true")
    ap.add_argument("--autonat-threshold", type=int, default=2)
    ap.add_argument("--dcutr", action="store_true")
    ap.add_argument(
        "--host",
        choices=["nat", "main"],
        default="nat",
        help="nat: meshmerge.daemon.nat.hostfactory; main: meshmerge.daemon.host",
    )
    ap.add_argument("--listen-ip", default="0.0.0.0")
    ap.add_argument("--mode", choices=["ours", "stock", "stockhost"], default="ours")
    args = ap.parse_args()
    import logging

    import trio

    logging.basicConfig(level=os.environ.get("MM_AGENT_LOG", "WARNING"), stream=sys.stderr)
    trio.run(_agent, args)


if __name__ == "__main__":
    main()
