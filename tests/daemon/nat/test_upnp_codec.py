"""UPnP / NAT-PMP message building and parsing (no network)."""

from __future__ import annotations

import struct

import pytest

from meshmerge.daemon.nat.upnp import (
    PortMapConfig,
    PortMapError,
    default_gateway,
    msearch,
    natpmp_map_request,
    parse_description,
    parse_http_response,
    parse_natpmp,
    parse_soap,
    parse_ssdp_location,
    soap_body,
)

DESC = b"""<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0"><device><deviceList><device>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<controlURL>/ctl/IPConn</controlURL></service></serviceList></device></deviceList></device></root>"""


def test_ssdp_search_and_answer() -> None:
    assert msearch().startswith(b"M-SEARCH * HTTP/1.1\r\n")
    ans = b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION: http://198.51.100.17:5000/rootDesc.xml\r\n\r\n"
    assert parse_ssdp_location(ans) == "http://198.51.100.17:5000/rootDesc.xml"
    assert parse_ssdp_location(b"NOTIFY * HTTP/1.1\r\n\r\n") is None
    assert parse_ssdp_location(b"HTTP/1.1 200 OK\r\nLOCATION: file:///etc/passwd\r\n\r\n") is None


def test_description_and_soap() -> None:
    st, url = parse_description(DESC, "http://198.51.100.17:5000/rootDesc.xml")
    assert st.endswith("WANIPConnection:1") and url == "http://198.51.100.17:5000/ctl/IPConn"
    with pytest.raises(PortMapError):
        parse_description(b"<root/>", "http://198.51.100.17/")
    with pytest.raises(PortMapError):
        parse_description(b"<not xml", "http://198.51.100.17/")
    body = soap_body(st, "AddPortMapping", [("NewPortMappingDescription", "a<b")])
    assert b"a&lt;b" in body
    ok = (
        b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
        b'<u:GetExternalIPAddressResponse xmlns:u="x"><NewExternalIPAddress>203.0.113.9'
        b"</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>"
    )
    assert parse_soap(200, ok) == {"NewExternalIPAddress": "203.0.113.9"}
    fault = (
        b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault><detail>'
        b'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718</errorCode>'
        b"<errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail></s:Fault>"
        b"</s:Body></s:Envelope>"
    )
    with pytest.raises(PortMapError, match="718"):
        parse_soap(500, fault)


def test_http_and_chunked() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert parse_http_response(raw) == (200, b"abcde")
    with pytest.raises(PortMapError):
        parse_http_response(b"garbage")


def test_natpmp_codec() -> None:
    req = natpmp_map_request(4001, 4001, 60)
    assert struct.unpack("!BBHHHI", req) == (0, 2, 0, 4001, 4001, 60)
    reply = struct.pack("!BBHIHHI", 0, 130, 0, 7, 4001, 4001, 60)
    assert parse_natpmp(reply, 2) == (4001, 4001, 60)
    with pytest.raises(PortMapError, match="result code 3"):
        parse_natpmp(struct.pack("!BBHIHHI", 0, 130, 3, 7, 0, 0, 0), 2)
    with pytest.raises(PortMapError):
        parse_natpmp(b"\x00", 0)


def test_default_gateway_from_proc_route() -> None:
    table = (
        "Iface\tDestination\tGateway \tFlags\neth0\t00000000\t116433C6\t0003\n"  # 198.51.100.17 little-endian
    )
    assert default_gateway(table) == "198.51.100.17"
    assert default_gateway("Iface\tDestination\tGateway\n") is None


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="renew_fraction"):
        PortMapConfig(renew_fraction=1.0).validate()
    with pytest.raises(ValueError, match="description"):
        PortMapConfig(description="x" * 100).validate()
