"""The HTTP client of webhook deliveries: one POST, and nothing a hostile endpoint can turn against
the service.

- **Addresses checked at delivery.** The host is resolved here, every address it resolves to must
  pass server.domain.webhook_urls.address_problem, and the connection goes to the address that was
  checked (TLS still verifies the certificate for the host name): a name cannot pass the check and
  then resolve somewhere else for the connection (DNS rebinding).
- **No redirects.** http.client never follows one; a 3xx is a failed attempt, so a public URL
  cannot send the service on to a private one.
- **One deadline for the whole attempt** (`timeout`, ended within MARGIN_SECONDS of it): name
  resolution waits in a thread for what is left of it (getaddrinfo has no timeout of its own),
  connect and the TLS handshake get what is left, and a timer shuts the socket down at the deadline
  from the moment the socket exists, which wakes any connect, handshake, write or read (a receiver
  that trickles its status line a byte at a time is cut off too). The error says which phase the
  deadline met and how long the attempt really took.
- **A bounded read.** The status line and headers are all that matter; at most RESPONSE_BYTES of
  the body are read, for the attempt's error text. A Retry-After header is passed on (at most
  RETRY_AFTER_CHARS of it) for the delivery rules to weigh (server/domain/webhook_delivery.py).
- **No proxies, no environment.** http.client reads no proxy variables.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Callable

from server.domain.webhook_delivery import Attempt
from server.domain.webhook_delivery import printable
from server.domain.webhook_urls import address_problem, normal_host, port_problem

RESPONSE_BYTES = 4096
RETRY_AFTER_CHARS = 64  # an HTTP-date is 29

Resolve = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (TCP), in the resolver's order."""
    seen: list[str] = []
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if sockaddr[0] not in seen:
            seen.append(sockaddr[0])
    return seen


# Name resolution runs here, so that an attempt waits for it no longer than its deadline
# (getaddrinfo has no timeout of its own). A lookup that outlives its attempt finishes in the
# background; the pool bounds how many can.
_RESOLVERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-resolve")
# How far past its deadline an attempt may end: the timer's wake-up and the socket's close.
MARGIN_SECONDS = 0.1


class _Deadline(Exception):
    """The attempt's deadline passed (in the phase named)."""


class _Pinned(http.client.HTTPConnection):
    """A connection to one checked address, whatever the host name says, within one deadline:
    connect and the TLS handshake get what is left of it, and the socket is kept where the timer
    can cut it from the moment it exists."""

    def __init__(self, host: str, port: int, address: str, deadline: float, tls: ssl.SSLContext | None):
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.001))
        self._address, self._tls, self._deadline = address, tls, deadline
        # The socket, kept here: http.client hands it to the response and forgets it (sock = None)
        # when the answer ends the connection, and the deadline must still reach it then.
        self.raw: socket.socket | None = None
        self.cut = False

    def left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0 or self.cut:
            raise _Deadline()
        return left

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.left())
        self.raw = sock
        if self.cut:  # the timer fired while connecting, before it could reach the socket
            raise _Deadline()
        if self._tls is not None:
            sock.settimeout(self.left())
            sock = self._tls.wrap_socket(sock, server_hostname=self.host)  # the handshake
            self.raw = sock
        sock.settimeout(self.left())
        self.sock = sock


class Sender:
    """Send(url, body, headers) -> Attempt; never raises; never takes longer than its timeout
    and MARGIN_SECONDS, resolving, connecting and the TLS handshake included."""

    def __init__(self, *, timeout: float = 15.0, allow_loopback: bool = False, resolver: Resolve = resolve,
                 tls: ssl.SSLContext | None = None):
        self.timeout = timeout
        self.allow_loopback = allow_loopback
        self.resolver = resolver
        self.tls = tls or ssl.create_default_context()

    def __call__(self, url: str, body: bytes, headers: dict) -> Attempt:
        started = time.monotonic()
        deadline = started + self.timeout

        def took() -> int:
            return int((time.monotonic() - started) * 1000)

        def timed_out(phase: str) -> Attempt:
            return Attempt(0, f"timed out after {self.timeout:g} s ({phase}; the attempt took "
                              f"{time.monotonic() - started:.2f} s)", took())

        try:
            parts = urllib.parse.urlsplit(url)
            https = parts.scheme == "https"
            host, port = normal_host(parts.hostname or ""), parts.port or (443 if https else 80)
        except ValueError as e:
            return Attempt(0, f"refused: {e}", took())
        if not https and not self.allow_loopback:
            return Attempt(0, "refused: only https URLs are sent to", took())
        host = host.name  # the one reading registration checked (webhook_urls.normal_host)
        lookup = _RESOLVERS.submit(self.resolver, host, port)
        try:
            addresses = lookup.result(timeout=max(deadline - time.monotonic(), 0))
        except concurrent.futures.TimeoutError:
            lookup.cancel()
            return timed_out(f"resolving {host}")
        except (OSError, UnicodeError) as e:
            return Attempt(0, f"cannot resolve {host}: {e}", took())
        if not addresses:
            return Attempt(0, f"cannot resolve {host}", took())
        for address in addresses:
            if why := address_problem(address, allow_loopback=self.allow_loopback):
                return Attempt(0, f"refused: {host} resolves to {why}", took())
        if not https and not all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addresses):
            return Attempt(0, "refused: plain http is sent only to loopback addresses", took())
        if why := port_problem(port, addresses, allow_loopback=self.allow_loopback):
            return Attempt(0, f"refused: {why}", took())
        if time.monotonic() >= deadline:
            return timed_out(f"resolving {host}")
        connection = _Pinned(host, port, addresses[0], deadline, self.tls if https else None)
        # The whole attempt ends at the deadline: shutting the socket down wakes any blocked
        # connect, handshake, write or read (each also waits at most what is left).
        timer = threading.Timer(max(deadline - time.monotonic(), 0), self._cut, (connection,))
        timer.daemon = True
        timer.start()
        phase = "connecting"
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.connect()
            phase = "sending"
            connection.request("POST", path, body=body, headers={**headers, "Content-Length": str(len(body))})
            phase = "waiting for the answer"
            response = connection.getresponse()
            phase = "reading the answer"
            excerpt = response.read(RESPONSE_BYTES)
            status = response.status
            retry_after = printable(response.getheader("Retry-After") or "").strip()[:RETRY_AFTER_CHARS]
        except (_Deadline, OSError, http.client.HTTPException, ssl.SSLError, ValueError) as e:
            if isinstance(e, _Deadline) or connection.cut or time.monotonic() >= deadline:
                return timed_out(phase)
            return Attempt(0, f"{type(e).__name__}: {e}"[:300] or type(e).__name__, took())
        finally:
            timer.cancel()
            connection.close()
            if connection.raw is not None:
                connection.raw.close()
        if 200 <= status < 300:
            return Attempt(status, "", took())
        if 300 <= status < 400:
            return Attempt(status, f"HTTP {status}: redirects are not followed", took())
        text = printable(excerpt.decode("utf-8", "replace")).strip()
        asked = f" (Retry-After: {retry_after})" if retry_after else ""
        return Attempt(status, f"HTTP {status}{asked}" + (f": {text[:200]}" if text else ""), took(), retry_after)

    @staticmethod
    def _cut(connection: _Pinned) -> None:
        connection.cut = True
        sock = connection.raw
        if sock is not None:
            try:
                # The system call on the descriptor itself: SSLSocket.shutdown would also drop its
                # TLS state under a read in progress in another thread.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
