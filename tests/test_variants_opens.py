"""A/B variants and opens, end to end: mail through the real relay, clicks and pixel loads
through the real web app, figures through the reports API, CSV and pages."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import replace

import pytest

from clickrelay.tracking.tokens import Kind

from support import basic_auth, send, start_relay, start_web

A, B = "https://shop.example.com/a", "https://shop.example.com/b"
HTML = f'<html><body><a href="{A}">A</a> <a href="{B}">B</a></body></html>'
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"
TRACKING = re.compile(rb'(?:href|src)="http://click\.test(/[co]/[A-Za-z0-9_-]{32})"')


@pytest.fixture
def ab_settings(report_settings):
    """A/B tests tracked, reports on, every click judged at once (no bot timing rules)."""
    tracking = report_settings.tracking
    return replace(
        report_settings,
        tracking=replace(tracking, tracked_campaign_types=("standard", "ab_test")),
    )


def mail(contact: str, *, variant: str | None = None, opens: bool = False,
         campaign_type: str = "ab_test", html: str = HTML) -> bytes:  # fmt: skip
    headers = (
        f"From: shop@example.com\r\nTo: {contact}@example.com\r\nSubject: Sale\r\n"
        f"Message-ID: <{contact}@shop.example.com>\r\nX-Campaign-Id: spring\r\n"
        f"X-Campaign-Type: {campaign_type}\r\nX-Track-Clicks: yes\r\nX-Contact-Id: {contact}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
    )
    if variant is not None:
        headers += f"X-Campaign-Variant: {variant}\r\n"
    if opens:
        headers += "X-Track-Opens: yes\r\n"
    return (headers + "\r\n" + html + "\r\n").encode()


async def page(web, path: str) -> str:
    async with web.session.get(web.base + path, headers=basic_auth()) as response:
        assert response.status == 200
        return await response.text()


async def relayed(relay, upstream, message: bytes, contact: str) -> list[str]:
    """Relay one message; the tracking paths in what the upstream got, in order."""
    await send(relay.port, message, rcpts=[f"{contact}@example.com"])
    content = upstream.received[-1].content
    return [path.decode() for path in TRACKING.findall(content)]


async def test_variants_are_reported_side_by_side_with_the_difference_in_click_rate(
    upstream, ab_settings
):
    async with start_relay(ab_settings) as relay, start_web(ab_settings) as web:
        paths = {}
        for contact, variant in [("1", "A"), ("2", "A"), ("3", "B"), ("4", "B")]:
            paths[contact] = await relayed(relay, upstream, mail(contact, variant=variant), contact)
        assert all(b"X-Campaign-Variant" not in r.content for r in upstream.received)
        # A: contact 1 clicks both links, contact 2 nothing; B: contacts 3 and 4 click link A
        for path in [paths["1"][0], paths["1"][1], paths["3"][0], paths["4"][0], paths["4"][0]]:
            assert (await web.get(path, headers={"User-Agent": BROWSER})).status == 302
        report = await web.api("/api/campaigns/spring")
        html = await page(web, "/reports/campaigns/spring")
        variants_csv = await page(web, "/reports/campaigns/spring/variants/export.csv")
        rows = list(csv.DictReader(io.StringIO(variants_csv)))
        events = await web.api("/api/events")
    assert report["variants"] == [
        {"variant": "A", "tracked_sends": 2, "total_clicks": 2, "unique_clicks": 1,
         "click_rate": 0.5},
        {"variant": "B", "tracked_sends": 2, "total_clicks": 3, "unique_clicks": 2,
         "click_rate": 1.0},
    ]  # fmt: skip
    by_url = {link["url"]: link["variants"] for link in report["links"]}
    assert [(v["variant"], v["total_clicks"], v["unique_clicks"]) for v in by_url[A]] == [
        ("A", 1, 1), ("B", 3, 2),
    ]  # fmt: skip
    assert [(v["variant"], v["unique_clicks"]) for v in by_url[B]] == [("A", 1), ("B", 0)]
    assert "A/B variants" in html and "+50.00 pts" in html and "baseline" in html
    assert [(r["link_id"], r["variant"], r["unique_clicks"]) for r in rows[:2]] == [
        ("", "A", "1"), ("", "B", "2"),
    ]  # fmt: skip
    assert len(rows) == 2 + 2 * 2
    clicks = [e["data"] for e in events["events"] if e["type"] == "click"]
    assert [c["variant"] for c in clicks] == ["A", "A", "B", "B", "B"]


async def test_ab_tests_stay_untracked_unless_their_type_is_tracked(upstream, settings):
    async with start_relay(settings) as relay:
        message = mail("1", variant="A")
        assert await relayed(relay, upstream, message, "1") == []
    assert A.encode() in upstream.received[-1].content


async def test_a_campaign_without_variants_reports_none(upstream, ab_settings):
    async with start_relay(ab_settings) as relay, start_web(ab_settings) as web:
        await relayed(relay, upstream, mail("1", campaign_type="standard"), "1")
        report = await web.api("/api/campaigns/spring")
        html = await page(web, "/reports/campaigns/spring")
    assert report["variants"] == [] and all(link["variants"] == [] for link in report["links"])
    assert "A/B variants" not in html


async def test_a_variant_name_from_mail_is_escaped_on_the_page(upstream, ab_settings):
    async with start_relay(ab_settings) as relay, start_web(ab_settings) as web:
        await relayed(relay, upstream, mail("1", variant="<b>x</b>"), "1")
        html = await page(web, "/reports/campaigns/spring")
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html


def test_open_and_click_tokens_are_not_interchangeable():
    from clickrelay.tracking.tokens import Signer

    signer = Signer(b"k" * 32, "instance")
    click, pixel = signer.sign(5, 7, 1e9), signer.sign(5, 0, 1e9, Kind.OPEN)
    assert signer.verify(click).kind is Kind.HTML and signer.verify(pixel).kind is Kind.OPEN
    with pytest.raises(ValueError):
        signer.sign(5, 0, 1e9)  # a click needs a link


GOOGLE_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"


async def test_opens_are_counted_apart_from_privacy_proxies_and_prefetchers(upstream, ab_settings):
    async with start_relay(ab_settings) as relay, start_web(ab_settings) as web:
        first = await relayed(relay, upstream, mail("1", opens=True, campaign_type="standard"), "1")
        content = upstream.received[-1].content
        second = await relayed(
            relay, upstream, mail("2", opens=True, campaign_type="standard"), "2"
        )
        pixel, other = first[-1], second[-1]
        assert pixel.startswith("/o/") and [p[:3] for p in first] == ["/c/", "/c/", "/o/"]
        answers = [await web.get(pixel, headers={"User-Agent": agent})
                   for agent in (BROWSER, BROWSER, "Mozilla/5.0", GOOGLE_PROXY)]  # fmt: skip
        answers.append(await web.get(other, headers={"User-Agent": YAHOO_PROXY}))
        assert (await web.get(first[0], headers={"User-Agent": BROWSER})).status == 302
        body = await (await web.session.get(web.base + pixel)).read()
        report = await web.api("/api/campaigns/spring")
        html = await page(web, "/reports/campaigns/spring")
    assert b"X-Track-Opens" not in content
    assert content.index(b"/o/") < content.index(b"</body>")
    assert all(a.status == 200 and a.headers["Content-Type"] == "image/gif" for a in answers)
    assert all("no-store" in a.headers["Cache-Control"] for a in answers)
    assert body.startswith(b"GIF89a") and len(body) < 100
    # the last GET (no user agent) is a machine too: 2 by a browser, 4 by machines
    assert (report["opens"], report["unique_opens"], report["machine_opens"]) == (2, 1, 4)
    assert report["click_to_open_rate"] == 1.0
    assert "click-to-open rate" in html and "machine opens" in html


async def test_an_open_token_is_no_click_and_a_click_token_no_open(upstream, ab_settings):
    async with start_relay(ab_settings) as relay, start_web(ab_settings) as web:
        paths = await relayed(relay, upstream, mail("1", opens=True, campaign_type="standard"), "1")
        click, pixel = paths[0], paths[-1]
        as_click = await web.get("/c/" + pixel[3:], headers={"User-Agent": BROWSER})
        as_open = await web.get("/o/" + click[3:], headers={"User-Agent": BROWSER})
        forged = await web.get("/o/" + "A" * 32, headers={"User-Agent": BROWSER})
        report = await web.api("/api/campaigns/spring")
    assert (as_click.status, as_open.status, forged.status) == (404, 404, 404)
    assert "Location" not in as_click.headers
    assert (report["opens"], report["machine_opens"], report["total_clicks"]) == (0, 0, 0)


async def test_without_the_opens_header_no_pixel_is_added(upstream, ab_settings):
    async with start_relay(ab_settings) as relay:
        paths = await relayed(relay, upstream, mail("1", campaign_type="standard"), "1")
    assert [p[:3] for p in paths] == ["/c/", "/c/"] and b"<img" not in upstream.received[-1].content


async def test_every_html_part_of_a_send_gets_the_pixel_and_the_text_part_none(
    upstream, ab_settings
):
    alternative = (
        "From: shop@example.com\r\nTo: 1@example.com\r\nSubject: Sale\r\n"
        "X-Campaign-Id: spring\r\nX-Track-Clicks: yes\r\nX-Track-Opens: yes\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nSee https://shop.example.com/a\r\n"
        "--b\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + __import__("base64").encodebytes(f"<p>no body tag <a href='{A}'>A</a>".encode()).decode()
        + "--b--\r\n"
    ).encode()
    async with start_relay(ab_settings) as relay:
        await send(relay.port, alternative, rcpts=["1@example.com"])
    import email

    parsed = email.message_from_bytes(upstream.received[-1].content)
    text, html = (
        part.get_payload(decode=True) for part in parsed.walk() if not part.is_multipart()
    )
    assert b"/o/" not in text and b"https://shop.example.com/a" in text
    assert html.count(b'src="http://click.test/o/') == 1 and html.endswith(b'padding:0">')
