"""Test helpers for a real headless browser: Debian's chromium, started with a fresh profile and
driven over the Chrome DevTools protocol with aiohttp's websocket client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--no-proxy-server", "--window-size=1280,1000",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]  # fmt: skip
START_SECONDS = 20.0  # a cold chromium start on a busy 2-core machine
STEP_SECONDS = 10.0  # any one DevTools command or awaited event

T = TypeVar("T")


class DevTools:
    """Just enough of the Chrome DevTools protocol: commands to one page, events recorded.

    `events` holds each event's parameters by method; `log` holds every event in arrival order,
    for `wait_until`. `handlers[method]`, if set, is called with each such event's parameters
    as it arrives (it must not block: to answer with a command, it schedules a task).
    """

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.session: str | None = None
        self.events: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self.log: list[tuple[str, dict[str, Any]]] = []
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._arrived: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._next_event = asyncio.Event()  # replaced by a fresh one as each event arrives
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._numbers = itertools.count(1)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            reply = self._replies.pop(data.get("id", -1), None)
            if reply is not None and not reply.done():
                if "error" in data:
                    reply.set_exception(AssertionError(f"DevTools: {data['error']}"))
                else:
                    reply.set_result(data.get("result", {}))
            elif "method" in data:
                params = data.get("params", {})
                self.events[data["method"]].append(params)
                self.log.append((data["method"], params))
                self._arrived[data["method"]].set()
                arrived, self._next_event = self._next_event, asyncio.Event()
                arrived.set()
                handler = self.handlers.get(data["method"])
                if handler is not None:
                    handler(params)
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(AssertionError("the browser closed the DevTools connection"))
        self._next_event.set()  # waiters see the end instead of waiting out their timeout

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._numbers)
        reply = self._replies[number] = asyncio.get_running_loop().create_future()
        message = {"id": number, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        await self.socket.send_json(message)
        return await asyncio.wait_for(reply, STEP_SECONDS)

    async def wait_for(self, event: str) -> None:
        """Until `event` has arrived at least once (at any time since the start)."""
        await asyncio.wait_for(self._arrived[event].wait(), STEP_SECONDS)

    async def wait_until(
        self, match: Callable[[str, dict[str, Any]], T | None], since: int = 0
    ) -> T:
        """The first non-None `match(method, params)` over the events from `log[since]` on,
        waiting (at most STEP_SECONDS) for more to arrive."""

        async def look() -> T:
            seen = since
            while True:
                arrived = self._next_event
                for method, params in self.log[seen:]:
                    found = match(method, params)
                    if found is not None:
                        return found
                seen = len(self.log)
                if self._reader.done():
                    raise AssertionError("the browser closed the DevTools connection")
                await arrived.wait()

        return await asyncio.wait_for(look(), STEP_SECONDS)

    async def open_page(self) -> None:
        """A fresh tab; later commands go to it."""
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        self.session = attached["sessionId"]

    async def navigate(self, url: str) -> None:
        """Load `url` in the page, until its load event."""
        since = len(self.log)
        navigated = await self.call("Page.navigate", url=url)
        assert "errorText" not in navigated, navigated
        await self.wait_until(lambda method, _: method == "Page.loadEventFired" or None, since)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def browser_page(
    session: aiohttp.ClientSession, endpoint: str, domains: Sequence[str],
    headers: dict[str, str] | None = None,
) -> AsyncIterator[DevTools]:  # fmt: skip
    """A fresh tab of the chromium at `endpoint` with these DevTools `domains` enabled (and
    `headers` sent with every request it makes)."""
    socket = await session.ws_connect(endpoint, max_msg_size=64 * 2**20)
    tools = DevTools(socket)
    try:
        await tools.open_page()
        for domain in domains:
            await tools.call(f"{domain}.enable")
        if headers:
            await tools.call("Network.setExtraHTTPHeaders", headers=headers)
        yield tools
    finally:
        await tools.close()
        await socket.close()


@contextlib.asynccontextmanager
async def headless_chromium(profile: Path, flags: Sequence[str] = ()) -> AsyncIterator[str]:
    """Chromium with a fresh profile (and `flags` besides FLAGS); yields its DevTools websocket
    URL. Its whole process group is killed on the way out, however the test ends."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: this test needs Debian's chromium "
            "(apt-get install chromium; .ci/run installs it)."
        )
    browser = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, *flags, f"--user-data-dir={profile}", "about:blank",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    log: list[str] = []
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def read_log() -> None:  # drained to the end, so chromium never blocks on stderr
        assert browser.stderr is not None
        async for raw in browser.stderr:
            line = raw.decode(errors="replace").rstrip()
            log.append(line)
            if line.startswith("DevTools listening on ws://") and not listening.done():
                listening.set_result(line.split()[-1])

    reader = asyncio.create_task(read_log())
    try:
        await asyncio.wait([listening, reader], timeout=START_SECONDS,
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if not listening.done():
            pytest.fail("chromium did not start:\n" + "\n".join(log[-40:]))
        yield listening.result()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGKILL)
        await asyncio.wait_for(browser.wait(), STEP_SECONDS)
        await asyncio.wait_for(reader, STEP_SECONDS)


def console_errors(tools: DevTools) -> list[str]:
    """Errors the page's console would show: CSP violations, failed loads, exceptions."""
    logged = [
        f"{e['entry']['source']}: {e['entry']['text']} {e['entry'].get('url', '')}"
        for e in tools.events["Log.entryAdded"]
        if e["entry"]["level"] == "error"
    ]
    calls = [
        f"console.{e['type']}: {e['args']}"
        for e in tools.events["Runtime.consoleAPICalled"]
        if e["type"] in ("error", "assert")
    ]
    thrown = [str(e["exceptionDetails"]) for e in tools.events["Runtime.exceptionThrown"]]
    return logged + calls + thrown
