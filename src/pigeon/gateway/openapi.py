"""The OpenAPI document of the HTTP API, with request schemas taken from the msgspec types."""

from __future__ import annotations

from typing import Any

import msgspec

from pigeon.gateway import http as h

_BODIES: dict[tuple[str, str], type[msgspec.Struct]] = {
    ("post", "/v1/users"): h.Register,
    ("post", "/v1/sessions"): h.Login,
    ("post", "/v1/conversations"): h.NewConversation,
    ("patch", "/v1/conversations/{conv_id}"): h.Rename,
    ("post", "/v1/conversations/{conv_id}/members"): h.AddMembers,
}

_SUMMARIES: dict[tuple[str, str], str] = {
    ("post", "/v1/users"): "Register a user",
    ("post", "/v1/sessions"): "Log in: a new device and its token",
    ("delete", "/v1/sessions"): "Log out: revoke the calling device",
    ("get", "/v1/me"): "The calling user",
    ("get", "/v1/users"): "Profiles by id (?ids=1,2,3) of people sharing a conversation with me",
    ("get", "/v1/users/{username}"): "Look a user up by username",
    ("get", "/v1/devices"): "My devices",
    ("delete", "/v1/devices/{device_id}"): "Revoke one of my devices",
    ("post", "/v1/conversations"): "Create a direct conversation (idempotent) or a group",
    ("get", "/v1/conversations"): "My conversations, with last message and unread count",
    ("get", "/v1/conversations/{conv_id}"): "One conversation with its members",
    ("patch", "/v1/conversations/{conv_id}"): "Rename a group",
    ("post", "/v1/conversations/{conv_id}/members"): "Add members (admins)",
    (
        "delete",
        "/v1/conversations/{conv_id}/members/{user_id}",
    ): "Remove a member (admins), or leave",
    ("get", "/v1/conversations/{conv_id}/messages"): "History page (before / after a seq, limit)",
    ("get", "/v1/conversations/{conv_id}/receipts"): "Delivered / read positions of every member",
    ("get", "/healthz"): "Liveness",
    ("get", "/v1/ws"): "WebSocket upgrade: protocol v1 (docs/protocol.md)",
}

_PUBLIC = {("post", "/v1/users"), ("post", "/v1/sessions"), ("get", "/healthz")}


def openapi_document() -> dict[str, Any]:
    components = _schemas()
    paths: dict[str, dict[str, Any]] = {}
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for (method, path), summary in _SUMMARIES.items():
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {"default": {"description": "error", "content": problem}},
        }
        params = [
            {
                "name": part[1:-1],
                "in": "path",
                "required": True,
                "schema": {"type": "string" if part == "{username}" else "integer"},
            }
            for part in path.split("/")
            if part.startswith("{")
        ]
        if path.endswith("/messages"):
            params += [
                {"name": q, "in": "query", "required": False, "schema": {"type": "integer"}}
                for q in ("before", "after", "limit")
            ]
        if params:
            operation["parameters"] = params
        body = _BODIES.get((method, path))
        if body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{body.__name__}"}
                    }
                },
            }
        if (method, path) not in _PUBLIC:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Pigeon HTTP API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _schemas() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        list(_BODIES.values()), ref_template="#/components/schemas/{name}"
    )
    components["Problem"] = {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "code": {"type": "string"},
            "detail": {"type": "string"},
        },
        "required": ["status", "code", "detail"],
    }
    return components
