"""envoy/envoy.yaml itself: valid for the pinned Envoy, and the config the e2e tests run is the
same file with only its three port numbers changed."""

from __future__ import annotations

import difflib
import subprocess

import yaml

from devstack.envoyconf import CONFIG, render
from tests.support.stack import ENVOY, prepare_workdir


def test_envoy_yaml_is_valid_for_the_pinned_envoy(tmp_path, keys_dir):
    # Validation opens keys/jwks.json and gen/payments.pb relative to the working directory,
    # as Envoy does at start in every environment.
    prepare_workdir(tmp_path, keys_dir)
    out = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(CONFIG)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout + out.stderr


def test_rendered_config_differs_only_in_ports():
    original = CONFIG.read_text()
    rendered = render(original, listen_port=1111, admin_port=2222, backend_port=[3333, 3334], metrics_port=4444)
    diff = [line for line in difflib.unified_diff(original.splitlines(), rendered.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    endpoint = ["-        - endpoint:", "-            address:"]
    assert diff == [
        "-    socket_address: {address: 127.0.0.1, port_value: 9901}",
        "+    socket_address: {address: 127.0.0.1, port_value: 2222}",
        "-      socket_address: {address: 0.0.0.0, port_value: 8080}",
        "+      socket_address: {address: 0.0.0.0, port_value: 1111}",
        "-      socket_address: {address: 0.0.0.0, port_value: 9902}",
        "+      socket_address: {address: 0.0.0.0, port_value: 4444}",
        "-              socket_address: {address: 127.0.0.1, port_value: 50051}",
        "+              socket_address: {address: 127.0.0.1, port_value: 3333}",
        # The two ports with no process of the test's are not listed at all.
        "-              socket_address: {address: 127.0.0.1, port_value: 50052}",
        *endpoint, "-              socket_address: {address: 127.0.0.1, port_value: 50053}",
        *endpoint, "-              socket_address: {address: 127.0.0.1, port_value: 50054}",
        "+              socket_address: {address: 127.0.0.1, port_value: 3334}",
        # The metrics listener's way to the admin port follows it.
        "-              socket_address: {port_value: 9901, address: 127.0.0.1}",
        "+              socket_address: {port_value: 2222, address: 127.0.0.1}",
    ], "\n".join(diff)


def test_the_server_endpoints_are_one_per_process_up_to_the_settings_maximum():
    from server.infra import config

    cluster = next(c for c in yaml.safe_load(CONFIG.read_text())["static_resources"]["clusters"] if c["name"] == "payments_grpc")
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [50051 + i for i in range(config.MAX_PROCESSES)]
    for c in yaml.safe_load(CONFIG.read_text())["static_resources"]["clusters"][:5]:  # the server's: never to a dead port
        assert c["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}, c["name"]
        # Envoy's checks name themselves: the server gives them a turn of their own (admission.py).
        assert c["health_checks"][0]["grpc_health_check"] == {"initial_metadata": [
            {"header": {"key": "x-payments-client-address", "value": "envoy-health-check"}}]}, c["name"]


def test_admin_is_loopback_and_backend_is_the_sidecar():
    config = yaml.safe_load(CONFIG.read_text())
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    clusters = config["static_resources"]["clusters"]
    assert [c["name"] for c in clusters] == ["payments_grpc", "payments_auth", "payments_reflection", "payments_health",
                                             "payments_watch", "envoy_admin", "google_jwks"]
    # Google's keys, over TLS checked against the system's authorities for www.googleapis.com.
    google = clusters.pop()
    assert google["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "www.googleapis.com", "port_value": 443}
    tls = google["transport_socket"]["typed_config"]
    assert tls["sni"] == "www.googleapis.com"
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "www.googleapis.com"}}]
    admin = clusters.pop()["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert admin == config["admin"]["address"]["socket_address"]  # the metrics listener's upstream: the admin port
    for cluster in clusters:  # one server, five connection pools with their own circuit breakers
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert {e["endpoint"]["address"]["socket_address"]["address"] for e in endpoints} == {"127.0.0.1"}
        assert endpoints[0]["endpoint"]["address"]["socket_address"]["port_value"] == 50051  # the first process
        assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] <= 1024
    # The payment and login breakers are above what the server admits, so the server, which sheds
    # fairly between callers, decides whose call waits (server/edge/admission.py); one process's
    # payment lane is below the payment breaker even at the default of four processes' worth.
    from server.edge import capacity
    from server.infra.config import Settings

    by_name = {c["name"]: c["circuit_breakers"]["thresholds"][0]["max_requests"] for c in clusters}
    assert by_name["payments_grpc"] >= 4 * Settings().max_concurrent_rpcs
    assert by_name["payments_auth"] >= 4 * (Settings().auth_threads + capacity.AUTH_WAITING)
    # So are reflection's and health Check's (the server sheds the busiest address's); health Watch,
    # which one address can hold whole, is one process's count of open watches, so a process never
    # refuses a Watch Envoy let through.
    assert by_name["payments_reflection"] >= 4 * Settings().max_streams
    assert by_name["payments_health"] >= 4 * capacity.HEALTH_ADMITTED
    assert by_name["payments_watch"] == capacity.MAX_WATCHES


def test_public_and_token_streams_never_share_a_circuit_breaker():
    """Health Watch (public, held open), health Check (public, unary) and reflection (a token at
    the edge) each on a cluster of its own: a Watch hold takes neither of the others
    (tests/faults/test_watch_hold.py)."""
    config = yaml.safe_load(CONFIG.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]

    def cluster(path: str) -> str:
        route = next(r for r in routes if r["match"].get("path") == path or path.startswith(r["match"].get("prefix", "\0")))
        return route["route"]["cluster"]

    paths = {"/grpc.health.v1.Health/Watch": "payments_watch", "/grpc.health.v1.Health/Check": "payments_health",
             "/grpc.health.v1.Health/List": "payments_health",
             "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "payments_reflection",
             "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "payments_reflection",
             "/payments.v1.PaymentService/GetPayment": "payments_grpc", "/payments.v1.AuthService/Login": "payments_auth"}
    assert {path: cluster(path) for path in paths} == paths
    listener, metrics = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    assert (metrics["name"], metrics["address"]["socket_address"]["port_value"]) == ("metrics", 9902)


def _filters():
    config = yaml.safe_load(CONFIG.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f.get("typed_config", {}) for f in hcm["http_filters"]}


def test_jwt_rules_fail_closed_and_read_only_the_authorization_header():
    jwt = _filters()["envoy.filters.http.jwt_authn"]
    provider = jwt["providers"]["payments"]
    assert provider["from_headers"] == [{"name": "Authorization", "value_prefix": "Bearer "}]
    assert "from_params" not in provider and "from_cookies" not in provider
    assert provider["forward"] is True
    assert jwt["rules"][-1] == {"match": {"prefix": "/"}, "requires": {"provider_name": "payments"}}
    public = [r["match"] for r in jwt["rules"] if "requires" not in r]
    # /v1/auth/ is public at the edge (a mistyped sign-up path gets a 404, not "send a token"), but
    # logout, the one auth route that needs a token, is matched first; the server checks every
    # method it serves against its own public list as well (server/edge/auth.py).
    either = {"requires_any": {"requirements": [{"provider_name": "payments"}, {"provider_name": "google"}]}}
    assert jwt["rules"][0] == {"match": {"path": "/v1/auth/logout"}, "requires": either}
    assert public == [
        {"prefix": "/v1/auth/"},
        {"path": "/payments.v1.AuthService/Register"}, {"path": "/payments.v1.AuthService/Login"},
        {"path": "/payments.v1.AuthService/Refresh"},
        {"path": "/oauth2/token"}, {"path": "/payments.v1.TokenService/CreateToken"},
        {"prefix": "/grpc.health.v1.Health/"}, {"path": "/ready"},
    ]


def test_google_id_tokens_are_taken_only_where_service_clients_call():
    """The google provider: Google's issuer and keys, the Authorization header only, forwarded to
    the server (which checks audience and the pinned account); required-or-ours on the payment and
    webhook routes, and on the person-only ones a client's token reaches too (managing clients,
    logout), where the server answers PERSONS_ONLY as it does on its own port; everything else
    stays our tokens only."""
    jwt = _filters()["envoy.filters.http.jwt_authn"]
    google = jwt["providers"]["google"]
    assert google["issuer"] == "https://accounts.google.com"
    assert google["remote_jwks"]["http_uri"]["uri"] == "https://www.googleapis.com/oauth2/v3/certs"
    assert google["from_headers"] == [{"name": "Authorization", "value_prefix": "Bearer "}] and google["forward"] is True
    assert "audiences" not in google  # each deployment's: the server checks it
    either = {"requires_any": {"requirements": [{"provider_name": "payments"}, {"provider_name": "google"}]}}
    taking = [r["match"].get("prefix") or r["match"]["path"] for r in jwt["rules"] if r.get("requires") == either]
    assert taking == ["/v1/auth/logout", "/payments.v1.AuthService/Logout", "/v1/payments", "/payments.v1.PaymentService/",
                      "/v1/webhook", "/payments.v1.WebhookService/", "/v1/clients", "/payments.v1.ClientService/"]
    others = [r["requires"] for r in jwt["rules"] if "requires" in r and r["requires"] != either]
    assert others and all(r == {"provider_name": "payments"} for r in others)


def test_the_google_keys_stand_in_changes_only_where_envoy_fetches_them():
    from devstack.envoyconf import with_google_keys_at

    original = CONFIG.read_text()
    moved = with_google_keys_at(original, "http://127.0.0.1:4321/oauth2/v3/certs")
    diff = [line for line in difflib.unified_diff(original.splitlines(), moved.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert [line for line in diff if line[0] == "+"] == [
        "+                      uri: http://127.0.0.1:4321/oauth2/v3/certs",
        "+              socket_address: {address: 127.0.0.1, port_value: 4321}",
    ]
    from devstack.envoyconf import GOOGLE_JWKS_TLS

    assert [line for line in diff if line[0] == "-"] == [
        "-                      uri: https://www.googleapis.com/oauth2/v3/certs",
        "-              socket_address: {address: www.googleapis.com, port_value: 443}",
        *("-" + line for line in GOOGLE_JWKS_TLS.splitlines()),
    ]


def test_make_run_s_copy_differs_only_in_listening_on_loopback():
    """make run renders envoy.yaml with loopback_only (its dev admin is nobody else's business)."""
    text = CONFIG.read_text()
    ours = render(text, listen_port=8080, admin_port=9901, metrics_port=9902, backend_port=[50051 + i for i in range(4)],
                  loopback_only=True)
    launcher = (CONFIG.parents[1] / "devstack" / "__main__.py").read_text()
    assert "admin_port=9901, metrics_port=9902," in launcher and "backend_port=[50051 + i for i in range(4)], loopback_only=True" in launcher
    changed = [(a, b) for a, b in zip(text.splitlines(), ours.splitlines()) if a != b]
    assert len(text.splitlines()) == len(ours.splitlines())
    assert changed == [("      socket_address: {address: 0.0.0.0, port_value: 8080}",
                        "      socket_address: {address: 127.0.0.1, port_value: 8080}"),
                       ("      socket_address: {address: 0.0.0.0, port_value: 9902}",
                        "      socket_address: {address: 127.0.0.1, port_value: 9902}")]


def test_the_committed_variants_are_what_make_gen_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("envoy_variants", CONFIG.parents[1] / "scripts" / "envoy_variants.py")
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)
    for name, make in variants.VARIANTS.items():
        assert (CONFIG.parent / name).read_text() == make(CONFIG.read_text()), f"envoy/{name} is stale: run `make gen`"
    cloudrun = yaml.safe_load((CONFIG.parent / "envoy-cloudrun.yaml").read_text())
    cloudrun_hcm = cloudrun["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert cloudrun_hcm.pop("xff_num_trusted_hops") == 1
    assert cloudrun == yaml.safe_load(CONFIG.read_text())  # the one difference
    committed = (CONFIG.parent / "envoy-tls.yaml").read_text()
    # The only differences: TLS on the one listener, and HSTS on routed responses.
    plain, tls = yaml.safe_load(CONFIG.read_text()), yaml.safe_load(committed)
    chain = tls["static_resources"]["listeners"][0]["filter_chains"][0]
    context = chain.pop("transport_socket")["typed_config"]["common_tls_context"]
    assert context["alpn_protocols"] == ["h2", "http/1.1"]
    assert context["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    hcm = chain["filters"][0]["typed_config"]
    hsts = hcm["route_config"].pop("response_headers_to_add")
    assert hsts[0]["header"]["key"] == "strict-transport-security"
    assert tls == plain


def _overload() -> dict:
    return yaml.safe_load(CONFIG.read_text())["overload_manager"]


def test_every_tracked_stream_may_be_reset_before_new_requests_are_refused():
    """envoy/README.md: streams buffering 1 KiB or more are reset, largest first, from 30% of the
    heap; one holding an unfinished body near the 16 KiB limit (16-32 KiB) is a candidate from 54%;
    every one of them (the last of the 8 buckets) before new requests get 503, and the action
    saturates late, since a saturated action resets nothing more."""
    overload = _overload()
    actions = {a["name"].rsplit(".", 1)[1]: a["triggers"][0] for a in overload["actions"]}
    reset = actions["reset_high_memory_stream"]["scaled"]
    refuse = actions["stop_accepting_requests"]["threshold"]["value"]
    smallest = overload["buffer_factory_config"]["minimum_account_to_track_power_of_two"]
    assert smallest == 10  # 1 KiB
    assert reset["scaling_threshold"] == 0.30
    bucket_of_16k = 14 - smallest  # 16-32 KiB: the bucket 2**14 starts, counted from the smallest
    from_ = reset["scaling_threshold"] + (7 - bucket_of_16k) * (reset["saturation_threshold"] - reset["scaling_threshold"]) / 8
    assert round(from_, 3) == 0.544, from_
    every_bucket = reset["scaling_threshold"] + 7 * (reset["saturation_threshold"] - reset["scaling_threshold"]) / 8
    assert every_bucket < refuse, (every_bucket, refuse)
    assert reset["saturation_threshold"] >= refuse
    # Up to 50 resets a refresh (Envoy's own limit): 10,000 a second.
    assert overload["refresh_interval"] == "0.005s"


def test_the_http2_flood_limits_are_written_out():
    hcm = yaml.safe_load(CONFIG.read_text())["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    http2 = hcm["typed_config"]["http2_protocol_options"]
    assert {k: http2[k] for k in ("max_outbound_frames", "max_outbound_control_frames",
                                  "max_consecutive_inbound_frames_with_empty_payload",
                                  "max_inbound_priority_frames_per_stream",
                                  "max_inbound_window_update_frames_per_data_frame_sent")} == {
        "max_outbound_frames": 10000, "max_outbound_control_frames": 1000,
        "max_consecutive_inbound_frames_with_empty_payload": 1, "max_inbound_priority_frames_per_stream": 100,
        "max_inbound_window_update_frames_per_data_frame_sent": 10}
