"""Fixtures for the fault tests: a work directory laid out like Envoy's (keys/, gen/), gRPC
helpers, an edge stack (server + the real Envoy) on free ports, and a bystander customer.
A module that raises the open-file limit does so in an autouse fixture of its own, which runs
before the edge starts."""

from __future__ import annotations

import dataclasses
import uuid

import grpc
import pytest

from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from tests.conftest import ALICE
from tests.support import attacks
from tests.support.bystander import Bystander
from tests.support.rest import Client
from tests.support.stack import Envoy, Server, prepare_workdir


@pytest.fixture
def work(tmp_path, keys_dir):
    prepare_workdir(tmp_path, keys_dir)
    return tmp_path


def payment_stub(target: str):
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.PaymentServiceStub(channel)


def create_request(email: str, request_id: str, amount: int = 1250) -> pb.CreatePaymentRequest:
    return pb.CreatePaymentRequest(payment=pb.Payment(email=email, amount=amount, currency="IDR",
                                                      request_id=request_id))


@dataclasses.dataclass
class Edge:
    server: object
    envoy: Envoy
    api: Client


@pytest.fixture(scope="module")
def edge(tmp_path_factory, keys_dir):
    """One server (SQLite) behind the real Envoy, shared by a module's tests."""
    work = tmp_path_factory.mktemp("edge")
    prepare_workdir(work, keys_dir)
    server = Server.start(work)
    try:
        envoy = Envoy.start(work, server.port)
    except BaseException:
        server.stop()
        raise
    yield Edge(server, envoy, Client(envoy.url))
    print(f"Envoy after the module's tests: {attacks.envoy_memory(envoy)}")  # while it still runs
    envoy.stop()
    server.stop()


@pytest.fixture
def bystander(edge, token_for) -> Bystander:
    """A customer of its own, from 127.0.0.1, whose calls must keep succeeding during an attack."""
    return Bystander.register(edge.api, f"127.0.0.1:{edge.envoy.port}", token_for(ALICE),
                              f"bystander-{uuid.uuid4().hex[:8]}@example.com")
