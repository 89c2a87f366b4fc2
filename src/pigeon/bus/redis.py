"""The Redis bus of a scaled deployment: presence registry, routing and fan-out wake-ups.

Keys (``P`` is the prefix, ``pigeon`` by default):

* ``P:u:{user}`` — a hash, device -> ``"{expires_ms}|{gateway}"``. One key per user, so
  ``locate`` and ``presence`` are one pipelined round trip of O(users), with no scan of all
  devices. Redis can only expire whole keys, so each field carries its own expiry (read
  against this process's clock) and the key's TTL follows its latest field; lapsed fields
  are dropped by the next write to that user.
* ``P:seen:{user}`` — last seen (unix seconds): written on register, refresh, unregister.
* ``P:gw:{gateway}`` — the pub/sub channel of one gateway: one Redis message per envelope,
  and an envelope already holds every target of a batch on that gateway.
* ``P:fanout`` — the pub/sub channel of fan-out wake-ups.

A redis-py asyncio subscriber tops out near 60k messages/s and an awaited PUBLISH near 9k/s
(`research/limits.md` §4), so publishes are queued and sent in pipelines by one flusher
task, which also keeps them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from redis import asyncio as aioredis
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from pigeon.bus.base import BusUnavailable, EnvelopeHandler, FanoutHandler, PresenceState
from pigeon.bus.envelope import Envelope

log = logging.getLogger(__name__)

#: How long a user's last-seen time is kept after they were last online.
SEEN_TTL_S = 30 * 86400
#: Publishes waiting for the flusher beyond this make ``publish`` wait (back-pressure).
MAX_QUEUED = 10_000
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 2.0

# Renew devices of one user for one gateway. ``force`` (register) takes the entry whatever
# it points at; otherwise (refresh) an entry is written only if it is missing, lapsed or
# already this gateway's, so a heartbeat never steals a device that reconnected elsewhere.
# Lapsed fields are dropped and the key lives as long as its latest field.
_RENEW = """
local key, seen = KEYS[1], KEYS[2]
local gw, now, expires, force = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4] == '1'
local value = expires .. '|' .. gw
for i = 7, #ARGV do
  local ok = force
  if not ok then
    local cur = redis.call('HGET', key, ARGV[i])
    if not cur then
      ok = true
    else
      local sep = string.find(cur, '|', 1, true)
      ok = tonumber(string.sub(cur, 1, sep - 1)) <= now or string.sub(cur, sep + 1) == gw
    end
  end
  if ok then redis.call('HSET', key, ARGV[i], value) end
end
local latest = 0
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do
  local exp = tonumber(string.sub(fields[i + 1], 1, string.find(fields[i + 1], '|', 1, true) - 1))
  if exp <= now then redis.call('HDEL', key, fields[i]) elseif exp > latest then latest = exp end
end
if latest > now then redis.call('PEXPIRE', key, latest - now) end
redis.call('SET', seen, ARGV[5], 'EX', ARGV[6])
"""

# Remove a device only if it still points at this gateway; then it went offline now.
_UNREGISTER = """
local cur = redis.call('HGET', KEYS[1], ARGV[2])
if not cur then return 0 end
if string.sub(cur, string.find(cur, '|', 1, true) + 1) ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
return 1
"""


def _parse_entry(raw: bytes) -> tuple[int, str]:
    expires, _, gateway = raw.decode().partition("|")
    return int(expires), gateway


class RedisBus:
    def __init__(
        self,
        url: str,
        prefix: str = "pigeon",
        *,
        clock: Callable[[], float] = time.time,
        command_timeout_s: float = 5.0,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._clock = clock
        # Few, quick retries: a command of the hot path must fail fast when Redis is gone,
        # not sit in redis-py's default multi-second backoff.
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=command_timeout_s,
            socket_connect_timeout=command_timeout_s,
            socket_keepalive=True,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        )
        self._renew = self._client.register_script(_RENEW)
        self._unregister = self._client.register_script(_UNREGISTER)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Envelope)
        self._fanout_channel = f"{prefix}:fanout"
        # routing: channel -> handler, read by one reader task on one pub/sub connection
        self._handlers: dict[str, EnvelopeHandler] = {}
        self._fanout_handlers: list[FanoutHandler] = []
        self._pubsub: PubSub | None = None
        self._pubsub_lock = asyncio.Lock()
        # channel -> resolved when Redis confirms the subscription (see `_listen`)
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._subscribe_timeout_s = command_timeout_s
        self._wanted = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        # publishing: queued and sent in pipelines by one flusher task
        self._queue: list[tuple[str, bytes]] = []
        self._fanout_pending = False
        self._flusher: asyncio.Task[None] | None = None
        self._degraded = False

    def _user_key(self, user_id: int) -> str:
        return f"{self._prefix}:u:{user_id}"

    def _seen_key(self, user_id: int) -> str:
        return f"{self._prefix}:seen:{user_id}"

    def _channel(self, gateway_id: str) -> str:
        return f"{self._prefix}:gw:{gateway_id}"

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        # Not fatal: a gateway may start before Redis and heal when it comes up.
        try:
            await self._client.ping()
        except RedisError as exc:
            self._failed("connect", exc)

    async def close(self) -> None:
        if self._flusher is not None:  # what was published before close still goes out
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._flusher), 2.0)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._handlers.clear()
        self._fanout_handlers.clear()
        await self._client.aclose()

    # -- health: one line per outage, not one per failed call --------------------------

    def _failed(self, what: str, exc: Exception) -> None:
        if not self._degraded:
            self._degraded = True
            log.warning("redis bus unavailable (%s): %s", what, exc)
        else:
            log.debug("redis bus still unavailable (%s): %s", what, exc)

    def _ok(self) -> None:
        if self._degraded:
            self._degraded = False
            log.info("redis bus reachable again")

    # -- presence registry -------------------------------------------------------------

    async def register(self, gateway_id: str, user_id: int, device_id: int, ttl_s: float) -> None:
        # Swallowed on failure: a device can still connect; the next refresh registers it.
        try:
            pipe = self._client.pipeline(transaction=False)
            await self._renew_call(pipe, gateway_id, user_id, [device_id], ttl_s, force=True)
            await pipe.execute()
        except RedisError as exc:
            self._failed("register", exc)
        else:
            self._ok()

    async def refresh(
        self, gateway_id: str, devices: Iterable[tuple[int, int]], ttl_s: float
    ) -> None:
        by_user: dict[int, list[int]] = {}
        for user_id, device_id in devices:
            by_user.setdefault(user_id, []).append(device_id)
        if not by_user:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for user_id, device_ids in by_user.items():
                await self._renew_call(pipe, gateway_id, user_id, device_ids, ttl_s, force=False)
            await pipe.execute()
        except RedisError as exc:
            self._failed("refresh", exc)
        else:
            self._ok()

    async def _renew_call(
        self,
        pipe: Pipeline,
        gateway_id: str,
        user_id: int,
        device_ids: list[int],
        ttl_s: float,
        *,
        force: bool,
    ) -> None:
        now = self._clock()
        now_ms = int(now * 1000)
        args: list[str | int] = [
            gateway_id,
            now_ms,
            now_ms + max(1, int(ttl_s * 1000)),
            1 if force else 0,
            repr(now),
            SEEN_TTL_S,
            *device_ids,
        ]
        # On a pipeline this only queues the EVALSHA (and makes sure the script is loaded
        # before the pipeline runs, also after a Redis restart).
        keys = [self._user_key(user_id), self._seen_key(user_id)]
        await self._renew(keys=keys, args=args, client=pipe)

    async def unregister(self, gateway_id: str, user_id: int, device_id: int) -> None:
        try:
            await self._unregister(
                keys=[self._user_key(user_id), self._seen_key(user_id)],
                args=[gateway_id, device_id, repr(self._clock()), SEEN_TTL_S],
            )
        except RedisError as exc:
            # The entry lapses by itself within its TTL.
            self._failed("unregister", exc)
        else:
            self._ok()

    async def _entries(
        self, user_ids: list[int], with_seen: bool
    ) -> list[tuple[dict[bytes, bytes], bytes | None]]:
        pipe = self._client.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hgetall(self._user_key(user_id))
            if with_seen:
                pipe.get(self._seen_key(user_id))
        replies: list[Any] = await pipe.execute()
        if with_seen:
            return list(zip(replies[0::2], replies[1::2], strict=True))
        return [(reply, None) for reply in replies]

    async def locate(self, user_ids: Iterable[int]) -> dict[str, list[int]]:
        users = list(dict.fromkeys(user_ids))
        if not users:
            return {}
        try:
            entries = await self._entries(users, with_seen=False)
        except RedisError as exc:
            # Nobody is pushed to; every device gets its entries from the inbox on resume.
            self._failed("locate", exc)
            return {}
        self._ok()
        now_ms = self._clock() * 1000
        found: dict[str, list[int]] = {}
        for user_id, (fields, _) in zip(users, entries, strict=True):
            gateways = set()
            for raw in fields.values():
                expires, gateway_id = _parse_entry(raw)
                if expires > now_ms:
                    gateways.add(gateway_id)
            for gateway_id in gateways:
                found.setdefault(gateway_id, []).append(user_id)
        return found

    async def presence(self, user_ids: Iterable[int]) -> list[PresenceState]:
        users = list(user_ids)
        if not users:
            return []
        try:
            entries = await self._entries(users, with_seen=True)
        except RedisError as exc:
            self._failed("presence", exc)
            raise BusUnavailable("presence is unavailable; retry later") from exc
        self._ok()
        now_ms = self._clock() * 1000
        return [
            PresenceState(
                user_id,
                any(_parse_entry(raw)[0] > now_ms for raw in fields.values()),
                float(seen) if seen is not None else None,
            )
            for user_id, (fields, seen) in zip(users, entries, strict=True)
        ]

    async def count(self, key: str, window_s: float) -> int:
        window = int(self._clock() // window_s)
        name = f"{self._prefix}:rl:{key}:{window}"
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.incr(name)
                pipe.expire(name, max(1, int(window_s) + 1))
                hits, _ = await pipe.execute()
        except RedisError as exc:
            self._failed("count", exc)
            raise BusUnavailable("rate limits are unavailable; retry later") from exc
        self._ok()
        return int(hits)

    # -- publishing --------------------------------------------------------------------

    async def publish(self, gateway_id: str, envelope: Envelope) -> None:
        self._queue.append((self._channel(gateway_id), self._encoder.encode(envelope)))
        flusher = self._kick()
        if len(self._queue) > MAX_QUEUED:
            await asyncio.shield(flusher)

    async def notify_fanout(self) -> None:
        # Coalesced: at most one wake-up waits in the queue however many commits ask.
        self._fanout_pending = True
        self._kick()

    def _kick(self) -> asyncio.Task[None]:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return self._flusher

    async def _flush(self) -> None:
        while self._queue or self._fanout_pending:
            batch, self._queue = self._queue, []
            if self._fanout_pending:
                self._fanout_pending = False
                batch.append((self._fanout_channel, b""))
            pipe = self._client.pipeline(transaction=False)
            for channel, payload in batch:
                pipe.publish(channel, payload)
            try:
                await pipe.execute()
            except RedisError as exc:
                # Dropped: pushes are a shortcut, workers also poll.
                self._failed("publish", exc)
            else:
                self._ok()

    # -- subscribing -------------------------------------------------------------------

    async def subscribe(self, gateway_id: str, handler: EnvelopeHandler) -> None:
        channel = self._channel(gateway_id)
        self._handlers[channel] = handler
        await self._listen(channel)

    async def unsubscribe(self, gateway_id: str) -> None:
        channel = self._channel(gateway_id)
        if self._handlers.pop(channel, None) is None:
            return
        async with self._pubsub_lock:
            if self._pubsub is not None:
                try:
                    await self._pubsub.unsubscribe(channel)
                except RedisError as exc:
                    self._failed("unsubscribe", exc)

    async def on_fanout(self, handler: FanoutHandler) -> None:
        self._fanout_handlers.append(handler)
        await self._listen(self._fanout_channel)

    def _channels(self) -> list[str]:
        channels = list(self._handlers)
        if self._fanout_handlers:
            channels.append(self._fanout_channel)
        return channels

    async def _listen(self, channel: str) -> None:
        """Subscribe to ``channel`` and return once Redis confirmed it.

        Waiting for the confirmation is what makes a publish after ``subscribe`` returns
        arrive. If Redis is down, give up waiting after a while: the reader subscribes to
        every wanted channel when it reconnects.
        """
        confirmed = self._confirmed.get(channel)
        if confirmed is None or confirmed.done():
            confirmed = self._confirmed[channel] = asyncio.get_running_loop().create_future()
        self._wanted.set()
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_forever())
        async with self._pubsub_lock:
            # If the reader is not connected yet, it subscribes to all channels itself.
            if self._pubsub is not None:
                try:
                    await self._pubsub.subscribe(channel)
                except RedisError as exc:
                    self._failed("subscribe", exc)
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), self._subscribe_timeout_s)
        except TimeoutError:
            log.warning("redis bus: subscription to %s not confirmed yet; continuing", channel)

    async def _read_forever(self) -> None:
        """Read pub/sub messages; on any connection failure, reconnect and resubscribe.

        Whatever was published while the connection was down is lost, as the contract
        allows; presence heals by itself with the gateways' next refresh.
        """
        backoff = RECONNECT_MIN_S
        lost = False
        while True:
            if not self._channels():
                self._wanted.clear()
                await self._wanted.wait()
            pubsub = self._client.pubsub()
            try:
                async with self._pubsub_lock:
                    await pubsub.subscribe(*self._channels())
                    self._pubsub = pubsub
                if lost:
                    log.info("redis bus: subscriber reconnected and resubscribed")
                    lost = False
                backoff = RECONNECT_MIN_S
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None:
                        self._dispatch(message)
            except (RedisError, OSError) as exc:
                if not lost:
                    log.warning("redis bus: subscriber lost its connection (%s); reconnecting", exc)
                lost = True
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    def _dispatch(self, message: dict[str, Any]) -> None:
        raw_channel = message.get("channel")
        if not isinstance(raw_channel, bytes):  # e.g. a pong
            return
        channel = raw_channel.decode()
        if message.get("type") == "subscribe":
            confirmed = self._confirmed.pop(channel, None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            return
        if message.get("type") != "message":
            return
        try:
            if channel == self._fanout_channel:
                for fanout_handler in list(self._fanout_handlers):
                    fanout_handler()
                return
            handler = self._handlers.get(channel)
            if handler is not None:
                handler(self._decoder.decode(message["data"]))
        except msgspec.DecodeError as exc:
            log.warning("redis bus: undecodable envelope on %s: %s", channel, exc)
        except Exception:
            # A handler's bug must not stop the reader of every other push.
            log.exception("redis bus: handler for %s failed", channel)
