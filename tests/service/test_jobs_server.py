"""The jobs seen through the gRPC API of a real server: an expired payment reads FAILED/EXPIRED, a
purged one is NOT_FOUND; and the scheduler wiring with short intervals, including a failing run
that the next tick retries and a clean stop."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

import grpc
import pytest

from server.infra import jobs
from server.edge.pb import payments_pb2 as pb
from server.infra.storage import JobRun, Payment
from tests.conftest import ADMIN_CALLER, ALICE, rich_status
from tests.support.jobs import wait_for

UTC = dt.timezone.utc


def create(stubs, auth_md, request_id=""):
    return stubs.payments.CreatePayment(
        pb.CreatePaymentRequest(payment=pb.Payment(email=ALICE.email, amount=1000, request_id=request_id)),
        metadata=auth_md(ALICE),
    )


def get(stubs, auth_md, payment_id):
    return stubs.payments.GetPayment(pb.GetPaymentRequest(id=payment_id), metadata=auth_md(ALICE))


def not_found(stubs, auth_md, payment_id) -> bool:
    try:
        get(stubs, auth_md, payment_id)
    except grpc.RpcError as e:
        code, info, _ = rich_status(e)
        return code == grpc.StatusCode.NOT_FOUND and info.reason == "PAYMENT_NOT_FOUND"
    return False


def test_api_shows_expired_and_purged_payments(running_server, stubs, auth_md):
    """Jobs run by hand with a `now` in the future, so nothing sleeps for a TTL."""
    rules, settings = running_server.rules, running_server.settings
    pending = create(stubs, auth_md)
    deleted = create(stubs, auth_md, request_id="order-7")
    stubs.payments.CancelPayment(pb.CancelPaymentRequest(id=deleted.id), metadata=auth_md(ALICE))
    stubs.payments.DeletePayment(pb.DeletePaymentRequest(id=deleted.id), metadata=auth_md(ALICE))
    later = dt.datetime.now(UTC) + dt.timedelta(seconds=settings.payment_ttl_seconds + 1)

    assert jobs.expire(rules, later, batch_size=settings.job_batch_size).rows == 1
    got = get(stubs, auth_md, pending.id)
    assert (got.status, got.failure_reason) == (pb.Payment.FAILED, pb.Payment.EXPIRED)
    assert got.updated_at.ToDatetime(UTC) == later
    with pytest.raises(grpc.RpcError) as e:
        stubs.payments.ConfirmPayment(pb.ConfirmPaymentRequest(id=pending.id), metadata=auth_md(ADMIN_CALLER))
    code, info, _ = rich_status(e.value)
    assert (code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_EXPIRED")

    # Deleted but within retention: hidden, and its request_id still refuses a second payment.
    assert not_found(stubs, auth_md, deleted.id)
    with pytest.raises(grpc.RpcError) as e:
        create(stubs, auth_md, request_id="order-7")
    assert rich_status(e.value)[1].reason == "PAYMENT_DELETED"

    after_retention = later + dt.timedelta(seconds=settings.delete_retention_seconds)
    assert jobs.purge(rules, after_retention, retention=dt.timedelta(seconds=settings.delete_retention_seconds),
                      batch_size=settings.job_batch_size).rows == 1
    assert not_found(stubs, auth_md, deleted.id)
    assert Payment.get_or_none(Payment.id == deleted.id) is None
    again = create(stubs, auth_md, request_id="order-7")  # its idempotency record went with it
    assert again.id != deleted.id and again.status == pb.Payment.PENDING


class _FailOnce:
    """Wraps PaymentRules.expire_due so the first scheduled run fails."""

    def __init__(self, real):
        self.real, self.failed = real, False

    def __call__(self, *a, **kw):
        if not self.failed:
            self.failed = True
            raise RuntimeError("database hiccup")
        return self.real(*a, **kw)


class TestScheduledInRunningServer:
    @pytest.fixture
    def settings(self, settings):
        return dataclasses.replace(settings, jobs_enabled=True, expire_interval_seconds=1, purge_interval_seconds=1,
                                   payment_ttl_seconds=1, delete_retention_seconds=0, job_batch_size=50)

    def test_jobs_expire_and_purge_on_schedule(self, running_server, stubs, auth_md, caplog):
        caplog.set_level(logging.INFO, logger="server.infra.jobs")
        rules = running_server.rules
        rules.expire_due = _FailOnce(rules.expire_due)
        pending = create(stubs, auth_md)
        doomed = create(stubs, auth_md)
        try:  # not pending any more, so the expiry job leaves it alone...
            stubs.payments.CancelPayment(pb.CancelPaymentRequest(id=doomed.id), metadata=auth_md(ALICE))
        except grpc.RpcError as e:  # ...unless a tick expired it first (its TTL is one second)
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        doomed_expired = get(stubs, auth_md, doomed.id).failure_reason == pb.Payment.EXPIRED
        stubs.payments.DeletePayment(pb.DeletePaymentRequest(id=doomed.id), metadata=auth_md(ALICE))

        expired = wait_for(lambda: (p := get(stubs, auth_md, pending.id)).status == pb.Payment.FAILED and p,
                           timeout=20, what="the expiry job to fail the payment")
        assert expired.failure_reason == pb.Payment.EXPIRED
        wait_for(lambda: Payment.get_or_none(Payment.id == doomed.id) is None, timeout=20,
                 what="the purge job to remove the deleted payment")
        assert not_found(stubs, auth_md, doomed.id)

        # The failed run was logged, the server kept serving, and a later tick did the work.
        def logged(message, job):
            return [r for r in caplog.records
                    if r.name == "server.infra.jobs" and r.getMessage() == message and r.job == job]

        # (A run logs once it has recorded itself, just after its changes are visible.)
        wait_for(lambda: sum(r.rows for r in logged("job run", "expire")) == 1 + doomed_expired
                 and sum(r.rows for r in logged("job run", "purge")) == 1, timeout=10, what="the run log lines")
        assert [r.outcome for r in logged("job failed", "expire")] == ["failed"]
        assert logged("job failed", "purge") == []
        outcomes = {(r.job, r.outcome) for r in JobRun.select()}
        assert {("expire", "failed"), ("expire", "ok"), ("purge", "ok")} <= outcomes

        scheduler = running_server.scheduler
        assert scheduler.shutdown(timeout=10)  # what App.stop does first
        assert not scheduler._scheduler.running
