"""Compose the network services under the daemon's nursery.

host (TCP, Noise, Yamux, identify, ping, limits) → relay (STOP; HOP if
enabled) and AutoNAT v1 + v2 servers → Kademlia DHT → NAT traversal (AutoNAT client
verdicts switch the DHT mode when dht_mode = "auto" and take a relay
reservation when private; DCUtR upgrades relayed connections; UPnP/NAT-PMP
port mapping if enabled) → GossipSub → sync (announcements, anti-entropy,
blob fetch) → bootstrap dials. Each
service owns its config, tasks and metrics; this module only wires them and
exposes their views over RPC (`meshmerge peers/scores/topics/dht`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from meshmerge.daemon.config import Config
from meshmerge.daemon.dht.service import DHTConfig, DHTMode, KademliaDHT
from meshmerge.daemon.host import HostConfig, peer_info, running_host
from meshmerge.daemon.identity import Identity
from meshmerge.daemon.limits import ConnectionLimits
from meshmerge.daemon.nat import circuit
from meshmerge.daemon.nat.autonat import AutoNATClient, AutoNATServer, Reachability
from meshmerge.daemon.nat.autonat2 import AutoNATv2Client, AutoNATv2Server
from meshmerge.daemon.nat.dcutr import DCUtRService
from meshmerge.daemon.nat.relay import (
    HOP_PROTOCOL_ID,
    RelayClient,
    RelayError,
    RelayService,
    RelayServiceConfig,
)
from meshmerge.daemon.nat.upnp import PortMapError, PortMapper
from meshmerge.daemon.node import Node
from meshmerge.daemon.rpc import Call, RpcServer
from meshmerge.daemon.sync import SyncService

if TYPE_CHECKING:
    # the trio-stubs that py-libp2p pulls in (trio-typing) predate trio.TaskStatus
    from trio_typing import TaskStatus

log = logging.getLogger("meshmerge.network")

BOOTSTRAP_RETRY = 5.0


def host_config(config: Config) -> HostConfig:
    net = config.network
    return HostConfig(
        listen_addrs=net.listen,
        announce_addrs=net.announce,
        limits=ConnectionLimits(
            max_connections=net.max_connections, max_connections_per_ip_group=net.max_connections_per_ip
        ),
    )


async def start_network(
    node: Node,
    rpc: RpcServer,
    config: Config,
    identity: Identity,
    *,
    task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    net = config.network
    async with running_host(host_config(config), identity) as host:
        # STOP is always served (we can be relayed to); HOP only when enabled
        relay = RelayService(host, RelayServiceConfig() if net.enable_relay_service else None)
        async with (
            relay.running(),
            AutoNATServer(host).running(),
            AutoNATv2Server(host).running(),
            trio.open_nursery() as nursery,
        ):
            initial = DHTMode.CLIENT if net.dht_mode == "auto" else DHTMode(net.dht_mode)
            dht_config = DHTConfig(mode=initial, persist_path=config.node.data_dir / "dht" / "records")
            dht = KademliaDHT(host, dht_config)
            await nursery.start(dht.run)
            nat = NatTraversal(
                host, relay, dht, auto_dht=net.dht_mode == "auto", relay_client=net.enable_relay_client
            )
            nursery.start_soon(nat.run)
            if net.enable_relay_client:
                await nursery.start(DCUtRService(host, relay).run)
            if net.enable_upnp:
                nursery.start_soon(_port_map, host)
            node.extra_status.append(nat.status)
            gossip = await _start_gossip(host, identity, nursery, config)
            sync = SyncService(node, host, config.sync, gossip=gossip, dht=dht)
            await nursery.start(sync.run)
            addrs = [str(a) for a in host.get_addrs()]
            node.extra_status.append(
                lambda: {"listen": addrs, "connected_peers": len(host.get_network().connections)}
            )
            node.extra_status.append(sync.status)
            node.extra_status.append(
                lambda: {"dht_values": len(dht.values), "dht_provider_keys": len(dht.providers)}
            )
            _register_views(rpc, host, dht, gossip)
            if config.network.bootstrap:
                nursery.start_soon(_bootstrap, host, dht, config.network.bootstrap)
            log.info("network up: %s", ", ".join(addrs))
            task_status.started()
            await trio.sleep_forever()


class NatTraversal:
    """AutoNAT verdicts drive the DHT mode and, when private, a relay reservation.

    v1 (whole-node verdict) drives those decisions; v2 classifies each public
    address candidate and is reported in the status (``address_reachability``).
    """

    def __init__(
        self, host: Any, relay: RelayService, dht: KademliaDHT, *, auto_dht: bool, relay_client: bool
    ) -> None:
        self.host = host
        self.autonat = AutoNATClient(host)
        self.autonat2 = AutoNATv2Client(host)
        self.relay = RelayClient(host, relay) if relay_client else None
        if self.relay is not None and hasattr(host, "set_circuit_dialer"):
            relays = self.relay
            host.set_circuit_dialer(lambda info: circuit.connect(host, relays, info))
        self.dht = dht
        self.auto_dht = auto_dht
        self.reserved: str | None = None

    def status(self) -> dict[str, Any]:
        return {
            "reachability": self.autonat.status.value,
            "address_reachability": {a: r.value for a, r in self.autonat2.status().items()},
            "relay_reservation": self.reserved,
            "circuit_addrs": [str(a) for a in self.relay.circuit_addrs()] if self.relay else [],
        }

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.autonat.run)
            nursery.start_soon(self.autonat2.run)
            await self.autonat.watch(lambda r: self._on_reachability(r, nursery))

    async def _on_reachability(self, reachability: Reachability, nursery: trio.Nursery) -> None:
        log.info("AutoNAT: we are %s", reachability.value)
        if self.auto_dht and reachability is not Reachability.UNKNOWN:
            await self.dht.set_mode(DHTMode.SERVER if reachability is Reachability.PUBLIC else DHTMode.CLIENT)
        if reachability is Reachability.PRIVATE and self.relay is not None and self.reserved is None:
            nursery.start_soon(self._reserve)

    async def _reserve(self) -> None:
        """Hold a reservation at the first connected peer that offers relay HOP."""
        assert self.relay is not None
        store = self.host.get_peerstore()
        for peer in self.host.get_connected_peers():
            try:
                if HOP_PROTOCOL_ID not in (store.get_protocols(peer) or []):
                    continue
            except Exception:
                continue
            self.reserved = str(peer)
            try:
                await self.relay.keep_reservation(peer)
            except RelayError as exc:
                log.warning("relay reservation at %s lost: %s", peer, exc)
            self.reserved = None
        log.info("no relay available among %d connected peers", len(self.host.get_connected_peers()))


async def _port_map(host: Any) -> None:
    port = next((int(a.value_for_protocol("tcp")) for a in host.get_addrs() if "/tcp/" in str(a)), None)
    if port is None:
        return
    try:
        await PortMapper(port).run()
    except PortMapError as exc:
        log.warning("UPnP/NAT-PMP port mapping unavailable: %s", exc)


async def _start_gossip(host: Any, identity: Identity, nursery: trio.Nursery, config: Config) -> Any:
    from meshmerge.daemon.gossip.bootstrap import daemon_gossip_config
    from meshmerge.daemon.gossip.driver import GossipService

    gossip = GossipService(host, identity, daemon_gossip_config(config.gossip, config.network.bootstrap))
    await nursery.start(gossip.run)
    return gossip


async def _bootstrap(host: Any, dht: KademliaDHT, addrs: tuple[str, ...]) -> None:
    """Dial the bootstrap peers until at least one answers, then fill the DHT table."""
    infos = [peer_info(a) for a in addrs]
    while True:
        connected = 0
        for info in infos:
            try:
                with trio.fail_after(10):
                    await host.connect(info)
                connected += 1
            except Exception as exc:
                log.warning("bootstrap peer %s unreachable: %s", info.peer_id, exc)
        if connected:
            size = await dht.bootstrap(infos)
            log.info(
                "bootstrapped: %d/%d peers answered, DHT table has %d peers", connected, len(infos), size
            )
            return
        await trio.sleep(BOOTSTRAP_RETRY)


def _register_views(rpc: RpcServer, host: Any, dht: KademliaDHT, gossip: Any) -> None:
    async def peers(call: Call) -> Any:
        out = []
        for peer_id, conns in host.get_network().connections.items():
            conn_list = conns if isinstance(conns, list) else [conns]
            addrs = [str(a) for a in host.get_peerstore().addrs(peer_id)][:2]
            out.append({"peer": str(peer_id), "connections": len(conn_list), "addrs": ", ".join(addrs)})
        return out

    async def dht_view(call: Call) -> Any:
        return {
            "mode": dht.mode.value if hasattr(dht, "mode") else "?",
            "routing_table": len(dht.routing),
            "values": len(dht.values),
            "provider_keys": len(dht.providers),
        }

    rpc.register("peers", peers)
    rpc.register("dht", dht_view)
    if gossip is not None:

        async def scores(call: Call) -> Any:
            return gossip.scores()

        async def topics(call: Call) -> Any:
            return gossip.topics()

        rpc.register("scores", scores)
        rpc.register("topics", topics)
