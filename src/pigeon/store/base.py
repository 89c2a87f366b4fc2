"""The durable store interface. Every implementation passes `tests/contract/test_store.py`.

Contract, for every implementation:

* Every method is atomic: it either commits all it says or raises a `StoreError` subclass
  and changes nothing.
* A conversation's messages have ``seq`` 1, 2, 3... with no gap and no duplicate, however
  many gateways send into it at once. ``send_message`` commits the message and its fan-out
  job together; a second call with the same ``(sender_device, client_id)`` returns the
  first result with ``duplicate=True`` and writes nothing.
* Group changes (create, add, remove, leave, rename) are recorded as ``kind="system"``
  messages in the conversation (body: a JSON object), so members learn of them through
  their inboxes like any other message.
* Each user has one inbox: positions ``inbox_seq`` 1, 2, 3... with no gap. ``fanout``
  appends one entry per current member (the sender included) for each committed message,
  in each conversation's ``seq`` order, exactly once, however many workers call it.
* Receipts are cumulative and monotonic per (member, conversation): ``read_seq <=
  delivered_seq`` always holds, positions never move back. A change of a member's receipt
  appends a receipt entry to the inbox of each other member who sent a message in the range
  that moved (so senders learn of it live or on their next resume).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from pigeon.store.errors import StoreError
from pigeon.store.models import (
    Conversation,
    ConversationSummary,
    Device,
    FanoutBatch,
    InboxBounds,
    InboxEntry,
    Member,
    Message,
    SendRequest,
    SendResult,
    User,
)


class Store(Protocol):
    async def open(self) -> None:
        """Connect and create or migrate the schema (versioned migrations)."""

    async def close(self) -> None: ...

    # -- users and devices -------------------------------------------------------------

    async def create_user(self, username: str, display_name: str, password_hash: str) -> User:
        """Raises Conflict if the username (case-insensitive) is taken."""

    async def get_user(self, user_id: int) -> User | None: ...

    async def find_user(self, username: str) -> User | None:
        """Case-insensitive lookup."""

    async def password_hash(self, user_id: int) -> str: ...

    async def set_password_hash(self, user_id: int, password_hash: str) -> None:
        """For rehashing when argon2 parameters change."""

    async def list_users(self) -> list[User]: ...

    async def create_device(self, user_id: int, name: str, token_hash: str) -> Device:
        """A new device starts with ``cursor`` = the user's current inbox head."""

    async def device_for_token(self, token_hash: str) -> Device | None:
        """The non-revoked device holding this token hash, else None."""

    async def list_devices(self, user_id: int) -> list[Device]: ...

    async def revoke_device(self, user_id: int, device_id: int) -> bool:
        """False if no such device of this user (or already revoked)."""

    # -- conversations -----------------------------------------------------------------

    async def direct_conversation(self, user_id: int, other_id: int) -> Conversation:
        """The one direct conversation of the pair, created on first call (idempotent).

        Raises NotFound if ``other_id`` does not exist. A conversation with oneself is allowed.
        """

    async def create_group(
        self, creator_id: int, title: str, member_ids: list[int], max_members: int
    ) -> Conversation:
        """Creator becomes admin. Raises NotFound (unknown user), LimitExceeded."""

    async def add_members(
        self, actor_id: int, conv_id: int, user_ids: list[int], max_members: int
    ) -> Conversation:
        """Admins only (Forbidden); groups only (Forbidden); existing members are skipped.

        New members start with delivered/read at the current last seq (they do not receive
        the earlier history through their inbox, but can page it over HTTP).
        """

    async def remove_member(self, actor_id: int, conv_id: int, user_id: int) -> Conversation:
        """Admins only; removing oneself is ``leave``."""

    async def leave(self, user_id: int, conv_id: int) -> None:
        """If the last admin leaves, the longest-standing member becomes admin."""

    async def rename(self, actor_id: int, conv_id: int, title: str) -> Conversation:
        """Any member of a group may rename it."""

    async def get_conversation(self, conv_id: int, user_id: int) -> Conversation:
        """With members. Raises NotMember unless ``user_id`` is a member."""

    async def member_ids(self, conv_id: int) -> list[int]: ...

    async def list_conversations(self, user_id: int) -> list[ConversationSummary]:
        """Newest activity first."""

    async def history(
        self,
        conv_id: int,
        user_id: int,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int = 50,
    ) -> list[Message]:
        """Ascending seq. ``before``: the ``limit`` messages just below it; ``after``: the
        ``limit`` messages just above it; neither: the newest ``limit``. NotMember if not in it.
        """

    async def contacts(self, user_id: int, max_group_size: int) -> list[int]:
        """Users sharing a direct conversation, or a group of at most ``max_group_size``
        members, with ``user_id`` (``user_id`` itself excluded)."""

    async def shared_with(self, user_id: int, others: list[int]) -> list[int]:
        """The subset of ``others`` that share at least one conversation with ``user_id``."""

    # -- the message path --------------------------------------------------------------

    def send_message(self, request: SendRequest, max_body: int) -> asyncio.Future[SendResult]:
        """Commit the message and its fan-out job; see the module contract.

        Queues the send and returns a future for its outcome, not a coroutine: a gateway
        queues one per frame it receives and handles the outcome in a callback, without a
        task per send. The future fails with NotMember, LimitExceeded (body longer than
        ``max_body`` characters), Unavailable. The sender's own delivered/read positions
        move to the new seq. Implementations batch concurrent calls into one transaction
        (group commit).
        """

    async def fanout(self, worker_id: str, max_messages: int, lease_s: float) -> FanoutBatch:
        """Claim pending fan-out jobs (leasing their conversations to ``worker_id``), append
        the inbox entries for up to ``max_messages`` messages, delete those jobs, and return
        the new entries (with their messages) for pushing. A lease not renewed within
        ``lease_s`` may be taken by another worker; a worker that lost its lease commits
        nothing.

        The batch's conversations stay leased until ``fanout_pushed``: if the worker dies
        between commit and push, the next worker to find the lease expired returns the
        members in ``nudge_users`` so their gateways read the entries from the inbox."""

    async def fanout_pushed(self, worker_id: str, conv_ids: list[int]) -> None:
        """The entries of the last batch for these conversations were pushed: release them."""

    async def inbox_after(self, user_id: int, after: int, limit: int) -> list[InboxEntry]:
        """Entries with inbox_seq > after, ascending, at most ``limit``."""

    async def inbox_bounds(self, user_id: int) -> InboxBounds: ...

    async def ack(self, device_id: int, up_to: int) -> list[InboxEntry]:
        """Move the device's cursor to ``up_to`` (never backwards; clamped to the inbox head);
        the acked messages become ``delivered`` for the device's user. Returns the receipt
        entries this appended to other users' inboxes."""

    async def ack_many(
        self, acks: Sequence[tuple[int, int]]
    ) -> list[list[InboxEntry] | StoreError]:
        """``ack(device_id, up_to)`` for each pair, applied together; one outcome per pair,
        in order: its receipt entries, or the error that failed it alone (NotFound for an
        unknown or revoked device)."""

    async def mark_read(self, user_id: int, conv_id: int, up_to_seq: int) -> list[InboxEntry]:
        """Move the member's read (and delivered) position up to ``up_to_seq``. Raises
        NotMember, BadPosition (beyond the last seq). Returns the receipt entries appended."""

    async def receipts(self, conv_id: int, user_id: int) -> list[Member]:
        """Every member's positions. NotMember unless ``user_id`` is a member."""

    async def prune_inbox(self, older_than: float) -> int:
        """Delete inbox entries created before ``older_than``; raise each user's floor."""
