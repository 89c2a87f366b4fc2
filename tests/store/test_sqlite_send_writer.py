"""The embedded store's send writer runs in a process of its own: it stops with the store,
and if it dies, it is started again and no acknowledged send is lost or doubled."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from pigeon.store.errors import Unavailable
from pigeon.store.models import SendResult
from pigeon.store.sqlite import SqliteStore
from tests.store.chat import alice_writing_to_bob


async def test_a_killed_send_writer_is_started_again_and_nothing_is_lost(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "w.db", fsync=False)
    killed: list[asyncio.subprocess.Process] = []
    async with alice_writing_to_bob(store) as chat:
        send, conv, alice = chat.send, chat.conv, chat.alice
        outcomes: list[SendResult | BaseException] = []
        while not any(isinstance(o, Unavailable) for o in outcomes) and len(killed) < 5:
            child = store._writer._child
            assert child is not None
            sends = [send(len(outcomes) + i) for i in range(300)]
            await asyncio.sleep(0)  # the first round is on its way
            os.kill(child.pid, signal.SIGKILL)
            killed.append(child)
            outcomes += await asyncio.gather(*sends, return_exceptions=True)
        assert all(isinstance(o, SendResult | Unavailable) for o in outcomes), outcomes
        assert any(isinstance(o, Unavailable) for o in outcomes), "answered before each kill"

        # The retries (same client ids) go to a new send writer; committed sends come back
        # with their first seq.
        count = len(outcomes)
        retried = await asyncio.gather(*[send(i) for i in range(count)])
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, SendResult):
                assert retried[i].seq == outcome.seq and retried[i].duplicate
        history = await store.history(conv.id, alice.id, limit=10_000)
        assert sorted(m.client_id for m in history) == sorted(f"c{i}" for i in range(count))
        assert [m.seq for m in history] == list(range(1, count + 1))
        assert store._writer._child not in killed
    assert all(child.returncode is not None for child in killed)


async def test_the_send_writer_stops_with_the_store(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", fsync=False)
    await store.open()
    child = store._writer._child
    assert child is not None and child.returncode is None
    await store.close()
    assert child.returncode == 0


async def test_a_send_writer_that_cannot_start_fails_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")
    store = SqliteStore(tmp_path / "f.db", fsync=False)
    with pytest.raises(Unavailable, match="the send writer did not start"):
        await store.open()
