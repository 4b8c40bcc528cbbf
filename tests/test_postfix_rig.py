"""The Postfix rig (tests/postfix.py) works: real Postfix as the relay's upstream and as its
client, smtp-sink recording what arrives. Smoke tests with a plain message; the relay's
handling of DSN, 8BITMIME and SMTPUTF8 against Postfix belongs to the relay's own tests."""

from __future__ import annotations

from pathlib import Path

from clickrelay.config import HostPort

from postfix import PostfixInstance, SmtpSink, unique_id
from support import LOOPBACK, ScriptedUpstream, message, relay_settings, send, start_relay


def trace_fields(raw: bytes, original: bytes) -> list[bytes]:
    """`raw` is `original` after Received fields only (one per hop); those fields, first first."""
    assert raw.endswith(original), raw
    prefix, fields = raw[: len(raw) - len(original)], []
    for line in prefix.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    assert all(f.startswith(b"Received: ") for f in fields), prefix
    return fields


def plain(message_id: str) -> bytes:
    body = "Hello through Postfix.\r\n.a line that starts with a dot\r\n\r\n..two\r\nend\r\n"
    return message({"Message-ID": f"<{message_id}>"}, body=body)


async def test_smtp_sink_records_what_postfix_relays(
    postfix_upstream: PostfixInstance, smtp_sink: SmtpSink
) -> None:
    """The rig alone: MAIL/RCPT parameters and the exact bytes, as Postfix hands them on."""
    mid = unique_id()
    original = plain(mid)
    submitted = await postfix_upstream.submit(
        "<s@x.test> BODY=8BITMIME RET=HDRS ENVID=e1",
        ["<r@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;r@example.com", "<q@example.com>"],
        original,
        port=postfix_upstream.listener_port("full"),
    )
    assert submitted.queue_id, submitted.replies
    sent = await postfix_upstream.wait_for_delivery(submitted.queue_id)
    assert sent["relay"] == f"127.0.0.1[127.0.0.1]:{smtp_sink.port}"
    assert sent["dsn"] == "2.0.0"

    (dump,) = await smtp_sink.wait(1, match=mid.encode())
    assert dump.helo == "postfix.test"
    assert dump.sender == "s@x.test"
    # Postfix sends the DSN parameters on (in its own order: ENVID before RET, ORCPT first)
    assert sorted(dump.mail_params) == ["BODY=8BITMIME", "ENVID=e1", "RET=HDRS"]
    # ... and its queue manager sorts the recipients
    assert dump.recipients == ["q@example.com", "r@example.com"]
    assert dump.rcpt_params[0] == ["ORCPT=rfc822;q@example.com"]  # Postfix adds an ORCPT
    assert sorted(dump.rcpt_params[1]) == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;r@example.com"]
    (received,) = trace_fields(dump.message, original)
    assert received.startswith(b"Received: from client.test (unknown [127.0.0.1])\r\n")
    assert f"by postfix.test (Postfix) with ESMTP id {submitted.queue_id}".encode() in received
    assert postfix_upstream.queued() == []


async def test_relay_delivers_to_postfix_as_its_upstream(
    tmp_path: Path, postfix_upstream: PostfixInstance, smtp_sink: SmtpSink
) -> None:
    """client -> relay -> Postfix -> smtp-sink: Postfix accepts the relay's transaction and
    passes the message on, changed only by its own Received header."""
    mid = unique_id()
    original = plain(mid)
    settings = relay_settings(tmp_path, postfix_upstream.listener_port("full"))
    async with start_relay(settings) as relay:
        replies = await send(relay.port, original, rcpts=["rcpt@example.com"], sender="s@x.test")
    assert replies[-1].startswith("250"), replies

    queue_id = await postfix_upstream.queue_id_of(mid)
    sent = await postfix_upstream.wait_for_delivery(queue_id)
    assert (sent["to"], sent["dsn"]) == ("rcpt@example.com", "2.0.0")
    (dump,) = await smtp_sink.wait(1, match=mid.encode())
    assert (dump.sender, dump.recipients) == ("s@x.test", ["rcpt@example.com"])
    received = trace_fields(dump.message, original)  # Postfix's, and the relay's if it adds one
    assert received[0].startswith(b"Received: from relay.test (unknown [127.0.0.1])\r\n")
    assert f"by postfix.test (Postfix) with ESMTP id {queue_id}\r\n".encode() in received[0]


async def test_postfix_delivers_through_the_relay_as_its_client(
    tmp_path: Path, postfix_client: PostfixInstance, upstream: ScriptedUpstream
) -> None:
    """Postfix -> relay -> scripted upstream: the relay takes Postfix's transaction, and Postfix
    logs the upstream's own answer, passed back by the relay."""
    mid = unique_id()
    original = plain(mid)
    listen = HostPort(LOOPBACK, postfix_client.relayhost_port)
    async with start_relay(relay_settings(tmp_path, upstream.port, listen=listen)):
        submitted = await postfix_client.submit("<s@x.test>", ["<rcpt@example.com>"], original)
        assert submitted.queue_id, submitted.replies
        sent = await postfix_client.wait_for_delivery(submitted.queue_id)
    assert sent["relay"] == f"127.0.0.1[127.0.0.1]:{postfix_client.relayhost_port}"
    assert sent["reply"] == "250 2.0.0 Ok: queued as Q1"

    (got,) = upstream.received
    assert (got.mail_from, got.rcpt_tos) == ("s@x.test", ["rcpt@example.com"])
    postfix_received = [
        field
        for field in trace_fields(got.content, original)  # the relay's may come first
        if f"by postfix.test (Postfix) with ESMTP id {submitted.queue_id}".encode() in field
    ]
    assert len(postfix_received) == 1
    assert postfix_received[0].startswith(b"Received: from client.test (unknown [127.0.0.1])\r\n")
    assert postfix_client.queued() == []
