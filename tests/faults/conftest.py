"""Fixtures for the fault tests: a work directory laid out like Envoy's (keys/, gen/), gRPC
helpers, and an edge stack (server + the real Envoy) on free ports."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
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
    envoy.stop()
    server.stop()
