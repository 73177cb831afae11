"""Text that no field of any request accepts, refused before any rule or query sees it.

Every string field of every request, at any depth, is checked the same way, so a new RPC or a
new field is covered without anyone remembering to: no control characters (C0, DEL, C1: a NUL
is an error in PostgreSQL's driver and a silent truncation in others; line breaks in a field
the API stores split log lines and CSV exports) and nothing longer than MAX_TEXT characters
(the longest field any rule accepts is shorter). The rules then apply each field's own
pattern and length (server/domain/payments.py, server/domain/accounts.py, server/infra/passwords.py).

Beside the control characters, the two Unicode line breaks (U+2028 LINE SEPARATOR, U+2029
PARAGRAPH SEPARATOR: JavaScript and many log viewers break lines there) and the bidirectional
embedding, override and isolate controls (U+202A-U+202E, U+2066-U+2069: "Trojan Source", they
make a stored value display in another order than it reads, in logs, admin screens and
receipts). Other format characters stay allowed: the zero-width joiner builds emoji, the
left-to-right and right-to-left marks only place punctuation in right-to-left text.
"""

from __future__ import annotations

import re

from google.protobuf.descriptor import FieldDescriptor

from server.domain import errors

MAX_TEXT = 2048
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_STRING, _MESSAGE = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE


def _problem(value: str) -> str | None:
    if len(value) > MAX_TEXT:
        return f"must be at most {MAX_TEXT} characters"
    if value.isprintable():  # C code, and true for nearly every real value: no control character
        return None
    if (bad := _CONTROL.search(value)) is not None:
        return ("must not contain control characters, line separators or bidirectional overrides "
                f"(found U+{ord(bad.group()):04X})")
    return None


def _violations(message, prefix: str, out: list) -> None:
    for field, value in message.ListFields():  # only fields that are set: cheap for small requests
        name = prefix + field.name
        if field.type == _STRING:
            for item in (value if field.is_repeated else (value,)):
                if (why := _problem(item)) is not None:
                    out.append((name, why))
        elif field.type == _MESSAGE:
            if field.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    if isinstance(key, str) and (why := _problem(key)) is not None:
                        out.append((f"{name}[key]", why))
                    if isinstance(item, str):
                        if (why := _problem(item)) is not None:
                            out.append((f"{name}[{key!r}]", why))
                    elif hasattr(item, "ListFields"):
                        _violations(item, f"{name}.", out)
            elif field.is_repeated:
                for i, item in enumerate(value):
                    _violations(item, f"{name}[{i}].", out)
            else:
                _violations(value, f"{name}.", out)


def first_problem(message) -> errors.InvalidArgument | None:
    """INVALID_ARGUMENT naming every string field that holds text no field accepts, or None."""
    if not hasattr(message, "ListFields"):
        return None
    out: list[tuple[str, str]] = []
    _violations(message, "", out)
    return errors.InvalidArgument(out, reason="INVALID_TEXT") if out else None
