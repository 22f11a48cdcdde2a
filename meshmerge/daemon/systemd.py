"""sd_notify without libsystemd: READY, STATUS, WATCHDOG and STOPPING datagrams.

With ``Type=notify`` systemd waits for READY=1 before it considers the unit
started, and with ``WatchdogSec=`` it restarts a daemon that stops sending
WATCHDOG=1. Outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket

import trio


def notify(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for, in seconds, if it asked us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


async def watchdog_loop(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)
