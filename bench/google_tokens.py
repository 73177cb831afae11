"""What a Google ID token costs the server per call, against the server's own tokens in the same
run: TokenVerifier (ES256, with its cache of verified tokens) for a client-credentials token, and
EitherIssuer's Google path (RS256 by a key held in memory; with its cache of verified tokens, and
without: our verifier refuses it first, then the issuer is peeked at).
Also what choosing the verifier adds to the server's own tokens when Google is configured. The keys
come from the local stand-in (devstack/google_standin.py); no network.

    .venv/bin/python bench/google_tokens.py [--calls 3000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.infra import google_tokens, tokens  # noqa: E402
from devstack.google_standin import GoogleStandIn, ServiceAccount  # noqa: E402

AUDIENCE = "https://payments.example.com"


def per_call(fn, calls: int) -> float:
    """Microseconds a call, the best of five rounds (the machine is shared)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    calls = parser.parse_args().calls
    google = GoogleStandIn()
    shop = ServiceAccount("shopping")
    with tempfile.TemporaryDirectory() as keys:
        keys = Path(keys)
        tokens.create_key_pair(keys / "jwt-private.pem", keys / "jwks.json")
        issuer = tokens.TokenIssuer(tokens.load_private_key(keys / "jwt-private.pem"), issuer="payments",
                                    audience="payments-api", ttl_seconds=300)
        own = tokens.TokenVerifier.from_file(keys / "jwks.json", issuer="payments", audience="payments-api")
        either = google_tokens.EitherIssuer(own, google_tokens.GoogleTokenVerifier(
            google_tokens.GoogleKeys(google.certs_url), audience=AUDIENCE, accounts={shop.sub: "cli_" + "a" * 26}))
        client_token = issuer.issue_client("cli_" + "a" * 26, "payments.create")
        id_token = google.mint(shop, AUDIENCE)
        either.verify(id_token)  # the keys fetched once, as at the first call of a running server
        own_cached = per_call(lambda: own.verify(client_token), calls)
        own_through_either = per_call(lambda: either.verify(client_token), calls)
        own._verified.clear()
        own_uncached = per_call(lambda: (own._verified.clear(), own.verify(client_token)), calls // 3)
        google_cached = per_call(lambda: either.verify(id_token), calls)
        google_each = per_call(lambda: (either.google._verified.clear(), either.verify(id_token)), calls // 3)
    google.stop()
    print(f"own token, cached (the server's steady state): {own_cached:8.1f} µs")
    print(f"own token, through EitherIssuer:               {own_through_either:8.1f} µs  "
          f"({own_through_either / own_cached:.2f}x the cached verify)")
    print(f"own token, verified each time (ES256):         {own_uncached:8.1f} µs")
    print(f"Google ID token, cached (steady state):        {google_cached:8.1f} µs  "
          f"({google_cached / own_cached:.2f}x the cached own token)")
    print(f"Google ID token, verified each time (RS256):   {google_each:8.1f} µs  "
          f"({google_each / own_uncached:.2f}x an uncached own token)")


if __name__ == "__main__":
    main()
