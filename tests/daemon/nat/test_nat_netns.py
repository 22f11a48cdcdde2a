"""NAT traversal through real kernels: network namespaces, veth, nftables NAT.

One topology per module (public relay, a second AutoNAT server, a public
peer, cone-NAT, symmetric-NAT, double-NAT, RST-router and UPnP peers), one
nodeagent process per node; the peers run on the daemon's host layer
(meshmerge.daemon.host). Everything is killed and deleted in the fixture's
finally, also when a test fails.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts" / "netns"))
import nsharness
from nodeagent import Agent

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

SITES = [
    ("relay", "public"),
    ("srv", "public"),
    ("pub", "public"),
    ("conea", "cone"),
    ("coneb", "cone"),
    ("syma", "symmetric"),
    ("symb", "symmetric"),
    ("dbl", "double"),
    ("home", "upnp"),
    ("rsta", "rst"),
    ("rstb", "rst"),
]
FLAGS = {"relay": ["--hop", "--autonat-server"], "srv": ["--autonat-server"]}


class Net:
    def __init__(self, topo: nsharness.Topology, agents: dict[str, Agent]) -> None:
        self.topo, self.a = topo, agents

    def addr(self, name: str) -> str:
        return f"/ip4/{self.topo.nodes[name].ip}/tcp/4001/p2p/{self.a[name].id}"


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    agents: dict[str, Agent] = {}
    with nsharness.topology("nat", SITES) as topo:
        try:
            topo.add_stun()
            topo.start_miniupnpd("home")
            for seed, (name, _) in enumerate(SITES, start=1):
                # peers run on the daemon's host layer; relay and AutoNAT servers on the NAT factory
                flags = FLAGS.get(name, ["--dcutr", "--host", "main", "--listen-ip", topo.nodes[name].ip])
                agents[name] = Agent(topo, name, seed, flags=flags)
            n = Net(topo, agents)
            for name in agents:
                if name != "relay":
                    agents[name].call("connect", addr=n.addr("relay"))
                if name not in ("relay", "srv"):
                    agents[name].call("connect", addr=n.addr("srv"))
            yield n
        finally:
            for a in agents.values():
                a.close()


def _settled_record(agent: Agent, peer: str, within_s: float) -> dict[str, object]:
    """Poll A's hole-punch record until it leaves "pending" (bounded)."""
    deadline = time.monotonic() + within_s
    while True:
        rec = agent.call("punch_record", peer=peer)["record"]
        if (rec and rec["outcome"] != "pending") or time.monotonic() > deadline:
            return dict(rec or {})
        time.sleep(0.05)


def test_autonat_classifies_public_cone_symmetric_and_double_nat(net: Net) -> None:
    servers = [net.a["relay"].id, net.a["srv"].id]
    expected = {"pub": "public", "conea": "private", "syma": "private", "dbl": "private"}
    got = {name: net.a[name].call("autonat", servers=servers, timeout=60)["status"] for name in expected}
    assert got == expected


def test_autonat_v2_classifies_each_address(net: Net) -> None:
    """Per address, through real kernels: the public peer's listen address is reachable and a
    closed port on the same IP is not; every public candidate of the NATed peers (observed
    address, observed IP with the listen port) is unreachable."""
    servers = [net.a["relay"].id, net.a["srv"].id]
    pub_ip = net.topo.nodes["pub"].ip
    listen, closed = f"/ip4/{pub_ip}/tcp/4001", f"/ip4/{pub_ip}/tcp/4999"
    got = net.a["pub"].call("autonat2", servers=servers, addrs=[listen, closed], timeout=60)["status"]
    assert got == {listen: "public", closed: "private"}
    for name in ("conea", "syma", "dbl"):
        got = net.a[name].call("autonat2", servers=servers, timeout=60)["status"]
        assert got and set(got.values()) == {"private"}, (name, got)
        router_ip = net.topo.nodes[name].public_ip
        assert any(f"/ip4/{router_ip}/tcp/" in a for a in got), (name, got)


def test_stock_autonat_server_calls_a_cone_nat_peer_reachable(net: Net) -> None:
    """Shortfall of py-libp2p 0.8.1 through a real NAT: its dial-back reuses the connection."""
    net.a["pub"].call("serve_stock_autonat")
    net.a["coneb"].call("connect", addr=net.addr("pub"))
    res = net.a["coneb"].call("autonat", servers=[net.a["pub"].id], timeout=60)["results"]
    assert res[net.a["pub"].id] is True  # wrong answer from the stock server: coneb is behind NAT


def test_natted_peer_reserves_and_is_reachable_via_circuit(net: Net) -> None:
    target, dialer, relay = net.a["syma"], net.a["pub"], net.a["relay"]
    r = target.call("reserve", relay=relay.id)
    circuit = r["circuit"]
    assert any(relay.id in c and c.endswith(f"/p2p-circuit/p2p/{target.id}") for c in circuit)
    target.call("serve_echo")
    assert dialer.call("dial_relay", peer=target.id, relay=relay.id)["relayed"] is True
    assert dialer.call("echo", peer=target.id, data="over the circuit")["data"] == "over the circuit"
    conns = target.call("conns", peer=dialer.id)["conns"]
    assert any(c["relayed"] and c["addrs"] == [f"/p2p/{relay.id}/p2p-circuit/p2p/{dialer.id}"] for c in conns)


def test_dcutr_upgrades_two_cone_nat_peers(net: Net) -> None:
    a, b, relay = net.a["conea"], net.a["coneb"], net.a["relay"]
    a.call("reserve", relay=relay.id)
    a.call("serve_echo")
    assert b.call("dial_relay", peer=a.id, relay=relay.id)["relayed"] is True
    w = b.call("wait_direct", peer=a.id, timeout=10)
    assert w["direct"], a.call("punch_record", peer=b.id)
    assert w["after_relayed_s"] < 5.0  # generous hang guard; the benchmark measures speed
    rec = _settled_record(a, b.id, within_s=10)  # A notices its side a moment after B
    assert rec["outcome"] == "direct", rec
    direct = [c for c in b.call("conns", peer=a.id)["conns"] if not c["relayed"]]
    assert direct and direct[0]["addrs"] == [f"/ip4/{net.topo.nodes['conea'].public_ip}/tcp/4001"]
    assert b.call("echo", peer=a.id, data="direct")["data"] == "direct"


def test_symmetric_nat_falls_back_to_the_relay_within_the_deadline(net: Net) -> None:
    a, b, relay = net.a["symb"], net.a["syma"], net.a["relay"]
    a.call("reserve", relay=relay.id)
    a.call("serve_echo")
    assert b.call("dial_relay", peer=a.id, relay=relay.id)["relayed"] is True
    # DCUtRConfig defaults: 2 attempts x 4 s hard deadline + pause; give it 12 s
    rec = _settled_record(a, b.id, within_s=12)
    assert rec.get("outcome") == "failed", rec
    assert rec["attempts"] == 2
    conns = b.call("conns", peer=a.id)["conns"]
    assert conns and all(c["relayed"] for c in conns)
    assert b.call("echo", peer=a.id, data="still relayed")["data"] == "still relayed"


def test_rst_answering_routers_end_in_a_bounded_outcome(net: Net) -> None:
    """Routers that RST unsolicited SYNs: punched or not, the attempt ends within its deadlines."""
    a, b, relay = net.a["rsta"], net.a["rstb"], net.a["relay"]
    a.call("reserve", relay=relay.id)
    a.call("serve_echo")
    assert b.call("dial_relay", peer=a.id, relay=relay.id)["relayed"] is True
    rec = _settled_record(a, b.id, within_s=12)
    assert rec.get("outcome") in ("direct", "failed"), rec
    assert b.call("echo", peer=a.id, data="still talking")["data"] == "still talking"


def test_dcutr_through_double_nat(net: Net) -> None:
    a, relay = net.a["dbl"], net.a["relay"]
    a.call("reserve", relay=relay.id)
    c = net.a["conea"]
    assert c.call("dial_relay", peer=a.id, relay=relay.id)["relayed"] is True
    w = c.call("wait_direct", peer=a.id, timeout=10)
    assert w["direct"], a.call("punch_record", peer=c.id)


def _upnp_rules(net: Net) -> str:
    return net.topo.exec("homeg", ["nft", "list", "chain", "inet", "mmupnp", "prerouting_miniupnpd"])


@pytest.mark.parametrize("proto", ["upnp", "natpmp"])
def test_port_mapping_makes_a_natted_peer_publicly_reachable(net: Net, proto: str) -> None:
    home, servers = net.a["home"], [net.a["relay"].id, net.a["srv"].id]
    dialer = net.a["srv"]
    public_ip = net.topo.nodes["home"].public_ip
    assert "dnat" not in _upnp_rules(net)
    mapped = f"/ip4/{public_ip}/tcp/4001"
    before = home.call("autonat2", servers=servers, addrs=[mapped], timeout=60)["status"]
    assert before == {mapped: "private"}
    m = home.call("portmap", lease_s=4, upnp=proto == "upnp", timeout=30)["mapping"]
    assert m["protocol"] == proto and m["external_ip"] == public_ip and m["external_port"] == 4001
    assert "dport 4001 dnat" in _upnp_rules(net)
    # a public peer dials the router's public address and reaches the peer behind it
    dialer.call("connect", addr=f"/ip4/{public_ip}/tcp/4001/p2p/{home.id}")
    assert home.call("autonat", servers=servers, timeout=60)["status"] == "public"
    after = home.call("autonat2", servers=servers, addrs=[mapped], timeout=60)["status"]
    assert after == {mapped: "public"}  # AutoNAT v2: the same address, now mapped

    time.sleep(2.5)  # lease 4 s, renewed at half the lease
    stop = home.call("portmap_stop", timeout=20)
    assert stop["renewals"] >= 1
    assert "dnat" not in _upnp_rules(net)  # removed on shutdown


def test_circuit_address_is_advertised_found_by_find_peer_and_dialed(net: Net) -> None:
    """A peer behind symmetric NAT reserves at the relay; its circuit address reaches the relay by
    identify push, a third NATed peer finds it by DHT find-peer (the relay answers FIND_NODE for
    the connected peer) and dials the circuit address it got, with no relay named by the test."""
    relay, target, finder = net.a["relay"], net.a["syma"], net.a["coneb"]
    relay.call("dht", mode="server")
    target.call("dht", mode="client", bootstrap=[net.addr("relay")])
    target.call("reserve", relay=relay.id)
    expected = f"/p2p/{relay.id}/p2p-circuit/p2p/{target.id}"
    advertised = [a for a in target.call("addrs")["addrs"] if "p2p-circuit" in a]
    assert advertised and all(a.endswith(expected) for a in advertised), advertised
    deadline = time.monotonic() + 10
    while not any("p2p-circuit" in a for a in relay.call("peer_addrs", peer=target.id)["addrs"]):
        assert time.monotonic() < deadline, "identify push never reached the relay"
        time.sleep(0.05)

    finder.call("disconnect", peer=target.id)
    finder.call("dht", mode="client", bootstrap=[net.addr("relay")])
    found = finder.call("find_peer", peer=target.id)["addrs"]
    circuits = [a for a in found if "p2p-circuit" in a]
    assert circuits, found
    # the public (203.0.113.0/24) relay address is among them: dialable from behind any NAT
    public_relay = f"/ip4/{net.topo.nodes['relay'].ip}/tcp/4001{expected}"
    assert public_relay in circuits, circuits
    target.call("serve_echo")
    d = finder.call("dial_addrs", peer=target.id, addrs=found, timeout=30)
    assert d["relayed"] is True and d["addrs"] == [f"/p2p/{relay.id}/p2p-circuit/p2p/{target.id}"]
    assert finder.call("echo", peer=target.id, data="found, not told")["data"] == "found, not told"

    target.call("unreserve", relay=relay.id)
    assert not [a for a in target.call("addrs")["addrs"] if "p2p-circuit" in a]
    deadline = time.monotonic() + 10
    while any("p2p-circuit" in a for a in relay.call("peer_addrs", peer=target.id)["addrs"]):
        assert time.monotonic() < deadline, "the relay still lists the withdrawn circuit address"
        time.sleep(0.05)
