"""The failure tests' checker: devices on the SDK, background traffic, and the final verdict.

Every send is recorded with the ``seq`` of its ``sent``; every message handed to the
application of every device is recorded with its (conv, seq, body, client_id). At the end
`Checker.verify` compares all of it with the conversations' history, read over HTTP:

* no acknowledged message lost: every ``sent`` seq is in history with that client_id and
  body, and reached every device of every member;
* no duplicate handed to any application, per-conversation order on every device;
* every device's view of each of its conversations equals that conversation's history;
* each client_id exists exactly once in history (retries became no second message), and
  history seqs are gapless.

Waits are on events with timeouts; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from pigeon.client import Client, ConnectionEvent, HttpApi, Message, MessageEvent
from tests.support import Account, Api

#: SDK options: reconnect and retry fast (the cluster is local).
CLIENT_OPTIONS: dict[str, Any] = {
    "backoff_initial": 0.05,
    "backoff_max": 0.5,
    "ack_interval": 0.02,
    "connect_timeout": 3.0,
}


@dataclass(frozen=True, slots=True)
class Delivery:
    conv: int
    seq: int
    body: str
    client_id: str


@dataclass(frozen=True, slots=True)
class SendRecord:
    device: str
    conv: int
    client_id: str
    body: str
    seq: int
    started: float  # loop time when the send was first attempted
    acked: float  # loop time of its `sent`


class Changed:
    """A level-triggered "something changed" signal for wait-until loops."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def until(self, predicate: Any, timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


@dataclass(eq=False)
class Device:
    """One device running the SDK against the cluster, its home gateway first in its URLs."""

    name: str
    account: Account
    urls: list[str]
    convs: set[int]
    checker: Checker
    client: Client | None = None
    reader: asyncio.Task[None] | None = None
    connected: bool = False
    connects: int = 0
    connected_at: list[float] = field(default_factory=list)  # loop time of each welcome
    disconnects: list[str] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def user_id(self) -> int:
        return self.account.user_id

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.client = Client(
            self.urls, self.account.token, self.account.device_id, session=session,
            **CLIENT_OPTIONS,
        )  # fmt: skip
        self.reader = asyncio.create_task(self._read(self.client), name=f"reader-{self.name}")
        async with asyncio.timeout(20):
            await self.client.connect()

    async def _read(self, client: Client) -> None:
        async for event in client:
            if isinstance(event, MessageEvent):
                self.deliveries.append(Delivery(event.conv, event.seq, event.body, event.client_id))
            elif isinstance(event, ConnectionEvent):
                if event.state == "connected":
                    self.connected = True
                    self.connects += 1
                    self.connected_at.append(asyncio.get_running_loop().time())
                else:
                    self.connected = False
                    self.disconnects.append(event.reason)
            self.checker.changed.notify()

    async def send(self, conv: int, client_id: str, body: str) -> SendRecord:
        """Send until `sent` (the SDK retries the same client_id across reconnects and
        retryable errors) and record it."""
        assert self.client is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = await self.client.send(conv, body, client_id)
        assert (sent.client_id, sent.conv) == (client_id, conv), sent
        record = SendRecord(self.name, conv, client_id, body, sent.seq, started, loop.time())
        self.checker.record_send(record)
        return record

    def seqs(self, conv: int) -> list[int]:
        return [d.seq for d in self.deliveries if d.conv == conv]

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await self.reader


class Checker:
    def __init__(self) -> None:
        self.devices: list[Device] = []
        self.sends: dict[str, SendRecord] = {}  # client_id -> its acknowledged send
        self.extra_client_ids: set[str] = set()  # acked sends made outside the SDK devices
        self.changed = Changed()

    def record_send(self, record: SendRecord) -> None:
        assert record.client_id not in self.sends, f"client_id reused: {record.client_id}"
        self.sends[record.client_id] = record
        self.changed.notify()

    def record_raw_send(self, conv: int, client_id: str, body: str, seq: int) -> None:
        """An acknowledged send made on a raw socket (not an SDK device)."""
        now = asyncio.get_running_loop().time()
        self.record_send(SendRecord("raw", conv, client_id, body, seq, now, now))

    async def wait_sends(self, count: int, timeout: float = 20.0) -> None:
        await self.changed.until(
            lambda: len(self.sends) >= count, timeout, f"{count} acknowledged sends"
        )

    async def wait_connected(self, devices: list[Device], timeout: float = 20.0) -> None:
        await self.changed.until(
            lambda: all(d.connected for d in devices),
            timeout,
            "devices to be connected: " + ", ".join(d.name for d in devices if not d.connected),
        )

    # -- the end --------------------------------------------------------------------------

    async def histories(self, url: str, session: aiohttp.ClientSession) -> dict[int, list[Message]]:
        """Every conversation's full history over HTTP, read with a member's token."""
        out: dict[int, list[Message]] = {}
        for conv in sorted({c for d in self.devices for c in d.convs}):
            member = next(d for d in self.devices if conv in d.convs)
            api = HttpApi(url, member.account.token, session=session)
            messages: list[Message] = []
            while True:
                after = messages[-1].seq if messages else 0
                page = await api.messages(conv, after=after, limit=500)
                messages += page
                if len(page) < 500:
                    break
            out[conv] = messages
        return out

    async def wait_complete(
        self, histories: dict[int, list[Message]], timeout: float = 30.0
    ) -> None:
        """Wait until every device has seen as many messages as its conversations hold."""

        def done() -> bool:
            return all(
                len(d.seqs(conv)) >= len(histories[conv]) for d in self.devices for conv in d.convs
            )

        def lagging() -> str:
            return ", ".join(
                f"{d.name} conv {c}: {len(d.seqs(c))}/{len(histories[c])}"
                for d in self.devices
                for c in sorted(d.convs)
                if len(d.seqs(c)) < len(histories[c])
            )

        try:
            await self.changed.until(done, timeout, "every device to see its history")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; lagging: {lagging()}") from None

    def verify(self, histories: dict[int, list[Message]]) -> None:
        problems: list[str] = []
        # history itself: gapless seqs, each client_id once
        where: Counter[str] = Counter()
        for conv, messages in histories.items():
            seqs = [m.seq for m in messages]
            if seqs != list(range(1, len(seqs) + 1)):
                problems.append(f"conv {conv}: history seqs not gapless: {seqs[:20]}...")
            where.update(m.client_id for m in messages if m.client_id)  # not system ones
        doubled = sorted(cid for cid, n in where.items() if n > 1)
        if doubled:
            problems.append(f"client_ids more than once in history: {doubled[:10]}")
        # every acknowledged send is in history at its seq, with its client_id and body
        by_seq = {(m.conv, m.seq): m for ms in histories.values() for m in ms}
        for record in self.sends.values():
            message = by_seq.get((record.conv, record.seq))
            if message is None:
                problems.append(f"acked send lost from history: {record}")
            elif (message.client_id, message.body) != (record.client_id, record.body):
                problems.append(f"acked seq holds another message: {record} vs {message}")
        # every device: exactly its conversations' history, once each, in order
        for device in self.devices:
            unexpected = {d.conv for d in device.deliveries} - device.convs
            if unexpected:
                problems.append(f"{device.name}: messages of conversations {unexpected}")
            for conv in sorted(device.convs):
                got = [d for d in device.deliveries if d.conv == conv]
                seqs = [d.seq for d in got]
                dups = sorted(s for s, n in Counter(seqs).items() if n > 1)
                if dups:
                    problems.append(f"{device.name} conv {conv}: duplicates {dups[:10]}")
                if seqs != sorted(seqs):
                    problems.append(
                        f"{device.name} conv {conv}: out of order {_first_inversion(seqs)}"
                    )
                missing = sorted({m.seq for m in histories[conv]} - set(seqs))
                if missing:
                    acked = [s for s in missing if (conv, s) in _acked_seqs(self.sends)]
                    problems.append(
                        f"{device.name} conv {conv}: missing {len(missing)} seqs "
                        f"({len(acked)} acknowledged), first {missing[:10]}"
                    )
                expected = [Delivery(m.conv, m.seq, m.body, m.client_id) for m in histories[conv]]
                if not (dups or missing) and got != expected:
                    problems.append(f"{device.name} conv {conv}: view differs from history")
        assert not problems, "\n".join(problems)

    def summary(self, histories: dict[int, list[Message]]) -> str:
        retried = sum(1 for r in self.sends.values() if r.acked - r.started > 1.0)
        return (
            f"{len(self.sends)} acknowledged sends ({retried} took over 1 s), "
            f"{sum(len(h) for h in histories.values())} messages in {len(histories)} "
            f"conversations, {sum(len(d.deliveries) for d in self.devices)} deliveries to "
            f"{len(self.devices)} devices, {sum(d.connects - 1 for d in self.devices)} reconnects"
        )

    async def close(self) -> None:
        await asyncio.gather(*(d.close() for d in self.devices), return_exceptions=True)


def _acked_seqs(sends: dict[str, SendRecord]) -> set[tuple[int, int]]:
    return {(r.conv, r.seq) for r in sends.values()}


def _first_inversion(seqs: list[int]) -> str:
    for a, b in itertools.pairwise(seqs):
        if b <= a:
            return f"{a} then {b}"
    return ""


class Traffic:
    """Background load: every device sends into its conversations in turn, a few sends in
    flight per device, until stopped. Each send keeps retrying until `sent`."""

    def __init__(
        self,
        devices: list[Device],
        interval: float = 0.1,
        in_flight: int = 3,
        exclude: frozenset[int] = frozenset(),
    ) -> None:
        self._devices = devices
        self._exclude = exclude  # conversations left out
        self._interval = interval
        self._in_flight = in_flight
        self._stop = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._sends: set[asyncio.Task[SendRecord]] = set()
        self.started = 0

    def start(self) -> None:
        self._loops = [asyncio.create_task(self._run(d)) for d in self._devices]

    async def _run(self, device: Device) -> None:
        slots = asyncio.Semaphore(self._in_flight)
        convs = itertools.cycle(sorted(device.convs - self._exclude))
        for n in itertools.count(1):
            if self._stop.is_set():
                return
            await slots.acquire()
            conv = next(convs)
            cid = f"{device.name}-{n}"
            task = asyncio.create_task(device.send(conv, cid, f"body of {cid}"))
            self._sends.add(task)
            task.add_done_callback(lambda _t: slots.release())
            self.started += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)  # the send rate

    async def finish(self, timeout: float = 30.0) -> None:
        """Stop starting sends; wait for every started one to be acknowledged."""
        self._stop.set()
        await asyncio.gather(*self._loops)
        pending = list(self._sends)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*pending)
        except TimeoutError:
            stuck = [t for t in pending if not t.done()]
            raise AssertionError(f"{len(stuck)} sends never acknowledged") from None

    async def cancel(self) -> None:
        self._stop.set()
        for task in [*self._loops, *self._sends]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._sends, return_exceptions=True)


@dataclass
class World:
    """Users, conversations and SDK devices spread over the cluster's gateways."""

    checker: Checker
    devices: list[Device]
    accounts: list[Account]
    group: int
    directs: list[int]

    def homed_on(self, gateway: int) -> list[Device]:
        return [d for d in self.devices if d.name.endswith(f"@gw{gateway}")]


async def build_world(urls: list[str], session: aiohttp.ClientSession, users: int = 6) -> World:
    """``users`` users (the first with two devices), one group of all of them, a ring of
    direct conversations; device i is homed on gateway i % len(urls), and its SDK client
    is given every URL, its home first."""
    apis = [Api(session, url) for url in urls]
    accounts = list(
        await asyncio.gather(*(apis[i % len(urls)].account(f"user{i}") for i in range(users)))
    )
    second = await apis[1 % len(urls)].login(accounts[0].username, accounts[0].password, "laptop")
    group = await apis[0].group(accounts[0], accounts[1:], "everyone")
    pairs = [(i, (i + 1) % users) for i in range(0, users, 2)] + [(1, users - 2)]
    directs = [await apis[0].direct(accounts[a], accounts[b]) for a, b in pairs]
    convs_of = {i: {group} for i in range(users)}
    for (a, b), conv in zip(pairs, directs, strict=True):
        convs_of[a].add(conv)
        convs_of[b].add(conv)
    checker = Checker()
    devices: list[Device] = []
    owners = [(i, accounts[i]) for i in range(users)] + [(0, second)]
    for index, (user, account) in enumerate(owners):
        home = index % len(urls)
        device = Device(
            f"u{user}d{index}@gw{home}",
            account,
            urls[home:] + urls[:home],
            set(convs_of[user]),
            checker,
        )
        devices.append(device)
    checker.devices = devices
    await asyncio.gather(*(d.start(session) for d in devices))
    return World(checker, devices, [*accounts, second], group, directs)


async def finish(world: World, traffic: Traffic, url: str, session: aiohttp.ClientSession) -> None:
    """Drain the traffic, read history, wait for every device, and verify."""
    await traffic.finish()
    histories = await world.checker.histories(url, session)
    await world.checker.wait_complete(histories)
    world.checker.verify(histories)
    print(world.checker.summary(histories))  # shown with -s or on failure
