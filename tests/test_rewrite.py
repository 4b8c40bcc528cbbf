"""Campaign mail through the relay: which messages and links are rewritten, byte for byte."""

from __future__ import annotations

import base64
import binascii
import codecs
import email
import re
from dataclasses import replace

import pytest

from clickrelay.tracking import rewrite
from clickrelay.tracking.links import find_links

import pg
from support import assert_faithful, message, send, start_relay

CAMPAIGN = {
    "X-Campaign-Id": "spring-2026",
    "X-Campaign-Name": "Spring sale",
    "X-Track-Clicks": "yes",
    "X-Contact-Id": "42",
}
TRACK = "http://click.test/c/"
OLD_TOKEN = "A" * 32

NEWSLETTER = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Spring</title>
<style>a[href="https://style.example/"] {{ color: red }}</style></head>
<body>
<a href="https://shop.example.com/spring?utm=1&amp;b=2" class="btn">Shop now</a>
<p>Grüße! <a href='https://shop.example.com/spring?utm=1&amp;b=2'>Shop again</a></p>
<a href="mailto:help@example.com">Mail us</a>
<a href="#top">Top</a>
<a href="/pricing">Pricing</a>
<a href="http://exa mple.com/">Broken</a>
<a href="{{{{unsubscribe_url}}}}">Unsubscribe</a>
<a href="https://app.example.com/trigger/123">Confirm</a>
<a href="https://news.example.com/unsub?u=42">Unsubscribe here</a>
<a href="https://news.example.com/lu">Manage</a>
<a href="https://news.example.com/view/42">View in browser</a>
<a href="https://status.example.com/x">Status</a>
<a href="https://partner.example.net/?aff=9">Partner</a>
<a href="https://blog.example.com/" data-notrack>Blog</a>
<a href="https://docs.example.com/">https://docs.example.com/</a>
<a href="{TRACK}{OLD_TOKEN}">Already</a>
<a href="  https://spaces.example.com/x  ">Spaces</a>
<a href="https://bücher.example/buch">IDN</a>
<map><area href="https://map.example.com/r1" alt="Region"></map>
<!--[if mso]><v:roundrect xmlns:v="urn:schemas-microsoft-com:vml"
  href="https://button.example.com/go" style="height:40px"><center>Go</center></v:roundrect>
<![endif]-->
<!-- <a href="https://commented.example.com/">hidden</a> -->
<script>var x = '<a href="https://script.example/">';</script>
</body></html>
"""
TRACKED = {
    "https://shop.example.com/spring?utm=1&b=2",
    "https://spaces.example.com/x",
    "https://bücher.example/buch",
    "https://map.example.com/r1",
    "https://button.example.com/go",
}
UNTRACKED = [
    ("#top", "anchor", 1),
    ("/pricing", "relative", 1),
    ("http://exa mple.com/", "malformed", 1),
    (f"{TRACK}{OLD_TOKEN}", "already_tracked", 1),
    ("https://app.example.com/trigger/123", "trigger", 1),
    ("https://blog.example.com/", "opt_out", 1),
    ("https://docs.example.com/", "url_text", 1),
    ("https://news.example.com/lu", "unsubscribe", 1),
    ("https://news.example.com/unsub?u=42", "unsubscribe", 1),
    ("https://news.example.com/view/42", "system", 1),
    ("https://partner.example.net/?aff=9", "affiliate", 1),
    ("https://status.example.com/x", "system", 1),
    ("mailto:help@example.com", "scheme", 1),
    ("{{unsubscribe_url}}", "placeholder", 1),
]


@pytest.fixture
def settings(settings):
    tracking = replace(
        settings.tracking,
        trigger_url_patterns=(re.compile("/trigger/"),),
        system_url_patterns=(re.compile(r"status\.example"),),
        affiliate_url_patterns=(re.compile("[?&]aff="),),
    )
    return replace(settings, tracking=tracking, smtp=replace(settings.smtp, received_header=False))


def html_message(html: str, headers=None, charset="utf-8", cte="quoted-printable") -> bytes:
    data = html.replace("\n", "\r\n").encode(charset)  # text in canonical (CRLF) form
    body = {
        "quoted-printable": binascii.b2a_qp(data, istext=True),
        "base64": base64.encodebytes(data).replace(b"\n", b"\r\n"),
    }.get(cte, data)
    head = {**CAMPAIGN, **(headers or {})}
    head.update({"MIME-Version": "1.0", "Content-Type": f"text/html; charset={charset}",
                 "Content-Transfer-Encoding": cte})  # fmt: skip
    return message({k: v for k, v in head.items() if v is not None}, "") + body


def strip_control(raw: bytes) -> bytes:
    return re.sub(rb"(?im)^x-(campaign|contact|track|test)-[a-z]+:.*\r\n", b"", raw)


def decoded_html(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw)
    return [
        p.get_payload(decode=True).decode(p.get_content_charset())
        for p in msg.walk()
        if p.get_content_type() == "text/html" and p.get_content_disposition() != "attachment"
    ]


def rows(settings, sql: str) -> list[tuple]:
    return pg.query(settings.storage, sql)


async def test_every_link_rule_on_a_handwritten_newsletter(settings, upstream):
    raw = html_message(NEWSLETTER, {"List-Unsubscribe": "<https://news.example.com/lu>"})
    async with start_relay(settings) as relay:
        await send(relay.port, raw)
        forwarded = upstream.received[0].content
        (html,) = decoded_html(forwarded)
        assert await assert_faithful(NEWSLETTER.replace("\n", "\r\n"), html, relay) == 6
    tracked = {url for (url,) in rows(settings, "SELECT url FROM links")}
    assert tracked == TRACKED
    assert rows(settings, "SELECT url, reason, count FROM untracked_links ORDER BY url") == sorted(
        UNTRACKED
    )
    assert rows(settings, "SELECT contact_id, decision, outcome FROM sends") == [
        ("42", "tracked", "accepted")
    ]
    assert "data-notrack" not in html and 'href="https://blog.example.com/">Blog' in html
    assert b"X-Campaign-Id" not in forwarded and b"X-Contact-Id" not in forwarded
    tokens = re.findall(r"http://click\.test/c/([A-Za-z0-9_-]+)", html)
    assert len(tokens) == 7 and all(len(t) == 32 for t in tokens)  # 6 new + the old one


@pytest.mark.parametrize(
    ("headers", "decision"),
    [
        ({"X-Campaign-Id": None}, None),
        ({"X-Test-Send": "yes"}, None),
        ({"X-Track-Clicks": None}, "tracking_off"),
        ({"X-Track-Clicks": "no"}, "tracking_off"),
        ({"X-Campaign-Type": "rss"}, "campaign_type"),
        ({"X-Campaign-Type": "ab_test"}, "campaign_type"),
        ({"X-Campaign-Type": "workflow"}, "campaign_type"),
        ({"DKIM-Signature": "v=1; a=rsa-sha256; d=example.com; s=s1; b=abc"}, "dkim"),
    ],
)
async def test_messages_that_do_not_qualify_pass_untouched(settings, upstream, headers, decision):
    raw = html_message(NEWSLETTER, headers)
    async with start_relay(settings) as relay:
        await send(relay.port, raw)
    assert upstream.received[0].content == strip_control(raw)
    sends = rows(settings, "SELECT decision FROM sends")
    assert sends == ([] if decision is None else [(decision,)])
    assert rows(settings, "SELECT count(*) FROM links") == [(0,)]


async def test_signed_and_text_only_messages_pass_untouched(settings, upstream):
    signed = message(
        {**CAMPAIGN, "Content-Type": 'multipart/signed; protocol="application/pgp-signature";'
         ' boundary="s"'},
        '--s\r\nContent-Type: text/html\r\n\r\n<a href="https://x.example/">x</a>\r\n'
        "--s\r\nContent-Type: application/pgp-signature\r\n\r\nSIG\r\n--s--\r\n",
    )  # fmt: skip
    plain = message(CAMPAIGN, "Visit https://x.example/ today.\r\n")
    async with start_relay(settings) as relay:
        await send(relay.port, signed)
        await send(relay.port, plain)
    assert [r.content for r in upstream.received] == [strip_control(signed), strip_control(plain)]
    assert rows(settings, "SELECT decision FROM sends ORDER BY id") == [("signed",), ("no_html",)]


@pytest.mark.parametrize("charset", ["iso-8859-1", "windows-1252", "utf-8", "iso-2022-jp"])
@pytest.mark.parametrize("cte", ["8bit", "quoted-printable", "base64"])
async def test_charsets_and_encodings_are_kept(settings, upstream, charset, cte):
    text = {"iso-2022-jp": "日本語のお知らせ", "windows-1252": "“Quoted” – €"}.get(charset, "Grüße")
    html = f'<p>{text}</p>\n<a href="https://example.com/{charset}">{text}</a>\n'
    raw = html_message(html, charset=charset, cte=cte)
    async with start_relay(settings) as relay:
        await send(relay.port, raw)
        forwarded = upstream.received[0].content
        (new_html,) = decoded_html(forwarded)
        python_charset = codecs.lookup(charset).name
        assert (
            await assert_faithful(html.replace("\n", "\r\n"), new_html, relay, python_charset) == 1
        )
    assert f"charset={charset}\r\nContent-Transfer-Encoding: {cte}\r\n".encode() in forwarded


async def test_rewritten_line_over_998_octets_switches_to_quoted_printable(settings, upstream):
    html = "<p>" + "word " * 196 + '<a href="https://a.io/">x</a></p>\n'  # 1011 chars after
    raw = html_message(html, cte="7bit")
    async with start_relay(settings) as relay:
        await send(relay.port, raw)
        forwarded = upstream.received[0].content
        (new_html,) = decoded_html(forwarded)
        assert await assert_faithful(html.replace("\n", "\r\n"), new_html, relay) == 1
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in forwarded
    assert max(len(line) for line in forwarded.split(b"\r\n")) <= 998


async def test_relaying_a_rewritten_message_again_changes_nothing(settings, upstream):
    # Opt-out attributes are removed on output (DESIGN.md), so a second pass would track that
    # one link; every other link is recognised as already tracked or left alone again.
    raw = html_message(NEWSLETTER.replace(" data-notrack", ""))
    async with start_relay(settings) as relay:
        await send(relay.port, raw)
        once = upstream.received[0].content
        head, _, body = once.partition(b"\r\n\r\n")
        await send(
            relay.port,
            head + b"\r\nX-Campaign-Id: spring-2026\r\nX-Track-Clicks: yes\r\n\r\n" + body,
        )
    assert upstream.received[1].content == once


async def test_same_url_twice_in_a_campaign_is_one_link(settings, upstream):
    html = '<a href="https://x.example/a">1</a> <a href="https://x.example/a">2</a>\n'
    async with start_relay(settings) as relay:
        for contact in ("1", "2"):
            await send(relay.port, html_message(html, {"X-Contact-Id": contact}))
        first, second = (re.findall(r"/c/([\w-]+)", decoded_html(r.content)[0])
                         for r in upstream.received)  # fmt: skip
        places = [relay.signer.verify(token) for token in first]
    assert rows(settings, "SELECT count(*) FROM links") == [(1,)]
    # one link: each place has a token of its own (the click map), each send its own tokens
    assert len(set(first)) == 2 and not set(first) & set(second)
    assert [(p.link_id, p.placement) for p in places] == [(places[0].link_id, 0),
                                                          (places[0].link_id, 1)]  # fmt: skip


async def test_long_url_gets_a_32_character_token(settings, upstream):
    url = "https://example.com/" + "p" * 3000
    async with start_relay(settings) as relay:
        await send(relay.port, html_message(f'<a href="{url}">go</a>'))
        (html,) = decoded_html(upstream.received[0].content)
        (link,) = find_links(html)
        assert len(link.url) == len(TRACK) + 32
        assert await relay.resolve(link.url) == url


async def test_contact_defaults_to_the_single_envelope_recipient(settings, upstream):
    raw = html_message("<a href='https://x.example/'>x</a>", {"X-Contact-Id": None})
    async with start_relay(settings) as relay:
        await send(relay.port, raw, rcpts=["only@example.com"])
        await send(relay.port, raw, rcpts=["a@example.com", "b@example.com"])
    assert rows(settings, "SELECT contact_id, email FROM sends ORDER BY id") == [
        ("only@example.com", "only@example.com"),
        (None, None),
    ]


async def test_storage_failure_forwards_untouched(settings, upstream):
    raw = html_message(NEWSLETTER)
    async with start_relay(settings) as relay:
        await relay.store.close()
        replies = await send(relay.port, raw)
    assert replies[-1].startswith("250")
    assert upstream.received[0].content == strip_control(raw)


async def test_rewrite_failure_forwards_untouched_with_reason_error(
    settings, upstream, monkeypatch
):
    def broken(*args):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(rewrite, "plan", broken)
    raw = html_message(NEWSLETTER)
    async with start_relay(settings) as relay:
        replies = await send(relay.port, raw)
    assert replies[-1].startswith("250")
    assert upstream.received[0].content == strip_control(raw)
    assert rows(settings, "SELECT decision, outcome FROM sends") == [("error", "accepted")]


async def test_undecodable_html_is_left_alone_and_recorded(settings, upstream):
    raw = html_message("<a href='https://x.example/'>caf\u00e9</a>\n", charset="utf-8", cte="8bit")
    raw = raw.replace(b"charset=utf-8", b"charset=us-ascii")
    async with start_relay(settings) as relay:
        await send(relay.port, raw)
    assert upstream.received[0].content == strip_control(raw)
    assert rows(settings, "SELECT decision FROM sends") == [("error",)]


# An unterminated quote runs to the end of the document, and a tag the end cuts off is no tag
# (WHATWG: eof-in-tag): to a browser this document has no link at all.
UNTERMINATED_QUOTE = (
    '<p>Intro</p><a href="https://example.com/one">One</a>'
    '<a href="https://example.com/two>Two</a>\n</body></html>\n'
)


async def test_a_tag_cut_off_by_an_unterminated_quote_is_not_rewritten(settings, upstream):
    raw = html_message(UNTERMINATED_QUOTE, cte="8bit")
    async with start_relay(settings) as relay:
        await send(relay.port, raw)
    forwarded = upstream.received[0].content
    assert forwarded.count(b"http://click.test/c/") == 1  # the first link only
    assert b'<a href="https://example.com/two>Two</a>' in forwarded
    assert rows(settings, "SELECT url FROM links") == [("https://example.com/one",)]


async def test_html_attachment_is_untouched_while_the_body_is_rewritten(settings, upstream):
    attached = b'<a href="https://attached.example/">page</a>'
    raw = message(
        {**CAMPAIGN, "MIME-Version": "1.0", "Content-Type": "multipart/mixed; boundary=m"},
        '--m\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<a href="https://body.example/">b</a>'
        "\r\n--m\r\nContent-Type: text/html\r\nContent-Disposition: attachment; filename=p.html\r\n"
        "\r\n" + attached.decode() + "\r\n--m--\r\n",
    )
    async with start_relay(settings) as relay:
        await send(relay.port, raw)
    forwarded = upstream.received[0].content
    assert attached in forwarded
    assert b"https://body.example/" not in forwarded
    assert rows(settings, "SELECT url FROM links") == [("https://body.example/",)]


async def test_labels_make_links_of_one_url_and_go_from_the_output(settings, upstream):
    html = (
        '<a href="https://x.example/a" data-label="hero">1</a>\n'
        '<a href="https://x.example/a" data-label=" footer  cta ">2</a>\n'
        '<a href="https://x.example/a">3</a>\n'
        '<a data-label="hero" href="https://x.example/a">4</a>\n'
        '<a href="mailto:help@example.com" data-label="mail">5</a>\n'
    )
    async with start_relay(settings) as relay:
        await send(relay.port, html_message(html))
        (out,) = decoded_html(upstream.received[0].content)
        tokens = re.findall(r"/c/([\w-]+)", out)
        resolved = [await relay.resolve(TRACK + token) for token in tokens]
        placed = [(t.link_id, t.placement) for t in map(relay.signer.verify, tokens)]
    assert rows(settings, "SELECT url, label FROM links ORDER BY label") == [
        ("https://x.example/a", ""), ("https://x.example/a", "footer cta"),
        ("https://x.example/a", "hero"),
    ]  # fmt: skip
    assert "data-label" not in out and '<a href="mailto:help@example.com">5</a>' in out
    # four places: the hero link's first and second, the footer's and the unlabelled one's
    assert len(tokens) == 4 and [place for _, place in placed] == [0, 0, 0, 1]
    assert placed[0][0] == placed[3][0] and len({link for link, _ in placed}) == 3
    assert resolved == ["https://x.example/a"] * 4
