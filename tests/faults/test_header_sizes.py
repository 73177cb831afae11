"""Request headers of every size get one answer: success up to the documented 16 KiB, a JSON 431
beyond it (REST), the same limit at Envoy and at the server, never a random 429.

grpc's default soft limit (8 KiB) refused requests between it and the hard limit at random, with
RESOURCE_EXHAUSTED, which clients read as rate limiting.
"""

from __future__ import annotations

import grpc
import yaml

from server.edge.app import HEADER_LIMIT_BYTES, MAX_METADATA_BYTES
from server.edge.pb import payments_pb2 as pb
from tests.conftest import ALICE
from devstack.envoyconf import CONFIG
from tests.faults.conftest import payment_stub

SIZES_KB = list(range(1, 65))
REPEATS = 3


def padding(kb: int) -> dict[str, str]:
    return {f"x-pad-{i}": "a" * 1000 for i in range(kb)}  # ~1 KB a header, at most 64 headers


def test_envoy_and_the_server_have_the_same_limit():
    hcm = yaml.safe_load(CONFIG.read_text())["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert hcm["typed_config"]["max_request_headers_kb"] * 1024 == HEADER_LIMIT_BYTES
    # The server's allowance: grpc's 32 bytes per header for Envoy's 100 headers, and 1 KiB of Envoy's own.
    max_count = hcm["typed_config"]["common_http_protocol_options"]["max_headers_count"]
    assert MAX_METADATA_BYTES == HEADER_LIMIT_BYTES + max_count * 32 + 1024


def test_rest_header_sizes_are_answered_deterministically(edge, token_for):
    token = token_for(ALICE)
    answers = {}
    for kb in SIZES_KB:
        got = [edge.api.get("/v1/payments", token=token, headers=padding(kb)) for _ in range(REPEATS)]
        statuses = {r.status for r in got}
        assert len(statuses) == 1, (kb, statuses)  # the same answer every time
        answers[kb] = statuses.pop()
        if answers[kb] == 431:
            code, reason, body = got[0].error()
            assert (code, reason) == (3, "HEADERS_TOO_LARGE") and "16 KiB" in body["message"]
    assert set(answers.values()) == {200, 431}, answers
    first_refused = min(kb for kb, status in answers.items() if status == 431)
    assert all(answers[kb] == 200 for kb in SIZES_KB if kb < first_refused)
    assert all(answers[kb] == 431 for kb in SIZES_KB if kb >= first_refused)
    assert first_refused * 1000 > HEADER_LIMIT_BYTES - 1500  # everything well under 16 KiB passes


def test_grpc_header_sizes_are_answered_deterministically(edge, token_for):
    md = [("authorization", f"Bearer {token_for(ALICE)}")]
    for target, limit in ((f"127.0.0.1:{edge.envoy.port}", HEADER_LIMIT_BYTES),
                          (f"127.0.0.1:{edge.server.port}", HEADER_LIMIT_BYTES)):
        channel, stub = payment_stub(target)
        with channel:
            answers = {}
            for kb in SIZES_KB[::3]:
                codes = set()
                for _ in range(REPEATS):
                    try:
                        stub.ListPayments(pb.ListPaymentsRequest(), metadata=md + list(padding(kb).items()), timeout=10)
                        codes.add("OK")
                    except grpc.RpcError as e:
                        codes.add(e.code().name)
                assert len(codes) == 1, (target, kb, codes)
                answers[kb] = codes.pop()
            assert all(code == "OK" for kb, code in answers.items() if kb * 1000 < limit - 1500), (target, answers)
            # Beyond the limit: Envoy resets the stream (INTERNAL); the server refuses the metadata.
            refused = {code for kb, code in answers.items() if kb * 1000 > limit + 4400}
            assert refused and refused <= {"INTERNAL", "RESOURCE_EXHAUSTED"}, (target, answers)
