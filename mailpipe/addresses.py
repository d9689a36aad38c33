"""Where mailpipe may connect for a stored account: public addresses on IMAP ports only.

An account's host and port are chosen by a user, so without a policy they would point the
workers at the operator's own network (Redis, PostgreSQL, a cloud metadata service). The check
runs on the addresses the host resolves to, at connect time, and the connection goes to exactly
the addresses that were checked, so a name that resolves differently the second time (DNS
rebinding) gains nothing. Operators name exceptions (`MAILPIPE_ALLOW_PRIVATE_HOSTS`): a host or
network named there may use any port.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

from .errors import MailpipeError

IMAP_PORTS = (143, 993)
ALLOW_ENV = "MAILPIPE_ALLOW_PRIVATE_HOSTS"
# Addresses that carry an IPv4 address inside an IPv6 one: the IPv4 address decides.
NAT64 = ipaddress.ip_network("64:ff9b::/96")
CGNAT = ipaddress.ip_network("100.64.0.0/10")
METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (family, type, proto, canonname, sockaddr) as socket.getaddrinfo gives them
AddrInfo = tuple[Any, ...]


class AddressRefused(MailpipeError):
    """The account's server is not on the public internet, or not on an IMAP port; nothing
    was connected."""


@dataclass(frozen=True, kw_only=True)
class AddressPolicy:
    """Public addresses on IMAP ports (143, 993 and `extra_ports`); `allow` names hosts or
    networks (CIDR) that may be private and use any port."""

    allow: tuple[str, ...] = ()
    extra_ports: tuple[int, ...] = ()
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False)
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in self.allow:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                name = entry.strip().lower().rstrip(".")
                if not name or any(c.isspace() or c in "/," for c in name):
                    raise ValueError(
                        f"{ALLOW_ENV}: {entry!r} is neither a host name nor an address or network"
                    ) from None
                hosts.add(name)
        for port in self.extra_ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"MAILPIPE_EXTRA_IMAP_PORTS: {port} is not a port (1 to 65535)")
        object.__setattr__(self, "_hosts", frozenset(hosts))
        object.__setattr__(self, "_networks", tuple(networks))

    @property
    def ports(self) -> tuple[int, ...]:
        """The ports any public server may be reached on."""
        return tuple(sorted({*IMAP_PORTS, *self.extra_ports}))

    def addresses(self, host: str, port: int) -> list[AddrInfo]:
        """Resolve `host` and check every address it gives; connect to these and no others.

        Raises AddressRefused (a plain message, no resolved address in it: the user learns
        nothing of the operator's network), or socket.gaierror when the name does not resolve.
        """
        found: list[AddrInfo] = list(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        if host.strip().lower().rstrip(".") in self._hosts:
            return found
        for *_, sockaddr in found:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if any(address in network for network in self._allowed_networks(address)):
                continue
            if not public(address):
                raise AddressRefused(
                    f"host {host} is not on the public internet (a private, loopback or "
                    "reserved address); mailpipe does not connect there"
                )
            if port not in self.ports:
                allowed = ", ".join(str(p) for p in self.ports)
                raise AddressRefused(
                    f"port {port} is not an IMAP port (allowed: {allowed}); "
                    "mailpipe does not connect there"
                )
        return found

    def check(self, host: str, port: int) -> None:
        """Refuse an account's server when it is added; a name that does not resolve yet
        passes here (the connection checks again, whatever it resolves to then)."""
        with contextlib.suppress(socket.gaierror, UnicodeError):
            self.addresses(host, port)

    def _allowed_networks(self, address: IPAddress) -> tuple[IPNetwork, ...]:
        return tuple(n for n in self._networks if n.version == address.version)


def public(address: IPAddress) -> bool:
    """Whether an address is on the public internet: not loopback, private, link-local, shared
    (CGNAT), multicast, unspecified, reserved or a cloud metadata address, in any IPv6 form."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return public(inner)
    if address in METADATA or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv4Address) and address in CGNAT:
        return False
    return address.is_global
