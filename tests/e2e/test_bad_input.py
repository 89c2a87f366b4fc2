"""Every class of bad input gets its typed error, changes nothing, and hurts nothing else."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from pigeon.server import Server, build_server
from tests.conftest import fast_passwords, make_config
from tests.support import Api, connect, open_socket


@pytest.fixture
async def tight_server(tmp_path: Path) -> Server:
    srv = build_server(
        make_config(
            tmp_path,
            max_frame_bytes=2048,
            hard_frame_bytes=64 * 1024,
            max_body_chars=100,
            send_burst=5,
            sends_per_second=0.5,
            max_bad_frames=100,
        ),
        fast_passwords(),
    )
    await srv.start()
    yield srv  # type: ignore[misc]
    await srv.stop()


async def test_malformed_frames_get_typed_errors(
    tight_server: Server, http: aiohttp.ClientSession
) -> None:
    api = Api(http, tight_server.url)
    alice, bob = await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    sock, _ = await connect(http, tight_server.url, alice)
    cases: list[tuple[str | dict[str, object], str]] = [
        ("{not json", "bad_json"),
        ({"type": "launch_missiles"}, "bad_frame"),
        ({"type": "send", "conv": conv, "client_id": "c1"}, "bad_frame"),  # no body
        ({"type": "send", "conv": "one", "client_id": "c1", "body": "x"}, "bad_frame"),
        ({"type": "send", "conv": conv, "client_id": "", "body": "x"}, "bad_frame"),
        ({"type": "send", "conv": conv, "client_id": "c2", "body": "x" * 101}, "body_too_large"),
        ({"type": "send", "conv": conv, "client_id": "c3", "body": "x" * 3000}, "frame_too_large"),
        ({"type": "ack", "up_to": 10_000}, "bad_ack"),
        ({"type": "read", "conv": conv, "up_to_seq": 50}, "bad_seq"),
        (
            {"type": "hello", "token": alice.token, "device": alice.device_id},
            "already_authenticated",
        ),
        ("[1, 2, 3]", "bad_frame"),
    ]
    for frame, code in cases:
        await sock.send(frame)
        error = await sock.expect("error")
        assert error["code"] == code, (frame, error)
    # nothing was written, and the connection still works
    status, history = await api.call("GET", f"/v1/conversations/{conv}/messages", alice.token)
    assert status == 200 and history["messages"] == []
    await sock.send({"type": "send", "conv": conv, "client_id": "ok", "body": "still here"})
    assert (await sock.expect("sent"))["seq"] == 1


async def test_oversized_beyond_hard_ceiling_closes_only_that_socket(
    tight_server: Server, http: aiohttp.ClientSession
) -> None:
    api = Api(http, tight_server.url)
    alice, bob = await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    sock, _ = await connect(http, tight_server.url, alice)
    other, _ = await connect(http, tight_server.url, bob)
    await sock.send("x" * (128 * 1024))
    assert await sock.closed() == 1009
    await other.send({"type": "send", "conv": conv, "client_id": "b", "body": "unharmed"})
    assert (await other.expect("sent"))["seq"] == 1


async def test_flood_is_rate_limited_and_retryable(
    tight_server: Server, http: aiohttp.ClientSession
) -> None:
    api = Api(http, tight_server.url)
    alice, bob = await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    sock, _ = await connect(http, tight_server.url, alice)
    for i in range(8):
        await sock.send({"type": "send", "conv": conv, "client_id": f"f{i}", "body": "spam"})
    answers = [await sock.expect(lambda fr: fr.get("type") in ("sent", "error")) for _ in range(8)]
    limited = [a for a in answers if a["type"] == "error"]
    assert len(answers) - len(limited) == 5  # the burst
    assert limited and all(a["code"] == "rate_limited" and a["retryable"] for a in limited)
    _status, history = await api.call("GET", f"/v1/conversations/{conv}/messages", alice.token)
    assert len(history["messages"]) == 5


async def test_frames_before_hello_and_bad_tokens(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice, bob = await api.account(), await api.account()
    sock = await open_socket(http, server.url)
    await sock.send({"type": "send", "conv": 1, "client_id": "x", "body": "hi"})
    assert (await sock.expect("error"))["code"] == "not_authenticated"
    await sock.send({"type": "hello", "token": "pgn_forged", "device": alice.device_id})
    assert (await sock.expect("error"))["code"] == "auth_failed"
    assert await sock.closed() == 4001
    # another user's token with my device id does not work either
    sock = await open_socket(http, server.url)
    await sock.send({"type": "hello", "token": bob.token, "device": alice.device_id})
    assert (await sock.expect("error"))["code"] == "auth_failed"
    assert await sock.closed() == 4001


async def test_revoked_token_is_refused_and_kicked(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice = await api.account()
    sock, _ = await connect(http, server.url, alice)
    status, _ = await api.call("DELETE", "/v1/sessions", alice.token)
    assert status == 204
    assert await sock.closed() == 4004
    status, body = await api.call("GET", "/v1/me", alice.token)
    assert status == 401 and body["code"] == "auth_failed"
    sock = await open_socket(http, server.url)
    await sock.send({"type": "hello", "token": alice.token, "device": alice.device_id})
    assert (await sock.expect("error"))["code"] == "auth_failed"


async def test_http_problems(server: Server, api: Api) -> None:
    status, body = await api.call("POST", "/v1/users", raw=b"{nope")
    assert status == 400 and body["code"] == "bad_json"
    status, body = await api.call("POST", "/v1/users", body={"username": "x", "password": "short"})
    assert status == 422 and body["code"] == "bad_request"
    await api.account("carol")
    status, body = await api.call(
        "POST", "/v1/users", body={"username": "CAROL", "password": "long enough pw"}
    )
    assert status == 409 and body["code"] == "conflict"
    status, body = await api.call(
        "POST", "/v1/sessions", body={"username": "carol", "password": "wrong password"}
    )
    assert status == 401 and body["code"] == "auth_failed"
    status, body = await api.call("GET", "/v1/conversations")
    assert status == 401
    status, doc = await api.call("GET", "/openapi.json")
    assert status == 200 and "/v1/conversations/{conv_id}/messages" in doc["paths"]


async def test_password_guessing_is_rate_limited(server: Server, api: Api) -> None:
    victim = await api.account("victim")
    guesses = [
        await api.call(
            "POST", "/v1/sessions", body={"username": "victim", "password": f"guess-{i}"}
        )
        for i in range(server.config.limits.login_attempts_per_minute - 1)
    ]
    assert {status for status, _ in guesses} == {401}  # account() used one attempt too
    status, body = await api.call(
        "POST", "/v1/sessions", body={"username": "VICTIM", "password": victim.password}
    )
    assert (status, body["code"]) == (429, "rate_limited")  # even the right password waits
    status, _ = await api.call(
        "POST", "/v1/sessions", body={"username": "someone-else", "password": "x" * 10}
    )
    assert status == 401  # other usernames are not affected
