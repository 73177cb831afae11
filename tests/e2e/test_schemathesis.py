"""Property-based contract test: the generated OpenAPI document against the real Envoy and server.

Schemathesis generates requests from openapi/payments.swagger.json (valid ones and, in negative
mode, ones that break the schema), sends them through Envoy with a real admin token, and checks
every answer: never a 5xx, a status code the operation documents, a JSON content type, and a body
that matches the documented schema for that status. A second test runs stateful scenarios over the
links Schemathesis infers from the document (the id a create returns, fed to get, confirm, cancel
and delete), so success bodies of those operations are checked too, not only their errors.

Bounded: at most MAX_EXAMPLES generated cases per operation and a few short stateful scenarios,
well under two minutes on the test machine.
"""

from __future__ import annotations

from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from tests.support.rest import Client, loopback_address
from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "openapi" / "payments.swagger.json"
DOCUMENT_3 = ROOT / "openapi" / "payments.openapi.json"  # the same routes as OpenAPI 3.0 (tools/openapi3)
MAX_EXAMPLES = 50
MAX_EXAMPLES_3 = 20  # a second reading of the same routes: fewer examples, SQLite only


def documented_status_code(ctx, response, case):
    """Stricter than status_code_conformance: every operation also documents a `default` error,
    which would make any status acceptable. Each status must be listed explicitly (2xx, the
    operation's own errors, or the 503 every operation has)."""
    if case.method.upper() != case.operation.method.upper():
        return  # a probe with another HTTP method is not this operation (not_a_server_error still applies)
    documented = set(case.operation.definition.raw["responses"]) - {"default"}
    if str(response.status_code) not in documented:
        raise AssertionError(
            f"{case.operation.label} answered {response.status_code}, which it does not document "
            f"(documents {sorted(documented)}): {response.text[:300]}"
        )


CHECKS = [not_a_server_error, status_code_conformance, documented_status_code, content_type_conformance,
          response_schema_conformance]


def load_schema(*phases: str, document: Path = DOCUMENT, max_examples: int = MAX_EXAMPLES):
    schema = schemathesis.openapi.from_path(document)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=max_examples)
    schema.config.phases.update(phases=list(phases))
    return schema


@pytest.fixture(params=["sqlite", "postgres"])
def target(request):
    """The stack on each database, and an admin token of that stack: an admin reaches every
    operation (confirm, the email filter, payments for any email), so generated requests get past
    authorization and exercise validation, storage and success paths."""
    stack = request.getfixturevalue("stack" if request.param == "sqlite" else "pg_stack")
    login = Client(stack.url).from_address(loopback_address()).post(
        "/v1/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert login.status == 200, login.text
    return stack.url, {"Authorization": f"Bearer {login.json['access_token']}"}


# Loaded from the file at import; the stack's address is given per call (ports are chosen at run time).
schema = load_schema("examples", "coverage", "fuzzing")


@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_every_answer_matches_the_document(case, target):
    url, auth_headers = target
    case.call_and_validate(base_url=url, headers=auth_headers, checks=CHECKS, timeout=15)


schema_3 = load_schema("examples", "coverage", "fuzzing", document=DOCUMENT_3, max_examples=MAX_EXAMPLES_3)


@pytest.fixture(scope="module")
def admin_headers(stack) -> dict[str, str]:
    """One admin login for every generated case (Envoy limits logins per client address)."""
    login = Client(stack.url).from_address(loopback_address()).post(
        "/v1/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert login.status == 200, login.text
    return {"Authorization": f"Bearer {login.json['access_token']}"}


@schema_3.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES_3, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_every_answer_matches_the_openapi_3_document(case, stack, admin_headers):
    case.call_and_validate(base_url=stack.url, headers=admin_headers, checks=CHECKS, timeout=15)


def test_linked_workflows_match_the_document(target):
    url, auth_headers = target
    workflow = load_schema("stateful").as_state_machine()

    class AuthenticatedWorkflow(workflow):
        def get_call_kwargs(self, case):
            return {"base_url": url, "headers": auth_headers, "timeout": 15}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS)

    AuthenticatedWorkflow.run(settings=hypothesis.settings(
        max_examples=15, stateful_step_count=6, deadline=None, database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    ))
