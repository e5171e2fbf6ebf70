"""A bounded byte pipe from the event loop to one worker thread.

A layer download arrives on the event loop in chunks of 16-256 KiB while its unpacking is
blocking work for a thread. The pipe hands the thread the bytes in batches of at least
``batch`` bytes (or whatever is left at the end): every batch costs the thread a few GIL
hand-offs (hash, inflate, write), so few big batches keep the threads from queueing on the
GIL behind each other and the event loop. At most about ``limit`` bytes wait in the pipe;
``put`` waits while it is full, which pushes back on the socket.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque


class PipeAborted(Exception):
    """Raised in the reading thread when the writer gave up (cancelled or failed)."""


class ChunkPipe:
    def __init__(self, *, batch: int, limit: int) -> None:
        if not 0 < batch <= limit:
            raise ValueError(f"batch {batch} must be positive and at most limit {limit}")
        self._batch = batch
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._readable = threading.Condition(self._lock)
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._closed = False
        self._aborted = False
        self._reader_gone = False
        # Set on the event loop when the thread has taken bytes out or stopped reading.
        self._writable = asyncio.Event()
        self._writer_waiting = False

    # -- event loop side --------------------------------------------------------------------

    async def put(self, data: bytes) -> bool:
        """Queue ``data`` for the thread. False once the thread has stopped reading."""
        while True:
            with self._lock:
                if self._reader_gone:
                    return False
                if self._buffered < self._limit:
                    self._chunks.append(data)
                    self._buffered += len(data)
                    if self._buffered >= self._batch:
                        self._readable.notify()
                    return True
                # Cleared under the lock, so the thread's wake-up cannot fall before it.
                self._writable.clear()
                self._writer_waiting = True
            await self._writable.wait()

    def close(self) -> None:
        """No more data: the thread gets what is left, then b""."""
        with self._lock:
            self._closed = True
            self._readable.notify()

    def abort(self) -> None:
        """The thread raises PipeAborted at its next ``get`` or ``check``."""
        with self._lock:
            self._aborted = True
            self._chunks.clear()
            self._buffered = 0
            self._readable.notify()

    # -- thread side ------------------------------------------------------------------------

    def get(self) -> bytes:
        """Block until a batch is there; every byte queued so far, or b"" at the end."""
        with self._lock:
            while not (self._aborted or self._closed or self._buffered >= self._batch):
                self._readable.wait()
            if self._aborted:
                raise PipeAborted()
            chunks, self._chunks = self._chunks, deque()
            self._buffered = 0
            self._wake_writer()
        # Joined outside the lock: the event loop's put() must not wait on a copy.
        return b"".join(chunks)

    def check(self) -> None:
        """Raise PipeAborted if the writer gave up; for long work between two ``get`` calls."""
        if self._aborted:
            raise PipeAborted()

    def reader_done(self) -> None:
        """The thread reads no more (finished or failed); ``put`` returns False from now on."""
        with self._lock:
            self._reader_gone = True
            self._chunks.clear()
            self._buffered = 0
            self._wake_writer()

    def _wake_writer(self) -> None:
        # Called with the lock held.
        if self._writer_waiting:
            self._writer_waiting = False
            self._loop.call_soon_threadsafe(self._writable.set)
