"""Batches of rows as one JSON text, read by one statement with `json_each`.

The sqlite3 module lets go of the GIL for each step of a statement: each row of an
executemany, each row fetched. Taking it back waits for the event loop thread to yield it,
so at direct max the writer spent ~40 % of its time waiting (docs/benchmarks.md, fourth
round). A statement over a JSON batch is one step however many rows it has.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec


def field(index: int) -> str:
    """Item ``index`` of the JSON row in `json_each`'s ``value``, as an SQL value.
    (``json_extract`` rather than ``->>``: the operator needs SQLite 3.38, and Ubuntu
    22.04's Python 3.11 builds link 3.37.)"""
    return f"json_extract(value, '$[{index}]')"


def fields(count: int) -> str:
    return ", ".join(field(i) for i in range(count))


#: A batch of keys or rows passed as one JSON array of arrays (`as_json`), as a table whose
#: columns are ``k.c1`` to ``k.c4`` (a join on it is an index search per key).
KEYS = f"(SELECT {', '.join(f'{field(i)} AS c{i + 1}' for i in range(4))} FROM json_each(?)) AS k"


_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder(list[list[Any]]).decode


def as_json(rows: Sequence[Sequence[object]]) -> str:
    """Rows as one JSON text, for one statement to read with `json_each` (`KEYS`).
    Exact for integers and text without NUL (`pigeon.store.errors.refused_send` keeps NUL
    out of what is sent)."""
    return _encode_json(rows).decode()


def json_rows(
    conn: sqlite3.Connection, query: str, keys: Sequence[Sequence[object]]
) -> list[list[Any]]:
    """The rows of ``query`` over ``keys`` (it joins `KEYS`), a query whose one value is
    ``json_group_array(json_array(...))``: every row in one step. Integers and text only:
    SQLite writes a REAL to JSON with 15 significant digits."""
    if not keys:
        return []
    (text,) = conn.execute(query, (as_json(keys),)).fetchone()
    return _decode_json(text)
