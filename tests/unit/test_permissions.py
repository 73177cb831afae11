"""The permission table (server/domain/permissions.py): every method of the API has a line, each
line names a method that exists (or is waiting for one) and a known permission, and what needs no
token here is exactly what Envoy lets through without one."""

from __future__ import annotations

import yaml

import pytest

from server.domain import permissions
from server.domain.errors import PermissionDenied
from server.edge import auth
from server.edge.pb import payments_pb2
from tests.conftest import ROOT


def api_methods() -> set[str]:
    return {f"/{service.full_name}/{method.name}"
            for service in payments_pb2.DESCRIPTOR.services_by_name.values() for method in service.methods}


def test_every_method_of_the_api_has_a_line_in_the_table():
    missing = api_methods() - set(permissions.METHODS)
    assert not missing, f"add these to server/domain/permissions.py METHODS: {sorted(missing)}"


def test_every_line_names_a_method_of_the_api_and_a_known_requirement():
    stale = set(permissions.METHODS) - api_methods()
    assert not stale, f"no such method (renamed or removed?): {sorted(stale)}"
    known = set(permissions.PERMISSIONS) | {permissions.PUBLIC, permissions.PERSONS_ONLY}
    for method, need in permissions.METHODS.items():
        if isinstance(need, tuple):  # several permissions, all needed: at least two, each known
            assert len(set(need)) == len(need) >= 2 and set(need) <= set(permissions.PERMISSIONS), method
        else:
            assert need in known, method
    # Every permission opens at least one method.
    used = {p for m in permissions.METHODS for p in permissions.permissions_needed(m)}
    assert set(permissions.PERMISSIONS) - used == set()


def test_a_method_missing_from_the_table_is_closed_to_clients():
    assert permissions.required("/payments.v1.PaymentService/SomethingNew") == permissions.PERSONS_ONLY
    with pytest.raises(PermissionDenied) as e:
        permissions.check("/payments.v1.PaymentService/SomethingNew", frozenset(permissions.PERMISSIONS))
    assert e.value.reason == "PERSONS_ONLY"


def test_check_names_the_missing_permission():
    permissions.check("/payments.v1.PaymentService/GetPayment", frozenset({"payments.read"}))
    with pytest.raises(PermissionDenied) as e:
        permissions.check("/payments.v1.PaymentService/GetPayment", frozenset({"payments.create"}))
    assert (e.value.reason, e.value.metadata["permission"]) == ("PERMISSION_MISSING", "payments.read")


def test_a_method_needing_several_permissions_needs_each_of_them():
    events = "/payments.v1.WebhookService/ListWebhookEvents"
    permissions.check(events, frozenset({"webhooks.manage", "payments.read"}))
    for held, missing in (({"webhooks.manage"}, "payments.read"), ({"payments.read"}, "webhooks.manage"),
                          (set(), "webhooks.manage")):
        with pytest.raises(PermissionDenied) as e:
            permissions.check(events, frozenset(held))
        assert (e.value.reason, e.value.metadata["permission"]) == ("PERMISSION_MISSING", missing)


def test_reading_webhook_events_needs_payments_read_since_an_event_carries_the_payment():
    for method in ("ListWebhookEvents", "GetWebhookEvent", "RedeliverWebhookEvent"):
        assert permissions.permissions_needed(f"/payments.v1.WebhookService/{method}") \
            == ("webhooks.manage", "payments.read")


def test_what_needs_no_token_is_what_envoy_lets_through_without_one():
    public = {m for m in api_methods() if permissions.is_public(m)}
    assert public == auth.PUBLIC_METHODS == {"/payments.v1.AuthService/Register", "/payments.v1.AuthService/Login",
                                             "/payments.v1.AuthService/Refresh",
                                             "/payments.v1.TokenService/CreateToken"}
    config = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    [jwt_filter] = [f for f in config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                    ["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.jwt_authn"]
    open_paths = set()
    for rule in jwt_filter["typed_config"]["rules"]:
        if "requires" not in rule and "path" in rule["match"]:
            open_paths.add(rule["match"]["path"])
        if rule["match"].get("path") in public or rule["match"].get("path") == "/oauth2/token":
            assert "requires" not in rule
    grpc_open = {p for p in open_paths if p.startswith("/payments.v1.")}
    assert grpc_open == public
    assert "/oauth2/token" in open_paths
