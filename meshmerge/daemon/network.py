"""Compose the network services under the daemon's nursery.

host (TCP, Noise, Yamux, identify, ping, limits) → Kademlia DHT → GossipSub →
sync (announcements, anti-entropy, blob fetch) → bootstrap dials. Each
service owns its config, tasks and metrics; this module only wires them and
exposes their views over RPC (`meshmerge peers/scores/topics/dht`).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from meshmerge.daemon.config import Config
from meshmerge.daemon.dht.service import DHTConfig, DHTMode, KademliaDHT
from meshmerge.daemon.host import HostConfig, peer_info, running_host
from meshmerge.daemon.identity import Identity
from meshmerge.daemon.limits import ConnectionLimits
from meshmerge.daemon.node import Node
from meshmerge.daemon.rpc import Call, RpcServer
from meshmerge.daemon.sync import SyncService

log = logging.getLogger("meshmerge.network")

BOOTSTRAP_RETRY = 5.0


def host_config(config: Config) -> HostConfig:
    net = config.network
    return HostConfig(
        listen_addrs=net.listen,
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
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with running_host(host_config(config), identity) as host, trio.open_nursery() as nursery:
        dht = KademliaDHT(host, DHTConfig(mode=DHTMode(config.network.dht_mode)))
        await nursery.start(dht.run)
        gossip = await _start_gossip(host, identity, nursery)
        sync = SyncService(node, host, config.sync, gossip=gossip, dht=dht)
        await nursery.start(sync.run)
        addrs = [str(a) for a in host.get_addrs()]
        node.extra_status.append(
            lambda: {"listen": addrs, "connected_peers": len(host.get_network().connections)}
        )
        node.extra_status.append(sync.status)
        _register_views(rpc, host, dht, gossip)
        if config.network.bootstrap:
            nursery.start_soon(_bootstrap, host, dht, config.network.bootstrap)
        log.info("network up: %s", ", ".join(addrs))
        task_status.started()
        await trio.sleep_forever()


async def _start_gossip(host: Any, identity: Identity, nursery: trio.Nursery) -> Any:
    from meshmerge.daemon.gossip.driver import GossipConfig, GossipService

    gossip = GossipService(host, identity, GossipConfig())
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
        return {"mode": dht.mode.value if hasattr(dht, "mode") else "?", "routing_table": len(dht.routing)}

    rpc.register("peers", peers)
    rpc.register("dht", dht_view)
    if gossip is not None:

        async def scores(call: Call) -> Any:
            return gossip.scores()

        async def topics(call: Call) -> Any:
            return gossip.topics()

        rpc.register("scores", scores)
        rpc.register("topics", topics)
