"""Property: whatever the interleaving of sends, drops, restarts and acks on several
devices, every device ends with every message exactly once, in per-conversation order."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pigeon.client import Client, ClientClosed, HttpApi, MessageEvent
from pigeon.protocol.codes import CloseCode
from pigeon.server import Server, build_server
from tests.conftest import fast_passwords, make_config

DEVICES = 4  # alice's phone and laptop, bob, carol
OPTIONS: dict[str, Any] = {"backoff_initial": 0.005, "backoff_max": 0.05, "ack_interval": 0.005}

send = st.tuples(st.just("send"), st.integers(0, DEVICES - 1), st.integers(0, 1), st.integers(1, 4))
drop = st.tuples(
    st.just("drop"), st.integers(0, DEVICES - 1), st.sampled_from(["going_away", "slow"])
)
restart = st.tuples(st.just("restart"), st.integers(0, DEVICES - 1))
settle = st.tuples(st.just("settle"))
operations = st.lists(st.one_of(send, send, drop, restart, settle), min_size=1, max_size=25)


@dataclass
class Device:
    """One device: the SDK client and what the application has seen so far."""

    token: str
    device_id: int
    client: Client | None = None
    reader: asyncio.Task[None] | None = None
    seen: dict[int, list[int]] = field(default_factory=dict)  # conv -> seqs in order
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int = 0  # restarts so far
    started: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self, url: str, resume_from: int) -> None:
        known = {conv: seqs[-1] for conv, seqs in self.seen.items() if seqs}
        self.client = Client(
            url, self.token, self.device_id, resume_from=resume_from,
            known_positions=known or None, **OPTIONS,
        )  # fmt: skip
        await self.client.connect()
        self.reader = asyncio.create_task(self._read(self.client))
        async with self.started:
            self.generation += 1
            self.started.notify_all()

    async def send(self, conv: int, client_id: str, body: str) -> int:
        """Send like an app with a persisted outbox: across a restart, the new client
        sends the same client_id again."""
        while True:
            client, generation = self.client, self.generation
            assert client is not None
            try:
                return (await client.send(conv, body, client_id)).seq
            except ClientClosed:
                async with self.started:
                    await self.started.wait_for(lambda g=generation: self.generation > g)

    async def _read(self, client: Client) -> None:
        async for event in client:
            if isinstance(event, MessageEvent):
                self.seen.setdefault(event.conv, []).append(event.seq)
                self.changed.set()

    async def restart(self, url: str) -> None:
        assert self.client is not None and self.reader is not None
        await self.client.close()
        await self.reader  # the app drains what was handed over before the close
        await self.start(url, self.client.resume_position)

    async def wait_for(self, expected: dict[int, list[int]], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while {c: self.seen.get(c, []) for c in expected} != expected:
                self.changed.clear()
                await self.changed.wait()


async def run_scenario(ops: list[tuple[Any, ...]], data_dir: Path) -> None:
    config = make_config(data_dir, sends_per_second=1e6, send_burst=1_000_000, frame_burst=10**6)
    server: Server = build_server(config, fast_passwords())
    await server.start()
    devices: list[Device] = []
    try:
        async with HttpApi(server.url) as api:
            users = [await api.register(n, "password-" + n) for n in ("alice", "bob", "carol")]
            logins = []
            for name, dev in (
                ("alice", "phone"),
                ("alice", "laptop"),
                ("bob", "p"),
                ("carol", "p"),
            ):
                async with HttpApi(server.url) as login_api:
                    logins.append(await login_api.login(name, "password-" + name, dev))
        owner_api = HttpApi(server.url, logins[0].token)
        group = (await owner_api.create_group("g", [users[1].id, users[2].id])).id
        direct = (await owner_api.create_direct(users[1].id)).id
        await owner_api.close()
        convs = [group, direct]
        members = {group: {0, 1, 2, 3}, direct: {0, 1, 2}}  # device indexes per conversation
        devices = [Device(login.token, login.device.id) for login in logins]
        for device in devices:
            await device.start(server.url, 0)

        sends: list[asyncio.Task[Any]] = []
        counter = 0
        for op in ops:
            if op[0] == "send":
                _, dev, conv_index, count = op
                conv = convs[conv_index]
                if dev not in members[conv]:
                    continue
                for _ in range(count):
                    counter += 1
                    sends.append(
                        asyncio.create_task(devices[dev].send(conv, f"c{counter}", f"m{counter}"))
                    )
            elif op[0] == "drop":
                _, dev, how = op
                code = CloseCode.GOING_AWAY if how == "going_away" else CloseCode.SLOW_CONSUMER
                for conn in list(server.hub.connections):
                    if conn.device_id == devices[dev].device_id:
                        conn.close(code, "test drop")
            elif op[0] == "restart":
                await devices[op[1]].restart(server.url)
            else:
                await asyncio.sleep(0)  # let in-flight work interleave with what follows

        async with asyncio.timeout(30):
            await asyncio.gather(*sends)
        expected_by_conv = {}
        async with HttpApi(server.url, logins[0].token) as api:
            bodies: list[str] = []
            for conv in convs:
                history = await api.messages(conv, limit=500)
                bodies += [m.body for m in history if m.kind == "text"]
                expected_by_conv[conv] = [m.seq for m in history]
                assert expected_by_conv[conv] == list(range(1, len(history) + 1))
            assert sorted(bodies) == sorted(f"m{i}" for i in range(1, counter + 1))  # each once
        for index, device in enumerate(devices):
            expected = {c: s for c, s in expected_by_conv.items() if index in members[c]}
            await device.wait_for(expected, timeout=30)
            # nothing beyond: conversations the device is not in stay empty
            assert set(device.seen) <= set(expected)
    finally:
        for device in devices:
            if device.client is not None:
                await device.client.close()
        await server.stop()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=operations)
def test_every_device_gets_every_message_once_in_order(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        asyncio.run(run_scenario(ops, Path(data_dir)))
