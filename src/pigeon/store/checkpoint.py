"""WAL checkpoints for the embedded store, off the writer's commit path.

SQLite's automatic checkpoint runs inside the commit that crosses its threshold: that commit
copies the WAL's pages into the database file and fsyncs it, and every send queued behind
it waits. Here a connection of its own, on a thread of its own, checkpoints in PASSIVE mode
(it never waits for the writer or the readers, and they never wait for it) every
``interval_s`` while there were commits. The writer keeps a large automatic threshold only
as a backstop, in case this one falls behind.

SQLite rewinds the WAL (writes it again from its start) only when a write transaction
begins with every frame already checkpointed. A background pass never gets there while
commits keep coming, so the WAL grew up to the backstop, and the commit that crossed it
checkpointed in place: 6-9 ms inside one commit, every 1.5-2 s at 2 000 msg/s. So after
each pass the writer, before its next transaction, copies what was committed during the
pass (`top_up`: a few pages), and the WAL starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

#: The writer's own checkpoint threshold, in pages: reached only if checkpoints here stall.
BACKSTOP_PAGES = 16_000


class WalCheckpointer:
    def __init__(self, connect: Callable[[], sqlite3.Connection], interval_s: float) -> None:
        self._connect = connect
        self._interval_s = interval_s
        self._thread: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._dirty = False
        self._top_up_due = False  # a pass ended; set on its thread, read on the writer's

    async def start(self) -> None:
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-sqlite-ckpt")
        await asyncio.get_running_loop().run_in_executor(thread, self._open)
        self._thread = thread
        self._task = asyncio.create_task(self._run())

    def committed(self) -> None:
        self._dirty = True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(thread, self._close)
            thread.shutdown(wait=False)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._interval_s)
            if not self._dirty or self._thread is None:
                continue
            self._dirty = False
            try:
                await loop.run_in_executor(self._thread, self._checkpoint)
            except sqlite3.Error as exc:  # the writer's backstop still bounds the WAL
                log.warning("WAL checkpoint failed: %s", exc)

    def _open(self) -> None:
        self._conn = self._connect()

    def _checkpoint(self) -> None:
        if self._conn is not None:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._top_up_due = True

    def top_up(self, writer: sqlite3.Connection) -> None:
        """On the writer's thread, outside a transaction: after a background pass, copy
        the frames committed during it, so that the next transaction rewinds the WAL."""
        if self.take_top_up() and passive_top_up(writer):
            self.top_up_again()

    def take_top_up(self) -> bool:
        """Whether a writer should top up before its next transaction (`top_up`); for a
        writer on another thread or process, which then calls `passive_top_up`."""
        due, self._top_up_due = self._top_up_due, False
        return due

    def top_up_again(self) -> None:
        """A top-up found a pass under way: the next transaction tops up instead."""
        self._top_up_due = True

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def passive_top_up(writer: sqlite3.Connection) -> bool:
    """A writer's top-up (`WalCheckpointer.top_up`), outside a transaction; True if a
    background pass was under way, so it has to be done again."""
    try:
        (busy, _, _) = writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.Error as exc:  # never the round's failure: the next pass retries
        log.warning("WAL checkpoint top-up failed: %s", exc)
        return False
    return bool(busy)
