"""Typed store errors. The gateway and HTTP layers map each to a protocol error code."""

from __future__ import annotations


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


class Unavailable(StoreError):
    """The database cannot be reached or is overloaded; the same call may succeed later."""
