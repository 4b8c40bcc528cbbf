"""Events out: signed webhooks to a real receiver on loopback, and the event feed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import signal
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from clickrelay import config
from clickrelay.config import BotSettings, WebhookSettings
from clickrelay.events import signing, webhooks
from clickrelay.storage import open_store
from clickrelay.storage.base import Event, NewSend
from clickrelay.tracking.tokens import Signer, load_secret

import pg
from support import (
    BROWSER,
    LOOPBACK,
    ServiceProcess,
    basic_auth,
    free_port,
    start_web,
    write_config,
)

A, B = "https://shop.example.com/a", "https://shop.example.com/b?x=1&y=%C3%A9"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_signatures_match_the_specification_s_reference_vector():
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    body = b'{"test": 2432232314}'
    assert (
        signing.signature(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )
    now = int(time.time())
    headers = signing.headers(key, "evt_1", now, b'{"a":"\xc3\xa9"}')
    assert Webhook(SECRET).verify(b'{"a":"\xc3\xa9"}', headers) == {"a": "é"}


def test_a_secret_file_is_made_once_private_and_in_the_receivers_form(tmp_path):
    path = tmp_path / "hook-secret"
    key = signing.load_key(path)
    assert path.stat().st_mode & 0o777 == 0o600 and len(key) == 32
    text = path.read_text().strip()
    assert text.startswith("whsec_") and signing.load_key(path) == key
    Webhook(text)  # the reference library takes it as it is
    path.write_text("hunter2\n")
    with pytest.raises(ValueError, match="whsec_"):
        signing.load_key(path)
    path.write_text("whsec_" + base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="24 to 64 bytes"):
        signing.load_key(path)


def test_retries_back_off_exponentially_with_jitter_and_a_ceiling():
    for attempt, ceiling in [(1, 5), (2, 10), (3, 20), (11, 5120), (30, 6 * 3600)]:
        delays = [webhooks.retry_delay(attempt) for _ in range(200)]
        assert ceiling / 2 <= min(delays) < max(delays) <= ceiling


def test_deliveries_give_way_only_when_redirects_saturate_the_node():
    now = {"clock": 0.0, "cpu": 0.0, "clicks": 0}
    load = webhooks.NodeLoad(lambda: now["clicks"], lambda: now["clock"], lambda: now["cpu"])
    window = webhooks.LOAD_WINDOW_SECONDS

    def spend(seconds: float, busy_share: float, clicks: int = 0) -> None:
        now["clock"] += seconds
        now["cpu"] += seconds * busy_share
        now["clicks"] += clicks

    spend(window, 1.0)  # a backlog drained on an idle node: busy, but with itself
    assert not load.busy()
    spend(window, 0.9, clicks=100)  # clicks at nearly full CPU: the redirects come first
    assert load.busy()
    spend(window / 4, 0.0)  # judged over a window, not over the last instant
    assert load.busy()
    spend(window, 0.3, clicks=100)  # clicks, but the CPU mostly idle
    assert not load.busy()
    spend(window, 0.9)  # the load gone: the CPU is the senders' own
    assert not load.busy()


# ---------------------------------------------------------------- a real receiver


@dataclass
class Receiver:
    """A webhook receiver on loopback that verifies every signature with the reference
    library; `fail` answers that status instead of 204, `hang` never answers."""

    secret: str
    fail: int | None = None
    hang: bool = False
    received: list[tuple[dict, dict]] = field(default_factory=list)  # (headers, body)
    rejected: int = 0
    open_now: int = 0
    most_open: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            body = await request.read()
            try:
                parsed = Webhook(self.secret).verify(body, dict(request.headers))
            except Exception:
                self.rejected += 1
                return web.Response(status=400)
            self.received.append((dict(request.headers), parsed))
            self.arrived.set()
            if self.hang:
                await asyncio.Event().wait()
            return web.Response(status=self.fail or 204)
        finally:
            self.open_now -= 1

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/hooks/{secret}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, LOOPBACK, port or free_port())
        await self.site.start()
        self.port = self.site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/hooks/s3cr3t-path"

    async def wait_for(self, count: int, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            self.arrived.clear()
            if len(self.received) >= count:
                return [body for _, body in self.received]
            left = deadline - time.monotonic()
            assert left > 0, f"{len(self.received)} of {count} events arrived"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)


@pytest.fixture
async def receiver(tmp_path):
    secret_file = tmp_path / "hook-secret"
    signing.load_key(secret_file)
    server = Receiver(secret_file.read_text().strip())
    await server.start()
    yield server
    await server.stop()


def hooked(settings, tmp_path, receiver: Receiver, **endpoint):
    """Reports on, one webhook endpoint to the receiver, burst judgement settled in 0.2 s."""
    hook = WebhookSettings(url=receiver.url, secret_file=tmp_path / "hook-secret", **endpoint)
    return replace(
        settings, reports=replace(settings.reports, password="pw"), webhooks=(hook,),
        bots=BotSettings(burst_seconds=0.2),
    )  # fmt: skip


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_human_and_bot_clicks_and_sends_arrive_signed_with_exact_payloads(
    settings, tmp_path, receiver
):
    settings = hooked(settings, tmp_path, receiver, events=("click", "bot_click", "send"))
    async with start_web(settings) as web_:
        send_id, links = await web_.send(urls=(A, B), name="Spring", email="a@example.com")
        await web_.store.set_send_outcome(send_id, "accepted")
        assert (await web_.click(send_id, links[B])).status == 302
        assert (await web_.click(send_id, links[A], method="HEAD")).status == 302
        bodies = await receiver.wait_for(3)
        feed = await web_.api("/api/events")
    assert receiver.rejected == 0
    by_type = {body["type"]: body for body in bodies}
    assert sorted(by_type) == ["bot_click", "click", "send"]
    click, bot, sent = by_type["click"], by_type["bot_click"], by_type["send"]
    assert click["data"] == {
        "campaign_id": "c1", "campaign_name": "Spring", "variant": None, "contact_id": "42",
        "email": "a@example.com", "link_id": links[B], "url": B, "label": None,
        "clicked_at": click["timestamp"], "bot": False, "bot_reason": None,
    }  # fmt: skip
    assert bot["data"]["bot"] is True and bot["data"]["bot_reason"] == "head"
    assert bot["data"]["url"] == A and bot["data"]["link_id"] == links[A]
    assert sent["data"] == {
        "campaign_id": "c1", "campaign_name": "Spring", "contact_id": "42",
        "email": "a@example.com", "message_id": None, "sent_at": iso(web_.sent[send_id]),
    }  # fmt: skip
    ids = {headers["webhook-id"] for headers, _ in receiver.received}
    assert {event["id"] for event in feed["events"]} == ids and len(ids) == 3
    assert all(i.startswith("evt_") for i in ids)
    assert [e["type"] for e in feed["events"]] == ["send", "click", "bot_click"]


async def test_an_endpoint_gets_only_the_events_it_asked_for(settings, tmp_path, receiver):
    settings = hooked(settings, tmp_path, receiver, events=("bot_click",))
    async with start_web(settings) as web_:
        send_id, links = await web_.send()
        await web_.store.set_send_outcome(send_id, "accepted")
        await web_.click(send_id, links["https://example.com/a"])
        await web_.click(send_id, links["https://example.com/a"], method="HEAD")
        bodies = await receiver.wait_for(1)
        stats = await _settled_stats(web_, delivered=1)
    assert [b["type"] for b in bodies] == ["bot_click"]
    assert stats == [{"url": receiver.url, "delivered": 1, "pending": 0, "failed": 0,
                      "last_error": None}]  # fmt: skip


async def _settled_stats(web_, failing: bool = False, **expected) -> list[dict]:
    """/api/webhooks once it shows `expected` (deliveries are recorded after the POST) and,
    if `failing`, a last error (pending deliveries exist before their first attempt)."""
    deadline = time.monotonic() + 20
    while True:
        stats = (await web_.api("/api/webhooks"))["webhooks"]
        shown = all(stats[0][key] == value for key, value in expected.items())
        if shown and (stats[0]["last_error"] or not failing):
            return stats
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.05)


async def test_a_failing_receiver_gets_the_same_id_again_then_failed_for_good(
    settings, tmp_path, receiver, monkeypatch
):
    monkeypatch.setattr(webhooks, "RETRY_FIRST_SECONDS", 0.1)
    receiver.fail = 500
    settings = hooked(settings, tmp_path, receiver, max_attempts=3)
    async with start_web(settings) as web_:
        send_id, links = await web_.send()
        await web_.click(send_id, links["https://example.com/a"])
        await receiver.wait_for(3)
        stats = await _settled_stats(web_, failed=1)
        await asyncio.sleep(0.5)  # no fourth attempt comes (the retries came within 0.3 s)
        async with web_.session.get(f"{web_.base}/reports", headers=basic_auth()) as response:
            page = await response.text()
    assert len(receiver.received) == 3
    assert len({headers["webhook-id"] for headers, _ in receiver.received}) == 1
    assert stats[0]["last_error"] == "HTTP 500" and stats[0]["delivered"] == 0
    row = page[page.index("<h2>Webhooks</h2>") :]
    assert receiver.url in row and "<td>HTTP 500</td>" in row.replace(' class="small"', "")
    assert re.search(r'<td class="num">0</td>\s*<td class="num">0</td>\s*<td class="num">1</td>',
                     row)  # delivered 0, pending 0, failed 1  # fmt: skip


async def test_events_wait_out_a_receiver_outage_and_a_restart(
    settings, tmp_path, receiver, monkeypatch
):
    monkeypatch.setattr(webhooks, "RETRY_FIRST_SECONDS", 0.1)
    port = receiver.port
    await receiver.stop()  # down: connections refused
    settings = hooked(settings, tmp_path, receiver)
    async with start_web(settings) as web_:
        send_id, links = await web_.send()
        for _ in range(3):
            assert (await web_.click(send_id, links["https://example.com/a"])).status == 302
        stats = await _settled_stats(web_, failing=True, pending=3)
        assert "ClientConnectorError" in stats[0]["last_error"]
    await receiver.start(port)  # back, while no node runs
    async with start_web(settings) as web_:
        bodies = await receiver.wait_for(3)
        await _settled_stats(web_, delivered=3, pending=0)
    assert [b["type"] for b in bodies] == ["click"] * 3
    assert len({headers["webhook-id"] for headers, _ in receiver.received}) == 3


async def test_a_hanging_receiver_neither_slows_redirects_nor_opens_more_connections(
    settings, tmp_path, receiver
):
    settings = hooked(settings, tmp_path, receiver, max_concurrency=3, timeout_seconds=30,
                      events=("click", "bot_click"))  # fmt: skip

    async def redirect_times(web_, send_id, link, n=200) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            assert (await web_.click(send_id, link, agent="Mozilla/5.0 x")).status == 302
            times.append(time.perf_counter() - started)
        return sorted(times)

    async with start_web(replace(settings, webhooks=())) as web_:
        send_id, links = await web_.send()
        quiet = await redirect_times(web_, send_id, links["https://example.com/a"])
    receiver.hang = True
    async with start_web(settings) as web_:
        send_id, links = await web_.send(campaign="c2")
        link = links["https://example.com/a"]
        await web_.click(send_id, link)
        await receiver.wait_for(1)  # the sender is stuck on it now
        hung = await redirect_times(web_, send_id, link)
        await receiver.wait_for(3)
        await asyncio.sleep(0.5)  # (time for a fourth request, which must not come)
        assert receiver.most_open == 3  # 200 events due: still 3 requests at a time
    p99_quiet, p99_hung = quiet[int(len(quiet) * 0.99)], hung[int(len(hung) * 0.99)]
    assert p99_hung < max(3 * p99_quiet, 0.05), (p99_quiet, p99_hung)


# ---------------------------------------------------------------- the feed


async def test_the_feed_pages_through_every_event_once_in_a_stable_order(settings, tmp_path):
    settings = replace(
        settings, reports=replace(settings.reports, password="pw"),
        bots=BotSettings(burst_seconds=0.2, min_seconds_after_send=0),
    )  # fmt: skip
    async with start_web(settings) as web_:
        send_id, links = await web_.send(urls=(A, B))
        await web_.store.set_send_outcome(send_id, "accepted")
        for n in range(7):
            await web_.click(send_id, links[A if n % 2 else B])
        seen: list[dict] = []
        after = ""
        deadline = time.monotonic() + 10
        while len(seen) < 8:
            assert time.monotonic() < deadline, seen
            page = await web_.api(f"/api/events?limit=3&after={after}")
            assert len(page["events"]) <= 3 and page["next"]
            seen += page["events"]
            after = page["next"]
        again = await web_.api(f"/api/events?limit=3&after={after}")
        await web_.click(send_id, links[A])
        bad = await web_.get("/api/events?after=bm90LWEtY3Vyc29y", headers=basic_auth())
        refused = await web_.get("/api/events")
    assert [e["type"] for e in seen] == ["send"] + ["click"] * 7
    assert len({e["id"] for e in seen}) == 8
    assert again == {"events": [], "next": after}  # nothing new: the same cursor back
    assert bad.status == 400 and refused.status == 401


def test_an_event_is_its_data_and_nothing_of_the_storage():
    from clickrelay.events.payloads import feed_item, webhook_body

    event = Event("evt_x_1", "click", 1_700_000_007.5, "c1", None, None, None, None,
                  1_700_000_000.0, 7, "https://é.example/", label="hero",
                  bot_reason="burst")  # fmt: skip
    assert json.loads(webhook_body(event)) == {
        "type": "click", "timestamp": "2023-11-14T22:13:27Z",
        "data": {"campaign_id": "c1", "campaign_name": None, "variant": None,
                 "contact_id": None, "email": None, "link_id": 7, "url": "https://é.example/",
                 "label": "hero", "clicked_at": "2023-11-14T22:13:27Z", "bot": True,
                 "bot_reason": "burst"},
    }  # fmt: skip
    assert feed_item(event)["id"] == "evt_x_1"


# ---------------------------------------------------------------- web nodes as processes


def hook_config(tmp_path, receiver: Receiver, storage, name: str, **endpoint) -> tuple:
    """A `clickrelay web` config with one webhook endpoint; its path and web port."""
    port = free_port()
    options = "".join(f"{key} = {value}\n" for key, value in endpoint.items())
    extra = (
        '[reports]\npassword = "pw"\n[bots]\nmin_seconds_after_send = 0\nburst_links = 0\n'
        f'[[webhooks]]\nurl = "{receiver.url}"\nsecret_file = "{tmp_path}/hook-secret"\n'
        f"{options}"
    )
    path = write_config(tmp_path / f"{name}.toml", free_port(), free_port(), port, extra,
                        storage=storage)  # fmt: skip
    return path, port


async def tokens(settings_path, links: int) -> list[str]:
    """Tracked sends recorded as the relay would, one link each; their tracking tokens."""
    settings = config.load(settings_path)
    store = await open_store(settings.storage)
    try:
        signer = Signer(load_secret(settings.tracking.secret_file), store.instance_id)
        found = []
        for n in range(links):
            sent_at = time.time() - 3600
            recorded = await store.record_send(NewSend(
                "hooks", None, "standard", f"contact-{n}", None, None, "tracked",
                ((f"https://shop.example.com/{n}", None),), sent_at=sent_at,
            ))  # fmt: skip
            (link,) = recorded.link_ids.values()
            found.append(signer.sign(recorded.send_id, link, sent_at))
        return found
    finally:
        await store.close()


async def click_all(port: int, found: list[str]) -> list[int]:
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as session:
        statuses = []
        for token in found:
            async with session.get(f"http://{LOOPBACK}:{port}/c/{token}",
                                   allow_redirects=False) as response:  # fmt: skip
                statuses.append(response.status)
        return statuses


@pytest.mark.slow
async def test_two_web_nodes_deliver_each_event_once(tmp_path, receiver):
    storage = pg.storage_for(tmp_path)
    nodes = [hook_config(tmp_path, receiver, storage, f"web{n}") for n in range(2)]
    found = await tokens(nodes[0][0], 40)
    services = [ServiceProcess("web", "--config", str(path)) for path, _ in nodes]
    try:
        for service in services:
            await service.start("http service listening")
        statuses = [
            *await click_all(nodes[0][1], found[::2]),
            *await click_all(nodes[1][1], found[1::2]),
        ]
        await receiver.wait_for(40)
        for service in services:  # each lets its requests in flight finish first
            service.signal(signal.SIGTERM)
        codes = [await service.wait() for service in services]
    finally:
        for service in services:
            await service.kill()
    ids = [headers["webhook-id"] for headers, _ in receiver.received]
    assert statuses == [302] * 40 and codes == [0, 0]
    assert len(ids) == 40 and len(set(ids)) == 40  # every event, from one node, once
    assert receiver.rejected == 0


@pytest.mark.slow
async def test_an_event_in_flight_when_its_node_is_killed_goes_out_again(tmp_path, receiver):
    receiver.hang = True
    path, port = hook_config(tmp_path, receiver, pg.storage_for(tmp_path), "web",
                             timeout_seconds=2)  # fmt: skip
    found = await tokens(path, 1)
    service = ServiceProcess("web", "--config", str(path))
    try:
        await service.start("http service listening")
        assert await click_all(port, found) == [302]
        await receiver.wait_for(1)  # on its way, never answered
        service.signal(signal.SIGKILL)
        assert await service.wait() == -signal.SIGKILL
        receiver.hang = False
        service = ServiceProcess("web", "--config", str(path))
        await service.start("http service listening")
        started = time.monotonic()
        await receiver.wait_for(2, timeout=30)  # once the dead node's lease ran out
        waited = time.monotonic() - started
        service.signal(signal.SIGTERM)
        assert await service.wait() == 0
    finally:
        await service.kill()
    first, again = (headers["webhook-id"] for headers, _ in receiver.received)
    assert first == again and len(receiver.received) == 2
    assert waited < 2 + webhooks.LEASE_MARGIN_SECONDS + 2 * webhooks.POLL_SECONDS
