"""The embedded store checkpoints its WAL in the background, not in the writer's commits."""

from __future__ import annotations

from pathlib import Path

from pigeon.store.sqlite import SqliteStore
from tests.store.chat import alice_writing_to_bob
from tests.support import eventually


def size(path: Path) -> int:
    return path.stat().st_size


async def grows_after_sends(db: Path, checkpoint_interval_s: float, wait_s: float) -> bool:
    """Whether the database file grows within ``wait_s`` after 300 committed sends (a WAL
    checkpoint is what copies committed pages into it)."""
    store = SqliteStore(db, checkpoint_interval_s=checkpoint_interval_s)
    async with alice_writing_to_bob(store) as chat:
        db_size = size(db)
        for i in range(300):
            await chat.send(i, "x" * 500)

        async def grown() -> bool:
            return size(db) > db_size

        try:
            await eventually(grown, timeout=wait_s)
        except TimeoutError:
            return False
        return True


async def test_commits_are_checkpointed_in_the_background(tmp_path: Path) -> None:
    # ~150 KB of messages: far below the writer's own threshold (BACKSTOP_PAGES).
    assert await grows_after_sends(tmp_path / "a.db", checkpoint_interval_s=0.05, wait_s=10)


async def test_the_writer_alone_does_not_checkpoint_small_wals(tmp_path: Path) -> None:
    """The control: without the background checkpoints the file does not grow."""
    assert not await grows_after_sends(tmp_path / "b.db", checkpoint_interval_s=3600, wait_s=1)


def wal_salt(db: Path) -> bytes:
    """The WAL header's salts, which SQLite changes each time it starts the WAL over."""
    with db.with_name(db.name + "-wal").open("rb") as wal:
        return wal.read(32)[16:24]


async def wal_starts_over(db: Path, checkpoint_interval_s: float, sends: int) -> bool:
    """Whether the WAL is started over within ``sends`` sends committed one by one, far
    below the writer's own threshold (BACKSTOP_PAGES)."""
    store = SqliteStore(db, checkpoint_interval_s=checkpoint_interval_s, fsync=False)
    async with alice_writing_to_bob(store) as chat:
        salt = wal_salt(db)
        for i in range(sends):
            await chat.send(i, "x" * 200)
            if wal_salt(db) != salt:
                return True
        return False


async def test_the_wal_starts_over_after_background_checkpoints(tmp_path: Path) -> None:
    """Background passes alone never leave the WAL wholly checkpointed while commits keep
    coming; the writer's top-up after each pass does, so the WAL is written again from its
    start instead of growing to the backstop (and being checkpointed inside a commit)."""
    assert await wal_starts_over(tmp_path / "a.db", checkpoint_interval_s=0.01, sends=1000)


async def test_without_checkpoints_the_wal_does_not_start_over(tmp_path: Path) -> None:
    """The control: the salts change only when the WAL starts over."""
    assert not await wal_starts_over(tmp_path / "b.db", checkpoint_interval_s=3600, sends=300)
