"""Where a webhook may be sent: the URL and address rules, with no network of their own.

A webhook URL is chosen by whoever holds an admin token, and the service then connects to it from
inside the deployment: without these rules it is a way to reach what only the deployment can reach
(a database, the cloud metadata server that hands out credentials, a sidecar's admin port). So a
URL must be https and name a host whose every address is public; the addresses are checked again at
every delivery (server/infra/webhook_sender.py resolves the name, refuses any non-public answer and
connects to the address it checked), because a name that was public at registration may resolve to
10.0.0.5 later. Loopback is allowed only where a setting for local development and tests says so
(PAYMENTS_WEBHOOK_ALLOW_LOOPBACK), and then over plain http too.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

MAX_URL = 2048
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits: judged by that address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Names that are never public whatever a resolver says (RFC 6761, RFC 6762, cloud metadata).
_PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".localdomain")
_PRIVATE_NAMES = {"localhost", "metadata", "metadata.google.internal"}


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
    if port == 0:
        return "must not name port 0"
    try:
        literal = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        literal = None
    loopback = literal is not None and _unwrapped(literal).is_loopback
    if literal is not None and (why := address_problem(host, allow_loopback=allow_loopback)):
        return f"must not point at {why.split(' is ', 1)[1]} ({host})"
    name = host.rstrip(".").lower()
    if literal is None and (name in _PRIVATE_NAMES or name.endswith(_PRIVATE_SUFFIXES)):
        if not (allow_loopback and (name == "localhost" or name.endswith(".localhost"))):
            return f"must not name a local or internal host ({host})"
        loopback = True
    if literal is None and "." not in name and not loopback:
        return f"must name a fully qualified host, not {host!r}"
    if scheme == "http" and not (allow_loopback and loopback):
        return "must be an https URL"
    return None
