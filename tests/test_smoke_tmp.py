from server.pb import payments_pb2 as pb
from tests.conftest import ALICE, rich_status
import grpc, pytest

def test_create_get(stubs, auth_md):
    p = stubs.payments.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email="alice@example.com", amount=1000)), metadata=auth_md(ALICE))
    assert p.status == pb.Payment.PENDING and p.currency == "IDR"
    got = stubs.payments.GetPayment(pb.GetPaymentRequest(id=p.id), metadata=auth_md(ALICE))
    assert got == p
    with pytest.raises(grpc.RpcError) as e:
        stubs.payments.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email="x", amount=-1)), metadata=auth_md(ALICE))
    print(rich_status(e.value))
    with pytest.raises(grpc.RpcError) as e:
        stubs.payments.GetPayment(pb.GetPaymentRequest(id=p.id))
    print(rich_status(e.value))
