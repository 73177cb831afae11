"""The service clients' store (server/domain/ports.py ClientStore): one row per client, each
change one statement, so two admins' changes at once each apply whole."""

from __future__ import annotations

import datetime as dt

import peewee

from server.domain.records import ClientRecord
from server.infra.storage.database import end_call
from server.infra.storage.models import ServiceClient, db

COLUMNS = tuple(getattr(ServiceClient, name) for name in ClientRecord._fields)


def _record(row) -> ClientRecord:
    return ClientRecord(*(field.python_value(value) for field, value in zip(COLUMNS, row)))


class ClientQueries:
    def insert(self, client: ClientRecord) -> None:
        ServiceClient.insert(dict(zip(ClientRecord._fields, client))).execute()

    def get(self, client_id: str) -> ClientRecord | None:
        row = ServiceClient.select(*COLUMNS).where(ServiceClient.id == client_id).tuples().first()
        return _record(row) if row is not None else None

    def page(self, *, after: tuple[dt.datetime, str] | None, limit: int) -> list[ClientRecord]:
        query = ServiceClient.select(*COLUMNS)
        if after is not None:
            at, last_id = after
            query = query.where(peewee.Tuple(ServiceClient.created_at, ServiceClient.id)
                                < peewee.Tuple(ServiceClient.created_at.db_value(at), last_id))
        rows = query.order_by(ServiceClient.created_at.desc(), ServiceClient.id.desc()).limit(limit).tuples()
        return [_record(r) for r in rows]

    def rotate(self, client_id: str, secret_hash: str, secret_prefix: str, previous_until: dt.datetime | None,
               tokens_valid_after: dt.datetime | None = None) -> bool:
        """The new secret in, the current one kept as the previous until `previous_until` (None:
        forgotten now); `tokens_valid_after` stored if given. One UPDATE: SET reads the row as it
        was, so rotations at once chain."""
        fields = dict(previous_secret_hash=ServiceClient.secret_hash if previous_until is not None else None,
                      previous_secret_expires_at=previous_until, secret_hash=secret_hash, secret_prefix=secret_prefix)
        if tokens_valid_after is not None:
            fields["tokens_valid_after"] = tokens_valid_after
        changed = (ServiceClient.update(**fields)
                   .where((ServiceClient.id == client_id) & ServiceClient.revoked_at.is_null()).execute())
        return bool(changed)

    def set_expiry(self, client_id: str, expires_at: dt.datetime | None) -> bool:
        return bool(ServiceClient.update(expires_at=expires_at)
                    .where((ServiceClient.id == client_id) & ServiceClient.revoked_at.is_null()).execute())

    def revoke(self, client_id: str, now: dt.datetime) -> bool:
        """Revoked for good, with every secret forgotten."""
        return bool(ServiceClient.update(revoked_at=now, previous_secret_hash=None, previous_secret_expires_at=None)
                    .where((ServiceClient.id == client_id) & ServiceClient.revoked_at.is_null()).execute())

    def used(self, client_id: str, now: dt.datetime) -> None:
        ServiceClient.update(last_used_at=now).where(ServiceClient.id == client_id).execute()

    def state(self, client_id: str) -> ClientRecord | None:
        """get(), for the check on every call: its connection goes back to the pool at once (the
        call may end right here, before any handler runs)."""
        try:
            return self.get(client_id)
        finally:
            end_call()

    def transaction(self):
        return db.atomic()
