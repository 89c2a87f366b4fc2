"""The send writer: a process of its own that commits the embedded store's sends and acks.

In one process the writer thread and the event loop share one GIL: at direct max the
writer spent a third of its time waiting for it, and the two never passed ~1 core
together (docs/benchmarks.md, fourth and fifth rounds). Here the hot writes run in a child
process with its own interpreter and its own connection to the same file. The parent
(`pigeon.store.sqlite.writer.Writer`) sends it rounds over a socket pair, msgpack framed
by a 4-byte length, and keeps up to two in flight, so the child commits one while the next
is on its way. Each round is one transaction: the sends (fanned out to the members'
inboxes in the same transaction, `sending.send_batch`), then the acks
(`acks.apply_acks`), each in a SAVEPOINT. The answer carries each send's result or error,
the fanned-out entries to push, and each ack's receipt entries or error.

The parent passes the time (its clock, which tests inject) and the checkpointer's request
to top the WAL up (`pigeon.store.checkpoint`) with each round. When the parent's socket
closes, the child finishes and exits: it never outlives its server.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import struct
from collections.abc import Sequence

import msgspec

from pigeon.store import errors
from pigeon.store.checkpoint import passive_top_up
from pigeon.store.errors import StoreError, Unavailable
from pigeon.store.models import InboxEntry, Message, SendRequest, SendResult
from pigeon.store.sqlite.acks import DetailedReceipts, apply_acks
from pigeon.store.sqlite.schema import connect, in_savepoint, map_error
from pigeon.store.sqlite.sending import SentBatch, send_batch

#: Length prefix of every message on the socket pair.
HEADER = struct.Struct("!I")

#: A store error across the socket: its class name and message.
Failure = tuple[str, str]


class Settings(msgspec.Struct, frozen=True):
    """What the child needs to know, passed as JSON on its command line."""

    path: str
    fsync: bool
    fanout_with_send: bool
    receipt_detail_max_group: int


class Round(msgspec.Struct, array_like=True):
    now: float
    sends: list[tuple[SendRequest, int]]  # (request, max body)
    acks: list[tuple[int, int]]  # (device, up to)
    top_up: bool  # copy the WAL's remaining frames before the transaction


class FannedOut(msgspec.Struct, array_like=True):
    """A message's inbox entries, sent as the message once and its (user, position) pairs:
    a 1 000-member group's entries would otherwise carry the message 1 000 times."""

    message: Message
    ts: float
    users: list[int]
    positions: list[int]

    @classmethod
    def of(cls, entries: list[InboxEntry]) -> FannedOut:
        """``entries``: one message's, as `sending.send_batch` writes them (not empty)."""
        first = entries[0]
        assert first.message is not None
        users = [e.user_id for e in entries]
        return cls(first.message, first.ts, users, [e.inbox_seq for e in entries])

    def entries(self) -> list[InboxEntry]:
        m, ts = self.message, self.ts
        return [
            InboxEntry(user, position, m.conv_id, ts, message=m)
            for user, position in zip(self.users, self.positions, strict=True)
        ]


class RoundResult(msgspec.Struct, array_like=True):
    sent: list[SendResult | None]  # None where the send failed: see send_failures
    send_failures: dict[int, Failure]  # index in the round -> why
    fanned_out: list[FannedOut]  # per message written to inboxes, its entries
    acked: list[list[InboxEntry] | None]
    ack_failures: dict[int, Failure]
    top_up_busy: bool = False  # a background checkpoint was under way: again next round
    failure: Failure | None = None  # the transaction failed: nothing was written


def failure(exc: BaseException) -> Failure:
    if isinstance(exc, sqlite3.Error):
        exc = map_error(exc)
    if isinstance(exc, StoreError):
        return (type(exc).__name__, str(exc))
    return (Unavailable.__name__, f"{type(exc).__name__}: {exc}")


def store_error(sent: Failure) -> StoreError:
    """The `StoreError` a `Failure` stands for (Unavailable for a name it does not know)."""
    name, message = sent
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, StoreError):
        return cls(message)
    return Unavailable(message)


def commit_round(
    conn: sqlite3.Connection, work: Round, settings: Settings, detailed: DetailedReceipts
) -> RoundResult:
    """One round in one transaction; a failing send or ack batch is rolled back alone."""
    busy = passive_top_up(conn) if work.top_up else False
    conn.execute("BEGIN IMMEDIATE")
    try:
        sent = _sends(conn, work.sends, work.now, settings.fanout_with_send)
        acked: Sequence[list[InboxEntry] | Exception] = []
        if work.acks:
            outcomes = in_savepoint(conn, lambda c: apply_acks(c, work.acks, work.now, detailed))
            acked = [outcomes] * len(work.acks) if isinstance(outcomes, Exception) else outcomes
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    fanned_out = [FannedOut.of(entries) for entries in sent.fanned_out if entries]
    result = RoundResult([], {}, fanned_out, [], {}, top_up_busy=busy)
    for index, send in enumerate(sent.outcomes):
        result.sent.append(None if isinstance(send, StoreError) else send)
        if isinstance(send, StoreError):
            result.send_failures[index] = failure(send)
    for index, ack in enumerate(acked):
        result.acked.append(None if isinstance(ack, Exception) else ack)
        if isinstance(ack, Exception):
            result.ack_failures[index] = failure(ack)
    return result


def _sends(
    conn: sqlite3.Connection, work: list[tuple[SendRequest, int]], now: float, fanout: bool
) -> SentBatch:
    if not work:
        return SentBatch([], [])
    outcome = in_savepoint(conn, lambda c: send_batch(c, work, now, fanout))
    if not isinstance(outcome, Exception):
        return outcome
    if len(work) == 1:
        error = outcome if isinstance(outcome, StoreError) else Unavailable(str(outcome))
        return SentBatch([error], [])
    # Checks before writing make this unexpected; still, one bad request must not fail
    # the others, so retry each on its own.
    batch = SentBatch([], [])
    for item in work:
        one = in_savepoint(conn, lambda c, item=item: send_batch(c, [item], now, fanout))  # type: ignore[misc]
        if isinstance(one, StoreError):
            batch.outcomes.append(one)
        elif isinstance(one, Exception):
            batch.outcomes.append(Unavailable(str(one)))
        else:
            batch.outcomes += one.outcomes
            batch.fanned_out += one.fanned_out
    return batch


def serve(sock: socket.socket, settings: Settings) -> None:
    """Commit rounds as they come, until the parent closes its end."""
    conn = connect(settings.path, settings.fsync)
    detailed = DetailedReceipts(settings.receipt_detail_max_group)
    decode = msgspec.msgpack.Decoder(Round).decode
    encode = msgspec.msgpack.Encoder().encode
    try:
        while (payload := _receive(sock)) is not None:
            work = decode(payload)
            try:
                result = commit_round(conn, work, settings, detailed)
            except Exception as exc:  # the commit itself failed: nothing was written
                result = RoundResult([], {}, [], [], {}, failure=failure(exc))
            answer = encode(result)
            try:
                sock.sendall(HEADER.pack(len(answer)) + answer)
            except OSError:  # the parent is gone (killed): nobody to answer
                break
    finally:
        conn.close()


def _receive(sock: socket.socket) -> bytes | None:
    """One message, or None once the parent has closed its end."""
    header = _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    return _read_exactly(sock, size)


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def main(argv: Sequence[str]) -> None:
    """``python -m pigeon.store.sqlite FD SETTINGS_JSON`` (`pigeon.store.sqlite.__main__`).

    Signals that stop the server (Ctrl-C, SIGTERM to its group) are the parent's to act
    on: it lets queued writes commit, then closes the socket, and that ends this process.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd, settings = int(argv[0]), msgspec.json.decode(argv[1], type=Settings)
    with socket.socket(fileno=fd) as sock:
        serve(sock, settings)
