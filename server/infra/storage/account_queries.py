"""The account and session queries, by name: what the account and session rules
(server/domain/accounts.py, sessions.py) ask of the database, as records, never peewee models."""

from __future__ import annotations

import datetime as dt
from typing import Sequence

import peewee

from server.domain.records import AccountRecord, DuplicateEmail, RefreshView, SessionState
from server.infra.storage import database
from server.infra.storage.fastpath import among
from server.infra.storage.models import RefreshToken, Session, User, db

_ACCOUNT_COLUMNS = (User.id, User.email, User.password_hash, User.role, User.created_at, User.disabled_at)


def _account(row) -> AccountRecord | None:
    return AccountRecord(*row) if row is not None else None


class AccountQueries:
    def write_transaction(self):
        return database.write_transaction()

    def by_email(self, email: str) -> AccountRecord | None:
        return _account(User.select(*_ACCOUNT_COLUMNS).where(User.email == email).tuples().first())

    def by_id(self, user_id: str) -> AccountRecord | None:
        return _account(User.select(*_ACCOUNT_COLUMNS).where(User.id == user_id).tuples().first())

    def insert(self, account: AccountRecord) -> None:
        user = User(**account._asdict())
        try:
            with db.atomic():
                user.save(force_insert=True)
        except peewee.IntegrityError:
            raise DuplicateEmail(account.email) from None

    def update(self, user_id: str, **columns) -> None:
        User.update(**columns).where(User.id == user_id).execute()


_ENDED_KEYS = {"revoked": Session.revoked_at, "expired": Session.expires_at}


class SessionQueries:
    errors = (peewee.PeeweeException,)

    def transaction(self):
        return db.atomic()

    def write_transaction(self):
        return database.write_transaction()

    def start(self, session_id: str, user_id: str, role: str, now: dt.datetime, expires_at: dt.datetime,
              token_hash: str) -> None:
        with db.atomic():
            Session.create(id=session_id, user_id=user_id, role=role, created_at=now, expires_at=expires_at)
            RefreshToken.create(hash=token_hash, session_id=session_id, issued_at=now)

    def token_known(self, token_hash: str) -> bool:
        return RefreshToken.select(RefreshToken.hash).where(RefreshToken.hash == token_hash).exists()

    def token_unused(self, token_hash: str) -> bool:
        return (RefreshToken.select(RefreshToken.hash)
                .where((RefreshToken.hash == token_hash) & RefreshToken.used_at.is_null()).exists())

    def spend(self, token_hash: str, now: dt.datetime) -> bool:
        return bool(RefreshToken.update(used_at=now)
                    .where((RefreshToken.hash == token_hash) & RefreshToken.used_at.is_null()).execute())

    def refresh_view(self, token_hash: str) -> RefreshView | None:
        row = (RefreshToken
               .select(RefreshToken.session_id, RefreshToken.used_at, Session.role, Session.expires_at,
                       Session.revoked_at, User.id, User.email, User.role, User.disabled_at)
               .join(Session, on=(Session.id == RefreshToken.session_id))
               .join(User, on=(User.id == Session.user_id))
               .where(RefreshToken.hash == token_hash).tuples().first())
        if row is None:
            return None
        view = RefreshView(*row)
        return view._replace(used_at=RefreshToken.used_at.python_value(view.used_at),
                             expires_at=Session.expires_at.python_value(view.expires_at))

    def add_token(self, token_hash: str, session_id: str, now: dt.datetime) -> None:
        RefreshToken.create(hash=token_hash, session_id=session_id, issued_at=now)

    def revoke(self, session_id: str, why: str, now: dt.datetime) -> bool:
        return bool(Session.update(revoked_at=now, revoke_reason=why)
                    .where((Session.id == session_id) & Session.revoked_at.is_null()).execute())

    def revoke_account(self, user_id: str, why: str, now: dt.datetime) -> int:
        return (Session.update(revoked_at=now, revoke_reason=why)
                .where((Session.user_id == user_id) & Session.revoked_at.is_null()).execute())

    def state(self, session_id: str) -> SessionState | None:
        row = (Session.select(Session.user_id, Session.role, Session.revoked_at, Session.expires_at, User.role,
                              User.disabled_at)
               .join(User, on=(User.id == Session.user_id)).where(Session.id == session_id).tuples().first())
        if row is None:
            return None
        state = SessionState(*row)
        return state._replace(expires_at=Session.expires_at.python_value(state.expires_at))

    def ended(self, kind: str, before: dt.datetime, after: tuple | None, limit: int) -> list[tuple[object, str]]:
        key = _ENDED_KEYS[kind]
        query = Session.select(Session.id, key).where(key.is_null(False) & (key < before))
        if after is not None:
            last_key, last_id = after
            query = query.where(peewee.Tuple(key, Session.id) > peewee.Tuple(key.db_value(last_key), last_id))
        return [(k, sid) for sid, k in query.order_by(key, Session.id).limit(limit).tuples()]

    def token_hashes(self, session_ids: Sequence[str], limit: int) -> list[str]:
        return [h for (h,) in RefreshToken.select(RefreshToken.hash)
                .where(among(RefreshToken.session_id, list(session_ids))).limit(limit).tuples()]

    def delete_tokens(self, token_hashes: Sequence[str]) -> None:
        RefreshToken.delete().where(among(RefreshToken.hash, list(token_hashes))).execute()

    def delete_sessions(self, session_ids: Sequence[str]) -> int:
        return Session.delete().where(among(Session.id, list(session_ids))).execute()

    def release(self) -> None:
        database.end_call()
