"""Group changes: creating a group, adding and removing members, leaving, renaming.

Each runs in one transaction (the store's ``_write``) and records the change as a system
message (`_append_system`), stored like a user message with its fan-out job, so fan-out
delivers it like any other (user messages are stored by ``pigeon_send`` instead,
`pigeon.store.postgres.sending`). A change to an existing group first locks the
conversation row, as sends do; member rows it writes are locked in user order, as sends and
acks lock them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pigeon.store.errors import Forbidden, LimitExceeded, NotFound, NotMember
from pigeon.store.models import Conversation, Message, Role
from pigeon.store.postgres.queries import (
    MEMBER_ORDER,
    MSG_COLS,
    conversation_kind,
    insert_members,
    load_conversation,
    lock_conversation,
    member_ids,
    member_role,
    require_group_admin,
    require_users,
    to_columns,
)
from pigeon.store.postgres.schema import Clock, Conn
from pigeon.store.postgres.sending import insert_lease


async def create_group(
    conn: Conn, clock: Clock, creator_id: int, title: str, member_ids: list[int], max_members: int
) -> Conversation:
    users = list(dict.fromkeys([creator_id, *member_ids]))  # dedup, keep order
    if len(users) > max_members:
        raise LimitExceeded(f"a group has at most {max_members} members")
    await require_users(conn, users)
    now = clock()
    conv_id = await conn.fetchval(
        "INSERT INTO conversations (kind, title, created_at, last_activity)"
        " VALUES ('group', $1, $2, $2) RETURNING id",
        title,
        now,
    )
    await insert_lease(conn, conv_id)
    roles: list[tuple[int, Role]] = [(creator_id, "admin")]
    roles += [(u, "member") for u in users[1:]]
    await insert_members(conn, conv_id, roles, now, 0)
    event = {"event": "created", "title": title, "by": creator_id, "users": users}
    await _append_system(conn, conv_id, creator_id, event, now)
    return await load_conversation(conn, conv_id)


async def add_members(
    conn: Conn, clock: Clock, actor_id: int, conv_id: int, user_ids: list[int], max_members: int
) -> Conversation:
    last_seq = await lock_conversation(conn, conv_id)
    await require_group_admin(conn, conv_id, actor_id)
    current = set(await member_ids(conn, conv_id))
    new = [u for u in dict.fromkeys(user_ids) if u not in current]
    if not new:
        return await load_conversation(conn, conv_id)
    await require_users(conn, new)
    if len(current) + len(new) > max_members:
        raise LimitExceeded(f"a group has at most {max_members} members")
    now = clock()
    # New members start at the current last seq: the "added" message is their first.
    # The conversation row is locked, so no send can slip in between.
    await insert_members(conn, conv_id, [(u, "member") for u in new], now, last_seq)
    event = {"event": "added", "users": new, "by": actor_id}
    await _append_system(conn, conv_id, actor_id, event, now)
    return await load_conversation(conn, conv_id)


async def remove_member(
    conn: Conn, clock: Clock, actor_id: int, conv_id: int, user_id: int
) -> Conversation:
    await lock_conversation(conn, conv_id)
    if user_id == actor_id:
        await _leave(conn, clock, actor_id, conv_id)
        return await load_conversation(conn, conv_id)
    await require_group_admin(conn, conv_id, actor_id)
    if await member_role(conn, conv_id, user_id) is None:
        raise NotFound(f"user {user_id} is not a member of conversation {conv_id}")
    await _lock_members(conn, conv_id, [user_id, actor_id])  # removed, then "by"
    await conn.execute("DELETE FROM members WHERE conv_id = $1 AND user_id = $2", conv_id, user_id)
    event = {"event": "removed", "user": user_id, "by": actor_id}
    await _append_system(conn, conv_id, actor_id, event, clock())
    return await load_conversation(conn, conv_id)


async def leave(conn: Conn, clock: Clock, user_id: int, conv_id: int) -> None:
    await lock_conversation(conn, conv_id)
    await _leave(conn, clock, user_id, conv_id)


async def _leave(conn: Conn, clock: Clock, user_id: int, conv_id: int) -> None:
    """Leave a group; the caller holds the conversation's row lock."""
    role = await member_role(conn, conv_id, user_id)
    if role is None:
        raise NotMember(f"not a member of conversation {conv_id}")
    if await conversation_kind(conn, conv_id) != "group":
        # The pair's one direct conversation must keep both members to stay findable.
        raise Forbidden("cannot leave a direct conversation")
    # The rows this may write: the leaver's, and the heir's if it must be promoted.
    heir = await conn.fetchval(
        f"SELECT user_id FROM members WHERE conv_id = $1 AND user_id <> $2"
        f" ORDER BY {MEMBER_ORDER} LIMIT 1",
        conv_id,
        user_id,
    )
    await _lock_members(conn, conv_id, [user_id] if heir is None else [user_id, int(heir)])
    await conn.execute("DELETE FROM members WHERE conv_id = $1 AND user_id = $2", conv_id, user_id)
    event: dict[str, Any] = {"event": "left", "user": user_id}
    if role == "admin":
        heir = await _promote_if_no_admin(conn, conv_id)
        if heir is not None:
            event["admin"] = heir
    await _append_system(conn, conv_id, user_id, event, clock())


async def rename(conn: Conn, clock: Clock, actor_id: int, conv_id: int, title: str) -> Conversation:
    await lock_conversation(conn, conv_id)
    if await member_role(conn, conv_id, actor_id) is None:
        raise NotMember(f"not a member of conversation {conv_id}")
    if await conversation_kind(conn, conv_id) != "group":
        raise Forbidden("only groups have a title")
    await conn.execute("UPDATE conversations SET title = $1 WHERE id = $2", title, conv_id)
    event = {"event": "renamed", "title": title, "by": actor_id}
    await _append_system(conn, conv_id, actor_id, event, clock())
    return await load_conversation(conn, conv_id)


async def _store_messages(conn: Conn, messages: list[Message]) -> None:
    """Insert messages with their fan-out jobs; move each sender's own positions past them.

    The caller has already allocated the seqs and updated ``conversations.last_seq``.
    """
    if not messages:
        return
    await conn.execute(
        f"WITH added AS (INSERT INTO messages ({MSG_COLS})"
        "  SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],"
        "  $5::text[], $6::text[], $7::text[], $8::float8[]) RETURNING conv_id, seq)"
        " INSERT INTO fanout_jobs (conv_id, seq) SELECT conv_id, seq FROM added",
        [m.conv_id for m in messages],
        [m.seq for m in messages],
        [m.sender_id for m in messages],
        [m.sender_device for m in messages],
        [m.client_id for m in messages],
        [m.kind for m in messages],
        [m.body for m in messages],
        [m.ts for m in messages],
    )
    # One update per (conversation, sender): messages are in seq order, so the last wins.
    # The rows are locked in (conv_id, user_id) order first, as acks lock them (pigeon_ack):
    # a batch of sends and a batch of acks touching the same members cannot deadlock.
    own = {(m.conv_id, m.sender_id): m.seq for m in messages}
    await conn.execute(
        "UPDATE members m SET delivered_seq = greatest(m.delivered_seq, o.seq),"
        " read_seq = greatest(m.read_seq, o.seq)"
        " FROM (SELECT l.conv_id, l.user_id, n.seq FROM members l"
        "  JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS n(conv_id, user_id, seq)"
        "  ON l.conv_id = n.conv_id AND l.user_id = n.user_id"
        "  ORDER BY l.conv_id, l.user_id FOR NO KEY UPDATE OF l) o"
        " WHERE m.conv_id = o.conv_id AND m.user_id = o.user_id",
        *to_columns([(conv, user, seq) for (conv, user), seq in own.items()], 3),
    )


async def _append_system(
    conn: Conn, conv_id: int, actor_id: int, event: dict[str, Any], now: float
) -> Message:
    """Record a group change as a system message, through the same path as user messages."""
    seq = await conn.fetchval(
        "UPDATE conversations SET last_seq = last_seq + 1, last_activity = $1"
        " WHERE id = $2 RETURNING last_seq",
        now,
        conv_id,
    )
    body = json.dumps(event, separators=(",", ":"))
    message = Message(conv_id, int(seq), actor_id, 0, "", "system", body, now)
    await _store_messages(conn, [message])
    return message


async def _lock_members(conn: Conn, conv_id: int, user_ids: Sequence[int]) -> None:
    """Lock member rows a group change will write, in user order (the order acks and sends
    lock members in), so that it cannot deadlock with them."""
    await conn.execute(
        "SELECT 1 FROM members WHERE conv_id = $1 AND user_id = ANY($2::bigint[])"
        " ORDER BY user_id FOR NO KEY UPDATE",
        conv_id,
        sorted(set(user_ids)),
    )


async def _promote_if_no_admin(conn: Conn, conv_id: int) -> int | None:
    """If no admin is left, make the longest-standing member admin; return who."""
    has_admin = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM members WHERE conv_id = $1 AND role = 'admin')", conv_id
    )
    if has_admin:
        return None
    heir = await conn.fetchval(
        f"SELECT user_id FROM members WHERE conv_id = $1 ORDER BY {MEMBER_ORDER} LIMIT 1",
        conv_id,
    )
    if heir is None:
        return None
    await conn.execute(
        "UPDATE members SET role = 'admin' WHERE conv_id = $1 AND user_id = $2", conv_id, heir
    )
    return int(heir)
