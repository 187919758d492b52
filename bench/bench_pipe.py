"""The worker pipe's own cost (gateway/engine/pipe.py), against multiprocessing's Connection
measured in the same run (what the gateway used before; it needs a blocking socket, so it is
the floor the non-blocking pipe is held to).

- small: decode-step messages (one token event each) from a worker thread to the event loop:
  messages per second, LoopPipe on the loop vs Connection.poll/recv on the loop;
- large: 1 MB requests from the loop to a worker thread that answers each with a small
  message: round trips per second, and the event loop's longest stall meanwhile (a ticker
  task that wants to run every millisecond), LoopPipe vs a blocking Connection.send.

    .venv/bin/python bench/bench_pipe.py [--small 50000] [--large 100]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.engine.pipe import LoopPipe, WorkerPipe  # noqa: E402

STEP = [("d", "r1", "token", None)]


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


async def _ticker(stop: asyncio.Event, worst: list[float]) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        worst[0] = max(worst[0], now - last)
        last = now


async def small_pipe(n: int) -> float:
    ours, theirs = _pair()
    worker = WorkerPipe(theirs.detach())
    loop = asyncio.get_running_loop()
    pipe = LoopPipe(ours)
    got = [0]
    done = loop.create_future()

    def on_messages(messages: list[Any]) -> None:
        got[0] += len(messages)
        if got[0] >= n and not done.done():
            done.set_result(None)

    pipe.attach(loop, on_messages, lambda: None)
    started = time.perf_counter()
    threading.Thread(target=lambda: [worker.send(STEP) for _ in range(n)], daemon=True).start()
    await done
    elapsed = time.perf_counter() - started
    pipe.close()
    worker.close()
    return n / elapsed


async def small_connection(n: int) -> float:
    ours, theirs = _pair()
    ours.setblocking(False)  # as the loop's add_reader left it
    conn, worker = Connection(ours.detach()), Connection(theirs.detach())
    loop = asyncio.get_running_loop()
    got = [0]
    done = loop.create_future()

    def readable() -> None:
        while conn.poll():
            conn.recv()
            got[0] += 1
        if got[0] >= n and not done.done():
            done.set_result(None)

    loop.add_reader(conn.fileno(), readable)
    started = time.perf_counter()
    threading.Thread(target=lambda: [worker.send(STEP) for _ in range(n)], daemon=True).start()
    await done
    elapsed = time.perf_counter() - started
    loop.remove_reader(conn.fileno())
    conn.close()
    worker.close()
    return n / elapsed


def _echo(worker: Any, n: int) -> None:
    for _ in range(n):
        worker.recv()
        worker.send(("ok",))


async def large_pipe(n: int, payload: str) -> tuple[float, float]:
    ours, theirs = _pair()
    worker = WorkerPipe(theirs.detach())
    loop = asyncio.get_running_loop()
    pipe = LoopPipe(ours)
    replies: asyncio.Queue[Any] = asyncio.Queue()
    pipe.attach(loop, lambda ms: [replies.put_nowait(m) for m in ms], lambda: None)
    threading.Thread(target=_echo, args=(worker, n), daemon=True).start()
    stop, worst = asyncio.Event(), [0.0]
    ticker = asyncio.create_task(_ticker(stop, worst))
    started = time.perf_counter()
    for _ in range(n):
        pipe.send(("gen", "r1", {"prompt": payload}))
        await replies.get()
    elapsed = time.perf_counter() - started
    stop.set()
    await ticker
    pipe.close()
    worker.close()
    return n / elapsed, worst[0]


async def large_connection(n: int, payload: str) -> tuple[float, float]:
    """The floor: a blocking send on the loop (it holds the loop until the frame is written)."""
    ours, theirs = _pair()
    conn, worker = Connection(ours.detach()), Connection(theirs.detach())
    threading.Thread(target=_echo, args=(worker, n), daemon=True).start()
    stop, worst = asyncio.Event(), [0.0]
    ticker = asyncio.create_task(_ticker(stop, worst))
    started = time.perf_counter()
    for _ in range(n):
        conn.send(("gen", "r1", {"prompt": payload}))
        while not conn.poll():
            await asyncio.sleep(0)
        conn.recv()
    elapsed = time.perf_counter() - started
    stop.set()
    await ticker
    conn.close()
    worker.close()
    return n / elapsed, worst[0]


async def main(args: argparse.Namespace) -> None:
    payload = "x" * 1_000_000
    rows = []
    for round_ in range(args.rounds):  # alternate, so drift in the machine hits both alike
        pipe_small = await small_pipe(args.small)
        conn_small = await small_connection(args.small)
        pipe_large, pipe_lag = await large_pipe(args.large, payload)
        conn_large, conn_lag = await large_connection(args.large, payload)
        rows.append((pipe_small, conn_small, pipe_large, conn_large, pipe_lag, conn_lag))
        print(
            f"round {round_ + 1}: small {pipe_small:,.0f} vs {conn_small:,.0f} msg/s "
            f"(ratio {pipe_small / conn_small:.2f}); 1 MB round trips {pipe_large:,.0f} vs "
            f"{conn_large:,.0f}/s (ratio {pipe_large / conn_large:.2f}); "
            f"longest loop stall {pipe_lag * 1000:.1f} ms vs {conn_lag * 1000:.1f} ms"
        )
    mid = sorted(rows, key=lambda r: r[0] / r[1])[len(rows) // 2]
    print(f"median small-message ratio (pipe / Connection): {mid[0] / mid[1]:.2f}")
    mid = sorted(rows, key=lambda r: r[2] / r[3])[len(rows) // 2]
    print(f"median 1 MB round-trip ratio (pipe / blocking Connection): {mid[2] / mid[3]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=50_000)
    parser.add_argument("--large", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
