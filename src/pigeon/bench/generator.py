"""The load generator: lean raw-frame clients, run in one or more shard processes.

A client is one WebSocket speaking protocol frames directly (`wsclient` + msgspec), with no
SDK bookkeeping beyond what the measurement needs: the inbox position (for acks and
resume), and a callback per received frame, run as its bytes are read (no task per
socket). Send times travel in the message body as ``time.monotonic()`` (one clock for
every process on a Linux machine), so a receipt in any shard process can be timed against
its send.

Shards are separate processes (``spawn``), each with its own event loop, driven by the
parent through a pipe: ``Link.sync(name, payload)`` in a shard waits until the parent,
having collected every shard's payload with ``Coordinator.gather(name)``, releases them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any

import msgspec

from pigeon.bench import wsclient
from pigeon.bench.metrics import SATURATED, CpuMeter, raise_nofile
from pigeon.bench.target import Account
from pigeon.bench.wsclient import RawWebSocket
from pigeon.runtime import tune_gc_for_serving


class In(msgspec.Struct):
    """Every server frame, flattened: only the fields the bench looks at."""

    type: str
    inbox_seq: int = 0
    conv: int = 0
    seq: int = 0
    sender: int = 0
    kind: str = ""
    body: str = ""
    client_id: str = ""
    up_to: int = 0
    code: str = ""
    message: str = ""


_decode = msgspec.json.Decoder(In | list[In]).decode
_encode = msgspec.json.Encoder().encode

Handler = Callable[["Client", In, float], None]


def stamp(pad: int = 48) -> str:
    """A message body carrying its send time."""
    return f"{time.monotonic():.6f} " + "x" * pad


def sent_at(body: str) -> float:
    return float(body.split(" ", 1)[0])


class Client:
    """One bench connection. ``handler(client, frame, now)`` sees every frame."""

    __slots__ = (
        "account",
        "acked",
        "caught_up",
        "errors",
        "handler",
        "inbox_gaps",
        "index",
        "position",
        "ws",
    )

    def __init__(self, index: int, account: Account, handler: Handler) -> None:
        self.index = index
        self.account = account
        self.handler = handler
        self.ws: RawWebSocket | None = None
        self.position = 0  # last inbox position received
        self.acked = 0
        self.inbox_gaps = 0  # inbox positions that arrived out of order (server bug)
        self.errors: list[str] = []
        self.caught_up = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self.ws is None or self.ws.closed

    async def connect(self, resume: bool = False) -> None:
        """Open and say hello; ``caught_up`` is set at the end of replay."""
        self.caught_up.clear()
        self.ws = await wsclient.connect(self.account.url + "/v1/ws", self._on_message)
        hello: dict[str, Any] = {
            "type": "hello",
            "token": self.account.token,
            "device": self.account.device_id,
            "echo": False,  # as the SDK: our own messages come back as `sent`, not `msg`
        }
        if resume:
            hello["resume_from"] = self.position
        self.ws.send(_encode(hello))

    def _on_message(self, data: bytes, now: float) -> None:
        try:
            decoded = _decode(data)
        except msgspec.DecodeError as exc:
            self.errors.append(f"undecodable message: {exc}")
            return
        handler = self.handler
        for frame in decoded if isinstance(decoded, list) else (decoded,):
            if frame.inbox_seq:
                if frame.inbox_seq != self.position + 1:
                    self.inbox_gaps += 1
                self.position = max(self.position, frame.inbox_seq)
            elif frame.type == "welcome":
                continue
            elif frame.type == "caught_up":
                self.caught_up.set()
                continue
            elif frame.type == "error":
                self.errors.append(f"{frame.code}: {frame.message}")
            handler(self, frame, now)

    def send(self, conv: int, client_id: str, body: str) -> None:
        if self.ws is not None:
            self.ws.send(
                _encode({"type": "send", "conv": conv, "client_id": client_id, "body": body})
            )

    def ack(self) -> None:
        if self.position > self.acked and not self.closed:
            assert self.ws is not None
            self.acked = self.position
            self.ws.send(_encode({"type": "ack", "up_to": self.position}))

    def ping(self) -> None:
        if self.ws is not None:
            self.ws.send(b'{"type":"ping"}')

    def drop(self) -> None:
        """Lose the connection abruptly (no closing handshake), as a phone losing signal."""
        if self.ws is not None:
            self.ws.abort()

    async def wait_closed(self) -> None:
        if self.ws is not None:
            await asyncio.wait([self.ws.closed_future], timeout=30)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


@dataclass
class Background:
    """Periodic acks (cumulative, each client every ``ack_s``) and pings (each client every
    ``ping_s``), both spread over their period: devices do not ack or ping in lockstep, and
    a shard acking all its clients in one go stalls its own reading (and the server's) for
    as long as a thousand writes take."""

    clients: list[Client]
    ack_s: float = 0.05
    ack_slices: int = 5
    ping_s: float = 15.0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._acks()), asyncio.create_task(self._pings())]

    async def _acks(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(self.ack_s / self.ack_slices)
            for client in self.clients[tick % self.ack_slices :: self.ack_slices]:
                client.ack()
            tick += 1

    async def _pings(self) -> None:
        """Spread: each second, the clients whose slot it is."""
        period = max(1, int(self.ping_s))
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            for client in self.clients[tick % period :: period]:
                client.ping()
            tick += 1

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()


async def connect_all(
    clients: list[Client],
    concurrency: int = 200,
    tolerate: bool = False,
) -> list[str]:
    """Connect every client (at most ``concurrency`` handshakes at once) until caught up.

    A failed connect raises, unless ``tolerate``: then the failures are returned (one
    ``repr`` each) and those clients are left unconnected (idle counts them)."""
    gate = asyncio.Semaphore(concurrency)
    failures: list[str] = []

    async def one(client: Client) -> None:
        async with gate:
            try:
                await client.connect()
                await asyncio.wait_for(client.caught_up.wait(), 60)
            except (OSError, TimeoutError) as exc:
                if not tolerate:
                    raise
                failures.append(repr(exc))
                with contextlib.suppress(Exception):
                    await client.close()
                client.ws = None

    await asyncio.gather(*(one(c) for c in clients))
    return failures


# -- shard processes and their coordination --------------------------------------------


@dataclass
class ShardSpec:
    scenario: str
    index: int
    count: int
    params: dict[str, Any]
    accounts: list[Account]  # this shard's clients
    first: int  # global index of accounts[0]
    plan: dict[str, Any]  # conversation ids etc.


class _PipeReader:
    """Reads a pipe in a thread (blocking, so large messages arrive whole) into a queue."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._read, args=(loop,), daemon=True)
        self._thread.start()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                item = self.pipe.recv()
            except (EOFError, OSError):
                loop.call_soon_threadsafe(self.queue.put_nowait, ("eof", None, None))
                return
            loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def close(self) -> None:
        self.pipe.close()


class Link:
    """A shard's side of the pipe."""

    def __init__(self, pipe: Pipe) -> None:
        self._reader = _PipeReader(pipe)
        self._pipe = pipe

    async def sync(self, name: str, payload: Any = None) -> Any:
        self._pipe.send(("sync", name, payload))
        kind, got, data = await self._reader.queue.get()
        if kind != "go" or got != name:
            raise RuntimeError(f"shard expected go {name!r}, got {kind} {got!r}")
        return data


ShardFn = Callable[[ShardSpec, Link], Awaitable[dict[str, Any]]]


def _shard_main(spec: ShardSpec, pipe: Pipe) -> None:
    raise_nofile()
    from pigeon.bench.scenarios import SCENARIOS

    run: ShardFn = SCENARIOS[spec.scenario].shard

    async def main() -> None:
        # A long-running process holding many sockets, like the server: its collector's
        # pauses would otherwise count as message latency.
        tune_gc_for_serving()
        link = Link(pipe)
        try:
            result = await run(spec, link)
        except BaseException as exc:
            pipe.send(("failed", "", repr(exc)))
            raise
        pipe.send(("result", "", result))

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


class Coordinator:
    """The parent's side: start shards, gather their sync points, release them."""

    def __init__(self, specs: list[ShardSpec]) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes: list[Any] = []
        self.readers: list[_PipeReader] = []
        self.pipes: list[Pipe] = []
        for spec in specs:
            parent, child = context.Pipe()
            process = context.Process(target=_shard_main, args=(spec, child), daemon=True)
            process.start()
            child.close()
            self.processes.append(process)
            self.pipes.append(parent)
            self.readers.append(_PipeReader(parent))
        self.cpu = CpuMeter([p.pid for p in self.processes])
        self.shard_cpu = [CpuMeter([p.pid]) for p in self.processes]

    def start_cpu(self) -> None:
        self.cpu.start()
        for meter in self.shard_cpu:
            meter.start()

    def read_cpu(self) -> dict[str, Any]:
        shares = [m.read() for m in self.shard_cpu]
        return {
            "generator_cpu": self.cpu.read(),
            "generator_procs": len(self.processes),
            "generator_cpu_per_proc": shares,
            "generator_saturated": any(s is not None and s >= SATURATED for s in shares),
        }

    async def _next(self, index: int, want: str, name: str, timeout: float) -> Any:
        kind, got, payload = await asyncio.wait_for(self.readers[index].queue.get(), timeout)
        if kind == "failed":
            raise RuntimeError(f"generator shard {index} failed: {payload}")
        if kind == "eof":
            raise RuntimeError(f"generator shard {index} exited")
        if kind != want or got != name:
            raise RuntimeError(f"shard {index}: expected {want} {name!r}, got {kind} {got!r}")
        return payload

    async def gather(self, name: str, timeout: float = 600) -> list[Any]:
        return [await self._next(i, "sync", name, timeout) for i in range(len(self.readers))]

    def release(self, name: str, data: Any = None) -> None:
        for pipe in self.pipes:
            pipe.send(("go", name, data))

    async def results(self, timeout: float = 600) -> list[dict[str, Any]]:
        return [await self._next(i, "result", "", timeout) for i in range(len(self.readers))]

    def close(self) -> None:
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for reader in self.readers:
            reader.close()
