"""`meshmerge daemon`: one tree of trio nurseries that owns every task.

Start-up order: logging → data directory and store (exclusive lock) →
identity → node → RPC socket → network services → GC tuning (if asked,
see :mod:`meshmerge.daemon.gctune`) → READY=1 to systemd.
SIGTERM/SIGINT cancel the tree; every service shuts down in its own
`finally`, the store is closed last, and the RPC socket file is removed.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import trio

from meshmerge.crdt import Signer
from meshmerge.daemon import systemd
from meshmerge.daemon.config import Config
from meshmerge.daemon.gctune import GcParams, tune_gc
from meshmerge.daemon.identity import load_or_create
from meshmerge.daemon.metrics import Metrics
from meshmerge.daemon.node import Node
from meshmerge.daemon.rpc import RpcServer
from meshmerge.daemon.store import Store, StoreLimits

if TYPE_CHECKING:
    # the trio-stubs that py-libp2p pulls in (trio-typing) predate trio.TaskStatus
    from trio_typing import TaskStatus

log = logging.getLogger("meshmerge.daemon")

#: Network services add themselves here: async fn(node, rpc, config, nursery, task_status).
NetworkStarter = Callable[..., Awaitable[Any]]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


async def run(
    config: Config,
    *,
    network: NetworkStarter | None = None,
    gc_params: GcParams | None = None,
    task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until cancelled (or SIGTERM/SIGINT).

    ``gc_params``: tune the cyclic GC once start-up is done (the CLI does; in-process callers
    such as tests leave their process's GC alone by passing None).
    """
    data_dir = config.node.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = load_or_create(data_dir)
    metrics = Metrics()
    async with AsyncExitStack() as stack:
        quota = config.store.blob_quota_bytes or None
        store = Store.open(data_dir / "store", StoreLimits(blob_quota_bytes=quota))
        stack.callback(store.close)
        node = Node(store, Signer(identity.seed), max_blob_bytes=config.sync.max_blob_bytes)
        log.info("meshmerge node %s, data in %s", node.peer_id, data_dir)
        if config.metrics.enabled:
            stack.callback(metrics.serve(config.metrics.address, config.metrics.port))
        rpc = RpcServer(
            node,
            config.rpc.socket,
            mode=config.rpc.socket_mode,
            max_frame_bytes=config.rpc.max_frame_bytes,
            max_connections=config.rpc.max_connections,
            on_request=metrics.count_request,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signals, nursery.cancel_scope)
            await nursery.start(rpc.serve)
            await nursery.start(node.gc_loop, config.store.gc_interval)
            if network is not None:
                await nursery.start(network, node, rpc, config, identity)
            if config.metrics.enabled:
                nursery.start_soon(metrics.refresh_loop, node, config.metrics.refresh_interval)
            if gc_params is not None:
                tune_gc(gc_params)
            interval = systemd.watchdog_interval()
            if interval:
                nursery.start_soon(systemd.watchdog_loop, interval)
            systemd.notify(f"READY=1\nSTATUS=serving {len(node.set_ids())} merge set(s)")
            log.info("ready")
            task_status.started(node)
            try:
                await trio.sleep_forever()
            finally:
                systemd.notify("STOPPING=1")
                log.info("shutting down")


async def _signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            scope.cancel()
            return
