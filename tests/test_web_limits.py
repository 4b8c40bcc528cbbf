"""The HTTP service against hostile clients: connection caps (503 at once), idle timeouts that a
slow-loris cannot stretch, TLS and shutdown still working. Real sockets on loopback, the real
app, runner and site as the service builds them, real storage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest

from clickrelay.config import _networks
from clickrelay.limits import LogThrottle
from clickrelay.service import Parts, running
from clickrelay.web.app import REFUSED, LimitedSite

from support import LOOPBACK


def web_settings(settings, **changes):
    return replace(settings, web=replace(settings.web, **changes))


@contextlib.asynccontextmanager
async def serve(settings) -> AsyncIterator[LimitedSite]:
    """The web service as `clickrelay web` starts it (service.running); its site."""
    async with running(settings, Parts(smtp=False, web=True)) as node:
        assert node.web is not None
        yield node.web.site


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Conn:
    """A raw HTTP/1.1 client connection (keep-alive), optionally from another loopback address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str = LOOPBACK, tls: ssl.SSLContext | None = None):
        reader, writer = await asyncio.open_connection(
            LOOPBACK, port, local_addr=(source, 0), ssl=tls,
            server_hostname="localhost" if tls else None,
        )  # fmt: skip
        return cls(reader, writer)

    async def get(self, path: str = "/healthz", timeout: float = 5) -> Answer:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: click.test\r\n\r\n".encode())
        return await self.answer(timeout)

    async def answer(self, timeout: float = 5) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return Answer(int(status_line.split()[1]), headers, body)

    async def closed_by_server(self, timeout: float) -> bool:
        """True once the server has closed (EOF or reset) within `timeout` seconds."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except (ConnectionError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
        return rest == b"" or self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class Clients:
    """Opens client connections and closes every one of them at the end of the test."""

    def __init__(self) -> None:
        self.opened: list[Conn] = []

    async def open(self, port: int, source: str = LOOPBACK, tls: ssl.SSLContext | None = None):
        conn = await Conn.open(port, source, tls)
        self.opened.append(conn)
        return conn

    async def close_all(self) -> None:
        for conn in self.opened:
            conn.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await conn.writer.wait_closed()


@pytest.fixture
async def clients():
    opened = Clients()
    yield opened
    await opened.close_all()


async def until(condition, timeout: float = 5.0) -> None:
    """Wait (bounded) for a condition the server reaches on its own, e.g. a close processed."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_connections_over_the_total_cap_get_a_quick_503_and_are_closed(settings, clients):
    async with serve(web_settings(settings, max_connections=3)) as site:
        held = [await clients.open(site.port) for _ in range(3)]
        for conn in held:  # each admitted and served, kept open (keep-alive)
            assert (await conn.get()).status == 200
        started = time.perf_counter()
        extra = await clients.open(site.port)
        refused = await extra.get()
        elapsed = time.perf_counter() - started
        assert await extra.closed_by_server(timeout=1)
        held[0].close()
        await until(lambda: site.limits.open == 2)
        again = await clients.open(site.port)
        after_release = await again.get()
        for conn in [*held, again]:
            conn.close()
    assert refused.status == 503
    assert refused.headers["connection"] == "close"
    assert refused.headers["retry-after"] == "5"
    assert refused.body == b"Too many connections; try again soon.\n"
    assert len(REFUSED) < 300  # small: a flood costs the server little
    assert elapsed < 0.5, f"the 503 took {elapsed * 1000:.1f} ms"
    assert after_release.status == 200


async def test_the_per_client_cap_spares_other_clients_and_trusted_proxies(settings, clients):
    capped = web_settings(settings, max_connections=10, max_connections_per_client=2)
    async with serve(capped) as site:
        mine = [await clients.open(site.port) for _ in range(2)]
        assert [(await c.get()).status for c in mine] == [200, 200]
        third = await (await clients.open(site.port)).get()
        other_client = await (await clients.open(site.port, source="127.0.0.2")).get()
    proxied = web_settings(capped, trusted_proxies=_networks(["127.0.0.0/8"]))
    async with serve(proxied) as site:
        behind_proxy = [await clients.open(site.port) for _ in range(10)]
        statuses = [(await c.get()).status for c in behind_proxy]
        eleventh = await (await clients.open(site.port)).get()  # the total still counts
    assert third.status == 503
    assert other_client.status == 200
    assert statuses == [200] * 10
    assert eleventh.status == 503


async def test_a_flood_of_refusals_logs_one_line(settings, caplog, clients):
    caplog.set_level(logging.WARNING, logger="clickrelay.limits")
    async with serve(web_settings(settings, max_connections=1)) as site:
        holder = await clients.open(site.port)
        assert (await holder.get()).status == 200

        async def refused() -> int:
            conn = await clients.open(site.port)
            try:
                return (await conn.get()).status
            finally:
                conn.close()

        statuses = await asyncio.gather(*(refused() for _ in range(200)))
        assert site.limits.open == 1
    lines = [r for r in caplog.records if r.name == "clickrelay.limits"]
    assert statuses == [503] * 200
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "web: connection from 127.0.0.1 refused: 1 connections open" in lines[0].getMessage()
    assert "(1 refused since the last such line)" in lines[0].getMessage()


async def test_refusals_after_the_first_line_are_counted_in_the_next(caplog):
    caplog.set_level(logging.WARNING, logger="test.throttle")
    throttle = LogThrottle(logging.getLogger("test.throttle"), "refused", interval=0.2)
    for i in range(100):
        throttle.event(f"refusal {i}")
    assert len(caplog.records) == 1
    await until(lambda: len(caplog.records) == 2, timeout=3)
    first, second = (r.getMessage() for r in caplog.records)
    assert first == "refusal 0 (1 refused since the last such line)"
    assert second == "refusal 99 (99 refused since the last such line)"
    gap = caplog.records[1].created - caplog.records[0].created
    assert gap >= 0.19  # never two lines within the interval


async def test_a_silent_connection_is_closed_after_the_idle_timeout(settings, clients):
    async with serve(web_settings(settings, idle_timeout_seconds=1)) as site:
        started = time.perf_counter()
        conn = await clients.open(site.port)
        closed = await conn.closed_by_server(timeout=5)
        elapsed = time.perf_counter() - started
        await until(lambda: site.limits.open == 0)
    assert closed
    assert 0.9 < elapsed < 2.0, f"closed after {elapsed:.2f} s"


async def test_a_slow_loris_dripping_header_bytes_is_closed_on_time(settings, clients):
    """aiohttp's keepalive_timeout runs from the connection's start; bytes of an unfinished
    request do not push it back."""
    async with serve(web_settings(settings, idle_timeout_seconds=1)) as site:
        started = time.perf_counter()
        conn = await clients.open(site.port)
        conn.writer.write(b"GET /healthz HTTP/1.1\r\nHost: click.test\r\n")
        dripped = 0
        closed = False
        for _ in range(40):  # a header byte every 0.1 s, for up to 4 s
            try:
                conn.writer.write(b"X")
                await conn.writer.drain()
            except ConnectionError:
                closed = True
                break
            dripped += 1
            if await conn.closed_by_server(timeout=0.1):
                closed = True
                break
        elapsed = time.perf_counter() - started
    assert closed, "the server kept a dripping connection open for 4 s"
    assert dripped >= 5  # bytes kept coming while the timeout ran
    assert 0.9 < elapsed < 2.0, f"closed after {elapsed:.2f} s"


async def test_keep_alive_connections_are_closed_when_idle_after_an_answer(settings, clients):
    async with serve(web_settings(settings, idle_timeout_seconds=1)) as site:
        conn = await clients.open(site.port)
        await asyncio.sleep(0.6)  # pacing, not waiting for the server: within the timeout
        first = await conn.get()
        answered = time.perf_counter()
        closed = await conn.closed_by_server(timeout=5)
        idle = time.perf_counter() - answered
    assert first.status == 200  # a request in time is served
    assert closed
    assert 0.9 < idle < 2.0, f"closed {idle:.2f} s after the answer"


@pytest.fixture
def client_tls(tls_files):
    return ssl.create_default_context(cafile=str(tls_files[0]))


async def test_tls_still_works_and_refusals_are_answered_over_tls(
    settings, tls_files, client_tls, clients
):
    cert, key = tls_files
    async with serve(web_settings(settings, max_connections=1, tls_cert=cert, tls_key=key)) as site:
        first = await clients.open(site.port, tls=client_tls)
        served = await first.get()
        second = await clients.open(site.port, tls=client_tls)
        refused = await second.get()
        closed = await second.closed_by_server(timeout=2)
        first.close()
    assert served.status == 200 and served.body == b"ok\n"
    assert refused.status == 503 and refused.headers["connection"] == "close"
    assert closed


async def test_shutdown_closes_held_and_refused_connections_promptly(settings, clients):
    site_settings = web_settings(settings, max_connections=2, idle_timeout_seconds=60)
    async with contextlib.AsyncExitStack() as stack:
        site = await stack.enter_async_context(serve(site_settings))
        held = [await clients.open(site.port) for _ in range(2)]
        assert [(await c.get()).status for c in held] == [200, 200]
        lingering = await clients.open(site.port)  # refused; it never closes its side
        assert (await lingering.answer()).status == 503
        started = time.perf_counter()
    shutdown = time.perf_counter() - started
    assert all([await c.closed_by_server(timeout=1) for c in [*held, lingering]])
    assert shutdown < 1.5, f"shutdown took {shutdown:.2f} s"
