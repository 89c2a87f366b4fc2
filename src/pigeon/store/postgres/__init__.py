"""The scaled store: PostgreSQL through an asyncpg connection pool.

Same semantics as `pigeon.store.sqlite` (system messages, receipts as inbox entries, fan-out
leases, group commit), made safe for many processes on one database:

* Seqs: every transaction that allocates a conversation's seq first locks the conversation
  row (``FOR UPDATE``, several rows in id order), then reads what it depends on (membership,
  idempotency keys) and only then writes. Gateways in different processes are therefore
  serialised per conversation, and seqs stay gapless and unique.
* Inbox positions: users' rows are locked in id order, then ``inbox_head`` is moved by the
  batch's count with one ``UPDATE ... RETURNING``.
* Fan-out: each conversation has a ``fanout_leases`` row. A worker locks the rows it can own
  (free, expired, or already its own) with ``FOR UPDATE SKIP LOCKED``, writes the entries, and
  extends or frees the lease, all in one transaction: the lock is the fence, so a worker whose
  lease was taken over commits nothing for that conversation.
* Sends: a batch locks its conversations (id order), then its senders' member rows
  ((conv_id, user_id) order), inside one call of ``pigeon_send`` (0005 migration).
* Acks: queued acks are applied in bulk by one call of the ``pigeon_ack`` function (0004
  migration), one round trip and one short transaction per batch, with a transaction
  advisory lock per big group around its aggregate receipt.
* Lock order, everywhere: conversations (id order), devices (id order), aggregate advisory
  locks (key order), members ((conv_id, user_id) order), users (id order); fan-out leases
  come before users. Sends, acks and group changes never wait for a lock earlier in it.
* Deadlocks and serialisation failures (which the lock ordering makes rare) are retried.

Group commit: ``send_message`` calls queue up and one task commits everything queued (up to
``MAX_SEND_BATCH``) in one call of the ``pigeon_send`` function (0005 migration): one round
trip and one short transaction over arrays, so the conversation row locks are held only while
the function runs (research/limits.md, 3b: batches of 100-1000 reach 30-50k rows/s, against
2-5k for one row per transaction).

Connection trouble (refused, reset, server restarting, pool exhausted) raises `Unavailable`;
the pool replaces broken connections on later calls, so the store recovers by itself.

Modules: `store` (`PostgresStore`: the pool, transactions and retries, users, devices,
conversations), `sending` (group commit, fan-out, inbox appends), `acks` (acks, read marks,
receipts), `groups` (group changes and their system messages), `queries` (lookups and
guards shared by the others), `schema` (shared types, database errors, migrations).
"""

from pigeon.store.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
