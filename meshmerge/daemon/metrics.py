"""Prometheus metrics, served on loopback by default.

One registry per process (not the global default) so tests that start
several nodes in one process do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger("meshmerge.metrics")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_requests = Counter(
            "meshmerge_rpc_requests", "RPC requests served, by method and outcome", ["method", "outcome"],
            registry=self.registry,
        )
        self.contributions = Gauge(
            "meshmerge_live_contributions", "Live contributions per merge set", ["set"], registry=self.registry
        )
        self.remote_ops = Counter(
            "meshmerge_remote_ops", "Operations received from peers, by outcome", ["outcome"], registry=self.registry
        )
        self.peers = Gauge("meshmerge_connected_peers", "Connected libp2p peers", registry=self.registry)

    def serve(self, address: str, port: int) -> Callable[[], None]:
        server, thread = start_http_server(port, addr=address, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", address, port)

        def stop() -> None:
            server.shutdown()
            thread.join(timeout=5)

        return stop
