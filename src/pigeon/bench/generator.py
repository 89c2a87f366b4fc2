"""The load generator: lean raw-frame clients, run in one or more shard processes.

A client is one WebSocket speaking protocol frames directly (aiohttp + msgspec), with no
SDK bookkeeping beyond what the measurement needs: the inbox position (for acks and
resume), and a callback per received frame. Send times travel in the message body as
``time.monotonic()`` (one clock for every process on a Linux machine), so a receipt in any
shard process can be timed against its send.

Shards are separate processes (``spawn``), each with its own event loop, driven by the
parent through a pipe: ``Link.sync(name, payload)`` in a shard waits until the parent,
having collected every shard's payload with ``Coordinator.gather(name)``, releases them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any

import aiohttp
import msgspec

from pigeon.bench.metrics import SATURATED, CpuMeter, raise_nofile
from pigeon.bench.target import Account
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
        "reader",
        "ws",
    )

    def __init__(self, index: int, account: Account, handler: Handler) -> None:
        self.index = index
        self.account = account
        self.handler = handler
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.position = 0  # last inbox position received
        self.acked = 0
        self.inbox_gaps = 0  # inbox positions that arrived out of order (server bug)
        self.errors: list[str] = []
        self.caught_up = asyncio.Event()

    async def connect(self, http: aiohttp.ClientSession, resume: bool = False) -> None:
        """Open, hello, and start reading; ``caught_up`` is set at the end of replay."""
        self.caught_up.clear()
        self.ws = await http.ws_connect(
            self.account.url + "/v1/ws", autoping=True, heartbeat=None, max_msg_size=0
        )
        hello: dict[str, Any] = {
            "type": "hello",
            "token": self.account.token,
            "device": self.account.device_id,
        }
        if resume:
            hello["resume_from"] = self.position
        await self.ws.send_bytes(_encode(hello))
        self.reader = asyncio.create_task(self._read(self.ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        handler = self.handler
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            now = time.monotonic()
            data = _decode(message.data)
            for frame in data if isinstance(data, list) else (data,):
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

    async def send(self, conv: int, client_id: str, body: str) -> None:
        assert self.ws is not None
        await self.ws.send_bytes(
            _encode({"type": "send", "conv": conv, "client_id": client_id, "body": body})
        )

    async def ack(self) -> None:
        if self.position > self.acked and self.ws is not None and not self.ws.closed:
            self.acked = self.position
            await self.ws.send_bytes(_encode({"type": "ack", "up_to": self.position}))

    async def ping(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.send_bytes(b'{"type":"ping"}')

    def drop(self) -> None:
        """Lose the connection abruptly (no closing handshake), as a phone losing signal."""
        if self.ws is None:
            return
        conn = self.ws._conn  # aiohttp has no public abort for a client WebSocket
        if conn is not None and conn.transport is not None:
            conn.transport.abort()
        else:
            sock = self.ws.get_extra_info("socket")
            if isinstance(sock, socket.socket):
                sock.shutdown(socket.SHUT_RDWR)

    async def wait_closed(self) -> None:
        if self.reader is not None:
            await asyncio.wait([self.reader], timeout=30)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()


@dataclass
class Background:
    """Periodic acks (cumulative, every ``ack_s``) and pings (each client every ``ping_s``)."""

    clients: list[Client]
    ack_s: float = 0.05
    ping_s: float = 15.0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._acks()), asyncio.create_task(self._pings())]

    async def _acks(self) -> None:
        while True:
            await asyncio.sleep(self.ack_s)
            for client in self.clients:
                if client.position > client.acked:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await client.ack()

    async def _pings(self) -> None:
        """Spread: each second, the clients whose slot it is."""
        period = max(1, int(self.ping_s))
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            for client in self.clients[tick % period :: period]:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await client.ping()
            tick += 1

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()


async def connect_all(
    http: aiohttp.ClientSession,
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
                await client.connect(http)
                await asyncio.wait_for(client.caught_up.wait(), 60)
            except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                if not tolerate:
                    raise
                failures.append(repr(exc))
                with contextlib.suppress(Exception):
                    await client.close()
                client.ws = None

    await asyncio.gather(*(one(c) for c in clients))
    return failures


def session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    return aiohttp.ClientSession(connector=connector)


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
