"""Typed store errors. The gateway and HTTP layers map each to a protocol error code."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class StoreError(Exception):
    """Base class: the operation changed nothing."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    """A unique value (e.g. a username) is taken."""


class NotMember(StoreError):
    """The conversation does not exist or the user is not a member of it."""


class Forbidden(StoreError):
    """A member without the needed role (e.g. a non-admin adding members)."""


class LimitExceeded(StoreError):
    """A configured limit (e.g. group size) would be exceeded."""


class BadPosition(StoreError):
    """A seq or inbox position beyond what exists."""


class Invalid(StoreError):
    """A value the store cannot hold: text with a NUL character (PostgreSQL's text cannot,
    and SQLite's JSON functions, through which batches are written, would cut it)."""


class Unavailable(StoreError):
    """The database cannot be reached or is overloaded; the same call may succeed later."""


def refused_send(body: str, client_id: str, max_body: int) -> StoreError | None:
    """Why a send cannot be stored whoever sends it, or None: checked by both stores
    before anything is written."""
    if len(body) > max_body:
        return LimitExceeded(f"body longer than {max_body} characters")
    if "\0" in body or "\0" in client_id:
        return Invalid("body and client_id cannot contain NUL characters")
    return None


async def settled(futures: Sequence[asyncio.Future[T]]) -> list[T | StoreError]:
    """Wait for every future: a `StoreError` is that item's outcome, anything else that
    failed one is raised (as the single-item call would have)."""
    results = await asyncio.gather(*futures, return_exceptions=True)
    outcomes: list[T | StoreError] = []
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, StoreError):
            raise result
        outcomes.append(result)
    return outcomes


def only(outcomes: list[T | StoreError]) -> T:
    """The outcome of a one-item batch call: its value, or its error raised."""
    (outcome,) = outcomes
    if isinstance(outcome, StoreError):
        raise outcome
    return outcome
