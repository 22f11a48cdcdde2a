"""Port mapping on the home router: UPnP IGD (SSDP + SOAP) with NAT-PMP as fallback.

Theory of operation. A mapping makes our listen port reachable from the
internet without hole punching, so AutoNAT then reports us PUBLIC. We find
the gateway with an SSDP M-SEARCH (or, for NAT-PMP, the default route), ask
for a TCP mapping external port -> our LAN address and port with a finite
lease, renew it at ``renew_fraction`` of the lease, and delete it when the
service stops (also on cancellation, under a shielded deadline).

The message formats are pure functions (build/parse) so they are tested
without a network; the I/O is a thin trio layer. Nothing is trusted from the
network beyond bounded sizes: SSDP answers, descriptions and SOAP replies
are capped and parsed with the standard library's XML parser on bounded
input (no external entities are resolved by ElementTree).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import secrets
import struct
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Any

import trio

log = logging.getLogger(__name__)

SSDP_ADDR = ("239.255.255.250", 1900)
NATPMP_PORT = 5351
WAN_SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
MAX_HTTP_BYTES = 64 * 1024


class PortMapError(Exception):
    """No gateway, or the gateway refused or garbled a request."""


@dataclasses.dataclass(frozen=True)
class PortMapConfig:
    """lease_s: lease we ask for (0 = permanent is never requested).
    renew_fraction: renew after this fraction of the lease.
    discover_timeout_s / request_timeout_s: deadlines for SSDP and one SOAP/NAT-PMP exchange.
    description: label shown in the router's mapping table.
    use_upnp: try UPnP IGD first.
    use_natpmp: try NAT-PMP when no UPnP IGD answers (or when UPnP is off).
    """

    lease_s: int = 3600
    renew_fraction: float = 0.5
    discover_timeout_s: float = 2.0
    request_timeout_s: float = 5.0
    description: str = "meshmerge"
    use_upnp: bool = True
    use_natpmp: bool = True

    def validate(self) -> None:
        if not 2 <= self.lease_s <= 7 * 86400:
            raise ValueError("PortMapConfig.lease_s must be in [2, 604800] seconds")
        if not 0.1 <= self.renew_fraction <= 0.9:
            raise ValueError("PortMapConfig.renew_fraction must be in [0.1, 0.9]")
        if self.discover_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("PortMapConfig.discover_timeout_s and request_timeout_s must be > 0")
        if not (self.use_upnp or self.use_natpmp):
            raise ValueError("PortMapConfig.use_upnp / use_natpmp: at least one must be on")
        if not re.fullmatch(r"[A-Za-z0-9 ._-]{1,64}", self.description):
            raise ValueError("PortMapConfig.description must be 1-64 characters of [A-Za-z0-9 ._-]")


@dataclasses.dataclass(frozen=True)
class Mapping:
    protocol: str  # "upnp" | "natpmp"
    external_ip: str
    external_port: int
    internal_ip: str
    internal_port: int
    lease_s: int


# ---------------------------------------------------------------- sans-I/O: UPnP
def msearch(st: str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1", mx: int = 1) -> bytes:
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {SSDP_ADDR[0]}:{SSDP_ADDR[1]}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\nST: {st}\r\n\r\n"
    ).encode()


def parse_ssdp_location(data: bytes) -> str | None:
    """LOCATION of an SSDP 200 answer if it is an http URL, else None."""
    try:
        text = data[:4096].decode("ascii", "replace")
    except Exception:
        return None
    if not text.startswith("HTTP/1.1 200"):
        return None
    for line in text.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "location":
            url = value.strip()
            return url if url.startswith("http://") else None
    return None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_description(xml: bytes, base_url: str) -> tuple[str, str]:
    """(service type, absolute control URL) of the first WAN connection service."""
    try:
        root = ET.fromstring(xml[:MAX_HTTP_BYTES])
    except ET.ParseError as exc:
        raise PortMapError(f"bad device description: {exc}") from exc
    found: dict[str, str] = {}
    for svc in root.iter():
        if _local(svc.tag) != "service":
            continue
        fields = {_local(c.tag): (c.text or "").strip() for c in svc}
        st, ctl = fields.get("serviceType", ""), fields.get("controlURL", "")
        if st in WAN_SERVICES and ctl:
            try:
                found.setdefault(st, urllib.parse.urljoin(base_url, ctl))
            except ValueError as exc:  # e.g. an unbalanced "[" of an IPv6 host
                raise PortMapError(f"bad control URL {ctl[:80]!r} in device description: {exc}") from None
    for st in WAN_SERVICES:
        if st in found:
            return st, found[st]
    raise PortMapError("gateway offers no WANIPConnection/WANPPPConnection service")


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def soap_body(service: str, action: str, args: list[tuple[str, str]]) -> bytes:
    inner = "".join(f"<{k}>{_xml_escape(v)}</{k}>" for k, v in args)
    return (
        '<?xml version="1.0"?>\r\n'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action} xmlns:u="{service}">{inner}</u:{action}>'
        "</s:Body></s:Envelope>"
    ).encode()


def parse_soap(status: int, body: bytes) -> dict[str, str]:
    """Out-arguments of a SOAP response; PortMapError carrying the UPnP error on a fault."""
    try:
        root = ET.fromstring(body[:MAX_HTTP_BYTES])
    except ET.ParseError as exc:
        raise PortMapError(f"bad SOAP response (HTTP {status}): {exc}") from exc
    for el in root.iter():
        if _local(el.tag) == "UPnPError":
            f = {_local(c.tag): (c.text or "").strip() for c in el}
            raise PortMapError(f"UPnP error {f.get('errorCode', '?')}: {f.get('errorDescription', '')}")
    if status != 200:
        raise PortMapError(f"HTTP {status} from gateway")
    for el in root.iter():
        if _local(el.tag).endswith("Response"):
            return {_local(c.tag): (c.text or "").strip() for c in el}
    return {}


def parse_http_response(raw: bytes) -> tuple[int, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise PortMapError("truncated HTTP response")
    first = head.split(b"\r\n", 1)[0].decode("ascii", "replace").split()
    if len(first) < 2 or not first[1].isdigit():
        raise PortMapError("malformed HTTP status line")
    headers = head.decode("latin-1").lower()
    if "transfer-encoding: chunked" in headers:
        body = _dechunk(body)
    return int(first[1]), body


def _dechunk(body: bytes) -> bytes:
    out, pos = b"", 0
    while pos < len(body):
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            break
        size_field = body[pos:line_end].split(b";")[0].strip() or b"0"
        try:
            size = int(size_field, 16)
        except ValueError:
            raise PortMapError(f"malformed HTTP chunk size {size_field[:20]!r}") from None
        if size == 0:
            break
        out += body[line_end + 2 : line_end + 2 + size]
        pos = line_end + 2 + size + 2
    return out


# ---------------------------------------------------------------- sans-I/O: NAT-PMP (RFC 6886)
def natpmp_external_request() -> bytes:
    return b"\x00\x00"


def natpmp_map_request(internal_port: int, external_port: int, lifetime: int) -> bytes:
    return struct.pack("!BBHHHI", 0, 2, 0, internal_port, external_port, lifetime)  # op 2 = TCP


def parse_natpmp(data: bytes, op: int) -> tuple[int, ...]:
    """External address reply -> (ip as int,); mapping reply -> (internal, external, lifetime)."""
    if len(data) < 8:
        raise PortMapError("short NAT-PMP reply")
    version, rop, result = struct.unpack("!BBH", data[:4])
    if version != 0 or rop != 128 + op:
        raise PortMapError("unexpected NAT-PMP reply")
    if result != 0:
        raise PortMapError(f"NAT-PMP result code {result}")
    if op == 0:
        if len(data) < 12:
            raise PortMapError("short NAT-PMP external address reply")
        return (struct.unpack("!I", data[8:12])[0],)
    if len(data) < 16:
        raise PortMapError("short NAT-PMP mapping reply")
    return struct.unpack("!HHI", data[8:16])


def default_gateway(route_table: str) -> str | None:
    """IPv4 default gateway from the text of /proc/net/route."""
    for line in route_table.splitlines()[1:]:
        f = line.split()
        if len(f) >= 3 and f[1] == "00000000" and f[2] != "00000000":
            return str(ipaddress.IPv4Address(struct.unpack("<I", bytes.fromhex(f[2]))[0]))
    return None


# ---------------------------------------------------------------- I/O
async def _http(
    url: str,
    *,
    method: str = "GET",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes, str]:
    """Tiny HTTP/1.1 client: returns (status, body, our local IP on that connection)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise PortMapError(f"unsupported URL {url!r}")
    port = u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    hdrs = {
        "Host": f"{u.hostname}:{port}",
        "Connection": "close",
        "Content-Length": str(len(body)),
        **(headers or {}),
    }
    req = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(u.hostname, port)
        async with stream:
            local_ip = stream.socket.getsockname()[0]
            await stream.send_all(req.encode() + body)
            raw = b""
            while chunk := await stream.receive_some(16384):
                raw += chunk
                if len(raw) > MAX_HTTP_BYTES:
                    raise PortMapError("gateway response too large")
    status, payload = parse_http_response(raw)
    return status, payload, local_ip


async def discover_igd(timeout: float) -> str:
    """LOCATION URL of the first Internet Gateway Device answering an SSDP search."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("0.0.0.0", 0))
        sock.setsockopt(trio.socket.IPPROTO_IP, trio.socket.IP_MULTICAST_TTL, 2)
        with trio.move_on_after(timeout):
            await sock.sendto(msearch(), SSDP_ADDR)
            while True:
                data, _ = await sock.recvfrom(4096)
                loc = parse_ssdp_location(data)
                if loc:
                    return loc
    raise PortMapError("no UPnP gateway answered the SSDP search")


class UPnPClient:
    """SOAP calls against one IGD's WAN connection service."""

    def __init__(self, service: str, control_url: str, timeout: float) -> None:
        self.service, self.control_url, self.timeout = service, control_url, timeout
        self.local_ip = ""

    @classmethod
    async def discover(cls, config: PortMapConfig) -> UPnPClient:
        location = await discover_igd(config.discover_timeout_s)
        status, xml, _ = await _http(location, timeout=config.request_timeout_s)
        if status != 200:
            raise PortMapError(f"device description fetch failed: HTTP {status}")
        st, ctl = parse_description(xml, location)
        return cls(st, ctl, config.request_timeout_s)

    async def call(self, action: str, args: list[tuple[str, str]]) -> dict[str, str]:
        status, body, local_ip = await _http(
            self.control_url,
            method="POST",
            body=soap_body(self.service, action, args),
            headers={"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": f'"{self.service}#{action}"'},
            timeout=self.timeout,
        )
        self.local_ip = local_ip
        return parse_soap(status, body)

    async def external_ip(self) -> str:
        return (await self.call("GetExternalIPAddress", [])).get("NewExternalIPAddress", "")

    async def add(
        self, external_port: int, internal_ip: str, internal_port: int, lease_s: int, desc: str
    ) -> None:
        await self.call(
            "AddPortMapping",
            [
                ("NewRemoteHost", ""),
                ("NewExternalPort", str(external_port)),
                ("NewProtocol", "TCP"),
                ("NewInternalPort", str(internal_port)),
                ("NewInternalClient", internal_ip),
                ("NewEnabled", "1"),
                ("NewPortMappingDescription", desc),
                ("NewLeaseDuration", str(lease_s)),
            ],
        )

    async def delete(self, external_port: int) -> None:
        await self.call(
            "DeletePortMapping",
            [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "TCP")],
        )


async def _natpmp(gateway: str, payload: bytes, op: int, timeout: float) -> tuple[int, ...]:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.connect((gateway, NATPMP_PORT))
        delay = 0.25
        deadline = trio.current_time() + timeout
        while (left := deadline - trio.current_time()) > 0:  # RFC 6886: retransmit, doubling delay
            await sock.send(payload)
            got: list[bytes] = []  # stays empty when the wait times out
            with trio.move_on_after(min(delay, left)):
                got.append(await sock.recv(64))
            if got:
                return parse_natpmp(got[0], op)
            delay *= 2
    raise PortMapError(f"no NAT-PMP answer from {gateway}")


class PortMapper:
    """Keeps one TCP port mapped while ``run`` is alive; removes it on exit."""

    def __init__(self, internal_port: int, config: PortMapConfig | None = None) -> None:
        self.internal_port = internal_port
        self.config = config or PortMapConfig()
        self.config.validate()
        self.mapping: Mapping | None = None
        self.renewals = 0

    async def _map_upnp(self, client: UPnPClient, lan_ip: str) -> Mapping:
        ext_port = self.internal_port
        for _ in range(3):
            try:
                await client.add(
                    ext_port, lan_ip, self.internal_port, self.config.lease_s, self.config.description
                )
                break
            except PortMapError as exc:
                if "718" not in str(exc):  # ConflictInMappingEntry: try another external port
                    raise
                ext_port = 20000 + secrets.randbelow(40000)
        else:
            raise PortMapError("external ports kept conflicting")
        ext_ip = await client.external_ip()
        return Mapping("upnp", ext_ip, ext_port, lan_ip, self.internal_port, self.config.lease_s)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        client: UPnPClient | None = None
        gateway: str | None = None
        try:
            if not cfg.use_upnp:
                raise PortMapError("UPnP disabled")
            client = await UPnPClient.discover(cfg)
            lan_ip = urllib.parse.urlsplit(client.control_url).hostname or ""
            await client.external_ip()  # learns our LAN address on the connection to the gateway
            self.mapping = await self._map_upnp(client, client.local_ip or lan_ip)
        except PortMapError as exc:
            if not cfg.use_natpmp:
                raise
            log.info("upnp: %s; trying NAT-PMP", exc)
            client = None
            try:
                with open("/proc/net/route") as f:
                    gateway = default_gateway(f.read())
            except OSError:
                gateway = None
            if gateway is None:
                raise PortMapError(f"no UPnP gateway ({exc}) and no default route for NAT-PMP") from exc
            self.mapping = await self._map_natpmp(gateway, self.internal_port)
        task_status.started(self.mapping)
        try:
            while True:
                await trio.sleep(self.mapping.lease_s * cfg.renew_fraction)
                if client is not None:
                    await client.add(
                        self.mapping.external_port,
                        self.mapping.internal_ip,
                        self.internal_port,
                        cfg.lease_s,
                        cfg.description,
                    )
                else:
                    assert gateway is not None
                    self.mapping = await self._map_natpmp(gateway, self.mapping.external_port)
                self.renewals += 1
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(cfg.request_timeout_s):
                try:
                    if client is not None:
                        await client.delete(self.mapping.external_port)
                    elif gateway is not None:
                        await _natpmp(
                            gateway, natpmp_map_request(self.internal_port, 0, 0), 2, cfg.request_timeout_s
                        )
                except (PortMapError, OSError) as exc:
                    log.warning("upnp: could not remove mapping: %s", exc)
                self.mapping = None

    async def _map_natpmp(self, gateway: str, external_port: int) -> Mapping:
        t = self.config.request_timeout_s
        (ip_int,) = await _natpmp(gateway, natpmp_external_request(), 0, t)
        internal, external, lifetime = await _natpmp(
            gateway, natpmp_map_request(self.internal_port, external_port, self.config.lease_s), 2, t
        )
        if internal != self.internal_port or lifetime == 0:
            raise PortMapError("NAT-PMP gateway mapped something else")
        return Mapping("natpmp", str(ipaddress.IPv4Address(ip_int)), external, "", internal, lifetime)
