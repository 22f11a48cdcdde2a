"""Prometheus metrics, served on loopback by default.

What `meshmerge status` and `meshmerge sets` show is what Prometheus gets:
a trio task copies the node's status and per-set summaries every
``[metrics] refresh_interval`` seconds, and the exporter thread only reads
that copy, never the live state trio is changing. RPC requests are counted
as they are served.

One registry per process (not the global default) so tests that start
several nodes in one process do not collide.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from meshmerge.daemon.node import Node

log = logging.getLogger("meshmerge.metrics")

#: per-set summary fields exported as ``meshmerge_set_<field>{set, id}``
_SET_FIELDS = {
    "live": "Live contributions",
    "complete": "Live contributions whose tensors are stored here",
    "known": "Contributions known, live or not",
    "convicted": "Authors convicted of equivocation",
}
_NAME_OK = re.compile(r"[a-z_][a-z0-9_]*")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_requests = Counter(
            "meshmerge_rpc_requests",
            "RPC requests served, by method and outcome (ok or the error code)",
            ["method", "outcome"],
            registry=self.registry,
        )
        self._status: Mapping[str, Any] = {}
        self._sets: Sequence[Mapping[str, Any]] = ()
        self.registry.register(_SnapshotCollector(self))

    def update(self, status: Mapping[str, Any], sets: Sequence[Mapping[str, Any]]) -> None:
        """Replace the exported snapshot (two reference swaps: the exporter sees old or new)."""
        self._status = dict(status)
        self._sets = [dict(s) for s in sets]

    def count_request(self, method: str, outcome: str) -> None:
        self.rpc_requests.labels(method, outcome).inc()

    async def refresh_loop(self, node: Node, interval: float) -> None:
        while True:
            self.update(node.status(), node.summaries())
            await trio.sleep(interval)

    def serve(self, address: str, port: int) -> Callable[[], None]:
        server, thread = start_http_server(port, addr=address, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", address, port)

        def stop() -> None:
            server.shutdown()
            thread.join(timeout=5)

        return stop


class _SnapshotCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        status, sets = self.metrics._status, self.metrics._sets
        for key, value in sorted(status.items()):
            if not _NAME_OK.fullmatch(key):
                continue
            if isinstance(value, bool | int | float):
                yield _gauge(f"meshmerge_{key}", f"`meshmerge status` field {key}", float(value))
            elif key == "reachability" and isinstance(value, str):
                family = GaugeMetricFamily(
                    f"meshmerge_{key}", f"`meshmerge status` {key} (1 = current)", labels=["state"]
                )
                family.add_metric([value], 1.0)
                yield family
        for name, text in _SET_FIELDS.items():
            family = GaugeMetricFamily(
                f"meshmerge_set_{name}", f"{text}, per merge set", labels=["set", "id"]
            )
            for row in sets:
                family.add_metric([str(row.get("name", "")), str(row.get("id", ""))], float(row.get(name, 0)))
            yield family


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text)
    family.add_metric([], value)
    return family
