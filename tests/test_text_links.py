"""URLs in plain text, found where mail clients linkify them, and spliced back."""

from __future__ import annotations

import base64
import binascii
import email
import email.message
import re
import time
from dataclasses import replace
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickrelay.mail.edits import apply
from clickrelay.tracking.text_links import (
    LINE_LIMIT,
    TRAILING,
    Flow,
    edits,
    find_links,
    find_urls,
    written,
)
from clickrelay.tracking.tokens import Kind
from clickrelay.tracking.urls import has_valid_host

import pg
from support import growth, message, send, start_relay, start_web


def urls(text: str) -> list[str]:
    return [text[start:end] for start, end in find_urls(text)]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("Shop at https://shop.example.com/spring today", ["https://shop.example.com/spring"]),
        ("HTTP://EXAMPLE.COM/A and hTtPs://x.test", ["HTTP://EXAMPLE.COM/A", "hTtPs://x.test"]),
        ("Ends a sentence: https://x.test/a.", ["https://x.test/a"]),
        ("Really? https://x.test/a?!", ["https://x.test/a"]),
        (
            "list https://x.test/a, https://x.test/b; https://x.test/c:",
            ["https://x.test/a", "https://x.test/b", "https://x.test/c"],
        ),
        (
            "quoted 'https://x.test/a' and \"https://x.test/b\"",
            ["https://x.test/a", "https://x.test/b"],
        ),
        ("dash https://x.test/a- done", ["https://x.test/a"]),
        ("(see https://x.test/a_(b))", ["https://x.test/a_(b)"]),
        ("(see https://x.test/wiki)", ["https://x.test/wiki"]),
        ("[https://x.test/a[1]] {https://x.test/b}", ["https://x.test/a[1]", "https://x.test/b"]),
        ("mismatched https://x.test/(a]b", ["https://x.test/(a"]),
        ("open https://x.test/a(b end", ["https://x.test/a(b"]),
        ("<https://x.test/a.b.>", ["https://x.test/a.b."]),  # delimited: all up to ">"
        ("<https://x.test/a)b>", ["https://x.test/a)b"]),
        ("<URL:http://x.test/rfc1738>", ["http://x.test/rfc1738"]),
        ("<https://x.test/wrapped\n  /rest>", []),  # clients disagree on it: left alone
        ("<https://x.test/a b>", []),
        ('"https://x.test/a b"', []),
        ("unclosed <https://x.test/a", []),
        ("IDN https://bücher.example/buch?q=ü#frag", ["https://bücher.example/buch?q=ü#frag"]),
        ("query https://x.test/p?a=1&b=2#top.", ["https://x.test/p?a=1&b=2#top"]),
        (
            "ipv6 http://[2001:db8::1]:8080/x and http://192.0.2.1/",
            ["http://[2001:db8::1]:8080/x", "http://192.0.2.1/"],
        ),
        ("port https://x.test:8443/a", ["https://x.test:8443/a"]),
        ("nbsp https://x.test/a\u00a0next", ["https://x.test/a"]),
        ("tab\thttps://x.test/a\tnext", ["https://x.test/a"]),
        ("html-ish <a>https://x.test/a</a>", ["https://x.test/a"]),
        ("mailto:help@example.com ftp://x.test/ file:///etc", []),
        ("www.example.com and example.com/path", []),  # no scheme: not an absolute URL
        ("xhttp://x.test/ a/http://x.test/ a.http://x.test/ _https://x.test", []),
        ("no host http:// https:///path http://exa mple", ["http://exa"]),
        ("bad host http://x_y%zz/ http://1.2.3.999/ http://a.b:port/", []),
        ("httpſ://x.test/ (long s is not s)", []),
    ],
)
def test_urls_are_found_where_clients_linkify_them(text, found):
    assert urls(text) == found


def test_each_link_carries_its_line_as_text_and_its_offsets():
    text = "Hello,\r\n\r\nTo  unsubscribe:\thttps://news.test/u?id=1\r\nShop https://shop.test/\r\n"
    first, second = find_links(text)
    assert text[first.start : first.end] == first.url == "https://news.test/u?id=1"
    assert first.text == "To unsubscribe: https://news.test/u?id=1"
    assert second.text == "Shop https://shop.test/"
    assert (second.tag, second.quote, second.opts_out, second.label, second.removed) == (
        "text", "", False, None, ()
    )  # fmt: skip


def test_a_line_of_many_urls_keeps_each_text_bounded():
    text = " ".join(f"https://x.test/{i}" for i in range(20_000))
    found = find_links(text)
    assert len(found) == 20_000
    assert max(len(link.text) for link in found) <= 2 * LINE_LIMIT + len(found[-1].url)


# --- format=flowed ----------------------------------------------------------------------------


def unflow(text: str, delsp: bool) -> str:
    """RFC 3676 section 4: a reference unflowing, line by line."""
    out, joining = [], None
    for line in text.split("\r\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        content = content[1:] if content.startswith(" ") else content
        flowed = content.endswith(" ") and content != "-- "
        if joining is not None and joining != depth:
            out.append("\n")
        out.append(content[:-1] if flowed and delsp else content)
        if not flowed:
            out.append("\n")
        joining = depth if flowed else None
    return "".join(out)


FLOWED = (
    "Hello, see https://x.test/flowed and \r\n"  # soft break after "and"
    "more at https://x.test/b.\r\n"
    "> quoted https://x.test/q  \r\n"
    "> continued\r\n"
    " From https://x.test/stuffed here\r\n"  # space-stuffed
    "-- \r\n"
    "sig https://x.test/sig\r\n"
)


@pytest.mark.parametrize("delsp", [False, True])
def test_flowed_urls_are_found_on_their_lines(delsp):
    found = find_links(FLOWED, Flow(flowed=True, delsp=delsp))
    assert [link.url for link in found] == [
        "https://x.test/flowed", "https://x.test/b", "https://x.test/q", "https://x.test/stuffed",
        "https://x.test/sig",
    ]  # fmt: skip
    assert all(FLOWED[link.start : link.end] == link.url for link in found)
    joined = "Hello, see https://x.test/flowed and more at https://x.test/b."
    assert found[0].text == (joined if not delsp else joined.replace("and more", "andmore"))
    assert found[2].text == "quoted https://x.test/q continued"


def test_a_url_across_a_delsp_soft_break_is_left_alone():
    text = "Go to https://x.test/a-long- \r\npath now or https://x.test/b  \r\nlater\r\n"
    delsp = find_links(text, Flow(flowed=True, delsp=True))
    assert [link.url for link in delsp] == ["https://x.test/b"]  # ".../b" ends at a space
    # without DelSp the trailing space is text: no URL can cross a soft break
    plain = find_links(text, Flow(flowed=True, delsp=False))
    assert [link.url for link in plain] == ["https://x.test/a-long", "https://x.test/b"]


@pytest.mark.parametrize("delsp", [False, True])
def test_replacing_flowed_urls_keeps_the_unflowed_text(delsp):
    flow = Flow(flowed=True, delsp=delsp)
    found = find_links(FLOWED, flow)
    new = "http://click.test/c/" + "A" * 31 + "-"
    rewritten = apply(FLOWED, edits(FLOWED, [(link, new) for link in found]))
    expected = unflow(FLOWED, delsp)
    for link in found:  # each URL is there once
        expected = expected.replace(link.url, written(new), 1)
    assert unflow(rewritten, delsp) == expected
    assert rewritten.count("\r\n") == FLOWED.count("\r\n")
    assert [line.endswith(" ") for line in rewritten.split("\r\n")] == [
        line.endswith(" ") for line in FLOWED.split("\r\n")
    ]


# --- writing ----------------------------------------------------------------------------------


def test_a_trailing_character_clients_drop_is_percent_encoded():
    assert written("https://c.test/c/abc-") == "https://c.test/c/abc%2D"
    assert written("https://c.test/c/a-b_c") == "https://c.test/c/a-b_c"
    assert urls(f"Click {written('https://c.test/c/ab--')}.") == ["https://c.test/c/ab%2D%2D"]


def test_edits_write_urls_as_they_are_and_refuse_a_misplaced_link():
    text = "A & B: https://x.test/?a=1&b=2\n"
    (link,) = find_links(text)
    assert apply(text, edits(text, [(link, "https://c.test/c/T?x=<&>")])) == (
        "A & B: https://c.test/c/T?x=<&>\n"
    )  # no HTML escaping
    with pytest.raises(ValueError, match="no URL"):
        edits("changed " + text, [(link, "https://c.test/")])


# --- properties -------------------------------------------------------------------------------

LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
HOST = st.one_of(
    st.lists(LABEL, min_size=1, max_size=3).map(lambda labels: ".".join([*labels, "test"])),
    st.sampled_from(["bücher.example", "xn--bcher-kva.example", "192.0.2.7", "[2001:db8::1]"]),
)
PATH_CHARS = st.sampled_from([*"abcXYZ019-._~!$&*+=:@%;,'/?#", "é", "ü", "日"])
SEGMENT = st.lists(PATH_CHARS, max_size=10).map("".join)


@st.composite
def url(draw) -> str:
    """An http(s) URL a client links whole: balanced brackets, no trailing punctuation."""
    path = draw(st.lists(st.one_of(SEGMENT, SEGMENT.map(lambda s: f"({s})"),
                                   SEGMENT.map(lambda s: f"[{s}]")), max_size=4))  # fmt: skip
    scheme = draw(st.sampled_from(["http", "https", "HTTPS"]))
    value = f"{scheme}://{draw(HOST)}/{''.join(path)}"
    return value + "x" if value[-1] in TRAILING else value


WORDS = st.text(st.sampled_from([*"ab ,.!?;:()\n\t'\"<>*", "\u00a0"]), max_size=20)
WRAPPINGS = st.sampled_from(
    [("", ""), (" ", " "), ("(", ")"), ("(see ", ")."), ("<", ">"), ('"', '"'), ("'", "'."),
     ("\n", ",\n"), ("[", "]"), ("*", "!")]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(WORDS, url(), WRAPPINGS, WORDS)
def test_a_url_in_text_is_found_whole(before, link, wrapping, after):
    """(b) never a cut URL: a URL in any surroundings is found exactly."""
    opener, closer = wrapping
    head = before if not before or before[-1].isspace() else before + " "
    tail = after if not after or after[0].isspace() else " " + after
    text = f"{head}{opener}{link}{closer}{tail}"
    start = len(head) + len(opener)
    assert (start, start + len(link)) in list(find_urls(text))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([*"htps:/.xa-é(){}[]<>\"' \n?#,!", "HTTP", "https://"])).map("".join)
)
def test_every_url_found_is_one_a_client_links(text):
    """(a) never a URL a client would not linkify."""
    for start, end in find_urls(text):
        found = text[start:end]
        assert re.match(r"https?://", found, re.I)
        assert has_valid_host(found)
        assert not re.search(r'[\s<>"]', found)
        delimited = text[start - 1 : start] in ("<", '"') and text[end : end + 1] in (">", '"')
        assert delimited or found[-1] not in TRAILING


@pytest.mark.parametrize(
    "pattern",
    ["http://", "https://x.test/(", "((((", "<http://x.test/", "http://x.test/)", '"http://a',
     "http://x.test/" + "[" * 50, "\u00a0http://a.b." * 3, "<URL:https://"],
)  # fmt: skip
def test_time_is_linear_in_hostile_text(pattern):
    """(c) 200 KB of hostile text, and 10x that: the time grows about 10x, no more."""
    small = pattern * (200_000 // len(pattern))
    started = time.perf_counter()
    ratio = growth(lambda text: list(find_urls(text)), small, small * 10)
    assert ratio < 30, f"{ratio:.1f}x the time for 10x the text"
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize("delsp", [False, True])
def test_flowed_reading_is_linear_too(delsp):
    small = "> https://x.test/a \r\n" * 10_000
    ratio = growth(lambda text: find_links(text, Flow(True, delsp)), small, small * 10)
    assert ratio < 30, f"{ratio:.1f}x the time for 10x the text"


# --- end to end: SMTP in, HTTP click ----------------------------------------------------------

CAMPAIGN = {
    "X-Campaign-Id": "plain",
    "X-Track-Clicks": "yes",
    "X-Contact-Id": "42",
    "List-Unsubscribe": "<https://news.example.com/lu>, <mailto:u@example.com>",
}
TRACKING = re.compile(r"http://click\.test/c/[A-Za-z0-9_%-]+")
SHOP = "https://shop.example.com/spring?utm=1&b=2"
TEXT = (
    f"Spring is here! Shop now: {SHOP}.\r\n"
    "Read more (https://blog.example.com/post_(1)) or <https://docs.example.com/a b.c>\r\n"
    "To unsubscribe, visit https://news.example.com/unsub?u=42\r\n"
    "Manage your subscription: https://news.example.com/lu\r\n"
    "View this email online: https://news.example.com/view/42\r\n"
    "Reply to mailto:help@example.com or www.example.com\r\n"
    "https://shop.example.com/a-line-of-its-own\r\n"
)
TEXT_TRACKED = [
    SHOP,
    "https://blog.example.com/post_(1)",
    "https://shop.example.com/a-line-of-its-own",
]
HTML = f'<p><a href="{SHOP.replace("&", "&amp;")}">Shop</a></p>\r\n'


@pytest.fixture
def settings(settings):
    tracking = replace(settings.tracking, track_plain_text=True)
    return replace(settings, tracking=tracking, smtp=replace(settings.smtp, received_header=False))


def part(content_type: str, text: str, cte: str = "7bit", charset: str = "utf-8") -> str:
    data = text.encode(charset)
    body = {
        "quoted-printable": binascii.b2a_qp(data, istext=True),
        "base64": base64.encodebytes(data).replace(b"\n", b"\r\n"),
    }.get(cte, data)
    head = (
        f"Content-Type: {content_type}; charset={charset}\r\nContent-Transfer-Encoding: {cte}\r\n"
    )
    return head + "\r\n" + body.decode("latin-1")


def alternative(*parts: str, headers=None) -> bytes:
    body = "".join(f"--b\r\n{p}\r\n" for p in parts) + "--b--\r\n"
    head = {**CAMPAIGN, **(headers or {}), "MIME-Version": "1.0",
            "Content-Type": 'multipart/alternative; boundary="b"'}  # fmt: skip
    return message(head, "") + body.encode("latin-1")


def text_parts(raw: bytes) -> list[email.message.Message]:
    return [p for p in email.message_from_bytes(raw).walk() if p.get_content_type() == "text/plain"]


def decoded(part_: email.message.Message) -> str:
    return part_.get_payload(decode=True).decode(part_.get_content_charset("utf-8"))


async def original_of(text: str, relay) -> tuple[str, list[str]]:
    """`text` with each tracking URL replaced by the URL it stands for; those URLs."""
    found = []
    pieces, pos = [], 0
    for match in TRACKING.finditer(text):
        url = await relay.resolve(unquote(match[0]))
        found.append(url)
        pieces += (text[pos : match.start()], url)
        pos = match.end()
    return "".join(pieces) + text[pos:], found


async def relayed(settings, upstream, raw: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """What the upstream got of `raw`, and (tracking URL, original URL) of its text parts."""
    async with start_relay(settings) as relay:
        replies = await send(relay.port, raw)
        assert replies[-1].startswith("250"), replies
        forwarded = upstream.received[-1].content
        pairs = []
        for text_part in text_parts(forwarded):
            for match in TRACKING.finditer(decoded(text_part)):
                pairs.append((match[0], await relay.resolve(unquote(match[0]))))
    return forwarded, pairs


async def test_text_urls_become_tracking_links_that_redirect_to_them(settings, upstream):
    raw = alternative(part("text/plain", TEXT), part("text/html", HTML))
    forwarded, pairs = await relayed(settings, upstream, raw)
    assert [original for _, original in pairs] == TEXT_TRACKED
    (new_text,) = map(decoded, text_parts(forwarded))
    restored = new_text
    for tracking, original in pairs:
        restored = restored.replace(tracking, original, 1)
    assert restored == TEXT  # nothing but the tracked URLs changed
    kept = ["https://news.example.com/unsub?u=42", "https://news.example.com/lu\r\n",
            "https://news.example.com/view/42", "<https://docs.example.com/a b.c>"]  # fmt: skip
    assert all(url in new_text for url in kept)
    rows = pg.query(settings.storage, "SELECT url FROM links ORDER BY url")
    # the URL of the HTML and text parts: one link (PostgreSQL makes link rows in hash order)
    assert rows == [(url,) for url in sorted(TEXT_TRACKED)]
    untracked = pg.query(settings.storage, "SELECT url, reason FROM untracked_links ORDER BY url")
    assert untracked == [("https://news.example.com/lu", "unsubscribe"),
                         ("https://news.example.com/unsub?u=42", "unsubscribe"),
                         ("https://news.example.com/view/42", "system")]  # fmt: skip
    html_token = TRACKING.search(forwarded.split(b"text/html")[1].decode())[0]
    async with start_web(settings) as web:
        for tracking, original in pairs:
            token = web.signer.verify(unquote(tracking).rsplit("/", 1)[1])
            assert token is not None and token.kind is Kind.TEXT
            response = await web.get(tracking.removeprefix("http://click.test"))
            assert (response.status, response.headers["Location"]) == (302, original)
        assert web.signer.verify(html_token.rsplit("/", 1)[1]).kind is Kind.HTML


async def test_a_token_ending_in_a_dash_is_written_so_clients_keep_it(settings):
    async with start_web(settings) as web:
        send_id, links = await web.send(urls=(SHOP,))
        sent = web.sent[send_id]
        tokens = (web.signer.sign(send_id, links[SHOP], sent + k) for k in range(5000))
        token = next(t for t in tokens if t.endswith("-"))
        url = written(f"http://click.test/c/{token}")
        assert url.endswith("%2D") and urls(f"Go to {url}.") == [url]
        response = await web.get(url.removeprefix("http://click.test"))
        assert (response.status, response.headers["Location"]) == (302, SHOP)


async def test_with_the_default_the_text_part_is_byte_identical(settings, upstream):
    settings = replace(settings, tracking=replace(settings.tracking, track_plain_text=False))
    text = part("text/plain", TEXT)
    forwarded, pairs = await relayed(settings, upstream, alternative(text, part("text/html", HTML)))
    assert pairs == [] and text.encode() in forwarded
    assert b"http://click.test/c/" in forwarded  # the HTML part is tracked
    only_text = message(CAMPAIGN, TEXT)
    forwarded, _ = await relayed(settings, upstream, only_text)
    assert forwarded == re.sub(rb"(?m)^X-(Campaign|Contact|Track)-[A-Za-z]+:.*\r\n", b"", only_text)
    decisions = pg.query(settings.storage, "SELECT decision FROM sends ORDER BY id")
    assert decisions == [("tracked",), ("no_html",)]


async def test_a_text_only_message_is_tracked(settings, upstream):
    _, pairs = await relayed(settings, upstream, message(CAMPAIGN, TEXT))
    assert [original for _, original in pairs] == TEXT_TRACKED
    assert pg.query(settings.storage, "SELECT decision FROM sends") == [("tracked",)]


@pytest.mark.parametrize("cte", ["quoted-printable", "base64", "8bit"])
async def test_charset_and_transfer_encoding_are_kept(settings, upstream, cte):
    text = "Grüße! Prüfen Sie https://x.example/straße?q=café (ça coûte 5 €).\r\n"
    charset = "iso-8859-15"
    raw = alternative(part("text/plain", text, cte, charset))
    forwarded, pairs = await relayed(settings, upstream, raw)
    assert pairs and pairs[0][1] == "https://x.example/straße?q=café"  # as written
    head = f"charset={charset}\r\nContent-Transfer-Encoding: {cte}\r\n".encode()
    assert head in forwarded
    (new,) = text_parts(forwarded)
    assert decoded(new) == text.replace(pairs[0][1], pairs[0][0])


FLOWED_DELSP = (
    "Hallo, unser Angebot finden Sie unter https://shop.example.com/angebot und \r\n"
    "weitere Infos unter https://shop.example.com/infos-zum-angebot-mit-sehr-langem-pfa \r\n"
    "d sowie https://x.example/a.\r\n"
    "> Zitat https://x.example/q  \r\n"
    "> weiter\r\n"
    " From https://x.example/stuffed\r\n"
    "-- \r\n"
    "Abmelden: https://x.example/abmelden\r\n"
)


async def test_a_flowed_delsp_part_stays_valid_flowed_text(settings, upstream):
    content_type = "text/plain; format=flowed; delsp=yes"
    raw = alternative(part(content_type, FLOWED_DELSP, "quoted-printable"))
    forwarded, pairs = await relayed(settings, upstream, raw)
    assert [original for _, original in pairs] == [
        "https://shop.example.com/angebot",
        "https://x.example/a",
        "https://x.example/q",
        "https://x.example/stuffed",
    ]  # not the URL across the soft break, nor the one on the line saying "Abmelden"
    (new,) = text_parts(forwarded)
    assert new.get_param("format") == "flowed" and new.get_param("delsp") == "yes"
    new_text = decoded(new)
    expected = unflow(FLOWED_DELSP, delsp=True)
    for tracking, original in pairs:
        expected = expected.replace(original, tracking, 1)
    assert unflow(new_text, delsp=True) == expected
    old_lines, new_lines = FLOWED_DELSP.split("\r\n"), new_text.split("\r\n")
    assert [line.endswith(" ") for line in new_lines] == [line.endswith(" ") for line in old_lines]
    assert [line[:1] for line in new_lines] == [line[:1] for line in old_lines]  # stuffing, ">"


async def test_lines_stay_within_998_octets(settings, upstream):
    line = " ".join(f"https://x{i}.example/" for i in range(45))  # 45 URLs, 900 characters
    raw = alternative(part("text/plain", line + "\r\n", "7bit"))
    forwarded, pairs = await relayed(settings, upstream, raw)
    assert len(pairs) == 45
    assert max(len(line) for line in forwarded.split(b"\r\n")) <= 998
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in forwarded
    (new,) = text_parts(forwarded)
    restored = decoded(new)
    for tracking, original in pairs:
        restored = restored.replace(tracking, original, 1)
    assert restored == line + "\r\n"
