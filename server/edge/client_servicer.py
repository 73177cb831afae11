"""The service client servicers: the token grant (TokenService) and the admins' management of
clients (ClientService), thin translations to server/domain/clients.py."""

from __future__ import annotations

import datetime as dt

from server.edge import auth
from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from server.edge.servicers import client_address, timestamp
from server.domain.clients import ClientRules
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


def _time(message, field: str) -> dt.datetime | None:
    return getattr(message, field).ToDatetime(tzinfo=dt.UTC) if message.HasField(field) else None


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
        c = request.client
        return _with_secret(self.rules.create(auth.caller(), name=c.name, permissions=list(c.permissions),
                                              expires_at=_time(c, "expire_time")))

    def ListClients(self, request, context):
        rows, token = self.rules.list(auth.caller(), page_size=request.page_size, page_token=request.page_token)
        return pb.ListClientsResponse(clients=[client_to_pb(r) for r in rows], next_page_token=token)

    def GetClient(self, request, context):
        return client_to_pb(self.rules.get(auth.caller(), request.id))

    def RotateClientSecret(self, request, context):
        ttl = request.previous_secret_ttl_seconds if request.HasField("previous_secret_ttl_seconds") else None
        return _with_secret(self.rules.rotate(auth.caller(), request.id, ttl))

    def SetClientExpiry(self, request, context):
        return client_to_pb(self.rules.set_expiry(auth.caller(), request.id, _time(request, "expire_time")))

    def RevokeClient(self, request, context):
        return client_to_pb(self.rules.revoke(auth.caller(), request.id))
