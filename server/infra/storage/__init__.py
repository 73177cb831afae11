"""Storage: the models (models.py), the database they live in (database.py), the fast path
that skips peewee's per-call overhead (fastpath.py), the records reads return (records.py), and
the named queries the rules use (repository.py for payments, webhook_queries.py for webhooks,
account_queries.py for accounts and sessions).
Everything else imports from here.
"""

from server.infra.storage.database import (DATA_ERRORS, OUTAGE_ERRORS, backfill_owners, end_call, give_back_space,
                                           is_busy, is_postgres, make_database, migrate_schema, open_database,
                                           release_connection, write_transaction)
from server.infra.storage.fastpath import Prepared, PreparedInsert, among, row_check
from server.domain.records import DuplicateRequest, EventRecord, PaymentRecord
from server.infra.storage.repository import PaymentQueries
from server.infra.storage.models import (MODELS, BaseModel, JobRun, Payment, PaymentEvent, RefreshToken, ServiceClient,
                                         Session, User, UTCDateTimeField, db)
from server.infra.storage.webhook_queries import WebhookQueries
from server.infra.storage.client_queries import ClientQueries
from server.infra.storage.account_queries import AccountQueries, SessionQueries
from server.domain import ports as _ports
from server.infra import passwords as _passwords

# The rules' defaults where their maker hands no adapter (server/domain/ports.py): a script or test
# that opened the database uses Accounts and Sessions as they are. The server's assembly hands its own.
_ports.install_default(_ports.AccountStore, AccountQueries())
_ports.install_default(_ports.SessionStore, SessionQueries())
_ports.install_default(_ports.PasswordHasher, _passwords.Argon2Passwords())

__all__ = [
    "DATA_ERRORS", "OUTAGE_ERRORS", "backfill_owners", "end_call", "give_back_space", "is_busy", "is_postgres",
    "make_database", "migrate_schema", "open_database", "release_connection", "write_transaction",
    "Prepared", "PreparedInsert", "among", "row_check",
    "DuplicateRequest", "EventRecord", "PaymentQueries", "PaymentRecord",
    "MODELS", "BaseModel", "JobRun", "Payment", "PaymentEvent", "RefreshToken", "ServiceClient", "Session", "User",
    "UTCDateTimeField", "db", "WebhookQueries", "ClientQueries", "AccountQueries", "SessionQueries",
]
