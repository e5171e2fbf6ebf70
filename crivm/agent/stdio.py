"""A process's stdio inside the guest: pipes or a pty master, read and written without blocking.

Output is buffered up to a bound. When the host reads slower than the process writes, the agent
stops reading the pipe, so the process blocks on write, exactly as it would on a full pipe. No
output is dropped and the agent's memory stays bounded. Buffers outlive host connections: a host
that reconnects reads on from where the last reader stopped.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
BUFFER_LIMIT = 1024 * 1024
# What one read() returns at most: one DATA frame of a streamed reply.
MESSAGE_LIMIT = 256 * 1024


class OutputBuffer:
    """Drains a non-blocking fd into memory; read() hands the bytes out in order."""

    def __init__(self, fd: int | None, name: str, *, owns_fd: bool = True) -> None:
        self.name = name
        self._fd = fd
        self._owns_fd = owns_fd
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = fd is None
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._reading = False
        if fd is not None:
            os.set_blocking(fd, False)
            self._resume()

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    async def read(self, limit: int = MESSAGE_LIMIT) -> bytes:
        """Up to `limit` buffered bytes, waiting for some. b"" means end of file."""
        while not self._chunks and not self._eof:
            self._changed.clear()
            await self._changed.wait()
        if not self._chunks:
            return b""
        data = b"".join(self._chunks)
        self._chunks = [data[limit:]] if len(data) > limit else []
        data = data[:limit]
        self._size -= len(data)
        if not self._eof:
            self._resume()
        return data

    def close(self) -> None:
        """Stop reading and release the fd; buffered bytes can still be read."""
        self._pause()
        if self._fd is not None and self._owns_fd:
            os.close(self._fd)
        self._fd = None
        self._eof = True
        self._changed.set()

    def _resume(self) -> None:
        if not self._reading and self._fd is not None:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading and self._fd is not None:
            self._loop.remove_reader(self._fd)
        self._reading = False

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            # A pty master reads EIO once the last slave fd closes: that is its end of file.
            if exc.errno != errno.EIO:
                log.warning("reading %s failed: %s", self.name, exc)
            data = b""
        if not data:
            self._pause()
            self._eof = True
        else:
            self._chunks.append(data)
            self._size += len(data)
            if self._size >= BUFFER_LIMIT:
                self._pause()
        self._changed.set()


class InputPipe:
    """Writes to a process's stdin fd without blocking the event loop."""

    def __init__(self, fd: int, name: str, *, owns_fd: bool = True) -> None:
        self.name = name
        self._fd: int | None = fd
        self._owns_fd = owns_fd
        self._lock = asyncio.Lock()
        os.set_blocking(fd, False)

    @property
    def closed(self) -> bool:
        return self._fd is None

    async def write(self, data: bytes) -> int:
        async with self._lock:
            view = memoryview(data)
            while view:
                if self._fd is None:
                    raise BrokenPipeError(errno.EPIPE, f"{self.name} is closed")
                try:
                    written = os.write(self._fd, view)
                except BlockingIOError:
                    await self._writable()
                    continue
                view = view[written:]
            return len(data)

    def close(self) -> None:
        if self._fd is not None and self._owns_fd:
            os.close(self._fd)
        self._fd = None

    async def _writable(self) -> None:
        assert self._fd is not None
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self._fd

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            loop.remove_writer(fd)
