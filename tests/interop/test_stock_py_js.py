"""A stock py-libp2p 0.8.1 host (Noise only) connects to a js-libp2p peer: identify + ping."""

from __future__ import annotations

import pytest

from meshmerge.testing.interop import run_trio, wait_until
from meshmerge.testing.interop.jspeer import JsPeer, start_js_peer
from meshmerge.testing.interop.pyhost import StockPyHost, start_stock_py_host
from meshmerge.testing.interop.tools import InteropTools

pytestmark = pytest.mark.interop


async def _js_connected(js: JsPeer, py: StockPyHost) -> bool:
    return py.peer_id in await js.connected_peers()


@pytest.mark.parametrize("direction", ["py_dials_js", "js_dials_py"])
def test_stock_py_libp2p_host_and_js_identify_and_ping(interop_tools: InteropTools, direction: str) -> None:
    async def body() -> None:
        async with start_js_peer(interop_tools) as js, start_stock_py_host() as py:
            if direction == "py_dials_js":
                await py.connect(js.peer_id, js.addrs)
            else:
                await js.dial(py.p2p_addrs[0])
            await wait_until(lambda: _js_connected(js, py), what="js lists the py connection")

            assert "/ipfs/kad/1.0.0" in await py.identified_protocols(js.peer_id)  # py's own identify
            js_seen_by_py = await py.identify_remote(js.peer_id)
            assert "/meshsub/1.2.0" in js_seen_by_py.protocols
            assert js_seen_by_py.agent_version.startswith("js-libp2p/")

            py_seen_by_js = await js.identify_remote(py.peer_id)
            assert "/ipfs/ping/1.0.0" in py_seen_by_js.protocols
            assert py_seen_by_js.agent_version and "py-libp2p" in py_seen_by_js.agent_version

            assert len(await py.ping(js.peer_id, count=3)) == 3
            assert len(await js.ping(py.peer_id, count=3)) == 3

    run_trio(body, timeout=60)
