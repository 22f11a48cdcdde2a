"""The Prometheus endpoint of a real daemon shows what `meshmerge status` and `sets` show."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest

from meshmerge.client import Client, RpcError
from meshmerge.daemon.config import ConfigError, MetricsSection, dev_config
from tests.daemon.test_rpc_node import SPEC, model, with_daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_follow_the_node(tmp_path: Path) -> None:
    port = _free_port()
    config = dev_config(tmp_path).with_overrides(
        metrics=MetricsSection(enabled=True, port=port, refresh_interval=0.1)
    )

    def body(sock: Path) -> dict[str, float]:
        with Client(sock) as c:
            created = c.create_set("test/metrics", SPEC)
            c.contribute("test/metrics", model(1))
            c.contribute("test/metrics", model(2))
            with pytest.raises(RpcError):
                c.contributions("no/such/set")
            with pytest.raises(RpcError):
                c.call("no.such.method")
        deadline = time.monotonic() + 10
        while True:
            samples = _scrape(port)
            live = samples.get(f'meshmerge_set_live{{id="{created["id"]}",set="test/metrics"}}')
            if live == 2 or time.monotonic() > deadline:
                return samples

    samples = with_daemon(tmp_path, body, config)
    set_rows = {k: v for k, v in samples.items() if k.startswith("meshmerge_set_live{")}
    assert list(set_rows.values()) == [2.0], samples
    assert samples["meshmerge_sets"] == 1.0
    assert samples["meshmerge_blobs"] == 2.0 and samples["meshmerge_blob_bytes"] > 0
    assert samples['meshmerge_rpc_requests_total{method="contribute",outcome="ok"}'] == 2.0
    assert samples['meshmerge_rpc_requests_total{method="contributions",outcome="unknown_set"}'] == 1.0
    assert samples['meshmerge_rpc_requests_total{method="unknown",outcome="unknown_method"}'] == 1.0


def test_refresh_interval_is_validated() -> None:
    with pytest.raises(ConfigError, match="refresh_interval"):
        MetricsSection(refresh_interval=0).validate()
