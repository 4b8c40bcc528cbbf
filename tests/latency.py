"""A TCP proxy on loopback that puts a server `delay` seconds away, each way, and watches the
SMTP commands and replies that pass: what a relay 20 ms from its upstream sees, without netem.

Every chunk is passed on `delay` seconds after it arrived, in order, and chunks that arrive
close together stay close together: pipelined commands reach the server together, as they
would over a real link (a store-and-forward delay per round trip, no bandwidth limit).
"""

from __future__ import annotations

import asyncio
import contextlib

from ports import LOOPBACK, listening_port


class DelayProxy:
    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.most_rcpts_in_flight = 0  # RCPTs sent upstream before the replies to them came back
        self._in_flight = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, LOOPBACK, 0)

    @property
    def port(self) -> int:
        return listening_port(self._server)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        sessions = list(self._tasks)
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)

    async def _session(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        session = asyncio.current_task()
        assert session is not None
        self._tasks.add(session)
        server_r, server_w = await asyncio.open_connection(LOOPBACK, self.target_port)
        self._in_flight = 0
        try:
            await asyncio.gather(
                self._pump(client_r, server_w, self._commands),
                self._pump(server_r, client_w, self._replies),
            )
        except (asyncio.CancelledError, ConnectionError):
            pass  # stopped, or a side hung up: the session is over either way
        finally:
            for writer in (client_w, server_w):
                writer.close()
            self._tasks.discard(session)

    async def _pump(self, reader, writer, watch) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                watch(chunk)
                if not chunk:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                writer.write(chunk)

        delivering = asyncio.create_task(deliver())
        try:
            while not delivering.done():
                chunk = await reader.read(65536)
                queue.put_nowait((loop.time() + self.delay, chunk))
                if not chunk:
                    break
            await delivering
        finally:
            delivering.cancel()
            await asyncio.gather(delivering, return_exceptions=True)

    def _commands(self, chunk: bytes) -> None:
        self._in_flight += sum(1 for line in chunk.split(b"\r\n") if line[:5].upper() == b"RCPT ")
        self.most_rcpts_in_flight = max(self.most_rcpts_in_flight, self._in_flight)

    def _replies(self, chunk: bytes) -> None:
        # RCPT replies: one per line with no continuation, but only while RCPTs are out
        # (the replies to MAIL and DATA come when none is).
        answered = sum(1 for line in chunk.split(b"\r\n") if line[3:4] == b" ")
        self._in_flight = max(0, self._in_flight - answered)
