"""Who the client is: the TCP peer, or the address a trusted proxy forwarded.

Pure: no tornado, no I/O. Forwarding headers (``X-Forwarded-For``,
``X-Real-IP``, ``Forwarded``) are believed only when the TCP peer is in
``http.trusted_proxies`` (loopback only when that list is empty and
``http.xheaders`` is on); from anyone else they are ignored, so rotating
them cannot escape a rate limit or unlock the loopback-only admin.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

FORWARDING_HEADERS = ("X-Forwarded-For", "X-Real-IP", "Forwarded")
_FORWARDING_LOWER = frozenset(name.lower() for name in FORWARDING_HEADERS)
LOOPBACK = ("127.0.0.0/8", "::1/128")
_FORWARDED_FOR = re.compile(r'(?i)(?:^|[;,\s])for\s*=\s*"?\[?([^\]";,\s]+)')


def parse_ip(text: str) -> IPAddress | None:
    """An address (IPv4-mapped IPv6 as IPv4, zone and port stripped), or None."""
    text = text.strip().split("%", 1)[0]
    if text.count(":") == 1:  # "1.2.3.4:5678"
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything unparsable."""
    ip = parse_ip(address)
    return ip is not None and ip.is_loopback


def has_forwarding(headers: Mapping[str, str]) -> bool:
    """Whether the request names a client other than its TCP peer (it came through a proxy)."""
    # The names first: a header lookup that misses raises and catches a KeyError inside.
    if _FORWARDING_LOWER.isdisjoint(name.lower() for name in headers):
        return False
    return any(headers.get(name) for name in FORWARDING_HEADERS)


@dataclass(frozen=True)
class ProxyTrust:
    """Which peers' forwarding headers are believed, and how the client is read from them."""

    networks: tuple[IPNetwork, ...]
    # Peers judged so far: parsing an address costs more than the rest of a request's checks.
    _judged: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, xheaders: bool, trusted: Iterable[str]) -> ProxyTrust:
        if not xheaders:
            return cls(())
        cidrs = tuple(trusted) or LOOPBACK
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs))

    def trusts(self, address: str) -> bool:
        judged = self._judged.get(address)
        if judged is None:
            if len(self._judged) >= 4096:  # bounded: many peers only cost the parse again
                self._judged.clear()
            ip = parse_ip(address)
            judged = self._judged[address] = (ip is not None
                                              and any(ip in net for net in self.networks))
        return judged

    def client(self, peer: str, headers: Mapping[str, str]) -> str:
        """The client's address: ``peer`` unless ``peer`` is trusted and forwarded another.

        ``X-Real-IP`` first (a proxy sets it, never appends), then the right-most
        untrusted hop of ``X-Forwarded-For``, then ``Forwarded: for=``.
        """
        if not self.networks or not self.trusts(peer):
            return peer
        real = parse_ip(headers.get("X-Real-IP", ""))
        if real is not None:
            return str(real)
        for value in (headers.get("X-Forwarded-For", ""),
                      ",".join(_FORWARDED_FOR.findall(headers.get("Forwarded", "")))):
            hops = [parse_ip(h) for h in value.split(",") if h.strip()]
            for ip in reversed(hops):
                if ip is None:
                    break  # a garbled chain: believe nothing further left
                if not any(ip in net for net in self.networks):
                    return str(ip)
            if hops and hops[0] is not None:
                return str(hops[0])  # every hop is a trusted proxy: the first one is the client
        return peer

    def protocol(self, peer: str, headers: Mapping[str, str], default: str) -> str:
        """``http`` or ``https`` as the client sees it (``X-Forwarded-Proto`` from a trusted peer)."""
        if not self.networks or not self.trusts(peer):
            return default
        proto = headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
        return proto if proto in ("http", "https") else default
