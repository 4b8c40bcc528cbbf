"""The shared real-world corpus through the relay with tracking on: never lost, never mangled.

Every HTML template is wrapped in a campaign message (7bit, quoted-printable, base64) and every
.eml gets the tracking headers. Each must be forwarded, either rewritten faithfully (every link
leads where the original did, every other character unchanged) or untouched with a reason.
"""

from __future__ import annotations

import base64
import email
import quopri
import re
from dataclasses import replace
from urllib.parse import unquote

import pytest

from clickrelay.mail import mime

import pg
from support import (
    assert_faithful,
    assert_headers_as_the_email_package_reads_them,
    corpus_path,
    message,
    send,
    start_relay,
)

HEADERS = {"X-Campaign-Id": "corpus", "X-Track-Clicks": "yes", "X-Contact-Id": "c1"}


def names(kind: str) -> list[str]:
    """File names for parametrizing (the `corpus` fixture skips when the corpus is absent)."""
    folder = corpus_path() / kind
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else ["(corpus absent)"]


@pytest.fixture
def settings(settings):
    return replace(settings, smtp=replace(settings.smtp, received_header=False))


def crlf(data: bytes) -> bytes:
    """As an SMTP client sends it: CRLF line ends, ending with one."""
    data = re.sub(rb"\r?\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def wrap(html: bytes, cte: str) -> bytes:
    body = {
        "7bit": crlf(html),
        "quoted-printable": crlf(quopri.encodestring(html)),
        "base64": crlf(base64.encodebytes(html)),
    }[cte]
    head = {**HEADERS, "MIME-Version": "1.0", "Content-Type": "text/html; charset=utf-8",
            "Content-Transfer-Encoding": cte}  # fmt: skip
    return message(head, "") + body


def strip_control(raw: bytes) -> bytes:
    """What the relay forwards of a message it leaves alone: no control headers, and no NUL
    characters (removed at the door: see relay.canonical)."""
    return re.sub(rb"(?im)^x-(campaign|contact|track|test)-[a-z]+:.*\r\n", b"", raw).replace(
        b"\0", b""
    )


def with_control_headers(original: bytes) -> bytes:
    """The message with the tracking headers before its first field."""
    control = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items()).encode()
    first_field = re.search(rb"(?m)^[!-9;-~]+:", original)  # after an mbox line or junk
    at = first_field.start() if first_field else 0
    return original[:at] + control + original[at:]


def html_parts(raw: bytes) -> list[mime.DecodedPart | None]:
    return [mime.decode(raw, entity) for entity in mime.html_body_parts(mime.parse(raw))]


def structure(raw: bytes) -> list[str]:
    return [part.get_content_type() for part in email.message_from_bytes(raw).walk()]


async def check_forwarded(relay, settings, original: bytes, forwarded: bytes) -> str:
    """Assert `forwarded` is a faithful rewrite of `original` (or it, untouched); the decision."""
    ((decision,), *_) = pg.query(settings.storage, "SELECT decision FROM sends ORDER BY id DESC")
    expected = strip_control(original)
    if decision != "tracked" or forwarded == expected:
        assert forwarded == expected, f"decision {decision} but the message changed"
        return decision
    assert structure(forwarded) == structure(expected)
    before, after = html_parts(expected), html_parts(forwarded)
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        if old is None:  # undecodable parts stay as they were
            continue
        assert new is not None
        old_text, new_text = old.text.replace("\r\n", "\n"), new.text.replace("\r\n", "\n")
        await assert_faithful(old_text, new_text, relay, old.charset)
    return decision


@pytest.mark.parametrize("name", names("html"))
@pytest.mark.parametrize("cte", ["7bit", "quoted-printable", "base64"])
async def test_html_templates(corpus, settings, upstream, name, cte):
    raw = wrap((corpus / "html" / name).read_bytes(), cte)
    async with start_relay(settings) as relay:
        replies = await send(relay.port, raw)
        assert replies[-1].startswith("250"), replies
        (received,) = upstream.received
        decision = await check_forwarded(relay, settings, raw, received.content)
    assert decision in ("tracked", "no_links")  # (a template of merge tags only: untouched)


@pytest.mark.parametrize("name", names("eml"))
def test_eml_headers_read_as_the_email_package_reads_them(corpus, name):
    assert_headers_as_the_email_package_reads_them((corpus / "eml" / name).read_bytes())


@pytest.mark.parametrize("name", names("eml"))
async def test_eml_messages(corpus, settings, upstream, name):
    original = crlf((corpus / "eml" / name).read_bytes())
    raw = with_control_headers(original)
    async with start_relay(settings) as relay:
        replies = await send(relay.port, raw)
        assert replies[-1].startswith("250"), replies
        (received,) = upstream.received
        decision = await check_forwarded(relay, settings, raw, received.content)
    assert decision in {"tracked", "signed", "dkim", "no_html", "no_links", "error"}


def text_parts(raw: bytes) -> list[mime.DecodedPart | None]:
    return [mime.decode(raw, entity) for entity in mime.body_parts(mime.parse(raw), "text/plain")]


TRACKING = re.compile(r"http://click\.test/c/[A-Za-z0-9_%-]{32,}")


@pytest.mark.parametrize("name", names("eml"))
async def test_eml_text_parts_with_plain_text_tracking(corpus, settings, upstream, name):
    """Every text/plain body part is forwarded, and each tracking link in it stands for a URL
    the original part holds at that place: restoring them gives the original text."""
    settings = replace(settings, tracking=replace(settings.tracking, track_plain_text=True))
    raw = with_control_headers(crlf((corpus / "eml" / name).read_bytes()))
    async with start_relay(settings) as relay:
        replies = await send(relay.port, raw)
        assert replies[-1].startswith("250"), replies
        (received,) = upstream.received
        before, after = text_parts(strip_control(raw)), text_parts(received.content)
        assert len(before) == len(after)
        for old, new in zip(before, after, strict=True):
            if old is None or new is None:
                assert received.content == strip_control(raw) or old is None
                continue
            restored, pos = [], 0
            for found in TRACKING.finditer(new.text):
                restored += (new.text[pos : found.start()], await relay.resolve(unquote(found[0])))
                pos = found.end()
            assert "".join(restored) + new.text[pos:] == old.text
