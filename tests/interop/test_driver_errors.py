"""Bad requests to the peers come back as typed errors, and the peers stay usable."""

from __future__ import annotations

import pytest

from meshmerge.testing.interop import run_trio
from meshmerge.testing.interop.gopeer import DaemonError, start_go_peer
from meshmerge.testing.interop.jspeer import JsPeerError, start_js_peer
from meshmerge.testing.interop.tools import InteropTools

pytestmark = pytest.mark.interop


def test_bad_requests_give_typed_errors_and_peers_stay_up(interop_tools: InteropTools) -> None:
    async def body() -> None:
        async with start_go_peer(interop_tools) as go, start_js_peer(interop_tools) as js:
            with pytest.raises(JsPeerError, match="unknown op"):
                await js.call("no-such-op")
            with pytest.raises(JsPeerError):
                await js.call("dial", addr="/ip4/127.0.0.1/tcp/not-a-port")
            with pytest.raises(JsPeerError):
                await js.call("subscribe")  # no topic
            # a port nobody listens on: the go peer's own port + nothing bound is not
            # guaranteed, so dial the js peer's id at the go peer's address (wrong peer id)
            with pytest.raises(DaemonError, match="CONNECT"):
                await go.connect(js.peer_id, go.addrs, timeout=5)
            with pytest.raises(JsPeerError):
                await js.dial(f"{go.addrs[0]}/p2p/{js.peer_id.to_base58()}", timeout=5)

            # both still work
            await js.dial(go.p2p_addrs[0])
            assert len(await go.ping(js.peer_id, count=2)) == 2
            assert (await js.call("info"))["peerId"] == js.peer_id.to_base58()

    run_trio(body, timeout=60)
