"""The campaign page in a real headless browser (Debian's chromium), driven over the DevTools
protocol with aiohttp's websocket client: the figures, links and chart render, the stylesheet
applies under the page's CSP, nothing lands in the console, and a screenshot is kept in
test-artifacts/."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

from browser import DevTools, browser_page, console_errors, headless_chromium
from support import basic_auth, start_web

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

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
        domains = ("Page", "Network", "Runtime", "Log")
        async with browser_page(web.session, endpoint, domains, basic_auth()) as tools:
            await tools.navigate(page_url)
            seen = await tools.call("Runtime.evaluate", expression=INSPECT, returnByValue=True)
            shot = await tools.call("Page.captureScreenshot", format="png",
                                    captureBeyondViewport=True)  # fmt: skip

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


LONG = "https://shop.example.com/" + "very-long-path-segment/" * 12 + "?utm_source=mail&id=12345"
# How a page sits on the screen: the page must not scroll sideways, whatever is in it.
LAYOUT = """(() => ({
  page: document.documentElement.scrollWidth,
  screen: window.innerWidth,
  truncated: [...document.querySelectorAll('.truncate')].map(
    e => ({title: e.title, text: e.textContent, cut: e.scrollWidth > e.clientWidth})),
}))()"""
SMALL_SCREEN = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}


async def visit(tools: DevTools, url: str) -> dict:
    """Load `url` in the page; its LAYOUT and a whole-page screenshot."""
    await tools.navigate(url)
    seen = await tools.call("Runtime.evaluate", expression=LAYOUT, returnByValue=True)
    assert "exceptionDetails" not in seen, seen
    shot = await tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    return {**seen["result"]["value"], "png": base64.b64decode(shot["data"])}


async def test_every_report_page_fits_a_390px_screen(settings, tmp_path):
    settings = replace(settings, reports=replace(settings.reports, password="pw"))
    async with start_web(settings) as web, headless_chromium(tmp_path / "profile") as endpoint:
        untracked = {(LONG + "&x={{id}}", "placeholder"): 1}
        send_id, links = await web.send(
            campaign="autumn-26", urls=(A, LONG), name=NAME, untracked=untracked
        )
        assert (await web.click(send_id, links[LONG])).status == 302
        copy = f'<p>Hello</p><a href="clickrelay:{links[LONG]}:0">{LONG}</a>'
        await web.store.keep_html_copy(send_id, copy)
        await web.send(campaign="winter-26", name="Winter sale with a long name" * 3)
        base = web.base + "/reports"
        pages = {
            "campaigns": base, "campaign": base + "/campaigns/autumn-26",
            "link": base + f"/campaigns/autumn-26/links/{links[LONG]}",
            "map": base + "/campaigns/autumn-26/map",
            "compare": base + "/compare?c=autumn-26&c=winter-26",
        }  # fmt: skip
        domains = ("Page", "Network", "Runtime")
        async with browser_page(web.session, endpoint, domains, basic_auth()) as tools:
            await tools.call("Emulation.setDeviceMetricsOverride", **SMALL_SCREEN)
            seen = {name: await visit(tools, url) for name, url in pages.items()}
    ARTIFACTS.mkdir(exist_ok=True)
    for name, layout in seen.items():
        (ARTIFACTS / f"{name}-390px.png").write_bytes(layout["png"])
        assert layout["screen"] == 390, name
        assert layout["page"] <= 390, f"the {name} page scrolls sideways: {layout['page']}px"
    # long URLs are cut short on screen, and whole in their title and their text (to copy)
    cut = [t for t in seen["campaign"]["truncated"] if t["title"].startswith(LONG)]
    assert len(cut) == 2 and all(t["cut"] and t["text"] == t["title"] for t in cut), cut
