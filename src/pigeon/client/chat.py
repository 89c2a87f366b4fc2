"""``pigeon chat``: a small terminal chat on top of the SDK.

Input is read on a daemon thread (or from any async iterable of lines), so incoming
messages print while the user is typing and a blocked ``readline`` never keeps the
process alive after ``/quit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterable, AsyncIterator
from typing import TextIO

from pigeon.client.client import Client
from pigeon.client.events import (
    ClientError,
    ConnectionEvent,
    FatalError,
    MessageEvent,
    ReceiptEvent,
    SendError,
    TypingEvent,
)
from pigeon.client.http import ApiError, HttpApi
from pigeon.client.models import Conversation

HELP = (
    "commands: /list, /open N, /dm username, /group title user1 user2 ..., /quit; "
    "other lines are sent to the open conversation"
)
_HISTORY_SHOWN = 20
_CONNECT_TIMEOUT = 15.0


async def _lines(stream: TextIO | AsyncIterable[str]) -> AsyncIterator[str]:
    """Lines of ``stream`` without blocking the event loop; ends at EOF."""
    if isinstance(stream, AsyncIterable):
        async for line in stream:
            yield line
        return
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def pump() -> None:
        try:
            for line in iter(stream.readline, ""):
                loop.call_soon_threadsafe(queue.put_nowait, line)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop may be gone at exit
                loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="pigeon-chat-input", daemon=True).start()
    while (item := await queue.get()) is not None:
        yield item


class _Chat:
    """The session state of one terminal: names, titles, the open conversation."""

    def __init__(self, client: Client, me: int, device: int, out: TextIO) -> None:
        self.client = client
        self.me = me
        self.device = device
        self.out = out
        self.names: dict[int, str] = {}
        self.convs: dict[int, Conversation] = {}
        self.listing: list[int] = []
        self.open: int | None = None
        self.last_sent: dict[int, int] = {}  # my newest seq per conversation
        self.shown_receipt: dict[int, str] = {}
        self.sending: set[asyncio.Task[None]] = set()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def title(self, conv: int) -> str:
        c = self.convs.get(conv)
        if c is None:
            return f"#{conv}"
        if c.title:
            return c.title
        others = [self.name(m.user_id) for m in c.members if m.user_id != self.me]
        return ", ".join(others) or f"#{conv}"

    def name(self, user: int) -> str:
        return "you" if user == self.me else self.names.get(user, f"user{user}")

    async def conversation(self, conv: int) -> Conversation | None:
        if conv not in self.convs:
            with contextlib.suppress(ApiError):
                self.convs[conv] = await self.client.http.conversation(conv)
                await self.learn_names([m.user_id for m in self.convs[conv].members])
        return self.convs.get(conv)

    async def learn_names(self, users: list[int]) -> None:
        unknown = [u for u in users if u not in self.names and u != self.me]
        if unknown:
            for user in await self.client.http.users(unknown):
                self.names[user.id] = user.display_name or user.username

    async def show_list(self) -> None:
        summaries = await self.client.http.conversations()
        self.listing = []
        if not summaries:
            self.say("no conversations yet: /dm username or /group title users...")
        await self.learn_names([m.user_id for s in summaries for m in s.members])
        for number, summary in enumerate(summaries, 1):
            self.convs[summary.id] = summary
            self.listing.append(summary.id)
            unread = f" ({summary.unread} unread)" if summary.unread else ""
            self.say(f"{number:>3}. {self.title(summary.id)}{unread}")

    async def open_conv(self, conv: Conversation) -> None:
        self.convs[conv.id] = conv
        await self.learn_names([m.user_id for m in conv.members])
        self.open = conv.id
        self.say(f"-- {self.title(conv.id)} --")
        start = max(0, conv.last_seq - _HISTORY_SHOWN)
        for message in await self.client.http.messages(conv.id, after=start):
            self.say(f"{self.name(message.sender)}: {message.body}")
        if conv.last_seq:
            await self.client.mark_read(conv.id, conv.last_seq)

    async def users(self, usernames: list[str]) -> list[int]:
        ids = []
        for username in usernames:
            user = await self.client.http.user(username)
            self.names[user.id] = user.username
            ids.append(user.id)
        return ids

    async def command(self, line: str) -> bool:
        """Run one input line; False when the user quits."""
        word, _, rest = line.partition(" ")
        args = rest.split()
        if word == "/quit":
            return False
        if word == "/list":
            await self.show_list()
        elif word == "/open" and len(args) == 1 and args[0].isdigit():
            number = int(args[0])
            if not 1 <= number <= len(self.listing):
                self.say("no such conversation: /list shows the numbers")
            else:
                await self.open_conv(await self.client.http.conversation(self.listing[number - 1]))
        elif word == "/dm" and len(args) == 1:
            (user,) = await self.users(args)
            await self.open_conv(await self.client.http.create_direct(user))
        elif word == "/group" and len(args) >= 2:
            members = await self.users(args[1:])
            await self.open_conv(await self.client.http.create_group(args[0], members))
        elif word.startswith("/"):
            self.say(HELP)
        elif self.open is None:
            self.say("no open conversation: /open N, /dm username or /group ...")
        else:
            task = asyncio.create_task(self.send(self.open, line))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)
        return True

    async def send(self, conv: int, body: str) -> None:
        try:
            sent = await self.client.send(conv, body)
        except SendError as err:
            self.say(f"! not sent to {self.title(conv)}: {err.message} ({err.code})")
            return
        except ClientError:
            return  # closing: the chat is over
        self.last_sent[conv] = max(sent.seq, self.last_sent.get(conv, 0))
        self.shown_receipt.pop(conv, None)
        self.say(f"[{self.title(conv)}] you: {body}  ✓")

    async def on_message(self, event: MessageEvent) -> None:
        if event.sender == self.me and event.sender_device == self.device:
            return  # already printed when sent
        await self.conversation(event.conv)
        with contextlib.suppress(ApiError):
            await self.learn_names([event.sender])
        self.say(f"[{self.title(event.conv)}] {self.name(event.sender)}: {event.body}")
        if event.conv == self.open:
            await self.client.mark_read(event.conv, event.seq)

    def on_receipt(self, event: ReceiptEvent) -> None:
        mine = self.last_sent.get(event.conv)
        if mine is None or event.user == self.me:
            return
        state = (
            "read"
            if event.all_read_seq >= mine
            else "✓✓"
            if event.all_delivered_seq >= mine
            else ""
        )
        if state and self.shown_receipt.get(event.conv) != state:
            self.shown_receipt[event.conv] = state
            self.say(f"[{self.title(event.conv)}] {state}")

    async def events(self) -> None:
        async for event in self.client:
            match event:
                case MessageEvent():
                    await self.on_message(event)
                case ReceiptEvent():
                    self.on_receipt(event)
                case TypingEvent() if event.conv == self.open:
                    self.say(f"[{self.title(event.conv)}] {self.name(event.user)} is typing…")
                case ConnectionEvent(state="disconnected", reason=reason):
                    self.say(f"! disconnected ({reason}), reconnecting…")
                case ConnectionEvent(state="connected"):
                    pass


async def run_chat(
    url: str,
    username: str,
    password: str,
    *,
    register: bool,
    display_name: str | None,
    input_stream: TextIO | AsyncIterable[str],
    output_stream: TextIO,
) -> None:
    """Log in (registering first if asked), then chat until ``/quit`` or end of input."""

    def say(text: str) -> None:
        output_stream.write(text + "\n")
        output_stream.flush()

    async with HttpApi(url) as api:
        try:
            if register:
                await api.register(username, password, display_name)
            login = await api.login(username, password, f"pigeon chat on {socket.gethostname()}")
        except ApiError as err:
            say(f"! {err.detail or err.code}")
            return
        client = Client(url, login.token, login.device.id, resume_from=login.device.cursor)
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                await client.connect()
        except (TimeoutError, FatalError) as err:
            say(f"! cannot connect: {err or 'timed out'}")
            await client.close()
            return
        chat = _Chat(client, login.user.id, login.device.id, output_stream)
        chat.names[login.user.id] = login.user.username
        printer = asyncio.create_task(chat.events())
        try:
            say(f"logged in as {login.user.username}. {HELP}")
            await chat.show_list()
            async for raw in _lines(input_stream):
                line = raw.strip()
                if not line:
                    continue
                try:
                    if not await chat.command(line):
                        break
                except ApiError as err:
                    say(f"! {err.detail or err.code}")
                if printer.done():
                    break
        finally:
            await client.close()
            with contextlib.suppress(FatalError):
                await printer
            with contextlib.suppress(ApiError, OSError):
                await api.logout()
