"""The campaign page in a real headless browser (Debian's chromium), driven over the DevTools
protocol with aiohttp's websocket client: the figures, links and chart render, the stylesheet
applies under the page's CSP, nothing lands in the console, and a screenshot is kept in
test-artifacts/."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support import basic_auth, start_web

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--no-proxy-server", "--window-size=1280,1000",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]  # fmt: skip
START_SECONDS = 20.0  # a cold chromium start on a busy 2-core machine
STEP_SECONDS = 10.0  # any one DevTools command or awaited event

A = "https://shop.example.com/autumn?utm_source=mail"
B = "https://shop.example.com/boots"
NAME = "Autumn launch"

# What the page looks like to a reader, gathered in the page itself.
INSPECT = """(() => {
  const figures = {};
  for (const box of document.querySelectorAll('.figures div')) {
    figures[box.querySelector('.label').innerText] = box.querySelector('.figure').innerText;
  }
  const box = getComputedStyle(document.querySelector('.figures div'));
  const rects = [...document.querySelectorAll('figure.chart svg rect')];
  return {
    text: document.body.innerText,
    figures,
    border: [box.borderTopStyle, box.borderTopWidth],
    rects: rects.length,
    drawn: rects.filter(r => r.height.baseVal.value > 0).length,
    hrefs: [...document.querySelectorAll('td.url a')].map(a => a.href),
  };
})()"""


class DevTools:
    """Just enough of the Chrome DevTools protocol: commands to one page, events recorded."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.session: str | None = None
        self.events: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self._arrived: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
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
                self.events[data["method"]].append(data.get("params", {}))
                self._arrived[data["method"]].set()
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(AssertionError("the browser closed the DevTools connection"))

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._numbers)
        reply = self._replies[number] = asyncio.get_running_loop().create_future()
        message = {"id": number, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        await self.socket.send_json(message)
        return await asyncio.wait_for(reply, STEP_SECONDS)

    async def wait_for(self, event: str) -> None:
        await asyncio.wait_for(self._arrived[event].wait(), STEP_SECONDS)

    async def open_page(self) -> None:
        """A fresh tab; later commands go to it."""
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        self.session = attached["sessionId"]

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def headless_chromium(profile: Path) -> AsyncIterator[str]:
    """Chromium with a fresh profile; yields its DevTools websocket URL. Its whole process
    group is killed on the way out, however the test ends."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: this test needs Debian's chromium "
            "(apt-get install chromium; .ci/run installs it)."
        )
    browser = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank",
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


async def seed(web) -> dict[str, int]:
    """Three sends; four human clicks by two contacts through the click service, one bot."""
    untracked = {("mailto:help@example.com", "scheme"): 1}
    ids = {
        contact: await web.send(
            campaign="autumn-26", contact=contact, urls=(A, B), name=NAME, untracked=untracked
        )
        for contact in ("1", "2", "3")
    }
    for contact, url in [("1", A), ("1", A), ("1", B), ("2", A)]:
        send_id, links = ids[contact]
        assert (await web.click(send_id, links[url])).status == 302
    send_id, links = ids["3"]
    await web.click(send_id, links[B], method="HEAD")  # a link scanner: a bot click
    return links


async def test_campaign_page_renders_in_a_real_browser(settings, tmp_path):
    settings = replace(settings, reports=replace(settings.reports, password="pw"))
    async with start_web(settings) as web, headless_chromium(tmp_path / "profile") as endpoint:
        links = await seed(web)
        page_url = web.base + "/reports/campaigns/autumn-26"
        socket = await web.session.ws_connect(endpoint, max_msg_size=64 * 2**20)
        tools = DevTools(socket)
        try:
            await tools.open_page()
            for domain in ("Page", "Network", "Runtime", "Log"):
                await tools.call(f"{domain}.enable")
            await tools.call("Network.setExtraHTTPHeaders", headers=basic_auth())
            navigated = await tools.call("Page.navigate", url=page_url)
            assert "errorText" not in navigated, navigated
            await tools.wait_for("Page.loadEventFired")
            seen = await tools.call("Runtime.evaluate", expression=INSPECT, returnByValue=True)
            shot = await tools.call("Page.captureScreenshot", format="png",
                                    captureBeyondViewport=True)  # fmt: skip
        finally:
            await tools.close()
            await socket.close()

    ARTIFACTS.mkdir(exist_ok=True)
    png = base64.b64decode(shot["data"])
    (ARTIFACTS / "campaign-page.png").write_bytes(png)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    statuses = {
        e["response"]["url"]: e["response"]["status"]
        for e in tools.events["Network.responseReceived"]
    }
    assert statuses[page_url] == 200
    assert statuses[web.base + "/reports/static/reports.css"] == 200  # credentials sent for it
    assert "exceptionDetails" not in seen, seen
    page = seen["result"]["value"]
    assert page["figures"] == {
        "tracked sends": "3", "total clicks": "4", "unique clicks": "2", "click rate": "66.7%",
        "bot clicks (not counted)": "1",
    }  # fmt: skip
    for text in (NAME, A, B, "mailto:help@example.com", "Clicks over time"):
        assert text in page["text"], text
    assert page_url + f"/links/{links[A]}" in page["hrefs"]
    assert page["border"] == ["solid", "1px"]  # the stylesheet applied despite the CSP
    assert page["rects"] >= 2 and page["rects"] % 2 == 0  # human and bot bar per bucket
    assert page["drawn"] >= 2  # at least the human and the bot clicks' bars have height
    assert console_errors(tools) == []
