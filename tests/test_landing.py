"""A tracking link lands exactly where the original link would have, as a real browser sees it.

One HTML page holds many shapes of `<a href>` as senders write them (entities, IDN hosts,
percent-encoding, whitespace, quoting styles, duplicate attributes, links that are not links).
Headless chromium (Debian's) loads that page and reports `a.href` for each of its
`document.links`: the URL a reader's browser opens. The same HTML goes as a campaign email
through the real relay to a real upstream; chromium then opens each tracking link of the
forwarded HTML on the real click service and the test records where the 302 sends it. Each
landing URL must equal chromium's `a.href` for the original link, and clickrelay must track
exactly the links chromium sees, in order. Mismatches are reported all at once, as a table.

The browser reaches nothing but loopback: click.test resolves to the click service, every other
host fails to resolve, and every request that is neither the page server nor the click service
is failed by the test before it leaves the browser (so `http://[::1]:8080/x` connects nowhere).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import re
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web as aioweb

from browser import STEP_SECONDS, DevTools, headless_chromium
from support import LOOPBACK, message, send, start_relay, start_web

TEST_SECONDS = 60.0  # the whole test, however it goes (it takes a few seconds)
CLICK_ORIGIN = "http://click.test"  # the `settings` fixture's public_url
TRACKING = re.compile(re.escape(CLICK_ORIGIN) + r"/c/[A-Za-z0-9_-]{32}(?![A-Za-z0-9_-])")
SHAPE_DIV = re.compile(r'<div id="shape-(\d+)">')


@dataclass(frozen=True)
class Shape:
    name: str  # part of the link's visible text: plain words, no markup
    html: str  # the sender's markup; "{text}" stands for the link's visible text
    links: int = 1  # how many links a browser sees in it


def a(href: str, quote: str = '"') -> str:
    return f"<a href={quote}{href}{quote}>{{text}}</a>"


LONG = ("https://shop.test/long?" + "&".join(f"p{i}=value-{i}" for i in range(400)))[:3000]

SHAPES = [
    # character references in the value
    Shape("amp entity", a("https://shop.test/amp?a=1&amp;b=2")),
    Shape("double escaped amp", a("https://shop.test/amp-amp?a=1&amp;amp;b=2")),
    Shape("uppercase AMP entity", a("https://shop.test/AMP?a=1&AMP;b=2")),
    Shape("decimal reference", a("https://shop.test/dec?a=1&#38;b=2")),
    Shape("hex reference", a("https://shop.test/hex?a=1&#x26;b=2")),
    Shape("decimal reference without semicolon", a("https://shop.test/dec-bare?a=1&#38b=2")),
    Shape("windows-1252 reference", a("https://shop.test/price?c=&#x80;")),
    Shape(
        "legacy names before = or letters",
        a("https://shop.test/prefs?lang=en&region=us&currency=EUR&copy=2&not=1&para=3&sect=4"),
    ),
    Shape(
        "times and sect prefixes",
        a("https://shop.test/u?user=42&timestamp=1700000000&section=billing"),
    ),
    Shape("amp without semicolon before a letter", a("https://shop.test/ampb?a=1&ampb=2")),
    Shape("copy without semicolon before a space", a("https://shop.test/legal?note=&copy 2024")),
    Shape("legacy name at the end of the value", a("https://shop.test/end?x=1&copy")),
    Shape("named entity with semicolon", a("https://shop.test/city?v=Montr&eacute;al")),
    Shape("nbsp entity", a("https://shop.test/nb?q=a&nbsp;b")),
    Shape("trailing nbsp entity", a("https://shop.test/trail&nbsp;")),
    Shape("lt and gt entities", a("https://shop.test/cmp?x=&lt;5&amp;y=&gt;1")),
    # fragments
    Shape("fragment after a path", a("https://shop.test/page#top")),
    Shape("fragment with a space", a("https://shop.test/page#a b")),
    Shape("non-ASCII fragment", a("https://shop.test/page#é")),
    Shape("CJK fragment", a("https://shop.test/jp#日本")),
    # hosts
    Shape("IDN host with sharp s", a("https://straße.test/")),
    Shape("IDN host with final sigma", a("https://ελληνικός.test/")),
    Shape("IDN host with capitals", a("https://Bücher.example/")),
    Shape("uppercase host with trailing dot", a("https://EXAMPLE.com./x")),
    Shape("fullwidth host", a("https://ｅｘａｍｐｌｅ.test/fw")),
    Shape("ideographic full stop in host", a("https://shop。test/dot")),
    Shape("symbol host", a("https://☃.net/snow")),
    Shape("emoji host", a("https://i❤.ws/love")),
    Shape("label starting with a hyphen", a("https://-ü.test/hyphen")),
    Shape("percent-encoded host", a("https://ex%61mple.com/pct")),
    Shape("uppercase scheme and host", a("HTTPS://Shop.Test/Path")),
    # percent-encoding
    Shape("encoded slash", a("https://shop.test/a%2Fb")),
    Shape("invalid percent sequence", a("https://shop.test/bad%zz")),
    Shape("latin-1 percent byte", a("https://shop.test/caf%E9")),
    Shape("encoded percent sign", a("https://shop.test/100%25")),
    Shape("encoded UTF-8", a("https://shop.test/caf%C3%A9?q=%c3%a9")),
    # non-ASCII, whitespace
    Shape("non-ASCII path", a("https://shop.test/café/ñ")),
    Shape("non-ASCII query", a("https://shop.test/s?q=café&e=😀")),
    Shape("spaces inside", a("https://shop.test/sp ace/x?q=a b")),
    Shape("tabs and newlines inside", a("https://shop.\ttest/ta\tb/\nnew\r\nline?q=1\n2")),
    Shape("leading and trailing whitespace", a(" \t\n https://shop.test/trimmed \n\t ")),
    # attribute styles
    Shape("single quoted with double quotes", a('https://shop.test/sq?say="hi"', "'")),
    Shape("double quoted with a single quote", a("https://shop.test/dq?it's=ok")),
    Shape("unquoted", a("https://shop.test/uq?a=1&amp;b=2", "")),
    Shape("3000 character URL", a(LONG)),
    # authority
    Shape("userinfo and port", a("https://user:pa%20ss@x.test:8443/")),
    Shape("default port", a("https://x.test:443/default")),
    Shape("port with a leading zero", a("https://x.test:08443/zero")),
    Shape("IPv6 literal", a("http://[::1]:8080/x")),
    # punctuation
    Shape(
        "quotes backticks and braces",
        a("https://shop.test/{p}/`t`?q={&quot;k&quot;:`v`}&amp;r='x'&amp;s=^|~"),
    ),
    # elements
    Shape("uppercase tag and attribute", '<A HREF="https://shop.test/UPPER">{text}</A>'),
    Shape(
        "two href attributes",
        "<a href=https://shop.test/first href=https://shop.test/second>{text}</a>",
    ),
    Shape("unquoted label before", "<a data-label=hero href=https://shop.test/lab1>{text}</a>"),
    Shape(
        "label after an unquoted href",
        '<a href=https://shop.test/lab2?a=1&amp;b=2 data-label="hero cta">{text}</a>',
    ),
    Shape(
        "inside a textarea",
        '<textarea><a href="https://shop.test/in-textarea">{text}</a></textarea>',
        links=0,
    ),
    Shape(
        "inside a title (text, like textarea)",
        '<title><a href="https://shop.test/in-title">{text}</a></title>',
        links=0,
    ),
    Shape(
        "inside an xmp (raw text)",
        '<xmp><a href="https://shop.test/in-xmp">{text}</a></xmp>',
        links=0,
    ),
    Shape(
        "area in a map",
        '<map name="m"><area shape="rect" coords="0,0,80,20" '
        'href="https://shop.test/area" alt="{text}"></map>',
    ),
]


def label(index: int, shape: Shape) -> str:
    return f"Offer {index:02d}: {shape.name}"


def campaign_page(shapes: list[Shape], charset: str) -> str:
    blocks = "\n".join(
        f'<div id="shape-{i:02d}">{shape.html.replace("{text}", label(i, shape))}</div>'
        for i, shape in enumerate(shapes)
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="{charset}"><title>Autumn offers</title>'
        f"</head>\n<body>\n{blocks}\n</body></html>\n"
    )


# Each link chromium sees: the shape it belongs to, and the URL it opens.
LINKS = """[...document.links].map(l => {
  const block = l.closest('div[id^="shape-"]');
  return [block ? Number(block.id.slice(6)) : null, l.href];
})"""


@contextlib.asynccontextmanager
async def page_server(pages: dict[str, bytes], charset: str) -> AsyncIterator[str]:
    """Serves `pages` (path -> HTML in `charset`) on 127.0.0.1; yields its origin."""

    async def serve(request: aioweb.Request) -> aioweb.Response:
        if request.path not in pages:
            raise aioweb.HTTPNotFound()
        return aioweb.Response(body=pages[request.path], content_type="text/html", charset=charset)

    app = aioweb.Application()
    app.router.add_get("/{name}", serve)
    runner = aioweb.AppRunner(app, access_log=None)
    await runner.setup()
    site = aioweb.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    try:
        yield f"http://{LOOPBACK}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def campaign_email(html: str, charset: str) -> bytes:
    body = base64.encodebytes(html.encode(charset)).decode().replace("\n", "\r\n")
    return message(
        {
            "MIME-Version": "1.0",
            "Content-Type": f"text/html; charset={charset}",
            "Content-Transfer-Encoding": "base64",
            "X-Campaign-Id": "landing-shapes",
            "X-Track-Clicks": "yes",
        },
        body,
    )


async def forwarded_html(settings, upstream, html: str, charset: str) -> str:
    """The HTML of `html` sent as a tracked campaign email through the relay, as it arrived."""
    async with start_relay(settings) as relay:
        replies = await send(relay.port, campaign_email(html, charset))
    assert replies[-1].startswith("250"), replies
    assert len(upstream.received) == 1
    forwarded = email.message_from_bytes(upstream.received[0].content, policy=email.policy.default)
    return forwarded.get_content()


def tracked_by_shape(forwarded: str, count: int) -> dict[int, list[str]]:
    """The tracking links in the forwarded HTML, by the shape whose block holds them."""
    prelude, *rest = SHAPE_DIV.split(forwarded)
    assert not TRACKING.search(prelude), prelude
    assert [int(n) for n in rest[::2]] == list(range(count)), "the shape blocks changed"
    return {int(n): TRACKING.findall(block) for n, block in zip(rest[::2], rest[1::2], strict=True)}


class Gate:
    """Fails, inside the browser, every request that goes neither to the page server nor to
    the click service, so a landing URL is recorded but never fetched."""

    def __init__(self, tools: DevTools, *allowed: str) -> None:
        self.tools, self.allowed = tools, tuple(origin + "/" for origin in allowed)
        self.tasks: set[asyncio.Task] = set()
        tools.handlers["Fetch.requestPaused"] = self.paused

    def paused(self, params: dict[str, Any]) -> None:
        if params["request"]["url"].startswith(self.allowed):
            call = self.tools.call("Fetch.continueRequest", requestId=params["requestId"])
        else:
            call = self.tools.call(
                "Fetch.failRequest", requestId=params["requestId"], errorReason="BlockedByClient"
            )
        task = asyncio.create_task(call)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def links_of(tools: DevTools, url: str) -> dict[int, list[str]]:
    """`a.href` of each of the page's document.links, by shape, in document order."""
    await tools.navigate(url)
    seen = await tools.call("Runtime.evaluate", expression=LINKS, returnByValue=True)
    assert "exceptionDetails" not in seen, seen
    found: dict[int, list[str]] = defaultdict(list)
    order = [shape for shape, _ in seen["result"]["value"]]
    assert None not in order, f"{url}: a link outside the shape blocks: {seen}"
    assert order == sorted(order), order  # document order is shape order
    for shape, href in seen["result"]["value"]:
        found[shape].append(href)
    return found


async def landing(tools: DevTools, tracking_url: str) -> str:
    """Where chromium goes when it opens `tracking_url`: the URL of the request the tracking
    redirect makes (its fragment included), or what went wrong instead, in parentheses."""
    since = len(tools.log)
    request_ids: set[str] = set()

    def outcome(method: str, params: dict[str, Any]) -> str | None:
        if method == "Network.requestWillBeSent":
            redirect, request = params.get("redirectResponse"), params["request"]
            if redirect is None and request["url"] == tracking_url:
                request_ids.add(params["requestId"])
            elif redirect is not None and params["requestId"] in request_ids:
                if redirect["status"] not in (301, 302, 303, 307, 308):
                    return f"(answered {redirect['status']})"
                return request["url"] + request.get("urlFragment", "")
        if params.get("requestId") not in request_ids:
            return None
        if method == "Network.responseReceived":
            return f"(no redirect: {params['response']['status']})"
        if method == "Network.loadingFailed":
            return f"(failed before any redirect: {params['errorText']})"
        return None

    try:
        await tools.call("Page.navigate", url=tracking_url)  # it ends in an error page: the gate
        return await tools.wait_until(outcome, since)
    except TimeoutError:
        return f"(no outcome within {STEP_SECONDS:g} s)"


def visible(text: str, other: str = "", width: int = 110) -> str:
    """`text` with its whitespace made visible, cut to `width` around where it differs from
    `other` (a 3,000-character URL stays readable)."""
    shown = text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    shown = shown.replace("\xa0", "\\xa0")
    if len(shown) <= width:
        return shown
    other = other.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    differs = next((i for i, (x, y) in enumerate(zip(shown, other, strict=False)) if x != y), None)
    start = 0 if differs is None or differs < width // 2 else differs - width // 3
    return f"{'...' if start else ''}{shown[start : start + width]}... ({len(text)} chars)"


Row = tuple[int, list[str], str, str, str]  # shape, problems, chromium's, landed, tracking link


def table(shapes: list[Shape], rows: list[Row]) -> str:
    out = [f"{len(rows)} of {len(shapes)} link shapes do not land where the browser goes:"]
    for index, notes, chromium, landed, tracking in rows:
        shape = shapes[index]
        out += [
            f"\n[{index:02d}] {shape.name}",
            f"    sender wrote : {visible(shape.html.replace('{text}', '...'))}",
            f"    Chromium     : {visible(chromium, landed)}",
            f"    landed       : {visible(landed, chromium)}",
            f"    tracking link: {tracking or '(none)'}",
            *(f"    problem      : {note}" for note in notes),
        ]
    return "\n".join(out)


async def test_tracking_links_land_where_the_browser_goes(settings, upstream, tmp_path):
    rows = await landings(settings, upstream, tmp_path, SHAPES, "utf-8")
    if rows:
        pytest.fail(table(SHAPES, rows), pytrace=False)


# In a document that is not UTF-8, a browser encodes a URL's query in the document's encoding
# (a character the encoding lacks as "&#N;"), its path and fragment in UTF-8.
WINDOWS_1252_SHAPES = [
    Shape("non-ASCII query in windows-1252", a("https://shop.test/s?q=café&n=1")),
    Shape("a query character windows-1252 lacks", a("https://shop.test/s?q=&#26085;x")),
    Shape("non-ASCII path and fragment", a("https://shop.test/café/è?q=é#à")),
]


async def test_tracking_links_of_a_windows_1252_part_land_where_the_browser_goes(
    settings, upstream, tmp_path
):
    rows = await landings(settings, upstream, tmp_path, WINDOWS_1252_SHAPES, "windows-1252")
    if rows:  # today: the query lands UTF-8 encoded (%C3%A9, not %E9)
        pytest.fail(table(WINDOWS_1252_SHAPES, rows), pytrace=False)


async def landings(settings, upstream, tmp_path, shapes: list[Shape], charset: str) -> list[Row]:
    """Each shape's mismatches between where chromium goes from the original page and where
    the tracking links of the relayed page land."""
    html = campaign_page(shapes, charset)
    async with asyncio.timeout(TEST_SECONDS):
        forwarded = await forwarded_html(settings, upstream, html, charset)
        tracked = tracked_by_shape(forwarded, len(shapes))
        pages = {"/original.html": html.encode(charset),
                 "/forwarded.html": forwarded.encode(charset)}  # fmt: skip
        async with (
            start_web(settings) as web,
            page_server(pages, charset) as origin,
            headless_chromium(
                tmp_path / "profile",
                [f"--host-resolver-rules=MAP click.test {web.base.removeprefix('http://')}, "
                 f"MAP * ~NOTFOUND, EXCLUDE {LOOPBACK}"],
            ) as endpoint,
        ):  # fmt: skip
            socket = await web.session.ws_connect(endpoint, max_msg_size=64 * 2**20)
            tools = DevTools(socket)
            gate = Gate(tools, origin, CLICK_ORIGIN)
            try:
                await tools.open_page()
                for domain in ("Page", "Network"):
                    await tools.call(f"{domain}.enable")
                await tools.call("Fetch.enable", patterns=[{"urlPattern": "*"}])
                original = await links_of(tools, origin + "/original.html")
                rewritten = await links_of(tools, origin + "/forwarded.html")
                every = {url for urls in tracked.values() for url in urls}
                landed = {url: await landing(tools, url) for url in every}
            finally:
                await gate.close()
                await tools.close()
                await socket.close()
    # The page is what the test means it to be: chromium sees the links each shape declares,
    # each an absolute URL on the host written (none resolved against the page server).
    assert {i: len(original[i]) for i in range(len(shapes))} == {
        i: shape.links for i, shape in enumerate(shapes)
    }
    for hrefs in original.values():
        for href in hrefs:
            assert href.startswith(("http://", "https://")) and not href.startswith(origin), href
    assert landed, "clickrelay tracked no link at all"
    return mismatches(len(shapes), original, tracked, rewritten, landed)


def mismatches(
    count: int, original: dict[int, list[str]], tracked: dict[int, list[str]],
    rewritten: dict[int, list[str]], landed: dict[str, str],
) -> list[Row]:  # fmt: skip
    rows: list[Row] = []
    for index in range(count):
        wanted, ours, shown = original[index], tracked[index], rewritten[index]
        if len(ours) != len(wanted):
            rows.append((
                index, [f"clickrelay tracked {len(ours)} link(s), chromium sees {len(wanted)}"],
                " | ".join(wanted) or "(no link)",
                " | ".join(landed[url] for url in ours) or "(not tracked)", " | ".join(ours),
            ))  # fmt: skip
            continue
        if len(shown) != len(wanted):
            rows.append((
                index, [f"the forwarded HTML has {len(shown)} link(s) here, the original "
                        f"{len(wanted)}: {' | '.join(shown)}"],
                " | ".join(wanted), " | ".join(landed[url] for url in ours), " | ".join(ours),
            ))  # fmt: skip
            continue
        for href, url, opened in zip(wanted, ours, shown, strict=True):
            notes = []
            if opened != url:
                notes.append(f"in the forwarded HTML chromium opens {visible(opened)} instead")
            if landed[url] != href:
                notes.append("the tracking redirect lands elsewhere")
            if notes:
                rows.append((index, notes, href, landed[url], url))
    return rows
