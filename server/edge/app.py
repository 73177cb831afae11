"""Assembling the server: storage, rules, interceptors, servicers, health, reflection, jobs,
and a graceful stop."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from server.edge import admission, capacity
from server.infra import clock as clocks
from server.infra import google_tokens, metrics, passwords, sqlite_turns, storage, tokens, tracing
from server.domain.accounts import Accounts
from server.domain.errors import FailedPrecondition
from server.edge.health import HealthServicer
from server.edge.interceptor import CallInterceptor
from server.infra.config import Settings
from server.domain.paging import PageTokens
from server.domain.payments import PaymentRules
from server.domain.refunds import RefundRules
from server.domain.sessions import SessionCheck, Sessions
from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from server.edge.reflection_pool import pool_for
from server.edge.servicers import AuthServicer, PaymentServicer
from server.edge.webhook_body import event_body
from server.edge.webhook_servicer import WebhookServicer
from server.edge.client_servicer import ClientServicer, TokenServicer
from server.domain.clients import ClientCheck, ClientRules
from server.domain.webhook_delivery import Dispatcher, RetryPolicy
from server.domain.webhooks import WebhookRules
from server.infra.webhook_sender import Sender

log = logging.getLogger("server")

# Request headers: one limit, 16 KiB of names and values, here and at Envoy (max_request_headers_kb
# in envoy/envoy.yaml). grpc counts 32 bytes more per header than Envoy does, and Envoy adds a few
# headers of its own (x-forwarded-for, x-request-id, ...): the server allows for both (up to
# Envoy's 100 headers), so whatever Envoy admits passes, and a client on this port directly gets
# the same limit. Soft and hard limit are equal: grpc refuses requests between them at random.
HEADER_LIMIT_BYTES = 16 * 1024
MAX_METADATA_BYTES = HEADER_LIMIT_BYTES + 100 * 32 + 1024

# HTTP/2 frames that open nothing but cost the server work, from a client on this port (the pod's
# Envoy, or something on the node). grpc's own ping policy, written out so a change is seen:
# a PING within 5 minutes of the last with nothing sent since is a strike, and the third ends
# the connection (GOAWAY ENHANCE_YOUR_CALM); Envoy sends the server no keepalive pings. A client
# that gets a call answered between its pings is forgiven its strikes, so this bounds a bare
# flood, not one mixed with calls (envoy/README.md, "What is still open").
# Streams a connection may have open. Without a limit, rapid reset on this port (about 50,000
# streams opened and reset in 8 s, tests/faults/test_control_frames.py) left the server working
# through cancelled calls, Envoy's health checks of it missed, and /ready and every call through
# Envoy were 503 for seconds. grpc counts a reset stream until the server is done with it, so the
# limit bounds what one connection's rapid reset leaves waiting (below). At 4,096, four
# connections' rapid reset of GetPayment here failed 7 of 54 bystander steps and took the
# server's RSS to 415 MB; at 1,024, none failed and RSS was 242 MB (eight connections: none
# failed, 337 MB). Envoy's payment breaker puts at most 1,024 calls on its connections to the
# server, and it opens another connection when one is full. (256 and 1,024 once refused Envoy's
# streams under one customer's load; calls were then held 5 s after they ended, see
# server/edge/capacity.py Deadlines. Since, 300 concurrent calls of one customer,
# tests/faults/test_noisy_customer.py, and make bench at 64 concurrent met no refusal.)
#
# Calls a method may have waiting for the application before grpc sheds new ones (at random past
# the first number, all past the second). A stream reset by its client still waits there until
# the application takes it, so grpc's defaults (1,000 and 3,000) let one connection's rapid reset
# of one method (4,096 streams at a time then) end every other client's calls on that method with
# CANCELLED at once, for seconds, through Envoy too (grpc 1.85's server.cc, RealRequestMatcher::
# MatchOrQueue, pending_backlog_protector_). Set at eight connections' streams. Envoy's breakers
# do not bound this queue (a stream Envoy reset leaves its breaker at once, and still waits here);
# its premature-reset limit closes a connection that floods so. The lanes' own bounds
# (server/edge/capacity.py) are what refuse work the server cannot do.
HTTP2_FLOOD_LIMITS = [
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.http2.min_ping_interval_without_data_ms", 300_000),
    ("grpc.max_concurrent_streams", 1024),
    ("grpc.server.max_pending_requests", 8192),
    ("grpc.server.max_pending_requests_hard_limit", 16384),
]

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["PaymentService"].full_name,
    pb.DESCRIPTOR.services_by_name["AuthService"].full_name,
    pb.DESCRIPTOR.services_by_name["WebhookService"].full_name,
    pb.DESCRIPTOR.services_by_name["TokenService"].full_name,
    pb.DESCRIPTOR.services_by_name["ClientService"].full_name,
)


@dataclasses.dataclass
class App:
    settings: Settings
    server: grpc.Server
    health: HealthServicer
    port: int
    rules: PaymentRules
    lanes: capacity.Lanes | None = None
    scheduler: object | None = None
    _stopped: threading.Event = dataclasses.field(default_factory=threading.Event)

    def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING first (so probes and Envoy stop sending), then let in-flight
        calls finish within the grace period."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("shutting down", extra={"grace_seconds": grace})
        self.health.enter_graceful_shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown(timeout=grace)  # running jobs stop after their current batch
        self.server.stop(grace).wait()
        if self.lanes is not None:
            self.lanes.shutdown()
        if storage.db.obj is not None:
            # Every connection of the pool, not only this thread's: the worker threads' went back
            # to the pool idle, and a server stopped inside a longer-lived process (the tests)
            # left them open on PostgreSQL, which ran out of connection slots.
            close_all = getattr(storage.db.obj, "close_all", None)
            if close_all is not None:
                close_all()
            elif not storage.db.is_closed():
                storage.db.close()
        log.info("stopped")


def ensure_admin(accounts: Accounts, email: str, password: str) -> None:
    """The admin PAYMENTS_ADMIN_EMAIL names, created if missing. Never a customer made admin: anyone
    can register an email before the operator uses it, so that is logged as an ERROR and the
    account stays a customer (`python -m server.cli create-admin --promote-existing` does it on
    purpose). The server starts either way."""
    try:
        accounts.ensure_admin(email, password)
    except FailedPrecondition as e:
        log.error("PAYMENTS_ADMIN_EMAIL is an existing customer account: it stays a customer, and there is no "
                  "admin of that email. If that account is yours, promote it with `python -m server.cli "
                  "create-admin --promote-existing`; else choose another email",
                  extra={"email": email, "reason": e.reason})
        return
    log.info("admin account ensured", extra={"email": email})


def build(settings: Settings) -> App:
    """Create and start a server for these settings; the caller owns stop()."""
    tracing.configure(settings)
    database = storage.open_database(settings)
    tracing.trace_queries(database, "postgresql" if storage.is_postgres(database) else "sqlite")
    # One clock for every rule and job, which replicas share: the database's time (clock.py).
    clock = clocks.for_database(database)
    verifier = google_tokens.EitherIssuer.from_settings(
        tokens.TokenVerifier.from_file(settings.jwks_file, issuer=settings.jwt_issuer, audience=settings.jwt_audience),
        settings)
    issuer = tokens.TokenIssuer.from_settings(settings)
    session_store = storage.SessionQueries()
    sessions = Sessions(settings.refresh_ttl_seconds, clock, store=session_store)
    accounts = Accounts(issuer, clock, sessions=sessions, store=storage.AccountQueries(),
                        passwords=passwords.RememberingPasswords(passwords.Argon2Passwords()))
    if settings.admin_email and settings.admin_password:
        ensure_admin(accounts, settings.admin_email, settings.admin_password)
    page_tokens = PageTokens(settings.page_token_secret, settings.page_token_ttl_seconds)
    webhook_queries = storage.WebhookQueries()
    rules = PaymentRules(
        page_tokens=page_tokens,
        payment_ttl=dt.timedelta(seconds=settings.payment_ttl_seconds),
        queries=storage.PaymentQueries(),
        clock=clock,
        observe=metrics.payment_event,
    )
    refund_rules = RefundRules(page_tokens=page_tokens, queries=rules.queries, clock=clock, observe=metrics.payment_event)
    webhook_rules = WebhookRules(queries=webhook_queries, page_tokens=page_tokens,
                                 allow_loopback=settings.webhook_allow_loopback, clock=clock,
                                 max_endpoints=settings.webhook_max_endpoints)
    client_queries = storage.ClientQueries()
    client_rules = ClientRules(store=client_queries, clock=clock, page_tokens=page_tokens,
                               issue=issuer.issue_client)
    if not settings.page_token_secret:
        log.warning("PAYMENTS_PAGE_TOKEN_SECRET is not set: page tokens work only within this process")

    lanes = capacity.Lanes.create(worker_threads=settings.worker_threads,
                                  max_concurrent_rpcs=settings.max_concurrent_rpcs,
                                  auth_threads=settings.auth_threads, max_streams=settings.max_streams,
                                  stream_max_seconds=settings.stream_max_seconds,
                                  request_seconds=settings.request_seconds)
    # A full auth lane sheds first the calls of the client whose logins and token requests fail
    # most: hundreds of addresses, each sending no faster than a stranger, cannot be told from the
    # stranger by their rate, but can by their failures (tests/faults/test_login_flood.py).
    def failures(key: str) -> int:
        client = admission.client_of(key)
        return accounts.throttle.failures(client) + client_rules.throttle.failures(client)

    lanes.auth.penalty = failures
    server = grpc.server(
        lanes.payments,
        interceptors=[CallInterceptor(verifier, None if storage.is_postgres(database) else sqlite_turns.Turns(), lanes,
                                      SessionCheck(settings.revocation_check_seconds, wall_clock=clock,
                                                   store=session_store),
                                      ClientCheck(client_queries, settings.revocation_check_seconds, wall_clock=clock))],
        # The lanes bound each kind of call; grpc's own cap only backs them up.
        maximum_concurrent_rpcs=lanes.total + 64,
        options=[
            ("grpc.so_reuseport", 0),
            # One limit for request headers, with no band in between: grpc's default soft limit
            # (8 KiB) refused requests between it and the hard limit at random.
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            *HTTP2_FLOOD_LIMITS,
        ],
    )
    pb_grpc.add_PaymentServiceServicer_to_server(PaymentServicer(rules, refund_rules), server)
    pb_grpc.add_AuthServiceServicer_to_server(AuthServicer(accounts), server)
    pb_grpc.add_WebhookServiceServicer_to_server(WebhookServicer(webhook_rules), server)
    pb_grpc.add_TokenServiceServicer_to_server(TokenServicer(client_rules), server)
    pb_grpc.add_ClientServiceServicer_to_server(ClientServicer(client_rules), server)
    health_servicer = HealthServicer(experimental_non_blocking=True, experimental_thread_pool=lanes.health)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), server,
        pool=pool_for(pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR))
    port = server.add_insecure_port(settings.listen_addr)
    if port == 0:
        raise RuntimeError(f"cannot listen on {settings.listen_addr}")
    server.start()

    scheduler = None
    if settings.jobs_enabled:
        from server.infra import jobs

        dispatcher = Dispatcher(
            queries=webhook_queries,
            send=Sender(timeout=settings.webhook_timeout_seconds, allow_loopback=settings.webhook_allow_loopback),
            render=event_body,
            concurrency=settings.webhook_concurrency,
            policy=RetryPolicy(settings.webhook_retry_base_seconds, settings.webhook_retry_max_delay_seconds,
                               settings.webhook_retry_window_seconds),
            # A run's leases outlast it (its budget, then one attempt's timeout twice over): a lease
            # runs out only when the run that took it died.
            lease_seconds=jobs.run_budget(settings.webhook_interval_seconds, jobs.WEBHOOK_BUDGET_FRACTION)
            + 2 * settings.webhook_timeout_seconds,
            observe=metrics.webhook_attempt,
            release_connection=storage.end_call,
            clock=clock)
        scheduler = jobs.start(settings, rules, dispatcher)

    for name in ("",) + SERVICE_NAMES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("listening", extra={"addr": settings.listen_addr, "port": port,
                                 "database": "postgresql" if storage.is_postgres(database) else "sqlite"})
    return App(settings=settings, server=server, health=health_servicer, port=port, rules=rules, lanes=lanes,
               scheduler=scheduler)
