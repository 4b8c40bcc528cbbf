"""The relay between real Postfix instances (tests/postfix.py): Postfix as its client (what an
MTA sends: bounces from the null sender, SMTPUTF8, 8BITMIME, DSN) and as its upstream (what an
MTA offers: with and without SMTPUTF8, 8BITMIME and DSN), smtp-sink recording what arrives."""

from __future__ import annotations

import email
import email.policy
from dataclasses import replace
from pathlib import Path

from clickrelay.config import HostPort

from postfix import PostfixInstance, SmtpSink, unique_id
from support import LOOPBACK, RawClient, ScriptedUpstream, message, relay_settings, start_relay


def behind(postfix_client: PostfixInstance, tmp_path: Path, upstream_port: int):
    """Relay settings for a relay listening where `postfix_client` sends its mail."""
    settings = relay_settings(tmp_path, upstream_port)
    listen = HostPort(LOOPBACK, postfix_client.relayhost_port)
    return replace(settings, smtp=replace(settings.smtp, listen=listen))


def text(mid: str, subject: str = "hello", body: str = "Hello through Postfix.\r\n") -> bytes:
    return message({"Message-ID": f"<{mid}>", "Subject": subject}, body)


async def test_postfix_bounces_reach_the_upstream_through_the_relay(
    tmp_path, postfix_client: PostfixInstance, upstream: ScriptedUpstream
):
    """The upstream refuses a recipient; Postfix bounces the message to its sender, from the
    null sender, through the relay (today: 553 5.1.7 to MAIL FROM:<>, and the bounce dies)."""
    upstream.script.rcpt["nobody@example.com"] = "550 5.1.1 <nobody@example.com>: no such user"
    mid = unique_id()
    async with start_relay(behind(postfix_client, tmp_path, upstream.port)):
        submitted = await postfix_client.submit(
            "<sender@example.com>", ["<nobody@example.com>"], text(mid)
        )
        bounced = await postfix_client.wait_for_delivery(submitted.queue_id, "bounced")
        notice = await postfix_client.wait_for_log(r"sender non-delivery notification: (\w+)")
        sent = await postfix_client.wait_for_delivery(notice[1], "sent")
    assert bounced["reply"].startswith("host 127.0.0.1[127.0.0.1] said: 550 5.1.1")
    assert sent["to"] == "sender@example.com"
    (dsn,) = [r for r in upstream.received if r.rcpt_tos == ["sender@example.com"]]
    assert dsn.mail_from in ("", "<>")
    report = email.message_from_bytes(dsn.content, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert b"nobody@example.com" in dsn.content and mid.encode() in dsn.content


async def test_a_postfix_bounce_passes_a_postfix_upstream_from_the_null_sender(
    tmp_path, postfix_client, postfix_upstream, smtp_sink: SmtpSink
):
    """Postfix client -> relay -> Postfix -> smtp-sink: the Postfix upstream refuses a
    recipient, the relay answers the client with that refusal, the client bounces the message
    from `<>` through the relay again, and the Postfix upstream delivers the bounce."""
    mid = unique_id()
    settings = behind(postfix_client, tmp_path, postfix_upstream.listener_port("full"))
    async with start_relay(settings):
        submitted = await postfix_client.submit(
            "<sender@example.com>", ["<refused@example.com>"], text(mid)
        )
        bounced = await postfix_client.wait_for_delivery(submitted.queue_id, "bounced")
        (dump,) = await smtp_sink.wait(1, match=mid.encode())
    assert bounced["dsn"] == "5.7.1" and "Recipient address rejected" in bounced["reply"]
    assert dump.sender == "" and dump.recipients == ["sender@example.com"]
    assert dump.headers.get_content_type() == "multipart/report"
    assert b"refused@example.com" in dump.message


async def test_smtputf8_and_8bit_mail_from_postfix_reach_a_7bit_postfix_upstream(
    tmp_path, postfix_client, postfix_upstream, smtp_sink: SmtpSink
):
    """Postfix client -> relay -> Postfix without SMTPUTF8 and 8BITMIME -> smtp-sink. An ASCII
    message sent with SMTPUTF8 is delivered without it (today: 555, bounced); an 8-bit body is
    converted to quoted-printable; a UTF-8 header refused with 5.6.7, as Postfix itself does."""
    ascii_mid, eight_mid, utf8_mid = unique_id(), unique_id(), unique_id()
    eight_bit = message(
        {"Message-ID": f"<{eight_mid}>", "MIME-Version": "1.0",
         "Content-Type": "text/plain; charset=utf-8", "Content-Transfer-Encoding": "8bit"},
        "Grüße aus Köln.\r\nline two €\r\n",
    )  # fmt: skip
    settings = behind(postfix_client, tmp_path, postfix_upstream.listener_port("legacy"))
    async with start_relay(settings):
        plain = await postfix_client.submit("<s@x.test> SMTPUTF8", ["<r@x.test>"], text(ascii_mid))
        body = await postfix_client.submit("<s@x.test> BODY=8BITMIME", ["<r@x.test>"], eight_bit)
        utf8 = await postfix_client.submit(
            "<s@x.test> SMTPUTF8", ["<r@x.test>"], text(utf8_mid, subject="Grüße")
        )
        refused = await postfix_client.wait_for_delivery(utf8.queue_id, "bounced")
        for submitted in (plain, body):
            await postfix_client.wait_for_delivery(submitted.queue_id, "sent")
        # each by its own id: the bounce of the refused one reaches the sink too, in any order
        for mid in (ascii_mid, eight_mid):
            await smtp_sink.wait(1, match=f"Message-ID: <{mid}>".encode())
        dumps = {dump.headers["Message-ID"]: dump for dump in smtp_sink.dumps()}
    assert refused["dsn"] == "5.6.7"
    assert f"<{utf8_mid}>" not in dumps  # (its bounce, with its headers inside, is)
    assert dumps[f"<{ascii_mid}>"].body == b"Hello through Postfix.\r\n"
    converted = dumps[f"<{eight_mid}>"]
    assert converted.headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert converted.body == b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln.\r\nline two =E2=82=AC\r\n"


async def test_dsn_is_offered_and_passed_on_when_the_upstream_offers_it(
    tmp_path, postfix_client, postfix_upstream, smtp_sink: SmtpSink
):
    """Postfix client -> relay -> Postfix (with DSN) -> smtp-sink: the relay offers DSN, so the
    client sends NOTIFY, ORCPT, RET and ENVID, and they arrive (today: not offered)."""
    mid = unique_id()
    settings = behind(postfix_client, tmp_path, postfix_upstream.listener_port("full"))
    async with start_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        ehlo = await client.cmd("EHLO c")
        await client.close()
        submitted = await postfix_client.submit(
            "<s@x.test> RET=HDRS ENVID=Env+2Bid-7",
            ["<r@x.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Orig@X.test"],
            text(mid),
        )
        await postfix_client.wait_for_delivery(submitted.queue_id, "sent")
        (dump,) = await smtp_sink.wait(1, match=mid.encode())
    assert "250-DSN" in ehlo.split("\n")
    assert sorted(dump.mail_params) == ["ENVID=Env+2Bid-7", "RET=HDRS"]
    assert sorted(dump.rcpt_params[0]) == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Orig@X.test"]


async def test_dsn_is_not_offered_when_the_upstream_does_not_offer_it(tmp_path, postfix_upstream):
    settings = relay_settings(tmp_path, postfix_upstream.listener_port("nodsn"))
    async with start_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        ehlo = await client.cmd("EHLO c")
        ret = await client.cmd("MAIL FROM:<s@x.test> RET=FULL")
        await client.close()
    assert "DSN" not in ehlo
    assert ret.startswith("555 5.5.4 ")


async def test_parameters_reach_the_upstream_exactly_as_written(tmp_path, smtp_sink: SmtpSink):
    """Straight to smtp-sink: the null sender, and DSN values whose case matters (xtext)."""
    mid = unique_id()
    settings = relay_settings(tmp_path, smtp_sink.port)
    async with start_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        await client.cmd("EHLO c")
        mail, rcpt, _, final = await client.transaction(
            "<> RET=FULL ENVID=aBc+2B",
            ["<Postmaster@X.test> NOTIFY=NEVER ORCPT=rfc822;PM@X.test"], text(mid),
        )  # fmt: skip
        await client.close()
        (dump,) = await smtp_sink.wait(1, match=mid.encode())
    assert (mail[:3], rcpt[:3], final[:3]) == ("250", "250", "250")
    assert dump.mail == "<> RET=FULL ENVID=aBc+2B"
    assert dump.rcpts == ["<Postmaster@X.test> NOTIFY=NEVER ORCPT=rfc822;PM@X.test"]


async def test_8bit_headers_pass_a_7bit_upstream_as_they_came(tmp_path, make_smtp_sink):
    """8BITMIME is about the body: a raw 8-bit header goes on as it came (as with Postfix)."""
    sink = make_smtp_sink("-8")
    mid = unique_id()
    raw = text(mid, subject="caf\u00e9 \u00fcber")
    settings = relay_settings(tmp_path, sink.port)
    settings = replace(settings, smtp=replace(settings.smtp, received_header=False))
    async with start_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        await client.cmd("EHLO c")
        replies = await client.transaction("<s@x.test> BODY=8BITMIME", ["<r@x.test>"], raw)
        await client.close()
        (dump,) = await sink.wait(1, match=mid.encode())
    assert replies[-1].startswith("250 ")
    assert dump.mail == "<s@x.test>"  # BODY= left out: the sink does not offer 8BITMIME
    assert dump.message == raw
