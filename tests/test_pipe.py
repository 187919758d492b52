"""The worker pipe (gateway/engine/pipe.py) on a real socket pair: frames of any size arrive
whole and in order, however the bytes are chunked, and a message that cannot be encoded fails
alone."""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading
from typing import Any

import pytest

from gateway.engine.pipe import FrameReader, LoopPipe, WorkerPipe, encode


def test_frames_reassemble_from_any_chunking() -> None:
    messages: list[Any] = [("gen", "r1", {"prompt": "x" * 1000}), [("d", "r1", "é", None)], ("hb",)]
    data = b"".join(encode(m) for m in messages)
    for size in (1, 3, 7, 64, len(data)):
        reader, got = FrameReader(), []
        for i in range(0, len(data), size):
            got += reader.feed(data[i : i + size])
        assert got == messages


def _pair() -> tuple[LoopPipe, WorkerPipe]:
    ours, theirs = socket.socketpair()
    return LoopPipe(ours), WorkerPipe(theirs.detach())


def test_large_messages_pass_whole_without_blocking_the_loop() -> None:
    big = {"prompt": "y" * 5_000_000, "stop": ["z" * 100_000] * 16}

    async def run() -> tuple[list[Any], int]:
        loop = asyncio.get_running_loop()
        pipe, worker = _pair()
        echoed: asyncio.Queue[Any] = asyncio.Queue()
        pipe.attach(loop, lambda ms: [echoed.put_nowait(m) for m in ms], lambda: None)

        def echo() -> None:  # the worker: read each message whole, answer with its size
            for _ in range(3):
                msg = worker.recv()
                worker.send(("got", len(pickle.dumps(msg))))

        thread = threading.Thread(target=echo)
        thread.start()
        for i in range(3):  # queued back to back: far more than the socket buffer holds
            pipe.send(("gen", f"r{i}", big))
        queued = pipe.pending_bytes
        got = [await asyncio.wait_for(echoed.get(), 60) for _ in range(3)]
        thread.join()
        pipe.close()
        return got, queued

    got, queued = asyncio.run(run())
    assert queued > 0  # send() returned at once, leaving the rest to the loop
    assert got == [("got", len(pickle.dumps(("gen", f"r{i}", big)))) for i in range(3)]


def test_a_message_that_cannot_be_encoded_fails_alone() -> None:
    async def run() -> Any:
        loop = asyncio.get_running_loop()
        pipe, worker = _pair()
        pipe.attach(loop, lambda ms: None, lambda: None)
        deep: list[Any] = []
        for _ in range(100_000):
            deep = [deep]
        with pytest.raises(RecursionError):
            pipe.send(("gen", "r1", deep))
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            pipe.send(("gen", "r2", threading.Lock()))
        pipe.send(("gen", "r3", {"prompt": "fine"}))
        got = await asyncio.to_thread(worker.recv)
        pipe.close()
        return got

    assert asyncio.run(run()) == ("gen", "r3", {"prompt": "fine"})


def test_the_end_of_the_stream_is_reported_after_what_came_before_it() -> None:
    async def run() -> list[Any]:
        loop = asyncio.get_running_loop()
        pipe, worker = _pair()
        seen: list[Any] = []
        ended = loop.create_future()
        pipe.attach(loop, seen.extend, lambda: ended.set_result(None))
        worker.send(("load_error", "boom", "traceback"))
        worker.close()
        await asyncio.wait_for(ended, 10)
        with pytest.raises(BrokenPipeError):
            pipe.send(("stop",))
        return seen

    assert asyncio.run(run()) == [("load_error", "boom", "traceback")]
