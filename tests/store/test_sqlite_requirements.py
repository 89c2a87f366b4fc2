"""The embedded store refuses, at start and by name, an SQLite too old for its writer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pigeon.store.errors import Unavailable
from pigeon.store.sqlite import SqliteStore


async def test_an_sqlite_without_update_from_is_refused_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    store = SqliteStore(tmp_path / "old.db")
    with pytest.raises(Unavailable, match=r"SQLite 3\.31\.1: 3\.33 or newer"):
        await store.open()
