"""Network-namespace topologies for NAT traversal tests and benchmarks.

Why this exists: NAT behaviour (mapping, filtering, RST answers, CGNAT,
UPnP) can only be tested honestly with real kernels doing real NAT. This
module builds small internets out of ``ip netns``, veth pairs and nftables
and tears them down again, even when the test that built them fails.

Address plan (documentation and carrier-grade ranges only):

- the "internet": one bridge in ``<prefix>-inet``, 203.0.113.0/24;
  public hosts get .10-.49, NAT routers' WAN sides get .100-.199;
- NATed LANs: site *i* uses 100.100.i.0/24 (router .1, host .2), inside
  the carrier-grade range 100.64.0.0/10, so no LAN address ever looks
  public to the code under test;
- carrier-grade NAT: site *i* puts 100.64.i.0/24 between the carrier
  router (.1) and the home router (.2);
- 192.0.2.0/24 is left unused (spare).

NAT kinds (nftables in the router namespace):

- ``cone``: masquerade without ``random``/``fully-random``/``persistent``,
  so the kernel keeps the source port and one internal endpoint maps to one
  external endpoint for every destination (endpoint-independent mapping);
  unsolicited inbound packets are silently dropped.
- ``rst``: like ``cone`` but unsolicited inbound TCP SYNs are answered with
  a TCP RST (some home routers do this; it defeats naive hole punching).
- ``symmetric``: ``masquerade fully-random``: a fresh random external port
  for every connection (endpoint-dependent mapping).
- ``double``: a ``cone`` home router behind a ``cone`` carrier-grade NAT.
- ``upnp``: a ``cone`` router running miniupnpd on its LAN side.

Only the standard library is used so the CLI runs without the venv.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

STATE_DIR = Path(os.environ.get("MM_NETNS_STATE", "/run/meshmerge-netns"))
NS_PREFIX = "mmn"
PUBLIC_NET = "203.0.113"
LAN_NET = "100.100"
CGNAT_NET = "100.64"
NAT_KINDS = ("cone", "rst", "symmetric", "double", "upnp")
STUN_HOSTS = (250, 251)


class HarnessError(RuntimeError):
    """A topology could not be built or a command inside it failed."""


def run(argv: Sequence[str], *, check: bool = True, input_text: str | None = None) -> str:
    """Run a command, return stdout; raise HarnessError with stderr on failure."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input_text)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _apt_install(packages: Sequence[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        check=True,
        capture_output=True,
        env=env,
    )


def ensure_tools(*, upnp: bool = False) -> None:
    """Install iproute2/nftables (and miniupnpd for UPnP) from Debian if missing."""
    if os.geteuid() != 0:
        raise HarnessError("network namespaces need root")
    wanted = {"ip": "iproute2", "nft": "nftables"}
    if upnp:
        wanted["miniupnpd"] = "miniupnpd-nftables"
    missing = [
        pkg for tool, pkg in wanted.items() if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists())
    ]
    if missing:
        _apt_install(missing)


@dataclasses.dataclass
class Node:
    """One namespace with a role; ``ip`` is its address on its own link."""

    name: str
    ns: str
    role: str  # "public", "router", "cgnat", "host"
    ip: str
    site: str = ""
    kind: str = ""
    public_ip: str = ""  # the address the internet sees (own ip for public nodes)


@dataclasses.dataclass
class Topology:
    """A set of namespaces under one unique prefix; use as a context manager."""

    prefix: str
    nodes: dict[str, Node] = dataclasses.field(default_factory=dict)
    _next_public: int = 10
    _next_wan: int = 100
    _next_site: int = 1
    persistent: bool = False
    _procs: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)

    @classmethod
    def new(cls, tag: str = "t") -> Topology:
        tag = "".join(c for c in tag if c.isalnum())[:4] or "t"
        return cls(prefix=f"{NS_PREFIX}{tag}{secrets.token_hex(2)}")

    # ---- lifecycle -------------------------------------------------------
    def __enter__(self) -> Topology:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        ensure_tools()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._write_state()
        if not self.persistent:
            atexit.register(self.down)
        inet = self._ns("inet")
        self._add_ns(inet)
        run(["ip", "-n", inet, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", inet, "link", "set", "br0", "up"])

    def down(self) -> None:
        """Kill processes we started and delete every namespace of this prefix."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self._procs.clear()
        delete_prefix(self.prefix)
        for f in [STATE_DIR / f"{self.prefix}.json", *STATE_DIR.glob(f"{self.prefix}-*")]:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)

    def _write_state(self) -> None:
        state = {
            "prefix": self.prefix,
            "pid": 0 if self.persistent else os.getpid(),
            "created": time.time(),
            "nodes": self.describe(),
        }
        (STATE_DIR / f"{self.prefix}.json").write_text(json.dumps(state))

    def _ns(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def _add_ns(self, ns: str) -> None:
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        run(["ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b])
        run(["ip", "-n", ns_a, "link", "set", if_a, "up"])
        run(["ip", "-n", ns_b, "link", "set", if_b, "up"])

    def _to_internet(self, ns: str, ifname: str, ip: str) -> None:
        """Plug ``ns`` into the public bridge with address ``ip``/24."""
        port = f"p{len(self.nodes)}"
        self._veth(ns, ifname, self._ns("inet"), port)
        run(["ip", "-n", self._ns("inet"), "link", "set", port, "master", "br0"])
        run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname])

    # ---- builders --------------------------------------------------------
    def add_public(self, name: str) -> Node:
        """A host directly on the internet segment."""
        ns = self._ns(name)
        self._add_ns(ns)
        ip = f"{PUBLIC_NET}.{self._next_public}"
        self._next_public += 1
        self._to_internet(ns, "eth0", ip)
        node = Node(name=name, ns=ns, role="public", ip=ip, public_ip=ip)
        self.nodes[name] = node
        self._write_state()
        return node

    def add_stun(self) -> Node:
        """A public STUN server on two addresses (.250 and .251), needed by miniupnpd."""
        ns = self._ns("stun")
        self._add_ns(ns)
        ip1, ip2 = f"{PUBLIC_NET}.{STUN_HOSTS[0]}", f"{PUBLIC_NET}.{STUN_HOSTS[1]}"
        self._to_internet(ns, "eth0", ip1)
        run(["ip", "-n", ns, "addr", "add", f"{ip2}/24", "dev", "eth0"])
        node = Node("stun", ns, "public", ip1, public_ip=ip1)
        self.nodes["stun"] = node
        self._write_state()
        script = str(Path(__file__).resolve().parent / "stunserver.py")
        self.popen(
            "stun", ["python3", script, ip1, ip2], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return node

    def add_nat(self, name: str, kind: str) -> Node:
        """A host ``name`` behind a router ``name``-gw of the given NAT kind."""
        if kind not in NAT_KINDS:
            raise HarnessError(f"unknown NAT kind {kind!r}; one of {NAT_KINDS}")
        site = self._next_site
        self._next_site += 1
        if site > 15:
            raise HarnessError("at most 15 NAT sites per topology")
        gw_lan, host_ip = f"{LAN_NET}.{site}.1", f"{LAN_NET}.{site}.2"
        wan_ip = f"{PUBLIC_NET}.{self._next_wan}"
        self._next_wan += 1
        gw = self._ns(f"{name}g")
        self._add_ns(gw)
        if kind == "double":
            cgn = self._ns(f"{name}c")
            self._add_ns(cgn)
            self._to_internet(cgn, "wan0", wan_ip)
            self._veth(cgn, "lan0", gw, "wan0")
            run(["ip", "-n", cgn, "addr", "add", f"{CGNAT_NET}.{site}.1/24", "dev", "lan0"])
            run(["ip", "-n", gw, "addr", "add", f"{CGNAT_NET}.{site}.2/24", "dev", "wan0"])
            run(["ip", "-n", gw, "route", "add", "default", "via", f"{CGNAT_NET}.{site}.1"])
            self._router_rules(cgn, "cone")
            self.nodes[f"{name}c"] = Node(f"{name}c", cgn, "cgnat", wan_ip, str(site), "cone", wan_ip)
            home_kind = "cone"
        else:
            self._to_internet(gw, "wan0", wan_ip)
            home_kind = kind
        self._router_rules(gw, home_kind)
        gw_ip = f"{CGNAT_NET}.{site}.2" if kind == "double" else wan_ip
        self.nodes[f"{name}g"] = Node(f"{name}g", gw, "router", gw_ip, str(site), kind, wan_ip)
        ns = self._ns(name)
        self._add_ns(ns)
        self._veth(gw, "lan0", ns, "eth0")
        run(["ip", "-n", gw, "addr", "add", f"{gw_lan}/24", "dev", "lan0"])
        run(["ip", "-n", ns, "addr", "add", f"{host_ip}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "route", "add", "default", "via", gw_lan])
        node = Node(name, ns, "host", host_ip, str(site), kind, wan_ip)
        self.nodes[name] = node
        self._write_state()
        return node

    def _router_rules(self, ns: str, kind: str) -> None:
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        masq = "masquerade fully-random" if kind == "symmetric" else "masquerade"
        rst = "tcp flags & (syn | ack) == syn reject with tcp reset" if kind == "rst" else ""
        stun_ips = ", ".join(f"{PUBLIC_NET}.{h}" for h in STUN_HOSTS)
        # the UPnP router's own STUN self-check (miniupnpd) must hear answers from the second address
        stun = (
            f'iifname "wan0" ip saddr {{ {stun_ips} }} udp sport 3478-3479 accept' if kind == "upnp" else ""
        )
        ruleset = f"""
table ip mmnat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" {masq}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    iifname "lan0" accept
    ct state established,related accept
    ct status dnat accept
    {f'iifname "wan0" {rst}' if rst else ""}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "wan0" ct state established,related accept
    iifname "wan0" icmp type echo-request accept
    {stun}
    {f'iifname "wan0" {rst}' if rst else ""}
    iifname "wan0" drop
  }}
}}
"""
        run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input_text=ruleset)
        if kind == "upnp":
            run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input_text=_UPNP_TABLES)

    def start_miniupnpd(self, name: str) -> subprocess.Popen[bytes]:
        """Run miniupnpd (UPnP IGD + NAT-PMP) on the LAN side of site ``name``'s router."""
        ensure_tools(upnp=True)
        gw = self.nodes[f"{name}g"]
        if gw.kind != "upnp":
            raise HarnessError(f"{name} is not behind a upnp router")
        conf = STATE_DIR / f"{self.prefix}-{name}-miniupnpd.conf"
        conf.write_text(
            "ext_ifname=wan0\n"
            "listening_ip=lan0\n"
            "port=5000\n"
            f"ext_perform_stun=yes\next_stun_host={PUBLIC_NET}.{STUN_HOSTS[0]}\next_stun_port=3478\n"
            "enable_upnp=yes\nenable_natpmp=yes\nsecure_mode=yes\nsystem_uptime=no\n"
            f"uuid=4d696e69-5550-6e50-0000-{int(gw.site):012d}\n"
            "upnp_table_name=mmupnp\nupnp_nat_table_name=mmupnp\n"
            "upnp_forward_chain=forward_miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n"
            "upnp_nat_postrouting_chain=postrouting_miniupnpd\n"
            f"allow 1024-65535 {LAN_NET}.{int(gw.site)}.0/24 1024-65535\n"
            "deny 0-65535 0.0.0.0/0 0-65535\n"
        )
        pid = STATE_DIR / f"{self.prefix}-{name}-miniupnpd.pid"
        return self.popen(
            f"{name}g",
            ["miniupnpd", "-d", "-f", str(conf), "-P", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    # ---- running things inside ------------------------------------------
    def exec(self, node: str, argv: Sequence[str], *, check: bool = True) -> str:
        return run(["ip", "netns", "exec", self.nodes[node].ns, *argv], check=check)

    def popen(self, node: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside ``node``'s namespace; killed by ``down()``."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", self.nodes[node].ns, *argv], **kwargs
        )
        self._procs.append(proc)
        return proc

    def describe(self) -> list[dict[str, str]]:
        return [dataclasses.asdict(n) for n in self.nodes.values()]


_UPNP_TABLES = """
table inet mmupnp {
  chain forward_miniupnpd { }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
  chain forward {
    type filter hook forward priority filter - 1; policy accept;
    jump forward_miniupnpd
  }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    jump prerouting_miniupnpd
  }
  chain postrouting {
    type nat hook postrouting priority srcnat - 1; policy accept;
    jump postrouting_miniupnpd
  }
}
"""


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_ns_pids(ns: str) -> None:
    pids = run(["ip", "netns", "pids", ns], check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def delete_prefix(prefix: str) -> list[str]:
    """Delete every namespace named ``<prefix>-*`` after killing what runs in it."""
    gone = []
    for ns in list_namespaces():
        if ns.startswith(f"{prefix}-"):
            _kill_ns_pids(ns)
            run(["ip", "netns", "del", ns], check=False)
            gone.append(ns)
    return gone


def cleanup_stale() -> list[str]:
    """Remove topologies whose creating process is gone (crashed test runs)."""
    removed: list[str] = []
    live_prefixes = set()
    if STATE_DIR.exists():
        for f in STATE_DIR.glob("*.json"):
            try:
                state = json.loads(f.read_text())
                if int(state["pid"]) == 0:  # made by the CLI: lives until `topology down`
                    live_prefixes.add(state["prefix"])
                    continue
                os.kill(int(state["pid"]), 0)
                live_prefixes.add(state["prefix"])
            except (ProcessLookupError, ValueError, KeyError, json.JSONDecodeError):
                f.unlink(missing_ok=True)
            except PermissionError:
                live_prefixes.add(f.stem)
    if STATE_DIR.exists():  # miniupnpd configs and pid files of dead topologies
        for f in STATE_DIR.glob(f"{NS_PREFIX}*-*"):
            if f.name.split("-", 1)[0] not in live_prefixes:
                f.unlink(missing_ok=True)
    for ns in list_namespaces():
        if ns.startswith(NS_PREFIX) and ns.split("-", 1)[0] not in live_prefixes:
            _kill_ns_pids(ns)
            run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
    return removed


@contextlib.contextmanager
def topology(tag: str, sites: Sequence[tuple[str, str]]) -> Iterator[Topology]:
    """Build a topology from (name, kind) pairs; kind "public" means no NAT."""
    topo = Topology.new(tag)
    try:
        topo.up()
        for name, kind in sites:
            if kind == "public":
                topo.add_public(name)
            else:
                topo.add_nat(name, kind)
        yield topo
    finally:
        topo.down()


# Named layouts for the CLI and the benchmark.
LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "basic": [("relay", "public"), ("pub", "public"), ("conea", "cone"), ("coneb", "cone")],
    "all": [
        ("relay", "public"),
        ("pub", "public"),
        ("conea", "cone"),
        ("coneb", "cone"),
        ("syma", "symmetric"),
        ("symb", "symmetric"),
        ("dbl", "double"),
        ("rsta", "rst"),
        ("rstb", "rst"),
    ],
}
