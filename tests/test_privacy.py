"""Privacy: consent withheld per send, erasure (API and command), retention."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from clickrelay.config import BotSettings
from clickrelay.retention import DAY_SECONDS, Retention

from support import basic_auth, send, start_relay, start_web, write_config

A, B = "https://shop.example.com/a", "https://shop.example.com/b"
HTML = f'<html><body><a href="{A}">A</a> <a href="{B}">B</a></body></html>'


@pytest.fixture
def web_settings(settings):
    """Reports on; events told at once (no burst judgement to wait for)."""
    return replace(
        settings, reports=replace(settings.reports, password="pw"), bots=BotSettings(burst_links=0)
    )


def campaign_mail(contact: str, consent: bool = True) -> bytes:
    headers = (
        f"From: shop@example.com\r\nTo: {contact}@example.com\r\nSubject: Sale\r\n"
        f"Message-ID: <{contact}@shop.example.com>\r\nX-Campaign-Id: spring\r\n"
        f"X-Track-Clicks: yes\r\nX-Contact-Id: {contact}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
    )
    if not consent:
        headers += "X-Track-Contact: no\r\n"
    return (headers + "\r\n" + HTML + "\r\n").encode()


async def test_a_send_without_consent_is_counted_but_nothing_identifies_the_contact(
    upstream, web_settings
):
    web_settings = replace(web_settings, bots=BotSettings(min_seconds_after_send=0, burst_links=0))
    async with start_relay(web_settings) as relay, start_web(web_settings) as web:
        await send(relay.port, campaign_mail("42", consent=False), rcpts=["42@example.com"])
        await send(relay.port, campaign_mail("43"), rcpts=["43@example.com"])
        anonymous, named = (received.content for received in upstream.received)
        links = re.findall(rb'href="http://click\.test(/c/[^"]+)"', anonymous)
        assert len(links) == 2 and b"X-Track-Contact" not in anonymous
        for path in links + re.findall(rb'href="http://click\.test(/c/[^"]+)"', named)[:1]:
            response = await web.get(path.decode(), headers={"User-Agent": "Mozilla/5.0 (X11)"})
            assert response.status == 302
        report = await web.api("/api/campaigns/spring")
        contacts = await web.api(f"/api/campaigns/spring/links/{report['links'][0]['link_id']}")
        events = await web.api("/api/events")
    assert (report["tracked_sends"], report["total_clicks"], report["unique_clicks"]) == (2, 3, 2)
    assert sorted((c["contact_id"] or "", c["email"] or "") for c in contacts["contacts"]) == [
        ("", ""), ("43", "43@example.com")
    ]  # fmt: skip
    identities = {(e["data"]["contact_id"], e["data"]["email"]) for e in events["events"]}
    assert identities == {(None, None), ("43", "43@example.com")}


async def test_erasure_through_the_api_leaves_no_trace_and_keeps_the_counts(web_settings):
    async with start_web(web_settings) as web:
        s1, l1 = await web.send(contact="42", email="a@example.com", urls=(A, B))
        s2, l2 = await web.send(contact="43", email="b@example.com", urls=(A, B))
        for send_id, link in [(s1, l1[A]), (s1, l1[B]), (s2, l2[A])]:
            assert (await web.click(send_id, link)).status == 302
        before = await web.api("/api/campaigns/c1")

        async def post(body: str, content_type: str = "application/json", auth=True):
            headers = {"Content-Type": content_type, **(basic_auth() if auth else {})}
            async with web.session.post(f"{web.base}/api/erase", data=body,
                                        headers=headers) as response:  # fmt: skip
                return response.status, await response.text()

        refused = [
            await post('{"contact_id": "42"}', "application/x-www-form-urlencoded"),
            await post('{"contact_id": "42"}', "text/plain"),
            await post('{"contact_id": "42"}', auth=False),
            await post('{"contact_id": 42}'),
            await post('{"contact_id": "42", "email": "a@example.com"}'),
            await post("not json"),
        ]
        status, text = await post('{"email": "a@example.com"}')
        after = await web.api("/api/campaigns/c1")
        contacts = await web.api(f"/api/campaigns/c1/links/{l1[A]}")
        csv = await web.get(f"/reports/campaigns/c1/links/{l1[A]}/export.csv",
                            headers=basic_auth())  # fmt: skip
        csv_text = await _text(web, f"/reports/campaigns/c1/links/{l1[A]}/export.csv")
        page = await _text(web, f"/reports/campaigns/c1/links/{l1[A]}")
        events = await web.api("/api/events")
        assert (await web.click(s1, l1[A])).status == 302  # the old link still redirects
    assert [code for code, _ in refused] == [415, 415, 401, 400, 400, 400]
    assert (status, text) == (200, '{"sends": 1, "clicks": 2}')
    assert after == before
    assert [c["contact_id"] for c in contacts["contacts"]] == ["43", None]
    assert csv.status == 200 and len(events["events"]) == 1
    for shown in (csv_text, page, str(events), str(contacts)):
        assert "a@example.com" not in shown and "'42'" not in shown and ",42," not in shown


async def _text(web, path: str) -> str:
    async with web.session.get(web.base + path, headers=basic_auth()) as response:
        assert response.status == 200
        return await response.text()


async def test_the_erase_command_answers_what_it_erased(tmp_path, web_settings):
    async with start_web(web_settings) as web:
        s1, links = await web.send(contact="42")
        await web.click(s1, links["https://example.com/a"])
    path = write_config(tmp_path / "c.toml", 25, 2525, 8080, storage=web_settings.storage)
    result = subprocess.run(
        [sys.executable, "-m", "clickrelay", "erase", "--config", str(path), "--contact", "42"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "erased contact 42: 1 send(s), 1 click(s); counts kept\n"
    again = subprocess.run(
        [sys.executable, "-m", "clickrelay", "erase", "--config", str(path), "--contact", "42"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.stdout == "erased contact 42: 0 send(s), 0 click(s); counts kept\n"


async def test_retention_prunes_what_is_older_and_keeps_counts_and_links(web_settings):
    now = time.time()
    async with start_web(web_settings) as web:
        old, old_links = await web.send(contact="old", sent_at=now - 40 * DAY_SECONDS)
        new, _ = await web.send(contact="new")
        link = old_links["https://example.com/a"]
        await web.store.add_clicks([
            web_click(old, link, now - 39 * DAY_SECONDS), web_click(new, link, now - 60)
        ])  # fmt: skip
        before = await web.api("/api/campaigns/c1")
        pruned = await Retention(web.store, 30).prune()
        after = await web.api("/api/campaigns/c1")
        contacts = await web.api(f"/api/campaigns/c1/links/{link}")
        events = await web.api("/api/events")
        assert (await web.click(old, link)).status == 302
        assert await Retention(web.store, 30).prune() == 0
    assert pruned == 3  # the old send made anonymous, its click and its event deleted
    assert after == before
    assert [c["contact_id"] for c in contacts["contacts"]] == ["new", None]
    assert [e["data"]["contact_id"] for e in events["events"]] == ["new"]


def web_click(send_id: int, link_id: int, at: float):
    from clickrelay.storage.base import NewClick

    return NewClick(send_id, link_id, at, "10.0.0.0", "Mozilla/5.0", "GET", None)
