"""The click service: exact redirects, forged links refused, every answered click kept."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from clickrelay.config import _networks

import pg
from support import BROWSER, start_web

NOW = time.time()


@pytest.fixture
def web_settings(settings):
    return replace(settings, reports=replace(settings.reports, password="pw"))


def clicks(settings) -> list[tuple]:
    return pg.query(
        settings.storage, "SELECT send_id, link_id, method, bot_reason, ip FROM clicks ORDER BY id"
    )


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("https://example.com/a?x=1&y=2#frag", "https://example.com/a?x=1&y=2#frag"),
        ("https://example.com/already%20encoded?q=%C3%A9", "https://example.com/already%20encoded?q=%C3%A9"),
        ("https://example.com/?", "https://example.com/?"),
        ("http://Example.COM:8080/Path/;params?Q=A+B", "http://Example.COM:8080/Path/;params?Q=A+B"),
        ("https://bücher.example/straße?q=ä ö", "https://xn--bcher-kva.example/stra%C3%9Fe?q=%C3%A4%20%C3%B6"),
        ("https://example.com/日本", "https://example.com/%E6%97%A5%E6%9C%AC"),
        ("https://example.com/" + "p" * 3000, "https://example.com/" + "p" * 3000),
    ],
)  # fmt: skip
async def test_redirect_goes_to_the_exact_original_url(web_settings, url, location):
    async with start_web(web_settings) as web:
        send_id, links = await web.send(urls=(url,))
        response = await web.click(send_id, links[url])
    assert response.status == 302
    assert response.headers["Location"] == location
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["X-Robots-Tag"] == "noindex"
    assert clicks(web_settings) == [(send_id, links[url], "GET", None, "127.0.0.0")]


class CountingStore:
    """The real store, counting every call the web app makes to it."""

    def __init__(self, store):
        self.store, self.calls = store, []

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if callable(attr):

            def counted(*args, **kwargs):
                self.calls.append(name)
                return attr(*args, **kwargs)

            return counted
        return attr


@pytest.mark.parametrize(
    "forge",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # flipped last character
        lambda t: t[:16],  # truncated
        lambda t: t + "A",  # one too many
        lambda t: "A" * 32,
        lambda t: "x" * 20_000,  # huge
        lambda t: "%00%ff%fe" + t[9:],  # binary
        lambda t: "%E2%80%AE" * 10 + "AA",
        lambda t: "..%2F..%2Fetc%2Fpasswd",
    ],
)
async def test_forged_tokens_get_404_without_touching_the_database(web_settings, forge):
    counter = None

    def wrap(store):
        nonlocal counter
        counter = CountingStore(store)
        return counter

    async with start_web(web_settings, store_wrapper=wrap) as web:
        send_id, links = await web.send()
        token = web.token(send_id, next(iter(links.values())))
        response = await web.get("/c/" + forge(token))
        body_calls = list(counter.calls)
    assert response.status == 404
    assert "Location" not in response.headers
    assert body_calls == []
    assert clicks(web_settings) == []


async def test_genuine_token_for_an_unknown_send_is_404(web_settings):
    async with start_web(web_settings) as web:
        response = await web.get("/c/" + web.token(999, 999))
    assert response.status == 404


async def test_head_and_scanners_are_bot_clicks(web_settings):
    async with start_web(web_settings) as web:
        send_id, links = await web.send()
        link = links["https://example.com/a"]
        head = await web.click(send_id, link, method="HEAD")
        scanner = await web.click(send_id, link, agent="Mozilla/5.0 (compatible; Mimecast)")
        curl = await web.click(send_id, link, agent="curl/8.5.0")
        human = await web.click(send_id, link)
    assert [r.status for r in (head, scanner, curl, human)] == [302] * 4
    assert head.headers["Location"] == "https://example.com/a"
    assert [c[3] for c in clicks(web_settings)] == ["head", "user_agent", "user_agent", None]


async def test_clicks_right_after_the_send_are_bot_clicks(web_settings):
    async with start_web(web_settings) as web:
        send_id, links = await web.send(sent_at=time.time())
        await web.click(send_id, links["https://example.com/a"])
    assert clicks(web_settings)[0][3] == "too_soon"


async def test_a_burst_over_many_links_marks_all_of_them_bots(web_settings):
    urls = tuple(f"https://example.com/{i}" for i in range(5))
    async with start_web(web_settings) as web:
        send_id, links = await web.send(urls=urls)
        other, other_links = await web.send(contact="43", urls=urls)
        for url in urls[:4]:
            await web.click(send_id, links[url])  # each committed and rolled up on its own
        await web.click(other, other_links[urls[0]])
        figures = await web.api("/api/campaigns/c1")
    reasons = [(c[0], c[3]) for c in clicks(web_settings)]
    assert reasons == [(send_id, "burst")] * 4 + [(other, None)]
    assert (figures["total_clicks"], figures["unique_clicks"], figures["bot_clicks"]) == (1, 1, 4)


async def test_figures_for_a_scripted_click_pattern(web_settings):
    a, b = "https://example.com/a", "https://example.com/b"
    async with start_web(web_settings) as web:
        s1, l1 = await web.send(contact="1", urls=(a, b))
        s2, l2 = await web.send(contact="2", urls=(a, b))
        await web.send(contact="3", urls=(a, b))
        for send_id, link in [(s1, l1[a]), (s1, l1[a]), (s1, l1[b]), (s2, l2[a])]:
            await web.click(send_id, link)
        await web.click(s2, l2[b], method="HEAD")
        api = await web.api("/api/campaigns/c1")
    figures = ("tracked_sends", "total_clicks", "unique_clicks", "bot_clicks")
    assert [api[k] for k in figures] == [3, 4, 2, 1]
    assert api["click_rate"] == 0.6667
    by_url = {link["url"]: link for link in api["links"]}
    assert (by_url[a]["total_clicks"], by_url[a]["unique_clicks"]) == (3, 2)
    assert (by_url[b]["total_clicks"], by_url[b]["unique_clicks"], by_url[b]["bot_clicks"]) == (
        1,
        1,
        1,
    )


@pytest.mark.parametrize(
    ("mode", "peer_ip"), [("truncated", "127.0.0.0"), ("full", "127.0.0.1"), ("none", None)]
)
async def test_ip_addresses_are_stored_as_configured(web_settings, mode, peer_ip):
    web_settings = replace(web_settings, privacy=replace(web_settings.privacy, store_ip=mode))
    async with start_web(web_settings) as web:
        send_id, links = await web.send()
        await web.click(send_id, links["https://example.com/a"])
    assert clicks(web_settings)[0][4] == peer_ip


async def test_forwarded_for_is_believed_only_from_trusted_proxies(web_settings):
    header = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7", "User-Agent": BROWSER}
    trusted = replace(web_settings.web, trusted_proxies=_networks(["127.0.0.0/8"]))
    for settings, expected in [(web_settings, "127.0.0.0"),
                               (replace(web_settings, web=trusted), "198.51.100.0")]:  # fmt: skip
        async with start_web(settings) as web:
            send_id, links = await web.send()
            await web.get(
                f"/c/{web.token(send_id, links['https://example.com/a'])}", headers=header
            )
        assert clicks(settings)[-1][4] == expected


async def test_healthz_follows_storage(web_settings):
    async with start_web(web_settings) as web:
        ok = await web.get("/healthz")
        await web.store.close()
        down = await web.get("/healthz")
    assert (ok.status, down.status) == (200, 503)


async def test_storage_outage_still_redirects_known_links_and_keeps_their_clicks(web_settings):
    async with start_web(web_settings) as web:
        send_id, links = await web.send(urls=("https://example.com/a", "https://example.com/b"))
        await web.click(send_id, links["https://example.com/a"])  # warms the caches
        await web.store.close()
        during = await web.click(send_id, links["https://example.com/a"])
        unknown = await web.click(send_id, links["https://example.com/b"])
        assert web.recorder.storage_down and web.recorder.pending == 1
        await web.store.open()
        after = await web.click(send_id, links["https://example.com/a"])
    assert (during.status, during.headers["Location"]) == (302, "https://example.com/a")
    assert unknown.status == 503
    assert after.status == 302
    assert len(clicks(web_settings)) == 3  # the held click was committed with the next batch


async def test_restart_keeps_everything(web_settings):
    async with start_web(web_settings) as web:
        send_id, links = await web.send()
        await web.click(send_id, links["https://example.com/a"])
        before = await web.api("/api/campaigns/c1")
    async with start_web(web_settings) as web:
        after = await web.api("/api/campaigns/c1")
        again = await web.click(send_id, links["https://example.com/a"])
    assert before == after and before["total_clicks"] == 1
    assert again.status == 302  # the same secret and database: old links still work


async def test_concurrent_clicks_are_group_committed(web_settings):
    batches: list[int] = []  # the number of clicks in each add_clicks call, in order

    def wrap(store):
        counter = CountingStore(store)
        add_clicks = store.add_clicks

        async def counted_add_clicks(new_clicks, bursts=(), opens=()):
            batches.append(len(new_clicks))
            return await add_clicks(new_clicks, bursts, opens)

        counter.add_clicks = counted_add_clicks  # found before CountingStore.__getattr__
        return counter

    async with start_web(web_settings, store_wrapper=wrap) as web:
        sends = [await web.send(contact=str(i)) for i in range(50)]
        responses = await asyncio.gather(
            *(web.click(s, links["https://example.com/a"]) for s, links in sends)
        )
    assert all(r.status == 302 for r in responses)
    stored = clicks(web_settings)
    assert sorted(send_id for send_id, *_ in stored) == sorted(s for s, _ in sends)  # each once
    assert sum(batches) == 50
    assert max(batches) > 1, batches  # some transaction committed several clicks at once
    assert len(batches) <= 25, batches  # two clicks a commit on average, not one per click


async def test_counters_keep_pace_with_clicks_whatever_the_clock(web_settings, monkeypatch):
    """A full roll-up step is followed by another at once, not after ROLL_UP_SECONDS."""
    from clickrelay.storage import rollup as clicks_module

    monkeypatch.setattr(clicks_module, "ROLL_UP_SECONDS", 1e9)
    monkeypatch.setattr(clicks_module, "ROLL_UP_LIMIT", 5)
    async with start_web(web_settings) as web:
        send_id, links = await web.send()
        for _ in range(30):  # one at a time: each click is a flush of its own
            assert (await web.click(send_id, links["https://example.com/a"])).status == 302
        # Each click's commit has told the roll-ups; let the steps it started finish (closing
        # the store cancels a step under way). No click comes meanwhile.
        steps = web.store._rollups._task
        if steps is not None:
            await steps
    if web_settings.storage.sqlite_path is not None:
        rolled = pg.query(web_settings.storage, "SELECT value FROM meta WHERE key = 'rolled_up'")
        (newest,) = pg.query(web_settings.storage, "SELECT max(id) FROM clicks")[0]
        assert int(rolled[0][0]) == newest == 30
    else:  # PostgreSQL marks each counted click. Its steps run beside the click commits (and
        # take longer than five of them), so the last few clicks may wait for the next step (or
        # report): never a full step's worth.
        ((rolled, stored),) = pg.query(
            web_settings.storage, "SELECT count(*) FILTER (WHERE rolled), count(*) FROM clicks"
        )
        assert stored == 30 and stored - rolled < clicks_module.ROLL_UP_LIMIT
