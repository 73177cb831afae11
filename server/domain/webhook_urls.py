"""Where a webhook may be sent: the URL and address rules, with no network of their own.

A webhook URL is chosen by whoever holds an admin token, and the service then connects to it from
inside the deployment: without these rules it is a way to reach what only the deployment can reach
(a database, the cloud metadata server that hands out credentials, a sidecar's admin port). So a
URL must be https and name a host whose every address is public; the addresses are checked again at
every delivery (server/infra/webhook_sender.py resolves the name, refuses any non-public answer and
connects to the address it checked), because a name that was public at registration may resolve to
10.0.0.5 later. Loopback is allowed only where a setting for local development and tests says so
(PAYMENTS_WEBHOOK_ALLOW_LOOPBACK), and then over plain http and on any port too.

**One reading of the host, here and at delivery** (`normal_host`): the URL's host is
percent-decoded, NFKC-normalised (full-width letters, digits and dots become ASCII), put through
IDNA (what socket.getaddrinfo does to a str) and lower-cased, with its trailing dot dropped; a host
whose last label is a number is an IPv4 address in any form the resolver reads as one
(socket.inet_aton, the parser getaddrinfo uses: `0177.0.0.1`, `0x7f.1`, `127.1`, `2130706433`) or
no host at all. The sender resolves and connects to exactly this name, so registration refuses
what delivery would refuse, and no spelling of a refused host passes the first check.

**Port 443 only** (the https default; `:443` may be written): the Kubernetes NetworkPolicy lets the
pods reach nothing else, and a webhook that may name any port turns the service into a probe of
other services on public hosts (SMTP, databases). With the development setting, loopback
addresses may use any port.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
import urllib.parse
from typing import NamedTuple

MAX_URL = 2048
HTTPS_PORT = 443
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits: judged by that address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Names that are never public whatever a resolver says (RFC 6761, RFC 6762, cloud metadata).
_PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".localdomain")
_PRIVATE_NAMES = {"localhost", "metadata", "metadata.google.internal"}
# Special-purpose ranges Python's ipaddress counts as global (3.11) but IANA's registries do not:
# fec0::/10, site-local (RFC 3879 deprecated it; reserved, never on the internet), and 192.0.0.0/24,
# IETF protocol assignments (RFC 6890; 192.0.0.8 is the IPv4 dummy address, and the two anycast
# services in it, .9 and .10, are no webhook receivers either).
_SPECIAL = (ipaddress.ip_network("fec0::/10"), ipaddress.ip_network("192.0.0.0/24"))
_LABELS = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", re.ASCII)
_NUMBER = re.compile(r"(0x[0-9a-f]*|[0-9]+)", re.ASCII)


class Host(NamedTuple):
    """A URL's host as the sender resolves it: `name` (ASCII, lower case, no trailing dot; an
    address's text when it is one) and the address, when the host is one in any spelling."""

    name: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None


def normal_host(host: str) -> Host:
    """The one reading of a URL's host (urlsplit's hostname) that registration checks and the
    sender connects to; ValueError (with why) when it is no host."""
    if ":" in host:  # only an IPv6 literal has one (urlsplit took the brackets off)
        return Host(host, ipaddress.ip_address(host.split("%", 1)[0]))
    try:
        text = urllib.parse.unquote(host, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{host!r} is not a host name (its percent-encoding is not UTF-8)") from None
    text = unicodedata.normalize("NFKC", text).lower()
    if any(c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text):
        raise ValueError(f"{host!r} is not a host name")
    try:
        name = text.encode("idna").decode("ascii").lower().rstrip(".") if text.strip(".") else ""
    except UnicodeError:
        raise ValueError(f"{host!r} is not a valid host name") from None
    if not _LABELS.fullmatch(name):
        raise ValueError(f"{host!r} is not a valid host name")
    if _NUMBER.fullmatch(name.rsplit(".", 1)[-1]):
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            raise ValueError(f"{host!r} is neither a host name nor an IPv4 address") from None
        return Host(str(address), address)
    return Host(name, None)


def _unwrapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address):
    """The IPv4 address an IPv6 one stands for (mapped, NAT64), else the address itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour is not None:
            return address.sixtofour
    return address


def address_problem(text: str, *, allow_loopback: bool) -> str | None:
    """Why a webhook must not be sent to this address, or None if it may."""
    try:
        address = _unwrapped(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return f"{text!r} is not an IP address"
    if address.is_loopback:
        return None if allow_loopback else f"{address} is a loopback address"
    if address.is_link_local:
        return f"{address} is a link-local address (where cloud metadata servers answer)"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return f"{address} is not a unicast address"
    if any(address in network for network in _SPECIAL if network.version == address.version):
        return f"{address} is a reserved address"
    if not address.is_global:
        return f"{address} is a private address"
    return None


def url_problem(url: str, *, allow_loopback: bool) -> str | None:
    """Why this URL cannot be a webhook endpoint, or None. The host's addresses, when it is a
    name, are the sender's to check at every delivery."""
    if not url:
        return "is required"
    if len(url) > MAX_URL:
        return f"must be at most {MAX_URL} characters"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"is not a URL ({e})"
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in ("https", "http"):
        return "must be an https URL"
    if not host:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user name or password (they would be stored and shown)"
    if parts.fragment:
        return "must not have a #fragment"
    try:
        normal = normal_host(host)
    except ValueError as e:
        return f"must name a host: {e}"
    literal, name = normal.address, normal.name
    loopback = literal is not None and _unwrapped(literal).is_loopback
    if literal is not None and (why := address_problem(str(literal), allow_loopback=allow_loopback)):
        return f"must not point at {why.split(' is ', 1)[1]} ({host})"
    if literal is None and (name in _PRIVATE_NAMES or name.endswith(_PRIVATE_SUFFIXES)):
        if not (allow_loopback and (name == "localhost" or name.endswith(".localhost"))):
            return f"must not name a local or internal host ({host})"
        loopback = True
    if literal is None and "." not in name and not loopback:
        return f"must name a fully qualified host, not {host!r}"
    if scheme == "http" and not (allow_loopback and loopback):
        return "must be an https URL"
    if (port or HTTPS_PORT) != HTTPS_PORT and not (allow_loopback and loopback):
        return f"must use port {HTTPS_PORT} (the https default), not {port}"
    return None


def port_problem(port: int, addresses: list[str], *, allow_loopback: bool) -> str | None:
    """Why the sender must not connect to this port of these addresses (the rule url_problem
    applies at registration), or None."""
    if port == HTTPS_PORT:
        return None
    if allow_loopback and all(_unwrapped(ipaddress.ip_address(a.split("%", 1)[0])).is_loopback for a in addresses):
        return None
    return f"only port {HTTPS_PORT} is sent to, not {port}"
