"""The HTTP API: accounts, devices, conversations, history. JSON in, JSON out.

Errors are RFC 9457 problem bodies: ``{"type", "title", "status", "code", "detail"}``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from aiohttp import web

from pigeon.auth import Passwords, new_token, token_hash
from pigeon.bus.base import BusUnavailable
from pigeon.config import Config
from pigeon.gateway.hub import Hub
from pigeon.protocol.codes import ErrorCode
from pigeon.store import errors as se
from pigeon.store.base import Store
from pigeon.store.models import Conversation, Device, Message, User

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

Username = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{2,32}$")]
Password = Annotated[str, msgspec.Meta(min_length=8, max_length=256)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Title = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
UserId = Annotated[int, msgspec.Meta(ge=1)]


class Register(msgspec.Struct, forbid_unknown_fields=True):
    username: Username
    password: Password
    display_name: Name | None = None


class Login(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    password: str
    device_name: Name = "device"


class NewConversation(msgspec.Struct, forbid_unknown_fields=True):
    kind: Literal["direct", "group"]
    user: UserId | None = None
    title: Title | None = None
    members: Annotated[list[UserId], msgspec.Meta(max_length=10_000)] = []


class Rename(msgspec.Struct, forbid_unknown_fields=True):
    title: Title


class AddMembers(msgspec.Struct, forbid_unknown_fields=True):
    users: Annotated[list[UserId], msgspec.Meta(min_length=1, max_length=10_000)]


class ApiError(Exception):
    def __init__(self, status: int, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


_STORE_ERRORS: dict[type[se.StoreError], tuple[int, ErrorCode]] = {
    se.NotFound: (404, ErrorCode.NOT_FOUND),
    se.NotMember: (404, ErrorCode.NOT_MEMBER),
    se.Conflict: (409, ErrorCode.CONFLICT),
    se.Forbidden: (403, ErrorCode.FORBIDDEN),
    se.LimitExceeded: (422, ErrorCode.LIMIT_EXCEEDED),
    se.BadPosition: (422, ErrorCode.BAD_SEQ),
    se.Unavailable: (503, ErrorCode.UNAVAILABLE),
}


def problem(status: int, code: ErrorCode | str, detail: str) -> web.Response:
    body = {
        "type": "about:blank",
        "title": str(code),
        "status": status,
        "code": str(code),
        "detail": detail,
    }
    return web.Response(
        status=status, body=json.dumps(body), content_type="application/problem+json"
    )


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = problem(exc.status, exc.code, exc.detail)
        if exc.status == 429:
            response.headers["Retry-After"] = "60"
        return response
    except se.StoreError as exc:
        status, code = _STORE_ERRORS.get(type(exc), (500, ErrorCode.INTERNAL))
        return problem(status, code, str(exc) or code.value)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem(
            exc.status,
            ErrorCode.NOT_FOUND if exc.status == 404 else ErrorCode.BAD_REQUEST,
            exc.reason,
        )


def to_json(value: Any) -> Any:
    if isinstance(value, msgspec.Struct):
        return {name: to_json(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def user_json(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "username": user.username,
        "display_name": user.display_name,
        "created_at": user.created_at,
    }


def device_json(device: Device) -> dict[str, Any]:
    return {
        "id": device.id,
        "name": device.name,
        "created_at": device.created_at,
        "revoked": device.revoked,
        "cursor": device.cursor,
    }


def message_json(m: Message) -> dict[str, Any]:
    return {
        "conv": m.conv_id,
        "seq": m.seq,
        "sender": m.sender_id,
        "sender_device": m.sender_device,
        "client_id": m.client_id,
        "kind": m.kind,
        "body": m.body,
        "ts": m.ts,
    }


def conversation_json(c: Conversation) -> dict[str, Any]:
    return {
        "id": c.id,
        "kind": c.kind,
        "title": c.title,
        "created_at": c.created_at,
        "last_seq": c.last_seq,
        "members": [to_json(m) for m in c.members],
    }


def reply(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


class HttpApi:
    def __init__(self, config: Config, store: Store, hub: Hub, passwords: Passwords) -> None:
        self.config = config
        self.store = store
        self.hub = hub
        self.passwords = passwords

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/users", self.register),
            web.post("/v1/sessions", self.login),
            web.delete("/v1/sessions", self.logout),
            web.get("/v1/me", self.me),
            web.get("/v1/users", self.users_by_id),
            web.get("/v1/users/{username}", self.find_user),
            web.get("/v1/devices", self.devices),
            web.delete("/v1/devices/{device_id}", self.revoke_device),
            web.post("/v1/conversations", self.create_conversation),
            web.get("/v1/conversations", self.list_conversations),
            web.get("/v1/conversations/{conv_id}", self.get_conversation),
            web.patch("/v1/conversations/{conv_id}", self.rename),
            web.post("/v1/conversations/{conv_id}/members", self.add_members),
            web.delete("/v1/conversations/{conv_id}/members/{user_id}", self.remove_member),
            web.get("/v1/conversations/{conv_id}/messages", self.history),
            web.get("/v1/conversations/{conv_id}/receipts", self.receipts),
            web.get("/healthz", self.health),
        ]

    # -- helpers -----------------------------------------------------------------------

    async def _device(self, request: web.Request) -> Device:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, ErrorCode.AUTH_FAILED, "missing bearer token")
        device = await self.store.device_for_token(token_hash(token.strip()))
        if device is None:
            raise ApiError(401, ErrorCode.AUTH_FAILED, "bad or revoked token")
        return device

    @staticmethod
    async def _body(request: web.Request, kind: type[T]) -> T:
        raw = await request.read()
        try:
            return msgspec.json.decode(raw, type=kind)
        except msgspec.ValidationError as exc:
            raise ApiError(422, ErrorCode.BAD_REQUEST, str(exc)) from exc
        except msgspec.DecodeError as exc:
            raise ApiError(400, ErrorCode.BAD_JSON, str(exc)) from exc

    @staticmethod
    def _int(request: web.Request, name: str) -> int:
        raw = request.match_info.get(name) or request.query.get(name, "")
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(400, ErrorCode.BAD_REQUEST, f"{name} must be an integer") from None
        if value < 0:
            raise ApiError(400, ErrorCode.BAD_REQUEST, f"{name} must not be negative")
        return value

    # -- accounts ----------------------------------------------------------------------

    async def register(self, request: web.Request) -> web.Response:
        body = await self._body(request, Register)
        password_hash = await asyncio.to_thread(self.passwords.hash, body.password)
        user = await self.store.create_user(
            body.username, body.display_name or body.username, password_hash
        )
        return reply(user_json(user), 201)

    async def login(self, request: web.Request) -> web.Response:
        body = await self._body(request, Login)
        await self._limit_logins(body.username)
        user = await self.store.find_user(body.username)
        stored = await self.store.password_hash(user.id) if user else None
        valid = stored is not None and await asyncio.to_thread(
            self.passwords.verify, stored, body.password
        )
        if user is None or stored is None or not valid:
            raise ApiError(401, ErrorCode.AUTH_FAILED, "wrong username or password")
        if self.passwords.needs_rehash(stored):
            rehashed = await asyncio.to_thread(self.passwords.hash, body.password)
            await self.store.set_password_hash(user.id, rehashed)
        token = new_token()
        device = await self.store.create_device(user.id, body.device_name, token_hash(token))
        return reply({"token": token, "device": device_json(device), "user": user_json(user)}, 201)

    async def _limit_logins(self, username: str) -> None:
        """Password guessing: a bounded number of attempts per username per minute, counted
        on the bus so that every gateway shares the count."""
        try:
            attempts = await self.hub.bus.count(f"login:{username.lower()}", 60.0)
        except BusUnavailable:
            return  # the limit is a guard, not a dependency: logins go on without it
        if attempts > self.config.limits.login_attempts_per_minute:
            raise ApiError(429, ErrorCode.RATE_LIMITED, "too many login attempts; retry later")

    async def logout(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        await self.store.revoke_device(device.user_id, device.id)
        await self.hub.revoke_device(device.user_id, device.id)
        return web.Response(status=204)

    async def me(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        user = await self.store.get_user(device.user_id)
        assert user is not None
        return reply(user_json(user))

    async def find_user(self, request: web.Request) -> web.Response:
        await self._device(request)
        user = await self.store.find_user(request.match_info["username"])
        if user is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, "no such user")
        return reply(user_json(user))

    async def users_by_id(self, request: web.Request) -> web.Response:
        """Profiles of people I share a conversation with (``?ids=1,2,3``, at most 256)."""
        device = await self._device(request)
        try:
            ids = [int(part) for part in request.query.get("ids", "").split(",") if part]
        except ValueError:
            raise ApiError(400, ErrorCode.BAD_REQUEST, "ids: comma-separated integers") from None
        if len(ids) > 256:
            raise ApiError(400, ErrorCode.BAD_REQUEST, "at most 256 ids")
        visible = set(await self.store.shared_with(device.user_id, ids)) | {device.user_id}
        users = [await self.store.get_user(i) for i in ids if i in visible]
        return reply({"users": [user_json(u) for u in users if u is not None]})

    async def devices(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        devices = await self.store.list_devices(device.user_id)
        return reply({"devices": [device_json(d) for d in devices]})

    async def revoke_device(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        target = self._int(request, "device_id")
        if not await self.store.revoke_device(device.user_id, target):
            raise ApiError(404, ErrorCode.NOT_FOUND, "no such device")
        await self.hub.revoke_device(device.user_id, target)
        return web.Response(status=204)

    # -- conversations -----------------------------------------------------------------

    async def create_conversation(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        body = await self._body(request, NewConversation)
        limit = self.config.limits.max_group_members
        if body.kind == "direct":
            if body.user is None:
                raise ApiError(422, ErrorCode.BAD_REQUEST, "a direct conversation needs `user`")
            conv = await self.store.direct_conversation(device.user_id, body.user)
        else:
            if body.title is None:
                raise ApiError(422, ErrorCode.BAD_REQUEST, "a group needs a `title`")
            conv = await self.store.create_group(device.user_id, body.title, body.members, limit)
        self.hub.committed()
        return reply(conversation_json(conv), 201)

    async def list_conversations(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        summaries = await self.store.list_conversations(device.user_id)
        return reply(
            {
                "conversations": [
                    {
                        **conversation_json(s.conversation),
                        "last_message": message_json(s.last_message) if s.last_message else None,
                        "unread": s.unread,
                    }
                    for s in summaries
                ]
            }
        )

    async def get_conversation(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        conv = await self.store.get_conversation(self._int(request, "conv_id"), device.user_id)
        return reply(conversation_json(conv))

    async def rename(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        body = await self._body(request, Rename)
        conv = await self.store.rename(device.user_id, self._int(request, "conv_id"), body.title)
        self.hub.committed()
        return reply(conversation_json(conv))

    async def add_members(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        body = await self._body(request, AddMembers)
        limit = self.config.limits.max_group_members
        conv = await self.store.add_members(
            device.user_id, self._int(request, "conv_id"), body.users, limit
        )
        self.hub.committed()
        return reply(conversation_json(conv))

    async def remove_member(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        conv_id = self._int(request, "conv_id")
        user_id = self._int(request, "user_id")
        if user_id == device.user_id:
            await self.store.leave(user_id, conv_id)
        else:
            await self.store.remove_member(device.user_id, conv_id, user_id)
        self.hub.committed()
        return web.Response(status=204)

    async def history(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        conv_id = self._int(request, "conv_id")
        before = self._int(request, "before") if "before" in request.query else None
        after = self._int(request, "after") if "after" in request.query else None
        limit = self._int(request, "limit") if "limit" in request.query else 50
        if before is not None and after is not None:
            raise ApiError(400, ErrorCode.BAD_REQUEST, "give `before` or `after`, not both")
        limit = max(1, min(limit, self.config.limits.history_page_max))
        messages = await self.store.history(
            conv_id, device.user_id, before=before, after=after, limit=limit
        )
        return reply({"messages": [message_json(m) for m in messages]})

    async def receipts(self, request: web.Request) -> web.Response:
        device = await self._device(request)
        members = await self.store.receipts(self._int(request, "conv_id"), device.user_id)
        return reply({"members": [to_json(m) for m in members]})

    async def health(self, request: web.Request) -> web.Response:
        return reply(
            {"ok": True, "gateway": self.hub.gateway_id, "connections": len(self.hub.connections)}
        )
