"""Database rows to store records, and packaged migrations: shared by every SQL store.

A row is anything indexable in the column order the stores select (an sqlite3 tuple or an
asyncpg Record).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar, cast

import msgspec

from pigeon.store.models import (
    Conversation,
    ConversationKind,
    Device,
    InboxEntry,
    Member,
    Message,
    ReceiptState,
    Role,
    User,
)

Row = Sequence[Any]
T = TypeVar("T")


def maybe(convert: Callable[[Row], T], row: Row | None) -> T | None:
    return None if row is None else convert(row)


def user(row: Row) -> User:
    return User(int(row[0]), str(row[1]), str(row[2]), float(row[3]))


def device(row: Row) -> Device:
    return Device(
        id=int(row[0]),
        user_id=int(row[1]),
        name=str(row[2]),
        created_at=float(row[3]),
        revoked=row[4] is not None,
        cursor=int(row[5]),
    )


def member(row: Row) -> Member:
    return Member(int(row[0]), cast(Role, row[1]), float(row[2]), int(row[3]), int(row[4]))


def conversation(row: Row, members: tuple[Member, ...]) -> Conversation:
    kind = cast(ConversationKind, row[1])
    return Conversation(int(row[0]), kind, str(row[2]), float(row[3]), int(row[4]), members)


def message(row: Row) -> Message:
    return Message(
        conv_id=int(row[0]),
        seq=int(row[1]),
        sender_id=int(row[2]),
        sender_device=int(row[3]),
        client_id=str(row[4]),
        kind=str(row[5]),
        body=str(row[6]),
        ts=float(row[7]),
    )


# msgspec: json.dumps(dataclasses.asdict(...)) took ~16 us a receipt and json.loads ~5 on
# this machine; these take ~0.5. Same text: the fields in order, no spaces.
_encode_receipt = msgspec.json.Encoder().encode
_decode_receipt = msgspec.json.Decoder(ReceiptState).decode


def receipt_json(state: ReceiptState) -> str:
    return _encode_receipt(state).decode()


def inbox_entry(row: Row) -> InboxEntry:
    """(user_id, inbox_seq, conv_id, ts, receipt JSON, then the message's columns or NULLs)."""
    user_id, inbox_seq, conv_id, ts, receipt = row[:5]
    msg = None if row[5] is None else message(row[5:])
    state = None if receipt is None else _decode_receipt(receipt)
    return InboxEntry(
        int(user_id), int(inbox_seq), int(conv_id), float(ts), message=msg, receipt=state
    )


def packaged_migrations(package: str) -> list[tuple[int, str, str]]:
    """(number, file name, SQL) of every ``NNNN_name.sql`` in ``package``, in order."""
    found = []
    for entry in resources.files(package).iterdir():
        name = entry.name
        if name.endswith(".sql"):
            found.append((int(name.split("_", 1)[0]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)
