"""The click map, end to end: a campaign mail through the real relay, clicks on each place of a
link through the real web app, the map page and its framed copy through HTTP and in headless
Chromium (sandboxed, inert, nothing remote unless asked, screenshot in test-artifacts/)."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from browser import DevTools, browser_page, headless_chromium
from support import LOOPBACK, basic_auth, free_port, message, send, start_relay, start_web

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
SALE, BOOTS = "https://shop.test/sale", "https://shop.test/boots"
TRACKING = re.compile(rb'href="http://click\.test(/c/[A-Za-z0-9_-]{32})"')
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"


def newsletter(elsewhere: str) -> str:
    """A mail with one link in three places (two <a>, an Outlook button), a labelled one, an
    unsubscribe link with the recipient in it, a remote image and scripts (`elsewhere`: where
    the image and the scripts' beacons would go)."""
    return f"""<html><head><title>Autumn</title></head><body>
<p>Hello alice@example.com, your number is cust-4711.</p>
<a href="{SALE}">Top banner</a>
<p>Our autumn range is in.</p>
<a href="{SALE}">Bottom button</a>
<!--[if mso]><v:roundrect href="{SALE}" style="width:200px">Outlook</v:roundrect><![endif]-->
<a href="{BOOTS}" data-label="hero">Boots</a>
<a href="https://shop.test/unsub?u=alice%40example.com">Unsubscribe</a>
<img src="{elsewhere}/remote.png" alt="">
<script>new Image().src = "{elsewhere}/script-ran";</script>
<img src="data:," onerror="new Image().src='{elsewhere}/handler-ran'" alt="">
<meta http-equiv="refresh" content="0;url={elsewhere}/refreshed">
<svg width="40" height="20"><a xlink:href="{elsewhere}/svg-link"><text y="15">SVG</text></a></svg>
<a data-clickrelay="999 clicks · 100%" href="{BOOTS}#faked">A badge of its own</a>
<p>Order 123456 and /img/cust-47110.png are not the contact's id.</p>
</body></html>
"""


def mail(html: str) -> bytes:
    return message(
        {"To": "alice@example.com", "X-Campaign-Id": "autumn", "X-Track-Clicks": "yes",
         "X-Contact-Id": "cust-4711", "MIME-Version": "1.0",
         "Content-Type": "text/html; charset=utf-8"},
        html,
    )  # fmt: skip


async def get(web, path: str):
    async with web.session.get(web.base + path, headers=basic_auth()) as response:
        return response.status, response.headers, await response.text()


async def relay_and_click(relay, web, upstream, html: str) -> None:
    """Relay the mail; click the sale link's places 2, 1, 1 (the banner twice, the bottom
    button and the Outlook button once) and the boots once: five human clicks."""
    assert (await send(relay.port, mail(html), rcpts=["alice@example.com"]))[-1].startswith("250")
    banner, bottom, outlook, boots, _ = TRACKING.findall(upstream.received[-1].content)
    for path in (banner, banner, bottom, outlook, boots):
        response = await web.get(path.decode(), headers={"User-Agent": BROWSER})
        assert response.status == 302


async def test_the_map_counts_every_place_of_a_link_in_an_inert_copy(report_settings, upstream):
    async with start_relay(report_settings) as relay, start_web(report_settings) as web:
        await relay_and_click(relay, web, upstream, newsletter("http://elsewhere.test"))
        page = await get(web, "/reports/campaigns/autumn/map")
        frame = await get(web, "/reports/campaigns/autumn/map/frame")
        with_images = await get(web, "/reports/campaigns/autumn/map/frame?images=1")
    status, headers, html = page
    assert status == 200 and "frame-src 'self'" in headers["Content-Security-Policy"]
    assert '<iframe class="mail" sandbox=""' in html
    row = (
        r'<tr>\s*<td class="url">(.*?)</td>\s*<td>(.*?)</td>\s*'
        r'<td class="num">(\d+)</td>\s*<td class="num">([\d.]+%)</td>'
    )
    rows = re.findall(row, html, re.S)
    assert [(place, clicks, share) for _, place, clicks, share in rows] == [
        ("1st place of this link", "2", "40.0%"), ("2nd place of this link", "1", "20.0%"),
        ("Outlook button (VML, not drawn above)", "1", "20.0%"),
        ("1st place of this link", "1", "20.0%"), ("1st place of this link", "0", "0.0%"),
    ]  # fmt: skip
    assert SALE in rows[0][0] and "hero" in rows[3][0] and BOOTS in rows[3][0]
    status, headers, copy = frame
    policy = headers["Content-Security-Policy"]
    assert status == 200 and "sandbox" in policy and "img-src data:;" in policy
    assert headers["X-Frame-Options"] == "SAMEORIGIN" and "script-src" not in policy
    (badge,) = set(re.findall(r"\[(data-[0-9a-f]{12})\]", copy))  # one the mail cannot know
    badges = re.findall(badge + r'="([^"]*)"', copy)
    assert badges == ["2 clicks · 40.0%", "1 click · 20.0%", "1 click · 20.0%",
                      "1 click · 20.0%", "0 clicks · 0.0%"]  # fmt: skip
    assert set(re.findall(r'href="([^"]*)"', copy)) == {"#"}  # nothing to follow
    assert "svg-link" not in copy
    assert "alice" not in copy and " cust-4711" not in copy and "[recipient]" in copy
    assert "Order 123456 and /img/cust-47110.png" in copy  # only the id itself is replaced
    assert "click.test/c/" not in copy and "shop.test/unsub" not in copy
    assert "img-src data: https: http:" in with_images[1]["Content-Security-Policy"]


async def test_a_send_without_its_contact_leaves_no_copy(report_settings, upstream):
    """Without the recipient's identity there is no knowing what to take out of the copy:
    the next send with one gives the campaign its copy."""
    html = newsletter("http://elsewhere.test")
    anonymous = mail(html).replace(b"X-Contact-Id: cust-4711\r\n", b"X-Track-Contact: no\r\n")
    async with start_relay(report_settings) as relay, start_web(report_settings) as web:
        await send(relay.port, anonymous, rcpts=["alice@example.com"])
        before = await web.store.click_map("autumn")
        await send(relay.port, mail(html), rcpts=["alice@example.com"])
        after = await web.store.click_map("autumn")
    assert before is not None and before.html is None
    assert after is not None and after.html is not None and "alice" not in after.html


async def test_without_copies_the_map_says_so_and_keeps_nothing(report_settings, upstream):
    settings = replace(
        report_settings, reports=replace(report_settings.reports, keep_html_copy=False)
    )
    async with start_relay(settings) as relay, start_web(settings) as web:
        await relay_and_click(relay, web, upstream, newsletter("http://elsewhere.test"))
        status, _, html = await get(web, "/reports/campaigns/autumn/map")
        frame_status, _, _ = await get(web, "/reports/campaigns/autumn/map/frame")
        assert (await web.store.click_map("autumn")).html is None
    assert status == 200 and "No copy of this campaign's HTML is kept" in html
    assert frame_status == 404


class Elsewhere:
    """A server standing for the rest of the internet: what asked it for what."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.asked.append(request.path)
        return web.Response(status=404)


async def test_the_map_in_chromium_runs_nothing_and_loads_images_only_when_asked(
    report_settings, upstream, tmp_path
):
    elsewhere = Elsewhere()
    app = web.Application()
    app.router.add_get("/{path:.*}", elsewhere.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    try:
        async with (
            start_relay(report_settings) as relay, start_web(report_settings) as service,
            headless_chromium(tmp_path / "profile") as endpoint,
        ):  # fmt: skip
            await relay_and_click(relay, service, upstream, newsletter(f"http://{LOOPBACK}:{port}"))
            base = service.base + "/reports/campaigns/autumn/map"
            domains = ("Page", "Network", "DOM")
            async with browser_page(service.session, endpoint, domains, basic_auth()) as tools:
                await tools.navigate(base)
                shot = await tools.call("Page.captureScreenshot", format="png")
                frames = await attributes_of(tools, "iframe")
                await tools.navigate(base + "/frame")  # the copy on its own: no script either
                marks = [m for m in await attributes_of(tools, "a")
                         if any(re.fullmatch(r"data-[0-9a-f]{12}", k) for k in m)]  # fmt: skip
                asked_before_images = list(elsewhere.asked)
                await tools.navigate(base + "?images=1")
                await tools.navigate(base + "/frame?images=1")
    finally:
        await runner.cleanup()
    ARTIFACTS.mkdir(exist_ok=True)
    png = base64.b64decode(shot["data"])
    (ARTIFACTS / "click-map.png").write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert [f.get("sandbox") for f in frames] == [""]
    # the drawn places (the Outlook button is in a comment to a browser); the mail's own
    # data-clickrelay is no badge
    badges = [next(v for k, v in m.items() if re.fullmatch(r"data-[0-9a-f]{12}", k))
              for m in marks]  # fmt: skip
    assert badges == ["2 clicks · 40.0%", "1 click · 20.0%", "1 click · 20.0%", "0 clicks · 0.0%"]
    assert asked_before_images == []  # no script, handler, refresh or image reached out
    assert set(elsewhere.asked) == {"/remote.png"}  # asked for: images, and nothing else


async def attributes_of(tools: DevTools, selector: str) -> list[dict[str, str]]:
    """The attributes of the elements of the top document matching `selector` (read with the
    DOM domain: no script runs in the page for it)."""
    root = await tools.call("DOM.getDocument")
    found = await tools.call("DOM.querySelectorAll", nodeId=root["root"]["nodeId"],
                             selector=selector)  # fmt: skip
    result = []
    for node in found["nodeIds"]:
        flat = (await tools.call("DOM.getAttributes", nodeId=node))["attributes"]
        result.append(dict(zip(flat[::2], flat[1::2], strict=True)))
    return result
