"""The embedded store: SQLite in WAL mode, through the stdlib ``sqlite3`` module.

Threads: sqlite3 calls block, so none runs on the event loop. One writer thread owns the only
write connection (every write is a ``BEGIN IMMEDIATE`` transaction on it) and one reader thread
owns a read-only connection; WAL lets the reader see the last commit without waiting for the
writer. Because every write in this process goes through the one writer thread, they are
serialised without lock contention; other processes on the same file are still safe because
each transaction takes SQLite's write lock before reading what it will change.

Group commit (`writer`): sends and other writes are queued, and one task hands everything
queued to the writer thread as a single transaction per round, so a burst of sends costs one
fsync instead of one each.

Fan-out with the send: the messages of a round are written to their members' inboxes in the
same transaction (the writer is the only one changing membership, so the members it reads are
exactly those at send time), and `fanout` hands the committed entries to a worker to push
without another round. Only what cannot take that path goes through ``fanout_jobs`` and the
leased `fanout` rounds: system messages of membership changes, and the messages of a
conversation that still has older jobs (so that its order holds).

Modules: `store` (`SqliteStore`, the operations), `writer` (the writer thread's rounds),
`sending` (sends, fan-out, the inbox appender), `acks` (acks, read marks, receipts),
`queries` (lookups and membership guards), `batches` (rows as JSON for one statement),
`schema` (migrations, errors).
"""

from pigeon.store.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
