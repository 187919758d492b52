"""The byte stream between the gateway and a worker process: length-prefixed pickled messages
over a Unix socket pair, with one end for each side.

The gateway's end (`LoopPipe`) lives on the event loop, so it never blocks: a message the
socket cannot take at once is buffered whole and flushed as the worker reads, and incoming
bytes are collected until whole messages have arrived. (multiprocessing's Connection assumes a
blocking socket: on the loop's non-blocking one a large send wrote part of a frame, raised
BlockingIOError and left the stream corrupt for every later message.) The worker's end
(`WorkerPipe`) blocks, as a worker has nothing else to do while it waits."""

from __future__ import annotations

import asyncio
import pickle
import select
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

_HEADER = struct.Struct("!Q")
_CHUNK = 1 << 20  # bytes read per recv


def encode(message: Any) -> bytes:
    """One frame: its payload's length, then the pickled message. Raises (RecursionError,
    PicklingError, ...) before anything is written, so a message that cannot be encoded
    fails alone."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


class FrameReader:
    """Bytes in, whole messages out, whatever the chunking."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buf = self._buf
        buf += data
        messages, at = [], 0
        view = memoryview(buf)
        try:
            while len(buf) - at >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buf, at)
                end = at + _HEADER.size + size
                if end > len(buf):
                    break
                messages.append(pickle.loads(view[at + _HEADER.size : end]))
                at = end
        finally:
            view.release()
        del buf[:at]
        return messages


class LoopPipe:
    """The gateway's end, driven by the event loop's reader and writer callbacks."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._reader = FrameReader()
        self._out = bytearray()  # what the socket has not taken yet, whole frames only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_messages: Callable[[list[Any]], None] | None = None
        self._on_eof: Callable[[], None] | None = None
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def readable(self) -> bool:
        """Something waits to be read (or the other end closed), without reading it."""
        if self.closed:
            return False
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def attach(
        self,
        loop: asyncio.AbstractEventLoop,
        on_messages: Callable[[list[Any]], None],
        on_eof: Callable[[], None],
    ) -> None:
        """From now on, deliver what arrives to `on_messages` and the end of the stream (the
        worker exited) to `on_eof`, once."""
        self._loop, self._on_messages, self._on_eof = loop, on_messages, on_eof
        loop.add_reader(self.sock.fileno(), self.read_ready)
        if self._out:
            loop.add_writer(self.sock.fileno(), self._write_ready)

    def send(self, message: Any) -> None:
        """Queue one message; it is written whole, in order, as fast as the worker reads.
        Raises if it cannot be encoded (nothing is queued then) or the pipe is closed."""
        if self.closed:
            raise BrokenPipeError("the pipe to the worker is closed")
        frame = encode(message)
        if self._out:
            self._out += frame
            return
        try:
            sent = self.sock.send(frame)
        except BlockingIOError:
            sent = 0
        if sent < len(frame):
            self._out += memoryview(frame)[sent:]
            if self._loop is not None:
                self._loop.add_writer(self.sock.fileno(), self._write_ready)

    @property
    def pending_bytes(self) -> int:
        return len(self._out)

    def _write_ready(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except BlockingIOError:
            return
        except OSError:
            self._out.clear()  # the worker is gone: the reader sees the end of the stream
            sent = 0
        del self._out[:sent]
        if not self._out and self._loop is not None:
            self._loop.remove_writer(self.sock.fileno())

    def read_ready(self) -> None:
        """Read what has arrived; deliver whole messages, then the end of the stream."""
        if self.closed:
            return
        messages: list[Any] = []
        eof = False
        try:
            while True:
                data = self.sock.recv(_CHUNK)
                if not data:
                    eof = True
                    break
                messages += self._reader.feed(data)
                if len(data) < _CHUNK:
                    break
        except BlockingIOError:
            pass
        except OSError:
            eof = True
        if messages and self._on_messages is not None:
            self._on_messages(messages)
        if eof and not self.closed:
            self.close()
            if self._on_eof is not None:
                self._on_eof()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop.remove_writer(self.sock.fileno())
        self._out.clear()
        self.sock.close()


class WorkerPipe:
    """The worker's end: blocking, safe to send from two threads (the main loop and the
    heartbeat)."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self._reader = FrameReader()
        self._ready: deque[Any] = deque()
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        frame = encode(message)
        with self._lock:
            self.sock.sendall(frame)

    def poll(self, timeout: float | None = 0.0) -> bool:
        """A message (or the end of the stream) can be received; with a timeout of None, wait
        for one. A message that has begun to arrive counts: recv() waits for the rest."""
        if self._ready:
            return True
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def recv(self) -> Any:
        while not self._ready:
            data = self.sock.recv(_CHUNK)
            if not data:
                raise EOFError("the gateway closed the pipe")
            self._ready.extend(self._reader.feed(data))
        return self._ready.popleft()

    def close(self) -> None:
        self.sock.close()
