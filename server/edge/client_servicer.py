"""The service client servicers: the token grant (TokenService) and the admins' management of
clients (ClientService), thin translations to server/domain/clients.py."""

from __future__ import annotations

import datetime as dt

from server.edge import auth
from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from server.edge.servicers import client_address, timestamp
from server.domain.clients import ClientRules, admin_only
from server.domain.errors import InvalidArgument
from server.domain.records import ClientRecord


def client_to_pb(client: ClientRecord) -> pb.Client:
    return pb.Client(id=client.id, name=client.name, permissions=client.permissions.split(),
                     secret_prefix=client.secret_prefix, created_at=timestamp(client.created_at),
                     last_used_at=timestamp(client.last_used_at), expire_time=timestamp(client.expires_at),
                     revoked_at=timestamp(client.revoked_at),
                     previous_secret_expires_at=timestamp(client.previous_secret_expires_at),
                     created_by=client.created_by)


def _with_secret(answer: tuple[ClientRecord, str]) -> pb.ClientWithSecret:
    client, secret = answer
    return pb.ClientWithSecret(client=client_to_pb(client), secret=secret)


# google.protobuf.Timestamp's own range (0001-01-01 to 9999-12-31, nanos 0-999,999,999): gRPC
# callers can send any int64/int32, which ToDatetime refuses with a ValueError (an INTERNAL).
_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799


def _time(message, field: str, name: str) -> dt.datetime | None:
    """`message.field` as an aware datetime; a value outside Timestamp's range is the caller's
    error, named `name` (the field's path in the request)."""
    if not message.HasField(field):
        return None
    value = getattr(message, field)
    if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos <= 999_999_999):
        raise InvalidArgument([(name, "must be a time between 0001-01-01 and 9999-12-31 (nanos 0-999999999)")],
                              reason="INVALID_CLIENT_REQUEST")
    return value.ToDatetime(tzinfo=dt.UTC)


class TokenServicer(pb_grpc.TokenServiceServicer):
    def __init__(self, rules: ClientRules):
        self.rules = rules

    def CreateToken(self, request, context):
        grant = self.rules.grant(grant_type=request.grant_type, client_id=request.client_id,
                                 client_secret=request.client_secret, scope=request.scope,
                                 address=client_address(context))
        return pb.Token(access_token=grant.access_token, token_type="Bearer", expires_in=grant.expires_in,
                        scope=grant.scope)


class ClientServicer(pb_grpc.ClientServiceServicer):
    def __init__(self, rules: ClientRules):
        self.rules = rules

    def CreateClient(self, request, context):
        caller, c = auth.caller(), request.client
        admin_only(caller)  # before the input is read
        return _with_secret(self.rules.create(caller, name=c.name, permissions=list(c.permissions),
                                              expires_at=_time(c, "expire_time", "client.expire_time")))

    def ListClients(self, request, context):
        rows, token = self.rules.list(auth.caller(), page_size=request.page_size, page_token=request.page_token)
        return pb.ListClientsResponse(clients=[client_to_pb(r) for r in rows], next_page_token=token)

    def GetClient(self, request, context):
        return client_to_pb(self.rules.get(auth.caller(), request.id))

    def RotateClientSecret(self, request, context):
        ttl = request.previous_secret_ttl_seconds if request.HasField("previous_secret_ttl_seconds") else None
        return _with_secret(self.rules.rotate(auth.caller(), request.id, ttl))

    def SetClientExpiry(self, request, context):
        caller = auth.caller()
        admin_only(caller)  # before the input is read
        return client_to_pb(self.rules.set_expiry(caller, request.id, _time(request, "expire_time", "expire_time")))

    def RevokeClient(self, request, context):
        return client_to_pb(self.rules.revoke(auth.caller(), request.id))
