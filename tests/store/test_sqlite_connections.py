"""How the embedded store sets up its SQLite connections."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pigeon.store.sqlite import SqliteStore

MEMORY = 2  # PRAGMA temp_store: 0 default (a file), 1 file, 2 memory


async def test_temporary_tables_stay_in_memory(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "p.db")
    await store.open()
    try:

        def temp_store(conn: sqlite3.Connection) -> int:
            return int(conn.execute("PRAGMA temp_store").fetchone()[0])

        assert await store._writer.write(temp_store) == MEMORY
        assert await store._read(temp_store) == MEMORY
    finally:
        await store.close()
