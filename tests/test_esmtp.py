"""Mail as real MTAs send it (RFC 5321, 3461, 6152, 6531), through the relay to a real aiosmtpd
upstream that offers less than the client asked for: bounces, SMTPUTF8, 8BITMIME, parameters,
multi-line replies, AUTH, line ends and NUL characters. (DSN and Postfix itself as client and as
upstream: tests/test_postfix.py.)"""

from __future__ import annotations

import base64
import email
import email.policy
import logging
import re
import ssl
from dataclasses import replace

import pytest

from clickrelay.passwords import hash_password
from clickrelay.smtp.esmtp import ParameterError, parse_mail, parse_rcpt

from support import RawClient, ScriptedUpstream, message, relay_settings, start_relay


@pytest.fixture
async def strict_upstream():
    """An upstream that offers neither SMTPUTF8 nor 8BITMIME (aiosmtpd then refuses both
    parameters, as Postfix does with smtputf8_enable = no)."""
    server = ScriptedUpstream(smtputf8=False, eightbitmime=False)
    await server.start()
    yield server
    await server.stop()


def no_trace(settings):
    return replace(settings, smtp=replace(settings.smtp, received_header=False))


async def transaction(port: int, mail: str, rcpts: list[str], raw: bytes | None) -> list[str]:
    """EHLO, then MAIL, each RCPT and (unless `raw` is None) DATA: every reply from MAIL on."""
    client = await RawClient.connect(port)
    try:
        await client.cmd("EHLO client.test")
        return await client.transaction(mail, rcpts, raw)
    finally:
        await client.close()


# --- the null sender ------------------------------------------------------------------------------


async def test_a_bounce_from_the_null_sender_is_relayed(upstream, settings):
    dsn = message({"From": "MAILER-DAEMON@example.com", "Subject": "Undelivered Mail"})
    async with start_relay(no_trace(settings)) as relay:
        replies = await transaction(relay.port, "<>", ["<sender@example.com>"], dsn)
    assert replies[0] == "250 2.1.0 Sender ok"
    assert replies[-1].startswith("250 ")
    (received,) = upstream.received
    assert received.mail_from in ("", "<>")  # aiosmtpd reports the null path as "<>"
    assert received.content == dsn


# --- SMTPUTF8 (RFC 6531) --------------------------------------------------------------------------


async def test_smtputf8_is_left_out_where_the_message_does_not_need_it(strict_upstream, tmp_path):
    settings = no_trace(relay_settings(tmp_path, strict_upstream.port))
    raw = message()
    async with start_relay(settings) as relay:
        replies = await transaction(relay.port, "<a@example.com> SMTPUTF8", ["<r@x.test>"], raw)
    assert replies[-1].startswith("250 "), replies
    assert strict_upstream.mail_options == [[]]  # today: SMTPUTF8 sent, the upstream says 501
    assert strict_upstream.received[0].content == raw


async def test_a_message_that_needs_smtputf8_is_refused_with_5_6_7(strict_upstream, tmp_path):
    settings = relay_settings(tmp_path, strict_upstream.port)
    async with start_relay(settings) as relay:
        sender = await transaction(relay.port, "<jörg@example.de> SMTPUTF8", [], None)
        recipient = await transaction(
            relay.port, "<a@example.com> SMTPUTF8", ["<用户@example.cn>", "<ok@x.test>"], None
        )
        header = await transaction(
            relay.port, "<a@example.com> SMTPUTF8", ["<ok@x.test>"],
            message({"Subject": "Grüße aus Köln"}),
        )  # fmt: skip
    assert sender[0].startswith("553 5.6.7 ")
    assert recipient[1].startswith("553 5.6.7 ") and recipient[2].startswith("250")
    assert header[-1].startswith("553 5.6.7 ")
    assert strict_upstream.received == []


async def test_a_unicode_address_needs_the_smtputf8_parameter(upstream, relay):
    replies = await transaction(relay.port, "<jörg@example.de>", [], None)
    assert replies[0].startswith("553 5.6.7 ")
    replies = await transaction(relay.port, "<a@example.com>", ["<用户@example.cn>"], None)
    assert replies[1].startswith("553 5.6.7 ")


# --- 8BITMIME (RFC 6152) --------------------------------------------------------------------------

EIGHT_BIT_TEXT = "Grüße, café, naïve — 8 bits\r\n" + "x" * 90 + "é\r\n"


def eight_bit(headers: dict[str, str], body: str) -> bytes:
    return message({"MIME-Version": "1.0", **headers}, body)


def decoded_texts(raw: bytes) -> list[str]:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return [part.get_content() for part in parsed.walk() if part.get_content_maintype() == "text"]


async def test_8bit_parts_are_converted_to_quoted_printable_for_a_7bit_upstream(
    strict_upstream, tmp_path
):
    raw = eight_bit(
        {"Content-Type": "multipart/mixed; boundary=b", "Content-Transfer-Encoding": "8bit"},
        "--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        f"\r\n{EIGHT_BIT_TEXT}--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f"<p>{EIGHT_BIT_TEXT}</p>\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
        "Subject: inner\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: 8bit\r\n\r\n{EIGHT_BIT_TEXT}--b--\r\n",
    )
    settings = no_trace(relay_settings(tmp_path, strict_upstream.port))
    async with start_relay(settings) as relay:
        replies = await transaction(relay.port, "<a@x.test> BODY=8BITMIME", ["<r@x.test>"], raw)
    assert replies[-1].startswith("250 "), replies
    assert strict_upstream.mail_options == [[]]  # no BODY= for a server that does not offer it
    forwarded = strict_upstream.received[0].content
    assert forwarded.isascii()
    assert max(map(len, forwarded.split(b"\r\n"))) <= 76
    assert forwarded.count(b"Content-Transfer-Encoding: quoted-printable\r\n") == 3
    assert b"Content-Transfer-Encoding: 8bit" not in forwarded  # the multipart says 7bit now
    # What a reader sees is unchanged: the same texts, the same structure.
    assert decoded_texts(forwarded) == decoded_texts(raw)
    headers_end = raw.index(b"\r\n\r\n")
    assert forwarded[:headers_end] == raw[:headers_end].replace(b"8bit", b"7bit")


@pytest.mark.parametrize(
    ("headers", "body", "why"),
    [
        ({}, EIGHT_BIT_TEXT, "without MIME structure"),
        ({"DKIM-Signature": "v=1; a=rsa-sha256; d=x.test; s=s; b=abc; bh=def"},
         EIGHT_BIT_TEXT, "DKIM-signed"),
        ({"Content-Type": 'multipart/signed; boundary=s; protocol="application/pgp-signature"'},
         f"--s\r\nContent-Type: text/plain\r\n\r\n{EIGHT_BIT_TEXT}--s\r\n"
         "Content-Type: application/pgp-signature\r\n\r\nsig\r\n--s--\r\n", "signed"),
        ({"Content-Type": "multipart/mixed; boundary=m"},
         "préambule\r\n--m\r\nContent-Type: text/plain\r\n\r\nok\r\n--m--\r\n", "outside"),
        ({"Content-Type": "text/plain", "Content-Transfer-Encoding": "base64"},
         EIGHT_BIT_TEXT, "base64"),
        ({"Content-Type": "multipart/mixed; boundary=m"},
         "--m\r\n" + ("X-Pad: " + "x" * 990 + "\r\n") * 110 + "Content-Type: text/plain\r\n"
         f"\r\n{EIGHT_BIT_TEXT}--m--\r\n", "too large to read"),
    ],
    ids=["not-mime", "dkim", "multipart-signed", "preamble", "base64-part", "huge-part-header"],
)  # fmt: skip
async def test_8bit_content_that_cannot_be_converted_safely_is_refused_with_5_6_3(
    strict_upstream, tmp_path, headers, body, why
):
    raw = message(headers, body) if not headers else eight_bit(headers, body)
    settings = relay_settings(tmp_path, strict_upstream.port)
    async with start_relay(settings) as relay:
        replies = await transaction(relay.port, "<a@x.test> BODY=8BITMIME", ["<r@x.test>"], raw)
    assert replies[-1].startswith("554 5.6.3 "), replies
    assert why in replies[-1]
    assert strict_upstream.received == []


async def test_7bit_content_passes_a_7bit_upstream_byte_for_byte(strict_upstream, tmp_path):
    settings = no_trace(relay_settings(tmp_path, strict_upstream.port))
    raw = eight_bit({"Content-Type": "text/plain", "Content-Transfer-Encoding": "8bit"}, "ok\r\n")
    async with start_relay(settings) as relay:
        replies = await transaction(relay.port, "<a@x.test> BODY=8BITMIME", ["<r@x.test>"], raw)
    assert replies[-1].startswith("250 "), replies
    assert strict_upstream.received[0].content == raw


# --- parameters (RFC 5321 4.1.1.11, 3461) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("MAIL FROM:<a@x.test> MT-PRIORITY=3", "555 5.5.4 "),
        ("MAIL FROM:<a@x.test> REQUIRETLS", "555 5.5.4 "),
        ("MAIL FROM:<a@x.test> RET=HDRS", "555 5.5.4 "),  # DSN not offered: the upstream lacks it
        ("MAIL FROM:<a@x.test> BODY=BINARYMIME", "555 5.5.4 "),  # BINARYMIME is not offered
        ("MAIL FROM:<a@x.test> BODY=9BIT", "501 5.5.4 "),
        ("MAIL FROM:<a@x.test> SIZE=\u00b2", "501 5.5.4 "),  # str.isdigit says yes; int() no
        ("MAIL FROM:<a@x.test SIZE=9999>", "501 5.1.7 "),  # a parameter inside the path
        ("MAIL FROM:<a b@x.test>", "501 5.1.7 "),
        ("MAIL FROM:<a@x.test> SIZE=x", "501 5.5.4 "),
        ("MAIL FROM:<a@x.test> SIZE=99999999999", "552 5.3.4 "),
        ("MAIL FROM:<a@x.test> =3", "501 5.5.4 "),
        ("MAIL FROM:<a\x01b@x.test>", "501 5.1.7 "),
        ("MAIL FROM:<unterminated@x.test", "501 5.5.4 "),
    ],
)
async def test_mail_parameters_not_offered_or_malformed_are_refused(relay, command, expected):
    client = await RawClient.connect(relay.port)
    await client.cmd("EHLO c")
    reply = await client.cmd(command)
    await client.close()
    assert reply.startswith(expected), reply


async def test_rcpt_parameters_not_offered_are_refused_with_555(upstream, relay):
    replies = await transaction(relay.port, "<a@x.test>", ["<r@x.test> NOTIFY=SUCCESS"], None)
    assert replies[1].startswith("555 5.5.4 ")


def test_parameters_keep_their_case_and_dsn_ones_are_read_when_offered():
    mail = parse_mail("FROM:<@relay.test:Mixed@X.test> ret=hdrs ENVID=QQ+2Bx size=10", dsn=True)
    assert (mail.address, mail.ret, mail.envid, mail.size) == ("Mixed@X.test", "HDRS", "QQ+2Bx", 10)
    rcpt = parse_rcpt("TO:<R@x.test> notify=success,delay ORCPT=rfc822;R@X.test", dsn=True)
    assert (rcpt.notify, rcpt.orcpt) == ("SUCCESS,DELAY", "rfc822;R@X.test")
    with pytest.raises(ParameterError, match=r"^501 5\.5\.4 Bad NOTIFY"):
        parse_rcpt("TO:<r@x.test> NOTIFY=NEVER,SUCCESS", dsn=True)
    with pytest.raises(ParameterError, match=r"^501 5\.5\.4 Duplicate"):
        parse_mail("FROM:<a@x.test> SIZE=1 SIZE=2", dsn=False)
    assert parse_mail('FROM:<"a>b"@x.test>', dsn=False).address == '"a>b"@x.test'
    with pytest.raises(ParameterError, match=r"^501 "):
        parse_mail("FROM:<a@x.test> SIZE=1", dsn=False, esmtp=False)  # after HELO: none


# --- replies --------------------------------------------------------------------------------------


async def test_multi_line_replies_are_mirrored_line_by_line(upstream, relay):
    upstream.script.rcpt["gone@x.test"] = (
        "550-5.1.1 The email account that you tried to reach does not exist.\r\n"
        "550-5.1.1 Please try double-checking the recipient's email address\r\n"
        "550 5.1.1 https://support.example/answer?id=6596 x12si4"
    )
    upstream.script.data = "554-5.7.1 Rejected as spam\r\n554 5.7.1 see https://spam.example/"
    replies = await transaction(
        relay.port, "<a@x.test>", ["<gone@x.test>", "<ok@x.test>"], message()
    )
    assert replies[1] == upstream.script.rcpt["gone@x.test"].replace("\r\n", "\n")
    assert replies[-1] == upstream.script.data.replace("\r\n", "\n")


async def test_auth_not_offered_is_503_and_never_advertised_empty(upstream, settings, tls_files):
    cert, key = tls_files
    settings = replace(settings, smtp=replace(settings.smtp, tls_cert=cert, tls_key=key))
    async with start_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        before_tls = await client.cmd("EHLO c")
        auth = await client.cmd("AUTH PLAIN AGFkbWluAHNlY3JldA==")
        await client.cmd("STARTTLS")
        reader, writer = client.reader, client.writer
        await writer.start_tls(ssl._create_unverified_context())
        after_tls = await RawClient(reader, writer).cmd("EHLO c")
        auth_tls = await RawClient(reader, writer).cmd("AUTH LOGIN")
        writer.close()
    assert auth.startswith("503 5.5.1 "), auth  # today: 538
    assert auth_tls.startswith("503 5.5.1 "), auth_tls  # no users: AUTH is not offered at all
    for ehlo in (before_tls, after_tls):
        assert "AUTH" not in ehlo, ehlo  # today: "250-AUTH " with no mechanism after STARTTLS


async def test_credentials_are_never_logged_at_any_level(upstream, settings, tls_files, caplog):
    """An AUTH blob sent after a refusal reads as a command (aiosmtpd logged it at WARNING, and
    every line at DEBUG); a failed login is logged without its password."""
    cert, key = tls_files
    users = {"app": hash_password("right")}
    settings = replace(settings, smtp=replace(settings.smtp, users=users, tls_cert=cert,
                                              tls_key=key))  # fmt: skip
    secret = "Sup3r-Secret-Pw"
    blob = base64.b64encode(f"\0app\0{secret}".encode()).decode()
    caplog.set_level(logging.DEBUG)
    async with start_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        await client.cmd("EHLO c")
        refused = await client.cmd(f"AUTH PLAIN {blob}")  # before STARTTLS: not offered
        stray = await client.cmd(blob)  # the client sends its answer anyway
        await client.cmd("STARTTLS")
        await client.writer.start_tls(ssl._create_unverified_context())
        tls = RawClient(client.reader, client.writer)
        await tls.cmd("EHLO c")
        failed = await tls.cmd(f"AUTH PLAIN {blob}")  # wrong password for the hash
        challenge = await tls.cmd("AUTH LOGIN")
        await tls.cmd(base64.b64encode(b"app").decode())
        failed_login = await tls.cmd(base64.b64encode(secret.encode()).decode())
        client.writer.close()
    assert refused.startswith("503") and stray.startswith("500")
    assert failed.startswith("535") and challenge.startswith("334")
    assert failed_login.startswith("535")
    logged = caplog.text
    assert "AUTH failed for user 'app'" in logged
    for leak in (blob, secret, base64.b64encode(secret.encode()).decode()):
        assert leak.lower() not in logged.lower()  # aiosmtpd's echo of a command upper-cases it


# --- what the relay reads is what it writes -------------------------------------------------------

BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
CAMPAIGN = {"X-Campaign-Id": "c1", "X-Track-Clicks": "yes", "MIME-Version": "1.0"}


@pytest.mark.parametrize(
    "part",
    [
        # one 8bit line over 998 octets, and no line break at the end of the part
        "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        '<p><a href="https://x.test/a">Shop</a>' + "é" * 600 + "</p>",
        # quoted-printable that encodes bare line feeds (=0A), one before a dot and a boundary
        "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
        '\r\n\r\n<a href=3D"https://x.test/b">Shop</a>=0A--b1=0A.foo=0Aend',
    ],
    ids=["long-8bit-line", "qp-encoded-line-feeds"],
)
async def test_rewritten_parts_end_their_lines_with_crlf_only(upstream, settings, part):
    """Re-encoding a part as quoted-printable must break lines with CRLF, and quote any other
    line feed: a bare LF on the wire ends a line for some upstreams (so "\n.foo" loses its dot,
    "\n--b1" starts a new MIME part) and is refused by others."""
    raw = message(
        {**CAMPAIGN, "Content-Type": "multipart/mixed; boundary=b1"},
        f"--b1\r\n{part}\r\n--b1\r\nContent-Type: text/plain\r\n\r\nend\r\n--b1--\r\n",
    )
    async with start_relay(no_trace(settings)) as relay:
        replies = await transaction(relay.port, "<a@x.test>", ["<r@x.test>"], raw)
    assert replies[-1].startswith("250 ")
    forwarded = upstream.received[0].content
    assert b"http://click.test/c/" in forwarded
    assert not BARE_LINE_END.search(forwarded)  # today: 37 bare LFs, or a new MIME part
    structure = [p.get_content_type() for p in email.message_from_bytes(forwarded).walk()]
    assert structure == ["multipart/mixed", "text/html", "text/plain"]


async def test_a_control_header_hidden_behind_a_bare_cr_is_stripped(upstream, settings):
    raw = (
        b"From: a@x.test\r\nX-Campaign-Id: c1\r\nX-Trace: t\rX-Contact-Id: 99\r\n"
        b"Subject: hi\r\n\r\nbody\r\n"
    )
    async with start_relay(no_trace(settings)) as relay:
        replies = await transaction(relay.port, "<a@x.test>", ["<r@x.test>"], raw)
    assert replies[-1].startswith("250 ")
    forwarded = upstream.received[0].content
    assert b"X-Contact-Id" not in forwarded  # today: written out as a header of its own
    assert forwarded == b"From: a@x.test\r\nX-Trace: t\r\nSubject: hi\r\n\r\nbody\r\n"


async def test_nul_characters_are_removed_so_no_upstream_finds_another_end_of_data(
    upstream, settings
):
    """ "..\\0" unstuffs to ".\\0": an upstream that stops a line at a NUL would read it as the
    end of the data and the rest as commands. The relay removes every NUL at the door."""
    body = b"Hello.\r\n..\x00\r\nMAIL FROM:<evil@x.test>\r\nQUIT\r\nBye\x00.\r\n"
    raw = b"Subject: nul\r\n\r\n" + body
    async with start_relay(no_trace(settings)) as relay:
        replies = await transaction(relay.port, "<a@x.test>", ["<r@x.test>"], raw)
    assert replies[-1].startswith("250 ")
    (received,) = upstream.received
    assert b"\x00" not in received.content  # today: forwarded with the NULs
    assert received.content == raw.replace(b"\x00", b"")
