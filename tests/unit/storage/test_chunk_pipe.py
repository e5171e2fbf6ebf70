"""The pipe from the event loop to an unpacking thread: batches, back-pressure, and stopping."""

from __future__ import annotations

import asyncio
import threading

import pytest

from crivm.storage.chunk_pipe import ChunkPipe, PipeAborted

pytestmark = pytest.mark.timeout(30)


async def test_thread_gets_whole_batches_in_order_then_the_rest() -> None:
    pipe = ChunkPipe(batch=10, limit=100)
    got: list[bytes] = []

    def read() -> None:
        while data := pipe.get():
            got.append(data)

    reader = asyncio.ensure_future(asyncio.to_thread(read))
    for piece in (b"abcd", b"efgh", b"ijkl", b"mn"):
        assert await pipe.put(piece)
    pipe.close()
    await asyncio.wait_for(reader, 5)
    assert b"".join(got) == b"abcdefghijklmn"
    # Nothing was handed over below the batch size except the tail after close().
    assert all(len(batch) >= 10 for batch in got[:-1]) and len(got) <= 2


async def test_put_waits_while_the_pipe_is_full() -> None:
    pipe = ChunkPipe(batch=4, limit=8)
    assert await pipe.put(b"12345678")
    blocked = asyncio.ensure_future(pipe.put(b"9"))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    assert await asyncio.to_thread(pipe.get) == b"12345678"
    assert await asyncio.wait_for(blocked, 5) is True
    pipe.close()
    assert await asyncio.to_thread(pipe.get) == b"9"
    assert await asyncio.to_thread(pipe.get) == b""


async def test_abort_wakes_a_waiting_thread_with_pipe_aborted() -> None:
    pipe = ChunkPipe(batch=4, limit=8)
    raised = threading.Event()

    def read() -> None:
        try:
            pipe.get()
        except PipeAborted:
            raised.set()

    reader = asyncio.ensure_future(asyncio.to_thread(read))
    await asyncio.sleep(0.05)
    pipe.abort()
    await asyncio.wait_for(reader, 5)
    assert raised.is_set()
    with pytest.raises(PipeAborted):
        pipe.check()


async def test_put_returns_false_once_the_reader_is_done_even_when_full() -> None:
    pipe = ChunkPipe(batch=4, limit=8)
    assert await pipe.put(b"12345678")
    blocked = asyncio.ensure_future(pipe.put(b"9"))
    await asyncio.sleep(0.05)
    await asyncio.to_thread(pipe.reader_done)
    assert await asyncio.wait_for(blocked, 5) is False
    assert await pipe.put(b"more") is False


async def test_batch_must_fit_the_limit() -> None:
    with pytest.raises(ValueError):
        ChunkPipe(batch=16, limit=8)
