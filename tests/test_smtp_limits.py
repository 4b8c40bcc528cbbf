"""The SMTP listener under a flood of connections and passwords: caps answered at once with 421,
idle sessions closed, failed logins slowed down, an unknown user as slow as a known one."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import ssl
import time
from dataclasses import replace

import pytest

from clickrelay.passwords import hash_password

from support import RawClient, message, send, start_relay, upstream_on

STRANGER = "127.0.0.2"  # not in allowed_clients below: the per-client cap applies to it


def limited(settings, **changes):
    smtp = replace(
        settings.smtp, allowed_clients=(ipaddress.ip_network("127.0.0.1/32"),), **changes
    )
    return replace(settings, smtp=smtp)


async def greeting(
    port: int, source: str
) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    line = await asyncio.wait_for(reader.readline(), 5)
    return line.decode(), reader, writer


async def test_connections_over_the_per_client_cap_get_421_at_once(upstream, settings):
    settings = limited(settings, max_connections_per_client=5)
    async with start_relay(settings) as relay:
        held = [await greeting(relay.port, STRANGER) for _ in range(5)]
        started = time.monotonic()
        refused, reader, writer = await greeting(relay.port, STRANGER)
        closed = await asyncio.wait_for(reader.read(), 5)  # then the relay closes it
        elapsed = time.monotonic() - started
        writer.close()
        # The allowed clients (the sending systems) are not held to the per-client cap.
        replies = await send(relay.port, message())
        held[0][2].close()
        await until_open(relay, 4)  # the four still held
        again, _, writer = await greeting(relay.port, STRANGER)
        writer.close()
        for _, _, w in held[1:]:
            w.close()
    assert all(line.startswith("220 ") for line, _, _ in held)
    assert refused.startswith("421 4.7.0 ")
    assert closed == b""
    assert elapsed < 1.0
    assert replies[-1].startswith("250 ")
    assert again.startswith("220 ")


async def until_open(relay, count: int) -> None:
    """Until the relay counts `count` open connections: it sees a close a few turns of this event
    loop (which client and relay share) after the client made it. Bounded."""
    for _ in range(10_000):
        if relay.server.limits.open <= count:
            return
        await asyncio.sleep(0)  # one turn of the loop, not a wait


async def test_connections_over_the_total_cap_get_421(upstream, settings):
    settings = limited(settings, max_connections=3, max_connections_per_client=0)
    async with start_relay(settings) as relay:
        held = [await greeting(relay.port, "127.0.0.1") for _ in range(3)]
        refused, _, writer = await greeting(relay.port, "127.0.0.1")
        writer.close()
        for _, _, w in held:
            w.close()
    assert refused.startswith("421 4.7.0 ")


async def test_an_idle_session_is_closed_after_the_idle_timeout(upstream, settings):
    settings = limited(settings, idle_timeout_seconds=0.5)
    async with start_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        await client.cmd("EHLO c")
        started = time.monotonic()
        rest = await asyncio.wait_for(client.reader.read(), 5)
        elapsed = time.monotonic() - started
        await client.close()
    assert rest == b""
    assert 0.4 < elapsed < 3


# --- passwords ------------------------------------------------------------------------------------


@pytest.fixture
def auth_settings(settings, tls_files):
    cert, key = tls_files
    users = {"app": hash_password("right")}
    return limited(settings, users=users, tls_cert=cert, tls_key=key)


async def login(port: int, source: str, user: str, password: str) -> tuple[str, float]:
    """One AUTH PLAIN attempt over STARTTLS; its reply and how long the reply took."""
    client = await RawClient.connect(port, source=source)
    try:
        await client.cmd("EHLO c")
        await client.cmd("STARTTLS")
        await client.writer.start_tls(ssl._create_unverified_context())
        tls = RawClient(client.reader, client.writer)
        await tls.cmd("EHLO c")
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        started = time.monotonic()
        reply = await tls.cmd(f"AUTH PLAIN {blob}", timeout=60)
        return reply, time.monotonic() - started
    finally:
        client.writer.close()


@pytest.mark.slow
async def test_failed_logins_from_one_address_wait_longer_and_longer(upstream, auth_settings):
    async with start_relay(auth_settings) as relay:
        attempts = [await login(relay.port, STRANGER, "app", "wrong") for _ in range(6)]
        other = await login(relay.port, "127.0.0.3", "app", "right")  # another address: at once
    replies = [reply for reply, _ in attempts]
    waits = [took for _, took in attempts]
    assert all(reply.startswith("535") for reply in replies)
    assert max(waits[:3]) < 1.0  # people mistype: the first failures cost nothing
    assert waits[3] >= 1.0 and waits[4] >= 2.0 and waits[5] >= 4.0  # then 1, 2, 4 s...
    assert other[0].startswith("235") and other[1] < 1.0


async def test_an_unknown_user_costs_a_password_check_like_a_known_one(upstream, auth_settings):
    """No user enumeration by timing: a wrong user name is checked against a hash of the same
    cost (today it is refused without one, some 50 ms sooner)."""
    async with start_relay(auth_settings) as relay:
        known, unknown = [], []
        for n in range(3):  # each from its own address: no throttling in the way
            known.append((await login(relay.port, f"127.0.1.{n}", "app", "wrong"))[1])
            unknown.append((await login(relay.port, f"127.0.2.{n}", "nobody", "wrong"))[1])
    assert min(unknown) >= 0.5 * min(known)
    assert min(known) > 0.005  # a real scrypt check happened


async def test_clients_not_allowed_to_relay_get_half_the_connections_at_most(upstream, settings):
    """A flood from addresses outside allowed_clients cannot lock the sending systems out."""
    settings = limited(settings, max_connections=4, max_connections_per_client=0)
    async with start_relay(settings) as relay:
        strangers = [await greeting(relay.port, f"127.0.0.{n}") for n in (2, 3, 4)]
        allowed = [await greeting(relay.port, "127.0.0.1") for _ in range(2)]
        for _, _, writer in strangers + allowed:
            writer.close()
    assert [line[:3] for line, _, _ in strangers] == ["220", "220", "421"]
    assert [line[:3] for line, _, _ in allowed] == ["220", "220"]


async def test_a_slow_sender_and_a_slow_upstream_are_not_idle(upstream, settings):
    """The idle timeout is for silent sessions: message data trickling in keeps a session
    alive, and the time the upstream takes to answer the message does not count."""
    settings = limited(settings, idle_timeout_seconds=0.6)
    upstream.script.data_delay = 1.2
    lines = [b"Subject: slow\r\n", b"\r\n"] + [b"line %d\r\n" % n for n in range(6)]
    async with start_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        await client.cmd("EHLO c")
        await client.cmd("MAIL FROM:<s@x.test>")
        await client.cmd("RCPT TO:<r@x.test>")
        await client.cmd("DATA")
        for line in lines:  # a sender on a slow link: 2 s for the message, 0.25 s a line
            client.writer.write(line)
            await asyncio.sleep(0.25)
        final = await client.cmd(".", timeout=10)
        await client.close()
    assert final.startswith("250 "), final  # today: the session is cut off mid-message
    assert upstream.received[0].content.endswith(b"line 5\r\n")


async def test_ehlo_does_not_wait_for_an_upstream_that_never_answers(settings):
    """An upstream that takes the connection and never greets: EHLO waits a moment to learn
    its extensions, not the upstream timeout (here 30 s)."""
    held: list[asyncio.StreamWriter] = []

    async def mute(reader, writer):
        held.append(writer)  # accepted, never greeted

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = upstream_on(settings, port, timeout_seconds=30)
    async with start_relay(settings) as relay:
        client = await RawClient.connect(relay.port)
        started = time.monotonic()
        first = await client.cmd("EHLO c", timeout=10)
        second = await client.cmd("EHLO c", timeout=10)
        elapsed = time.monotonic() - started
        await client.close()
    for writer in held:
        writer.close()
    server.close()
    assert first.startswith("250") and second.startswith("250")
    assert elapsed < 6  # two EHLOs, each waiting at most upstream.PROBE_WAIT (2 s)


async def test_broken_tls_handshakes_do_not_flood_the_log(upstream, settings, tls_files, caplog):
    cert, key = tls_files
    settings = replace(settings, smtp=replace(settings.smtp, tls_cert=cert, tls_key=key))
    async with start_relay(settings) as relay:
        for _ in range(5):
            client = await RawClient.connect(relay.port)
            await client.cmd("EHLO c")
            assert (await client.cmd("STARTTLS")).startswith("220")
            client.writer.write(b"\x16\x03\x01\x00\x05garbage, not a TLS hello\r\n" * 4)
            await asyncio.wait_for(client.reader.read(), 10)  # the relay closes it
            await client.close()
        replies = await send(relay.port, message())  # and goes on
        await until_open(relay, 0)
        still_open = relay.server.limits.open  # each counted once, released once, TLS or not
    assert replies[-1].startswith("250 ")
    assert still_open == 0
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(logged) <= 1, [r.getMessage() for r in logged]
    assert "Traceback" not in caplog.text
