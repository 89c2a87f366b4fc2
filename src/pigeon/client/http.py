"""The HTTP half of the SDK: accounts, devices, conversations, history.

One method per endpoint, each returning typed records from :mod:`pigeon.client.models`.
Errors come back as :class:`ApiError` carrying the server's problem code (an
:class:`~pigeon.protocol.codes.ErrorCode` value), so callers branch on codes, not text.
Transport failures (refused connection, timeout) are left as aiohttp / asyncio errors:
they mean "try again later", not "the server said no".
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import msgspec

from pigeon.client.models import (
    Conversation,
    ConversationSummary,
    Device,
    MemberReceipt,
    Message,
    Problem,
    Session,
    User,
)

R = TypeVar("R")


class ApiError(Exception):
    """The server answered an HTTP request with an error status."""

    def __init__(self, status: int, code: str, detail: str = "") -> None:
        super().__init__(f"{status} {code}: {detail}" if detail else f"{status} {code}")
        self.status = status
        self.code = code
        self.detail = detail

    @property
    def retryable(self) -> bool:
        """Server-side trouble (5xx) or throttling: the same request may succeed later."""
        return self.status >= 500 or self.status == 429


class _Users(msgspec.Struct):
    users: list[User]


class _Devices(msgspec.Struct):
    devices: list[Device]


class _Conversations(msgspec.Struct):
    conversations: list[ConversationSummary]


class _Messages(msgspec.Struct):
    messages: list[Message]


class _Receipts(msgspec.Struct):
    members: list[MemberReceipt]


def http_base(url: str) -> str:
    """Normalise a server URL to its HTTP base (``ws://h/v1/ws`` -> ``http://h``)."""
    url = url.rstrip("/")
    if url.endswith("/v1/ws"):
        url = url[: -len("/v1/ws")]
    if url.startswith("ws://"):
        url = "http://" + url[len("ws://") :]
    elif url.startswith("wss://"):
        url = "https://" + url[len("wss://") :]
    return url


class HttpApi:
    """A thin typed client of the ``/v1`` HTTP API.

    Pass ``session`` to share one connection pool with a :class:`~pigeon.client.Client`;
    otherwise the API opens its own and closes it in :meth:`close`. :meth:`login` stores
    the returned token, so the same object can go on to make authenticated calls.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = http_base(base_url)
        self.token = token
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def __aenter__(self) -> HttpApi:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- accounts and devices ---------------------------------------------------------

    async def register(self, username: str, password: str, display_name: str | None = None) -> User:
        body = {
            "username": username,
            "password": password,
            "display_name": display_name or username,
        }
        return await self._call("POST", "/v1/users", User, json=body)

    async def login(self, username: str, password: str, device_name: str) -> Session:
        """Log in as a new device; the token is kept for the calls that follow."""
        body = {"username": username, "password": password, "device_name": device_name}
        session = await self._call("POST", "/v1/sessions", Session, json=body)
        self.token = session.token
        return session

    async def logout(self) -> None:
        """Revoke the calling device (its token stops working)."""
        await self._call_empty("DELETE", "/v1/sessions")

    async def devices(self) -> list[Device]:
        return (await self._call("GET", "/v1/devices", _Devices)).devices

    async def revoke_device(self, device_id: int) -> None:
        await self._call_empty("DELETE", f"/v1/devices/{device_id}")

    async def me(self) -> User:
        return await self._call("GET", "/v1/me", User)

    async def user(self, username: str) -> User:
        return await self._call("GET", f"/v1/users/{username}", User)

    async def users(self, ids: list[int]) -> list[User]:
        """Profiles of people who share a conversation with me (others are left out)."""
        query = ",".join(str(i) for i in ids)
        return (await self._call("GET", f"/v1/users?ids={query}", _Users)).users

    # -- conversations ----------------------------------------------------------------

    async def create_direct(self, user_id: int) -> Conversation:
        """The direct conversation with ``user_id`` (the same one if it already exists)."""
        body = {"kind": "direct", "user": user_id}
        return await self._call("POST", "/v1/conversations", Conversation, json=body)

    async def create_group(self, title: str, members: list[int]) -> Conversation:
        body = {"kind": "group", "title": title, "members": members}
        return await self._call("POST", "/v1/conversations", Conversation, json=body)

    async def conversations(self) -> list[ConversationSummary]:
        return (await self._call("GET", "/v1/conversations", _Conversations)).conversations

    async def conversation(self, conv: int) -> Conversation:
        return await self._call("GET", f"/v1/conversations/{conv}", Conversation)

    async def rename(self, conv: int, title: str) -> Conversation:
        path = f"/v1/conversations/{conv}"
        return await self._call("PATCH", path, Conversation, json={"title": title})

    async def add_members(self, conv: int, users: list[int]) -> Conversation:
        path = f"/v1/conversations/{conv}/members"
        return await self._call("POST", path, Conversation, json={"users": users})

    async def remove_member(self, conv: int, user_id: int) -> None:
        """Remove ``user_id``; with your own id this leaves the conversation."""
        await self._call_empty("DELETE", f"/v1/conversations/{conv}/members/{user_id}")

    async def messages(
        self,
        conv: int,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> list[Message]:
        """History in ascending seq order; ``after`` / ``before`` are exclusive bounds."""
        query = {
            name: str(value)
            for name, value in (("after", after), ("before", before), ("limit", limit))
            if value is not None
        }
        path = f"/v1/conversations/{conv}/messages"
        return (await self._call("GET", path, _Messages, params=query)).messages

    async def receipts(self, conv: int) -> list[MemberReceipt]:
        return (await self._call("GET", f"/v1/conversations/{conv}/receipts", _Receipts)).members

    # -- plumbing ---------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _call(self, method: str, path: str, result: type[R], **kw: Any) -> R:
        return msgspec.json.decode(await self._request(method, path, **kw), type=result)

    async def _call_empty(self, method: str, path: str, **kw: Any) -> None:
        await self._request(method, path, **kw)

    async def _request(self, method: str, path: str, **kw: Any) -> bytes:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self._client().request(
            method, self.base_url + path, headers=headers, timeout=self._timeout, **kw
        ) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise _error(resp.status, raw)
            return raw


def _error(status: int, raw: bytes) -> ApiError:
    """Build an ApiError from a problem body, or from the bare status if there is none."""
    try:
        problem = msgspec.json.decode(raw, type=Problem)
    except msgspec.DecodeError:
        return ApiError(status, f"http_{status}", raw.decode(errors="replace")[:200])
    return ApiError(status, problem.code or f"http_{status}", problem.detail or problem.title)
