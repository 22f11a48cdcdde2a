"""Interop harness: independent go-libp2p / js-libp2p peers and a stock py-libp2p host.

Used by tests and benchmarks only. `scripts/interop/setup` installs the peers
into `.interop/`; see tests/interop/README.md for the API.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


def run_trio(fn: Callable[[], Awaitable[object]], timeout: float = 60.0) -> None:
    """Run `fn` under `trio.run` with a hard deadline (a hang guard for sync pytest tests)."""

    async def guarded() -> None:
        with trio.fail_after(timeout):
            await fn()

    trio.run(guarded)


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    *,
    timeout: float = 10.0,
    what: str = "condition",
    poll: float = 0.05,
) -> None:
    """Poll `condition` until it is true; trio.TooSlowError naming `what` after `timeout` s."""
    with trio.move_on_after(timeout):
        while not await condition():
            await trio.sleep(poll)
        return
    raise trio.TooSlowError(f"timed out after {timeout} s waiting for {what}")
