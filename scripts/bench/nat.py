"""DCUtR between two cone-NAT peers in network namespaces: ours vs stock py-libp2p, same run.

Each attempt starts a fresh pair of node processes (new identities, new
ports, so no NAT state carries over), reserves a slot for A at the public
relay, has B dial A through the relay and measures, on B, the time from the
relayed connection being up to a direct connection existing. Needs root.

    scripts/bench/run nat            (MM_NAT_ATTEMPTS=20 by default)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "netns"))
import nsharness  # noqa: E402
from _table import machine, table  # noqa: E402
from nodeagent import Agent, AgentError  # noqa: E402

ATTEMPTS = int(os.environ.get("MM_NAT_ATTEMPTS", "20"))
WAIT_S = float(os.environ.get("MM_NAT_WAIT_S", "30"))


def attempt(topo: nsharness.Topology, relay: Agent, mode: str, i: int) -> tuple[bool, float | None]:
    port = 4100 + i
    seed = 1000 + 2 * i + {"ours": 0, "stock": 500, "stockhost": 1000}[mode]

    def flags(node: str) -> list[str]:
        if mode == "ours":  # the daemon's host layer with our DCUtR
            return ["--dcutr", "--host", "main", "--listen-ip", topo.nodes[node].ip]
        return ["--mode", mode]

    a = b = None
    try:
        a = Agent(topo, "conea", seed, flags=flags("conea"), port=port)
        b = Agent(topo, "coneb", seed + 1, flags=flags("coneb"), port=port)
        raddr = f"/ip4/{topo.nodes['relay'].ip}/tcp/4001/p2p/{relay.id}"
        a.call("connect", addr=raddr)
        b.call("connect", addr=raddr)
        a.call("reserve", relay=relay.id)
        b.call("dial_relay", peer=a.id, relay=relay.id)
        w = b.call("wait_direct", peer=a.id, timeout=WAIT_S, **{})
        return bool(w["direct"]), (w["after_relayed_s"] if w["direct"] else None)
    except AgentError as exc:
        print(f"<!-- {mode} attempt {i}: {exc} -->", file=sys.stderr)
        return False, None
    finally:
        for ag in (a, b):
            if ag is not None:
                ag.close()


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("scripts/bench/nat.py needs root (network namespaces)")
    results: dict[str, list[tuple[bool, float | None]]] = {"ours": [], "stock": [], "stockhost": []}
    with nsharness.topology("bnch", [("relay", "public"), ("conea", "cone"), ("coneb", "cone")]) as topo:
        relay = Agent(topo, "relay", 1, flags=["--hop"])
        try:
            for i in range(ATTEMPTS):
                for mode in results:
                    results[mode].append(attempt(topo, relay, mode, i))
        finally:
            relay.close()

    rows = []
    summary = {}
    for mode, res in results.items():
        ok = [t for s, t in res if s and t is not None]
        rate = len(ok) / len(res) if res else 0.0
        med = statistics.median(ok) if ok else float("nan")
        worst = max(ok) if ok else float("nan")
        summary[mode] = (rate, med)
        label = {
            "ours": "meshmerge DCUtR on meshmerge.daemon.host",
            "stock": "stock py-libp2p 0.8.1 DCUtR on nat.hostfactory (listen-port dials)",
            "stockhost": "stock py-libp2p 0.8.1 DCUtR on a stock new_host",
        }[mode]
        rows.append([label, f"{len(ok)}/{len(res)}", f"{100 * rate:.0f}%", med, worst])
    print("## nat\n")
    print(
        f"DCUtR between two cone-NAT peers (nftables masquerade, unsolicited SYNs dropped) "
        f"through a public relay in network namespaces; {ATTEMPTS} attempts each, fresh processes "
        f"per attempt, wait limit {WAIT_S:.0f} s. {machine()}.\n"
    )
    print(table(["implementation", "direct", "success", "median relayed→direct (s)", "max (s)"], rows))
    ro, mo = summary["ours"]
    for mode in ("stock", "stockhost"):
        rs, ms = summary[mode]
        ratio = ms / mo if mo == mo and ms == ms and mo > 0 else float("nan")
        print(f"\n{mode}: success ours/theirs {ro:.2f}/{rs:.2f}; median time theirs/ours {ratio:.1f}x")
    print(f"\n(run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")


if __name__ == "__main__":
    main()
