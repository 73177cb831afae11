"""On SQLite, payment calls take turns (server/infra/sqlite_turns.py): two at a time, while sign-up and login
never wait for a turn."""

from __future__ import annotations

import threading

import grpc
import pytest

from server.edge.pb import payments_pb2 as pb
from server.infra.sqlite_turns import TURNS


@pytest.mark.parametrize("backend", ["sqlite"])
def test_payment_calls_take_turns_and_logins_do_not_wait(running_server, stubs, auth_md, monkeypatch):
    inside, peak, lock = 0, 0, threading.Lock()
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow_get(caller, payment_id):
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        entered.release()
        release.wait(20)
        with lock:
            inside -= 1
        return type(running_server.rules).get(running_server.rules, caller, payment_id)  # the real answer

    monkeypatch.setattr(running_server.rules, "get", slow_get)
    calls = [stubs.payments.GetPayment.future(pb.GetPaymentRequest(id="pay_" + "a" * 26), metadata=auth_md(),
                                              timeout=30) for _ in range(TURNS + 2)]
    for _ in range(TURNS):
        assert entered.acquire(timeout=20), "the first calls did not start"
    assert not entered.acquire(timeout=0.5), "more calls than turns ran at once"

    # While every turn is taken, a login is answered (here: unknown user) without waiting.
    with pytest.raises(grpc.RpcError) as e:
        stubs.auth.Login(pb.LoginRequest(email="nobody@example.com", password="whatever password"), timeout=20)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    release.set()
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call.result()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert peak == TURNS
