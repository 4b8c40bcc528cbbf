"""Relay semantics against a real aiosmtpd upstream: every answer mirrors the upstream's."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import replace

import aiosmtplib
import pytest

from clickrelay.config import HostPort, UpstreamURL
from clickrelay.passwords import hash_password

from support import (
    LOOPBACK,
    RawClient,
    ScriptedUpstream,
    message,
    relay_settings,
    send,
    start_relay,
    upstream_on,
)


def no_trace(settings):
    return replace(settings, smtp=replace(settings.smtp, received_header=False))


async def test_plain_message_is_forwarded_byte_identical(upstream, settings):
    original = message(body="Line one.\r\n.leading dot\r\n\r\nLast line\r\n")
    async with start_relay(no_trace(settings)) as relay:
        replies = await send(relay.port, original)
    assert replies[-1] == "250 2.0.0 Ok: queued as Q1"
    assert [r.content for r in upstream.received] == [original]


async def test_received_header_is_the_only_addition(upstream, relay):
    original = message()
    await send(relay.port, original)
    forwarded = upstream.received[0].content
    assert forwarded.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test")
    trace_end = forwarded.index(b"\r\n", forwarded.index(b"\r\n\t", forwarded.index(b"id ")) + 3)
    assert forwarded[trace_end + 2 :] == original


async def test_control_headers_are_stripped_and_nothing_else_changes(upstream, settings):
    original = (
        b"From: a@example.com\r\n"
        b"X-Campaign-Id: spring-sale\r\n"
        b"Subject: hello\r\n"
        b"X-Contact-Id: 42\r\n"
        b"x-campaign-name: Spring\r\n\tsale (folded)\r\n"
        b"X-Track-Clicks: yes\r\n"
        b"X-Test-Send: no\r\n"
        b"X-Campaign-Type: standard\r\n"
        b"X-Contact-Email: c@example.com\r\n"
        b"X-Other: kept\r\n"
        b"\r\n"
        b"X-Campaign-Id: in the body stays\r\n"
    )
    async with start_relay(no_trace(settings)) as relay:
        await send(relay.port, original)
    assert upstream.received[0].content == (
        b"From: a@example.com\r\nSubject: hello\r\nX-Other: kept\r\n\r\n"
        b"X-Campaign-Id: in the body stays\r\n"
    )


async def test_renamed_control_headers_are_stripped(upstream, settings):
    settings = no_trace(settings)
    settings = replace(settings, headers=replace(settings.headers, campaign_id="X-Mailing"))
    original = message({"X-Mailing": "m1", "X-Campaign-Id": "not a control header now"})
    async with start_relay(settings) as relay:
        await send(relay.port, original)
    forwarded = upstream.received[0].content
    assert b"X-Mailing" not in forwarded
    assert b"X-Campaign-Id: not a control header now\r\n" in forwarded


async def test_partial_rcpt_refusal_is_mirrored_and_accepted_gets_one_copy(upstream, relay):
    upstream.script.rcpt["nobody@example.com"] = "550 5.1.1 <nobody@example.com>: no such user"
    replies = await send(relay.port, message(), rcpts=["ok@example.com", "nobody@example.com"])
    assert replies[2].startswith("250")
    assert replies[3] == "550 5.1.1 <nobody@example.com>: no such user"
    assert replies[-1].startswith("250 ")
    assert len(upstream.received) == 1
    assert upstream.received[0].rcpt_tos == ["ok@example.com"]


async def test_all_recipients_refused_means_no_data_and_nothing_forwarded(upstream, relay):
    upstream.script.rcpt["a@example.com"] = "550 5.1.1 no"
    upstream.script.rcpt["b@example.com"] = "553 5.7.1 policy"
    replies = await send(relay.port, message(), rcpts=["a@example.com", "b@example.com"])
    assert replies[2:4] == ["550 5.1.1 no", "553 5.7.1 policy"]
    assert replies[4].startswith("503")  # DATA refused: no valid recipients
    assert upstream.received == []


async def test_temporary_rcpt_failure_is_mirrored(upstream, relay):
    upstream.script.rcpt["busy@example.com"] = "452 4.2.2 Mailbox full, try later"
    replies = await send(relay.port, message(), rcpts=["busy@example.com", "ok@example.com"])
    assert replies[2] == "452 4.2.2 Mailbox full, try later"
    assert replies[-1].startswith("250")
    assert upstream.received[0].rcpt_tos == ["ok@example.com"]


async def test_permanent_data_refusal_is_mirrored(upstream, relay):
    upstream.script.data = "554 5.7.1 Message rejected as spam"
    replies = await send(relay.port, message())
    assert replies[-1] == "554 5.7.1 Message rejected as spam"


async def test_temporary_data_refusal_becomes_451(upstream, relay):
    upstream.script.data = "452 4.3.1 Insufficient system storage"
    replies = await send(relay.port, message())
    assert replies[-1].startswith("451 ")
    assert "452 4.3.1 Insufficient system storage" in replies[-1]


async def test_upstream_down_gives_4xx_and_nothing_acknowledged(upstream, settings):
    port = upstream.port
    await upstream.stop()
    with pytest.raises(ConnectionRefusedError):  # the upstream port really is closed now
        await asyncio.open_connection(LOOPBACK, port)
    async with start_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        await client.cmd("EHLO client.test")
        reply = await client.cmd("MAIL FROM:<s@x.test>")
        rcpt = await client.cmd("RCPT TO:<r@x.test>")
        await client.close()
    assert reply.startswith("451 4.4.1 Upstream unavailable, try again later (")
    assert f"port {port}:" in reply  # the refused connection to that port is the reason given
    assert rcpt.startswith("503 ")  # the refused MAIL opened no transaction


async def test_upstream_stall_past_timeout_gives_451_in_time(upstream, settings):
    upstream.script.data_delay = 30
    settings = replace(settings, upstream=replace(settings.upstream, timeout_seconds=1.0))
    async with start_relay(settings) as relay:
        started = time.monotonic()
        replies = await send(relay.port, message())
        elapsed = time.monotonic() - started
    assert replies[-1].startswith("451 ")
    assert "timed out" in replies[-1]
    assert elapsed < 5


async def test_an_upstream_that_stops_reading_the_message_gives_451_in_time(settings):
    """The upstream says 354 and then reads nothing: once the socket buffers are full, the
    relay's writes wait at most the upstream timeout, and the sender gets 451."""
    held = []

    async def stops_reading(reader, writer):
        held.append(writer)
        writer.write(b"220 mute.test ESMTP\r\n")
        for reply in (b"250 mute.test", b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 Go ahead"):
            await reader.readuntil(b"\r\n")
            writer.write(reply + b"\r\n")
        # and nothing is read from here on

    server = await asyncio.start_server(stops_reading, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    settings = upstream_on(settings, port, timeout_seconds=1.0)
    big = message(body=("x" * 998 + "\r\n") * 25_000)  # 25 MB: more than the socket buffers
    try:
        async with start_relay(settings) as relay:
            client = await RawClient.connect(relay.port)
            started = time.monotonic()
            replies = await client.send("s@x.test", ["r@x.test"], big, timeout=30)
            elapsed = time.monotonic() - started
            await client.close()
    finally:
        server.close()
    assert replies[-1].startswith("451 "), replies[-1]
    assert "timed out" in replies[-1]
    assert elapsed < 15


async def test_upstream_vanishing_mid_data_gives_451(upstream, relay):
    upstream.script.data_delay = 30
    client = await RawClient.connect(relay.port)
    await client.cmd("EHLO c")
    await client.cmd("MAIL FROM:<s@x.test>")
    await client.cmd("RCPT TO:<r@x.test>")
    await client.cmd("DATA")
    client.writer.write(message() + b".\r\n")
    await upstream.data_started.wait()
    upstream.drop_connections()
    reply = await client.reply()
    await client.close()
    assert reply.startswith("451 ")
    assert upstream.received == []


async def test_oversize_message_is_refused_with_552(upstream, settings):
    settings = replace(settings, smtp=replace(settings.smtp, max_message_size=2048))
    async with start_relay(settings) as relay:
        big = message(body="x" * 70 + "\r\n") * 40
        replies = await send(relay.port, big)
        client = await RawClient.connect(relay.port)
        await client.cmd("EHLO c")
        declared = await client.cmd("MAIL FROM:<s@x.test> SIZE=999999")
        await client.close()
    assert replies[-1].startswith("552")
    assert declared.startswith("552")
    assert upstream.received == []


async def test_size_is_advertised(relay):
    client = await RawClient.connect(relay.port)
    ehlo = await client.cmd("EHLO c")
    await client.close()
    assert "250-SIZE 33554432" in ehlo
    assert "8BITMIME" in ehlo and "SMTPUTF8" in ehlo
    assert "AUTH" not in ehlo  # no users, no TLS: AUTH is not offered


async def test_client_outside_allowed_clients_is_refused(upstream, settings):
    settings = replace(settings, smtp=replace(settings.smtp, allowed_clients=()))
    async with start_relay(settings) as relay:
        replies = await send(relay.port, message())
    assert replies[1].startswith("554 5.7.1")
    assert upstream.connections == 0
    assert upstream.received == []


async def test_authenticated_client_may_relay_over_starttls(upstream, settings, tls_files):
    cert, key = tls_files
    users = {"app": hash_password("s3cret")}
    settings = replace(
        settings,
        smtp=replace(settings.smtp, allowed_clients=(), users=users, tls_cert=cert, tls_key=key),
    )
    async with start_relay(settings) as relay:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.port, start_tls=False, cert_bundle=str(cert)
        )
        await client.connect()
        await client.ehlo()
        assert not client.supports_extension("auth")  # never offered in clear text
        await client.starttls()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.login("app", "wrong")
        await client.login("app", "s3cret")
        errors, reply = await client.sendmail("s@x.test", ["r@x.test"], message())
        await client.quit()
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as Q1")
    assert len(upstream.received) == 1


async def test_long_lines_bare_lf_and_8bit_headers_pass_unchanged(upstream, settings):
    original = (
        "Subject: caf\u00e9 \u00fcber\r\nFrom: a@example.com\r\n\r\n".encode()
        + b"x" * 200_000  # longer than RFC 5321 allows, and than a command line may be
        + b"\r\nbare\nlf\nlines\r\n\xff\xfe raw 8-bit\r\n"
    )
    async with start_relay(no_trace(settings)) as relay:
        client = await RawClient.connect(relay.port)
        await client.cmd("EHLO c")
        await client.cmd("MAIL FROM:<s@x.test> BODY=8BITMIME")
        await client.cmd("RCPT TO:<r@x.test>")
        await client.cmd("DATA")
        final = await client.cmd(original + b".")
        await client.close()
    assert final.startswith("250")
    # the wire needs CRLF, so bare LFs arrive as CRLF (as with Postfix); all else is identical
    assert upstream.received[0].content == original.replace(
        b"bare\nlf\nlines", b"bare\r\nlf\r\nlines"
    )


@pytest.mark.parametrize("after", [b"", b"..stuffed\r\n"])
async def test_a_long_last_line_does_not_hide_the_end_of_data(upstream, settings, after):
    """The reader takes a line over its buffer limit in two pieces, CR and LF apart: the line
    after it still starts a line (the lone dot ends DATA, a leading dot is unstuffed)."""
    original = b"Subject: long\r\n\r\n" + b"x" * 100_000 + b"\r\n" + after
    async with start_relay(no_trace(settings)) as relay:
        client = await RawClient.connect(relay.port)
        await client.cmd("EHLO c")
        await client.cmd("MAIL FROM:<s@x.test>")
        await client.cmd("RCPT TO:<r@x.test>")
        await client.cmd("DATA")
        final = await client.cmd(original + b".")
        await client.close()
    assert final.startswith("250")
    assert upstream.received[0].content == original.replace(b"..stuffed", b".stuffed")


async def test_the_end_of_data_and_stuffed_dots_are_found_across_any_pieces(upstream, settings):
    """A dot ends DATA only at the start of a line, and only a line's first dot is unstuffed,
    wherever the client's writes happen to split the stream: lines ending in a dot, a ".\r"
    and ".." inside a line, a leading dot after a bare LF (no line start: kept), a first line
    that starts with a dot."""
    original = (
        b"..first line starts with a dot\r\nSubject: dots\r\n\r\nEnds with a dot.\r\n"
        b"...three\r\nmid..dle .\r x.\r\nbare\n.after a bare LF\r\n.\r.\r\n\r\n.."
        b"\r\nlast.\r\n"
    )
    stuffed = original + b".\r\n"
    async with start_relay(no_trace(settings)) as relay:
        for size in (1, 2, 3, 5, 7, len(stuffed)):
            client = await RawClient.connect(relay.port)
            await client.cmd("EHLO c")
            await client.cmd("MAIL FROM:<s@x.test>")
            await client.cmd("RCPT TO:<r@x.test>")
            await client.cmd("DATA")
            for start in range(0, len(stuffed), size):
                client.writer.write(stuffed[start : start + size])
                await client.writer.drain()
            assert (await client.reply()).startswith("250")
            await client.close()
    expected = (  # unstuffed; and bare CR and LF made CRLF, as ever
        b".first line starts with a dot\r\nSubject: dots\r\n\r\nEnds with a dot.\r\n"
        b"..three\r\nmid..dle .\r\n x.\r\nbare\r\n.after a bare LF\r\n\r\n.\r\n\r\n."
        b"\r\nlast.\r\n"
    )
    assert [r.content for r in upstream.received] == [expected] * 6


async def test_overlong_command_is_refused_and_the_session_goes_on(upstream, relay):
    client = await RawClient.connect(relay.port)
    await client.cmd("EHLO c")
    overlong = await client.cmd(b"MAIL FROM:<" + b"a" * 100_000 + b"@x.test>")
    replies = await client.send("s@x.test", ["r@x.test"], message())
    await client.close()
    assert overlong.startswith("500")
    assert replies[-1].startswith("250")


async def test_smtputf8_addresses_pass_through(upstream, relay):
    client = await RawClient.connect(relay.port)
    await client.cmd("EHLO c")
    mail = await client.cmd("MAIL FROM:<j\u00f6rg@example.de> SMTPUTF8".encode())
    rcpt = await client.cmd("RCPT TO:<\u7528\u6237@example.cn>".encode())
    await client.cmd("DATA")
    final = await client.cmd(message() + b".")
    await client.close()
    assert mail.startswith("250") and rcpt.startswith("250") and final.startswith("250")
    assert upstream.received[0].mail_from == "j\u00f6rg@example.de"
    assert upstream.received[0].rcpt_tos == ["\u7528\u6237@example.cn"]


async def test_upstream_connection_is_reused_and_a_dropped_one_replaced(upstream, relay):
    for _ in range(3):
        await send(relay.port, message())
    assert upstream.connections == 1
    upstream.drop_connections()
    await asyncio.sleep(0)  # let the relay see the close (not needed for correctness)
    replies = await send(relay.port, message())
    assert replies[-1].startswith("250")
    assert len(upstream.received) == 4
    assert upstream.connections == 2


async def test_rset_aborts_the_upstream_transaction(upstream, relay):
    client = await RawClient.connect(relay.port)
    await client.cmd("EHLO c")
    await client.cmd("MAIL FROM:<first@x.test>")
    await client.cmd("RCPT TO:<dropped@x.test>")
    assert (await client.cmd("RSET")).startswith("250")
    await client.cmd("MAIL FROM:<second@x.test>")
    await client.cmd("RCPT TO:<kept@x.test>")
    await client.cmd("DATA")
    await client.cmd(message() + b".")
    await client.close()
    assert [(r.mail_from, r.rcpt_tos) for r in upstream.received] == [
        ("second@x.test", ["kept@x.test"])
    ]


async def test_client_disconnect_mid_transaction_forwards_nothing(upstream, relay):
    client = await RawClient.connect(relay.port)
    await client.cmd("EHLO c")
    await client.cmd("MAIL FROM:<s@x.test>")
    await client.cmd("RCPT TO:<r@x.test>")
    await client.cmd("DATA")
    client.writer.write(b"Subject: half\r\n\r\nhalf a mess")
    await client.close()
    replies = await send(relay.port, message())  # the relay keeps serving
    assert replies[-1].startswith("250")
    assert len(upstream.received) == 1


@pytest.mark.parametrize("scheme", ["smtps", "smtp+starttls"])
async def test_tls_upstreams_with_auth(tmp_path, tls_files, scheme):
    cert, key = tls_files
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    if scheme == "smtps":
        upstream = ScriptedUpstream(tls=tls, require_auth=("relay", "pw"))
    else:
        upstream = ScriptedUpstream(starttls=tls, require_auth=("relay", "pw"))
    await upstream.start()
    settings = relay_settings(tmp_path, upstream.port)
    settings = replace(
        settings,
        upstream=replace(
            settings.upstream,
            url=UpstreamURL(scheme, "127.0.0.1", upstream.port),
            username="relay",
            password="pw",
            ca_file=cert,
        ),
    )
    try:
        async with start_relay(settings) as relay:
            replies = await send(relay.port, message())
    finally:
        await upstream.stop()
    assert replies[-1].startswith("250")
    assert len(upstream.received) == 1


async def test_maildir_upstream_delivers(tmp_path, upstream):
    settings = relay_settings(tmp_path, upstream.port)
    outbox = tmp_path / "outbox"
    settings = replace(
        settings, upstream=replace(settings.upstream, url=UpstreamURL("maildir", path=outbox))
    )
    original = message()
    async with start_relay(no_trace(settings)) as relay:
        replies = await send(relay.port, original, rcpts=["a@x.test", "b@x.test"])
    files = list((outbox / "new").iterdir())
    assert len(files) == 1
    assert replies[-1] == f"250 2.0.0 Ok: queued as {files[0].name}"
    assert files[0].read_bytes() == (
        b"Return-Path: <s@x.test>\r\nDelivered-To: a@x.test\r\nDelivered-To: b@x.test\r\n"
        + original
    )
    assert list((outbox / "tmp").iterdir()) == []


def test_listen_address_repr():
    assert str(HostPort("::1", 25)) == "[::1]:25"
