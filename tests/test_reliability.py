"""Reliability under faults, load and abuse (issue 6): nothing acknowledged is lost, nothing is
delivered twice or half, and both services keep answering.

Everything is real and on loopback: a real aiosmtpd upstream (`ScriptedUpstream`), the relay
in-process or as `python -m clickrelay` child processes, raw sockets for the abuse, a real SQLite
file. Every load is bounded in count and every wait in time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import random
import re
import resource
import signal
import socket
import ssl
import string
import struct
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import aiohttp
import hypothesis
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from clickrelay import config
from clickrelay.mail import mime
from clickrelay.passwords import hash_password
from clickrelay.storage import open_store
from clickrelay.storage.base import NewSend
from clickrelay.tracking.tokens import Signer, load_secret

import pg
from support import (
    BROWSER,
    LOOPBACK,
    RawClient,
    RunningRelay,
    ScriptedUpstream,
    ServiceProcess,
    assert_faithful,
    free_port,
    message,
    relay_settings,
    send,
    start_relay,
    wire,
    write_config,
)

CAMPAIGN = {"X-Campaign-Id": "reliability", "X-Track-Clicks": "yes"}
MESSAGE_ID = re.compile(rb"(?im)^Message-ID:[ \t]*<([^>\r\n]*)>")
TRACKING_URL = re.compile(rb"http://click\.test/c/[A-Za-z0-9_-]{32}")
BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


# ---------------------------------------------------------------- shared helpers


def numbered(tag: str, n: int, headers: dict | None = None, body: str = "Hi.\r\n") -> bytes:
    """A message whose Message-ID is `<tag-n@reliability.test>`."""
    return message({"Message-ID": f"<{tag}-{n}@reliability.test>", **(headers or {})}, body)


def msgid(tag: str, n: int) -> str:
    return f"{tag}-{n}@reliability.test"


def message_id(raw: bytes) -> str:
    found = MESSAGE_ID.search(raw)
    assert found is not None, raw[:300]
    return found[1].decode()


def delivered(upstream: ScriptedUpstream) -> Counter[str]:
    """How many times the upstream accepted each Message-ID."""
    return Counter(message_id(received.content) for received in upstream.received)


def campaign_message(tag: str, n: int) -> tuple[bytes, str]:
    """A tracked HTML message with one link of its own and one shared; and its own link."""
    own = f"https://example.com/{tag}/{n}?ref=mail"
    body = (
        f'<html><body><p><a href="{own}">Your offer</a></p>\r\n'
        '<p><a href="https://example.com/shared">Shop now</a></p></body></html>\r\n'
    )
    headers = {**CAMPAIGN, "X-Contact-Id": f"{tag}-{n}", "MIME-Version": "1.0",
               "Content-Type": "text/html; charset=utf-8"}  # fmt: skip
    return numbered(tag, n, headers, body), own


async def connect(port: int) -> RawClient:
    client = await RawClient.connect(port)
    assert (await client.cmd("EHLO client.test")).startswith("250")
    return client


async def attempt(client: RawClient, raw: bytes) -> str:
    """One transaction as an MTA runs it: stop at the first refusal (then RSET); the last reply."""
    for command in ("MAIL FROM:<sender@example.com>", "RCPT TO:<rcpt@example.com>", "DATA"):
        reply = await client.cmd(command)
        if not reply.startswith(("250", "354")):
            await client.cmd("RSET")
            return reply
    return await client.cmd(wire(raw) + b".")


def no_trace(settings: config.Settings) -> config.Settings:
    return replace(settings, smtp=replace(settings.smtp, received_header=False))


def sends_table(storage: config.StorageSettings) -> list[tuple[str, str, str]]:
    return pg.query(storage, "SELECT message_id, decision, outcome FROM sends ORDER BY id")


# ---------------------------------------------------------------- 1. upstream outage


class HoldingUpstream(ScriptedUpstream):
    """Holds the DATA of its `hold_at`-th message until that connection is cut (by `stop`)."""

    def __init__(self, hold_at: int) -> None:
        super().__init__()
        self.hold_at = hold_at
        self.data_count = 0
        self.holding = asyncio.Event()

    async def handle_DATA(self, server, session, envelope) -> str:
        self.data_count += 1
        if self.data_count == self.hold_at:
            self.holding.set()
            await asyncio.Event().wait()  # aiosmtpd cancels this when the connection is lost
        return await super().handle_DATA(server, session, envelope)


STREAM, HELD, OUTAGE = 40, 15, 10  # messages; the one whose DATA is cut (1-based); sent while down


async def test_upstream_outage_mid_stream_loses_and_duplicates_nothing(tmp_path):
    upstream = HoldingUpstream(hold_at=HELD)
    await upstream.start()
    port = upstream.port
    try:
        async with start_relay(relay_settings(tmp_path, port)) as relay:
            # A second client holds an open envelope (MAIL and RCPT accepted) across the outage.
            envelope = await connect(relay.port)
            assert (await envelope.cmd("MAIL FROM:<held@example.com>")).startswith("250")
            assert (await envelope.cmd("RCPT TO:<rcpt@example.com>")).startswith("250")
            cut = asyncio.create_task(cut_when_held(upstream))
            client = await connect(relay.port)
            first: list[str] = []
            for n in range(STREAM):
                first.append(await attempt(client, numbered("outage", n)))
                if n == HELD - 1:
                    await cut  # the upstream went away while this message's DATA was under way
                    assert (await envelope.cmd("DATA")).startswith("354")
                    late = await envelope.cmd(wire(numbered("outage", STREAM)) + b".")
                if n == HELD - 1 + OUTAGE:
                    await upstream.start(port)  # back, on the same port
            await client.close()
            await envelope.close()
            refused = [n for n, reply in enumerate(first) if not reply.startswith("250 ")]
            retried = await resend(relay.port, [*refused, STREAM])
    finally:
        await upstream.stop()
    assert all(reply.startswith("250 ") for reply in first[: HELD - 1]), first
    assert all(reply.startswith("4") for reply in first[HELD - 1 : HELD + OUTAGE]), first
    assert all(reply.startswith("250 ") for reply in first[HELD + OUTAGE :]), first  # recovered
    assert late.startswith("4"), late
    assert refused == list(range(HELD - 1, HELD + OUTAGE))
    assert all(reply.startswith("250 ") for reply in retried), retried
    assert delivered(upstream) == Counter(msgid("outage", n) for n in range(STREAM + 1))


async def cut_when_held(upstream: HoldingUpstream) -> None:
    await upstream.holding.wait()
    await upstream.stop()


async def resend(port: int, numbers: list[int]) -> list[str]:
    """Send the refused messages again on a new connection, as the sending MTA's queue would."""
    client = await connect(port)
    try:
        return [await attempt(client, numbered("outage", n)) for n in numbers]
    finally:
        await client.close()


# ---------------------------------------------------------------- 2. concurrent clients

CLIENTS, PER_CLIENT = 8, 40


@pytest.mark.slow
async def test_concurrent_clients_each_message_delivered_exactly_once(settings, upstream):
    async with start_relay(settings) as relay:
        streams = await asyncio.gather(*(client_stream(relay.port, c) for c in range(CLIENTS)))
        targets = {
            message_id(r.content): {await relay.resolve(u.decode()) for u in tracking_urls(r)}
            for r in upstream.received
        }
    replies = [reply for stream in streams for reply in stream]
    expected = {msgid(f"c{c}", n) for c in range(CLIENTS) for n in range(PER_CLIENT)}
    assert len(replies) == CLIENTS * PER_CLIENT
    assert all(reply.startswith("250 ") for reply in replies), Counter(replies)
    assert delivered(upstream) == Counter(expected)
    for mid, urls in targets.items():  # every message's tracking links lead to its own links
        tag, n = mid.split("@")[0].rsplit("-", 1)
        assert urls == {f"https://example.com/{tag}/{n}?ref=mail", "https://example.com/shared"}
    sends = sends_table(settings.storage)
    assert Counter(mid for mid, _, _ in sends) == Counter(f"<{mid}>" for mid in expected)
    assert {(decision, outcome) for _, decision, outcome in sends} == {("tracked", "accepted")}


async def client_stream(port: int, c: int) -> list[str]:
    client = await connect(port)
    try:
        return [await attempt(client, campaign_message(f"c{c}", n)[0]) for n in range(PER_CLIENT)]
    finally:
        await client.close()


def tracking_urls(received) -> list[bytes]:
    return TRACKING_URL.findall(received.content)


# ---------------------------------------------------------------- 3. idle connections

IDLE = 150


@pytest.mark.slow
async def test_service_answers_while_300_idle_connections_are_open(tmp_path, upstream):
    ensure_open_files(4 * IDLE + 256)
    smtp_port, web_port = free_port(), free_port()
    cfg = write_config(tmp_path / "clickrelay.toml", upstream.port, smtp_port, web_port)
    service = ServiceProcess("run", "--config", str(cfg))
    await service.start("smtp relay listening")
    smtp: list[RawClient] = []
    http: list[IdleHttp] = []
    try:
        for n in range(IDLE):  # one at a time: a burst would overflow the listen backlog
            smtp.append(await idle_smtp(smtp_port, talk=n % 2 == 0))
            http.append(await idle_http(web_port, partial=n % 2 == 0))
        raw, original = campaign_message("idle", 0)
        replies = await send(smtp_port, raw)
        (received,) = upstream.received
        tracking = tracking_urls(received)[0]  # the message's own link comes first
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as session:
            base = f"http://{LOOPBACK}:{web_port}"
            health = await get(session, base + "/healthz")
            click = await get(session, base + urlsplit(tracking.decode()).path)
        # The idle connections were held open, not dropped: each one still gets its answers.
        noops = [await client.cmd("NOOP") for client in smtp]
        statuses = [await idle.finish() for idle in http]
        for client in smtp:
            await client.close()
        service.signal(signal.SIGTERM)
        code = await service.wait()
    finally:
        for idle in http:
            idle.writer.close()
        await service.kill()
    assert replies[-1].startswith("250 ")
    assert health == (200, None)
    assert click == (302, original)
    assert clicks_of(config.load(cfg).storage) == 1
    assert all(reply.startswith("250") for reply in noops), Counter(noops)
    assert statuses == [200] * IDLE
    assert code == 0


def ensure_open_files(needed: int) -> None:
    """Raise this process's soft open-files limit (children inherit it) if it is below `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


async def idle_smtp(port: int, talk: bool) -> RawClient:
    """A connection that got its greeting (and maybe answered one EHLO) and then says nothing."""
    client = await RawClient.connect(port)
    if talk:
        assert (await client.cmd("EHLO idle.test")).startswith("250")
    return client


@dataclass
class IdleHttp:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    partial: bool  # sent half a request (no blank line)

    async def finish(self) -> int:
        """Complete the request; the status of the answer."""
        head = b"" if self.partial else b"GET /healthz HTTP/1.1\r\nHost: click.test\r\n"
        self.writer.write(head + b"Connection: close\r\n\r\n")
        answer = await asyncio.wait_for(self.reader.read(), 10)
        self.writer.close()
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


async def idle_http(port: int, partial: bool) -> IdleHttp:
    """A connection that sent nothing, or half a request, and then waits."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    if partial:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: click.test\r\n")
        await writer.drain()
    return IdleHttp(reader, writer, partial)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    async with session.get(url, allow_redirects=False) as response:
        await response.read()
        return response.status, response.headers.get("Location")


def clicks_of(storage: config.StorageSettings) -> int:
    return pg.query(storage, "SELECT count(*) FROM clicks")[0][0]


# ---------------------------------------------------------------- 4. protocol abuse

REPLY = re.compile(r"[2-5][0-9][0-9]([ -]|$)")


@pytest.fixture
async def tls_relay(tmp_path, upstream, tls_files):
    """A relay that offers STARTTLS and AUTH (for one user), like one facing the network."""
    cert, key = tls_files
    users = {"app": hash_password("s3cret")}
    settings = relay_settings(tmp_path, upstream.port, users=users, tls_cert=cert, tls_key=key)
    async with start_relay(settings) as relay:
        yield relay


def client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def converse(port: int, data: bytes) -> list[str]:
    """Write `data`, a line end and QUIT; the reply lines the relay sent until it closed."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(data + b"\r\nQUIT\r\n")
    answer = b""
    with contextlib.suppress(ConnectionResetError):  # closed on us with our junk unread
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            answer += chunk
    writer.close()
    lines = answer.decode("ascii").split("\r\n")
    assert lines.pop() == "", answer[-200:]
    assert all(REPLY.match(line) for line in lines), lines
    return lines


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a crashing client or a middlebox would."""
    writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    writer.transport.abort()


async def junk_bytes(port: int) -> None:
    lines = await converse(port, random.Random(6).randbytes(65536))
    assert lines[0].startswith("220 ")
    assert lines[-1].startswith(("221 ", "502 ")), lines[-3:]  # QUIT, or too many bad commands


async def overlong_commands(port: int) -> None:
    client = await RawClient.connect(port)
    client.writer.write(b"X" * 100_000)  # no line end yet
    await client.writer.drain()
    replies = [await client.cmd(b"")]  # now it comes
    replies.append(await client.cmd("EHLO client.test"))
    replies.append(await client.cmd(b"MAIL FROM:<" + b"a" * 100_000 + b"@example.com>"))
    replies.append(await client.cmd(b"RCPT TO:<" + b"r" * 100_000 + b"@example.com>"))
    replies.append(await client.cmd(b"EHLO " + b"h" * 100_000))
    replies.append(await client.cmd("NOOP"))
    await client.close()
    assert [reply[:4] for reply in replies] == ["500 ", "250-", "500 ", "500 ", "500 ", "250 "]


async def nul_bytes(port: int) -> None:
    client = await RawClient.connect(port)
    commands = [b"\0\0\0", b"EHLO nul\0.test", b"MAIL FROM:<nul\0@example.com>",
                b"MAIL FROM:<s@example.com>", b"RCPT TO:<rcpt\0@example.com>",
                b"RCPT TO:<rcpt@example.com>", b"DATA"]  # fmt: skip
    replies = [await client.cmd(command) for command in commands]
    client.writer.write(numbered("half", 1, body="\0\0 never ended\r\n"))
    await client.writer.drain()
    reset(client.writer)
    assert all(REPLY.match(reply) for reply in replies), replies
    assert replies[-1].startswith("354"), replies
    # aiosmtpd's answer when a handler raised: the relay did not handle the input itself
    assert [reply for reply in replies if "Error: (" in reply] == []


async def pipelined_garbage(port: int) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(
        b"EHLO p.test\r\nMAIL FROM:<p@example.com>\r\n\x16\x03\x01\xff\xfe\r\n"
        b"RCPT TO:<rcpt@example.com>\r\nRCPT TO:<<>>\r\nBDAT 100 LAST\r\nVRFY\r\nDATA\r\n"
        + numbered("half", 2)
        + b".garbage\r\n\r\n..\r\nnever finished"
    )
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n354 "), 10)
    reset(writer)
    assert answer.startswith(b"220 ")


async def data_then_eof(port: int) -> None:
    await data_then_close(port, abort=False)


async def data_then_reset(port: int) -> None:
    await data_then_close(port, abort=True)


async def data_then_close(port: int, abort: bool) -> None:
    """A whole 1 MB message but for the last LF of its end marker, then the connection ends."""
    client = await connect(port)
    for command in ("MAIL FROM:<s@example.com>", "RCPT TO:<rcpt@example.com>", "DATA"):
        assert (await client.cmd(command)).startswith(("250", "354"))
    body = ("y" * 76 + "\r\n") * 13_000
    client.writer.write(wire(numbered("half", 3 + abort, body=body)) + b".\r")
    await client.writer.drain()
    if abort:
        reset(client.writer)
    else:
        await client.close()


AUTH_GARBAGE = [
    ["AUTH"],
    ["AUTH XOAUTH2 " + "A" * 40],
    ["AUTH PLAIN !!!!"],
    ["AUTH PLAIN " + base64.b64encode(b"no separators").decode()],
    ["AUTH PLAIN " + base64.b64encode(b"\0app\0wrong").decode()],
    ["AUTH PLAIN " + base64.b64encode(b"\xff\xfe\0\xff\0\xff\0").decode()],
    ["AUTH PLAIN " + "A" * 100_000],
    ["AUTH PLAIN", "*"],
    ["AUTH PLAIN", "%%% not base64"],
    ["AUTH LOGIN", "*"],
    ["AUTH LOGIN", base64.b64encode(b"app").decode(), "not base64 !"],
    ["AUTH LOGIN " + base64.b64encode(b"app").decode(), base64.b64encode(b"\xff" * 3000).decode()],
    ["AUTH LOGIN =", ""],
]


async def auth_garbage(port: int) -> None:
    client = await connect(port)
    in_clear = await client.cmd("AUTH PLAIN " + base64.b64encode(b"\0app\0s3cret").decode())
    assert (await client.cmd("STARTTLS")).startswith("220")
    await client.writer.start_tls(client_tls(), server_hostname="localhost")
    assert "AUTH" in await client.cmd("EHLO client.test")
    answers = [(lines, await auth_exchange(client, lines), await client.cmd("NOOP"))
               for lines in AUTH_GARBAGE]  # fmt: skip
    ok = await client.cmd("AUTH PLAIN " + base64.b64encode(b"\0app\0s3cret").decode())
    await client.close()
    assert in_clear[0] == "5"  # never in clear text
    # Each attempt is refused with exactly one reply: the NOOP after it gets its own 250.
    wrong = [(lines[0][:30], *lines[1:], final, noop) for lines, final, noop in answers
             if final[0] not in "45" or not noop.startswith("250 ")]  # fmt: skip
    assert wrong == []
    assert ok.startswith("235")  # the garbage did not break authentication for the real user


async def auth_exchange(client: RawClient, lines: list[str]) -> str:
    """Send an AUTH command and the answers to its challenges; the final reply."""
    for line in lines:
        reply = await client.cmd(line)
        if not reply.startswith("334"):
            return reply
    return reply


async def tls_client_hello(port: int) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(
            asyncio.open_connection(LOOPBACK, port, ssl=client_tls(), server_hostname="x"), 10
        )
    lines = await converse(port, client_hello())
    assert lines[0].startswith("220 ")
    assert lines[-1].startswith(("221 ", "502 ")), lines[-3:]


def client_hello() -> bytes:
    """The bytes a TLS client sends first (implicit TLS on a plain-text port)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_tls().wrap_bio(incoming, outgoing, server_hostname="relay.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


ABUSES = [junk_bytes, overlong_commands, nul_bytes, pipelined_garbage, data_then_eof,
          data_then_reset, auth_garbage, tls_client_hello]  # fmt: skip


@pytest.mark.parametrize("abuse", ABUSES, ids=lambda abuse: abuse.__name__)
async def test_relay_keeps_serving_after_protocol_abuse(tls_relay, upstream, abuse, caplog):
    await abuse(tls_relay.port)
    await let_go(tls_relay)  # the relay closed its side of the abusive connection
    replies = await send(tls_relay.port, numbered("after", 0))
    await let_go(tls_relay)
    assert replies[-1].startswith("250 ")
    assert delivered(upstream) == Counter([msgid("after", 0)])  # nothing half-sent went through
    assert errors_logged(caplog) == []


async def let_go(relay: RunningRelay, timeout: float = 10) -> None:
    """Wait (bounded) until the relay holds no client connection and no upstream transaction."""

    async def poll() -> None:
        while relay.server.connections:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Errors and tracebacks logged by the relay or by aiosmtpd (a handler that raised)."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith(("clickrelay", "mail.log"))
        and (record.levelno >= 40 or record.exc_info)
    ]


# ---------------------------------------------------------------- 5. kill -9 under click load

SENDS, LINKS_PER_SEND, WORKERS, KILL_AFTER = 40, 10, 16, 120


@dataclass(frozen=True)
class Tracked:
    """One (send, link) pair with its token: clicked at most once by the load."""

    send_id: int
    link_id: int
    token: str
    url: str

    @property
    def pair(self) -> tuple[int, int]:
        return self.send_id, self.link_id


async def seed(settings: config.Settings) -> list[Tracked]:
    """Record the sends as the relay would, in the service's database, before it starts."""
    store = await open_store(settings.storage)
    try:
        signer = Signer(load_secret(settings.tracking.secret_file), store.instance_id)
        urls = tuple(f"https://example.com/kill/{n}?x=1&y=2" for n in range(LINKS_PER_SEND))
        tracked = []
        for n in range(SENDS):
            send = NewSend("kill-9", None, "standard", f"contact-{n}", None, None, "tracked",
                           [(url, None) for url in urls], sent_at=time.time() - 3600)  # fmt: skip
            recorded = await store.record_send(send)
            tracked += [
                Tracked(
                    recorded.send_id, link, signer.sign(recorded.send_id, link, send.sent_at), url
                )
                for (url, _), link in recorded.link_ids.items()
            ]
    finally:
        await store.close()
    random.Random(9).shuffle(tracked)
    return tracked


@dataclass
class ClickLoad:
    """Workers that click each pair once until the list is done or the service is gone."""

    base: str
    todo: list[Tracked]
    answered: list[Tracked] = field(default_factory=list)
    failed: int = 0
    enough: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, session: aiohttp.ClientSession) -> None:
        while self.todo:
            click = self.todo.pop()
            try:
                answer = await get(session, f"{self.base}/c/{click.token}")
            except (aiohttp.ClientError, TimeoutError):
                self.failed += 1
                return
            assert answer == (302, click.url)
            self.answered.append(click)
            if len(self.answered) >= KILL_AFTER:
                self.enough.set()

    async def run_and_kill(self, service: ServiceProcess) -> None:
        """Run the workers; SIGKILL the service once KILL_AFTER clicks were answered."""
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}, timeout=timeout) as s:
            workers = asyncio.gather(*(self.worker(s) for _ in range(WORKERS)))
            enough = asyncio.create_task(self.enough.wait())
            await asyncio.wait([enough, workers], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            service.signal(signal.SIGKILL)
            enough.cancel()
            await workers


def stored_clicks(storage: config.StorageSettings) -> tuple[Counter[tuple[int, int]], str]:
    """The (send, link) pairs in the clicks table, and whether the database file is sound
    (SQLite's `PRAGMA integrity_check`; PostgreSQL keeps its own, "ok")."""
    pairs = Counter(pg.query(storage, "SELECT send_id, link_id FROM clicks"))
    if storage.sqlite_path is None:
        return pairs, "ok"
    return pairs, pg.query(storage, "PRAGMA integrity_check")[0][0]


@pytest.mark.slow
async def test_kill_9_of_the_web_process_loses_no_answered_click(tmp_path):
    web_port = free_port()
    cfg = write_config(tmp_path / "clickrelay.toml", free_port(), free_port(), web_port)
    settings = config.load(cfg)
    tracked = await seed(settings)
    base = f"http://{LOOPBACK}:{web_port}"
    load = ClickLoad(base, list(tracked))
    service = ServiceProcess("web", "--config", str(cfg))
    await service.start("http service listening")
    try:
        await load.run_and_kill(service)
        killed = await service.wait()
    finally:
        await service.kill()
    stored, integrity = stored_clicks(settings.storage)
    attempted = {click.pair for click in tracked} - {click.pair for click in load.todo}

    assert killed == -signal.SIGKILL
    assert len(load.answered) >= KILL_AFTER
    assert load.failed > 0 and load.todo  # the kill came in the middle of the load
    assert integrity == "ok"
    assert {click.pair for click in load.answered} <= set(stored) <= attempted
    assert set(stored.values()) == {1}

    fresh, again = load.todo[0], load.answered[0]
    service = ServiceProcess("web", "--config", str(cfg))
    await service.start("http service listening")
    try:
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as session:
            after = [await get(session, f"{base}/c/{click.token}") for click in (fresh, again)]
        service.signal(signal.SIGTERM)
        stopped = await service.wait()
    finally:
        await service.kill()
    restored, integrity = stored_clicks(settings.storage)

    assert after == [(302, fresh.url), (302, again.url)]
    assert stopped == 0
    assert integrity == "ok"
    assert restored == stored + Counter([fresh.pair, again.pair])


# ---------------------------------------------------------------- 6. fuzzed MIME and HTML

EOLS = st.sampled_from(["\r\n", "\r\n", "\n"])  # bare LF now and then
ODD_URLS = [
    "http://Example.COM:8080/Path/;p?Q=A+B", "https://b\u00fccher.example/stra\u00dfe?q=\u00e4",
    "https://example.com/?a=1&amp;b=2", "https://example.com/a b", "  https://example.com/pad  ",
    "https://example.com/%7Euser?x=%C3%A9", "mailto:someone@example.com", "tel:+4912345",
    "#top", "/relative/path", "{{unsubscribe_url}}", "*|ARCHIVE|*", "javascript:alert(1)",
    "https://[::1]/v6", "https://example.com:99999/bad-port", "htps://example.com/typo",
    "http://click.test/c/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "",
]  # fmt: skip
URLS = st.one_of(
    st.builds(
        "https://example.com/{}/{}?id={}&utm=mail#f".format,
        st.sampled_from(["a", "shop", "Stra\u00dfe"]),
        st.integers(0, 30),
        st.integers(0, 9),
    ),
    st.sampled_from(ODD_URLS),
)
LINK_TEXTS = st.sampled_from([
    "Shop now", "Read more", "Unsubscribe", "View in browser", "",
    "<img src='logo.png' alt='Logo'>", "Caf\u00e9 \u2713", "<b>Bold</b>",
])  # fmt: skip
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\r"),
               max_size=30)  # fmt: skip


@st.composite
def anchors(draw) -> str:
    url, quote = draw(URLS), draw(st.sampled_from(['"', "'", ""]))
    if quote == "":
        url = re.sub(r"[\s>\"'`=<]", "", url) or "x"
    attrs = draw(st.sampled_from(["", " data-notrack", ' class="btn"', " target=_blank",
                                  ' clicktracking="off"', ' title="a > b"']))  # fmt: skip
    tag = draw(st.sampled_from(["a", "A", "area"]))
    href = draw(st.sampled_from(["href", "HREF", "href "]))
    end = "" if tag == "area" else f"{draw(LINK_TEXTS)}</{tag}>"
    return f"<{tag} {href}={quote}{url}{quote}{attrs}>{end}"


BROKEN_HTML = ['<a href="https://example.com/unterminated', "<a href='https://e.com/x'>open",
               "</a>", "&#xZZ;", "<p>\0</p>", "<!-- unterminated", "<![CDATA[ <a href=x> ]]>",
               "<template><a href='https://example.com/t'>t</a></template>"]  # fmt: skip
HTML_FRAGMENTS = st.one_of(
    TEXT,
    anchors(),
    anchors(),
    st.just("\n"),
    TEXT.map(lambda text: f"<!-- {text} -->"),
    anchors().map(lambda a: f"<!-- {a} -->"),
    anchors().map(lambda a: f"<!--[if mso]>{a}<![endif]-->"),
    URLS.map(lambda url: f'<v:roundrect href="{url}" style="width:200px"><w:anchorlock/>'),
    anchors().map(lambda a: f"<script>var s = '{a}';</script><style>a{{color:red}}</style>"),
    st.integers(990, 2500).map(lambda n: "<p>" + "x" * n + "</p>"),
    st.sampled_from(BROKEN_HTML),
)
HTML = st.builds(
    lambda head, parts, tail: head + "".join(parts) + tail,
    st.sampled_from(["", "<!DOCTYPE html><html><body>\n", "<html><head><meta charset=x></head>"]),
    st.lists(HTML_FRAGMENTS, max_size=16),
    st.sampled_from(["", "\n</body></html>\n", "</html>"]),
)
# (declared charset, the codec that really made the bytes): some lie, some are unknown
CHARSETS = st.sampled_from([
    (None, "utf-8"), ("utf-8", "utf-8"), ('"UTF-8"', "utf-8"), ("us-ascii", "ascii"),
    ("us-ascii", "utf-8"), ("iso-8859-1", "latin-1"), ("windows-1252", "cp1252"),
    ("koi8-r", "koi8-r"), ("shift_jis", "shift_jis"), ("iso-2022-jp", "iso-2022-jp"),
    ("utf-16", "utf-16"), ("x-unknown", "utf-8"), ("utf8", "utf-8"),
])  # fmt: skip
ENCODINGS = st.sampled_from([None, "7bit", "8bit", "8bits", "binary", "quoted-printable",
                             "Quoted-Printable", "broken-qp", "base64", "BASE64", "broken-base64",
                             "x-uuencode"])  # fmt: skip
BOUNDARY_CHARS = string.ascii_letters + string.digits + "'()+_,-./:=? "
BOUNDARIES = st.one_of(
    st.sampled_from(["b", "b1", "=_Part_1", "----=_NextPart_000", "b b", "outer"]),  # reused
    st.text(BOUNDARY_CHARS, min_size=1, max_size=70).map(str.rstrip).filter(bool),
)


def transfer_encoded(data: bytes, encoding: str | None, eol: str, textual: bool, rng) -> bytes:
    """`data` in the given Content-Transfer-Encoding, lines ending in `eol`; some deliberately
    broken. `textual`: the data's b"\\n" are line breaks (not so in UTF-16)."""
    name = (encoding or "").lower()
    if "base64" in name:
        encoded = base64.encodebytes(data)
        if name == "broken-base64" and len(encoded) > 4:
            at = rng.randrange(len(encoded) - 1)
            encoded = encoded[:at] + rng.choice([b"!", b"", b"=", b"\xff"]) + encoded[at + 1 :]
    elif "q" in name:
        encoded = binascii.b2a_qp(data, istext=textual)
        if name == "broken-qp":
            at = rng.randrange(len(encoded) + 1)
            encoded = encoded[:at] + rng.choice([b"=ZZ", b"=", b"=\r", b"=0"]) + encoded[at:]
    else:
        encoded = data
    return encoded.replace(b"\n", eol.encode())


def leaf_headers(ctype: str, encoding: str | None, eol: str, extra: str = "") -> str:
    cte = f"Content-Transfer-Encoding: {encoding.replace('broken-', '')}{eol}" if encoding else ""
    return f"Content-Type: {ctype}{eol}{cte}{extra}{eol}"


@st.composite
def html_leaves(draw) -> bytes:
    eol, (declared, codec) = draw(EOLS), draw(CHARSETS)
    encoding = draw(ENCODINGS)
    if codec == "utf-16" and encoding not in ("base64", "quoted-printable"):
        encoding = "base64"  # UTF-16 in a line-based encoding is no mail any MTA passes intact
    data = draw(HTML).encode(codec, "xmlcharrefreplace")
    ctype = draw(st.sampled_from(["text/html", "TEXT/HTML", "text/html; format=flowed"]))
    if declared is not None:
        ctype += f"; charset={declared}"
    disposition = draw(st.sampled_from(["", "", f"Content-Disposition: inline{eol}",
                                        f"Content-Disposition: attachment{eol}"]))  # fmt: skip
    rng = random.Random(draw(st.integers(0, 2**16)))
    body = transfer_encoded(data, encoding, eol, codec != "utf-16", rng)
    return leaf_headers(ctype, encoding, eol, disposition).encode() + body


@st.composite
def other_leaves(draw) -> bytes:
    """Parts that are not body HTML: their links must never change."""
    eol = draw(EOLS)
    kind = draw(st.sampled_from(["plain", "octets", "attached-mail"]))
    if kind == "plain":
        text = f'Visit https://plain.example/{draw(st.integers(0, 9))} or <a href="https://plain.example/a">a</a>'
        return leaf_headers("text/plain; charset=utf-8", None, eol).encode() + text.encode()
    if kind == "octets":
        data = random.Random(draw(st.integers(0, 2**16))).randbytes(draw(st.integers(0, 300)))
        headers = leaf_headers("application/octet-stream", "base64", eol)
        return headers.encode() + transfer_encoded(data, "base64", eol, False, None)
    inner = f'Subject: fwd{eol}Content-Type: text/html{eol}{eol}<a href="https://attached.example/">x</a>'
    return leaf_headers("message/rfc822", None, eol).encode() + inner.encode()


def multiparts(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw) -> bytes:
        eol, boundary = draw(EOLS), draw(BOUNDARIES)
        subtype = draw(st.sampled_from(["mixed", "alternative", "related", "digest"]))
        quoted = draw(st.booleans()) or not re.fullmatch(r"[A-Za-z0-9'+_.-]+", boundary)
        param = f'"{boundary}"' if quoted else boundary
        parts = draw(st.lists(children, max_size=4))
        closed = draw(st.sampled_from([True, True, False]))
        preamble = draw(st.sampled_from(["", f"This is a multi-part message in MIME format.{eol}"]))
        epilogue = draw(st.sampled_from(["", f"epilogue{eol}", f"--{boundary}-- not a close{eol}"]))
        delimiter = f"--{boundary}".encode()
        body = preamble.encode() + b"".join(
            delimiter + eol.encode() + p + eol.encode() for p in parts
        )
        if closed:
            body += delimiter + b"--" + eol.encode() + epilogue.encode()
        return f"Content-Type: multipart/{subtype}; boundary={param}{eol}{eol}".encode() + body

    return build()


MIME_TREES = st.recursive(st.one_of(html_leaves(), other_leaves()), multiparts, max_leaves=8)


def normalized(raw: bytes) -> bytes:
    """What the relay makes of what it reads (relay.canonical): CRLF everywhere (bare CR or LF
    too), no NUL characters."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", raw.replace(b"\0", b""))


def outside(raw: bytes, entities: list[mime.Entity]) -> list[bytes]:
    """The bytes before, between and after the given (leaf) entities."""
    pieces, pos = [], 0
    for entity in entities:
        pieces.append(raw[pos : entity.start])
        pos = entity.end
    return [*pieces, raw[pos:]]


def content_types(root: mime.Entity) -> list[str]:
    return [entity.content_type for entity in root.walk()]


def entity_bytes(raw: bytes, entity: mime.Entity) -> bytes:
    return raw[entity.start : entity.end]


def headers_but_cte(raw: bytes, entity: mime.Entity) -> bytes:
    head = raw[entity.start : entity.body_start]
    return re.sub(rb"(?im)^content-transfer-encoding:[^\r\n]*\r?\n", b"", head)


@dataclass
class Fuzz:
    """One relay and upstream for all of a test's examples; runs each on the test's loop."""

    relay: RunningRelay
    upstream: ScriptedUpstream
    storage: config.StorageSettings
    caplog: pytest.LogCaptureFixture
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    numbers: itertools.count = field(default_factory=itertools.count)
    outcomes: Counter[str] = field(default_factory=Counter)

    def check(self, tree: bytes) -> None:
        """Called by Hypothesis in a worker thread while the relay runs on the test's loop."""
        outcome = asyncio.run_coroutine_threadsafe(self.relayed(tree), self.loop).result(60)
        self.outcomes[outcome] += 1

    async def relayed(self, tree: bytes) -> str:
        self.caplog.clear()
        n = next(self.numbers)
        head = f"From: a@example.com\r\nTo: b@example.com\r\nMessage-ID: <fuzz-{n}@x>\r\n"
        control = "".join(f"{k}: {v}\r\n" for k, v in {**CAMPAIGN, "X-Contact-Id": "f"}.items())
        body = (head + "MIME-Version: 1.0\r\n").encode() + tree
        body += b"" if body.endswith(b"\r\n") else b"\r\n"
        before = len(self.upstream.received)
        replies = await send(self.relay.port, control.encode() + body)
        assert replies[-1].startswith("250 "), replies
        assert len(self.upstream.received) == before + 1
        forwarded, expected = self.upstream.received[-1].content, normalized(body)
        assert not BARE_LINE_END.search(forwarded)  # the wire knows no other line end than CRLF
        assert errors_logged(self.caplog) == []
        (decision,) = [d for mid, d, _ in sends_table(self.storage) if mid == f"<fuzz-{n}@x>"]
        if forwarded == expected:
            return "untouched"
        assert decision == "tracked"
        await self.assert_rewritten_faithfully(expected, forwarded)
        return "rewritten"

    async def assert_rewritten_faithfully(self, expected: bytes, forwarded: bytes) -> None:
        """Only tracked hrefs inside body HTML changed; every tracking link leads where the
        original did; the rest of the message is byte-identical."""
        old_root, new_root = mime.parse(expected), mime.parse(forwarded)
        assert content_types(old_root) == content_types(new_root)
        old_parts, new_parts = mime.html_body_parts(old_root), mime.html_body_parts(new_root)
        assert len(old_parts) == len(new_parts)
        assert outside(expected, old_parts) == outside(forwarded, new_parts)
        for old_part, new_part in zip(old_parts, new_parts, strict=True):
            assert headers_but_cte(expected, old_part) == headers_but_cte(forwarded, new_part)
            old = mime.decode(expected, old_part)
            if old is None:  # not decodable exactly: must be left as it was
                assert entity_bytes(expected, old_part) == entity_bytes(forwarded, new_part)
                continue
            new = mime.decode(forwarded, new_part)
            assert new is not None, entity_bytes(forwarded, new_part)[:500]
            await assert_faithful(
                old.text.replace("\r\n", "\n"),
                new.text.replace("\r\n", "\n"),
                self.relay,
                old.charset,
            )


FUZZ_SETTINGS = hypothesis.settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# Inputs these tests once found mangled, run first every time (Hypothesis explicit examples).
BARE_LF_LONG_LINE = (  # re-encoded as quoted-printable; the message then ends in a bare LF
    b'Content-Type: text/html\n\n<a href="https://example.com/a">Shop now</a>\n<p>'
    + b"x" * 1000
    + b"</p>"
)
BROKEN_QUOTES_LEAF = (  # html.parser read the first tag as a link once the second was rewritten
    b'Content-Type: text/html\r\n\r\n<a href="https://example.com/u<p>xxx</p><a href="'
    b'https://example.com/u<a href="https://example.com/u\r\n</body></html>\r\n'
)
UTF16_QUOTED_PRINTABLE = leaf_headers(  # UTF-16 has 0x0A bytes that are no line breaks
    "text/html; charset=utf-16", "quoted-printable", "\r\n"
).encode() + transfer_encoded(
    '<a href="https://example.com/a">Shop now</a>\n<p>Hi</p>\n'.encode("utf-16"),
    "quoted-printable", "\r\n", textual=False, rng=None,
)  # fmt: skip


async def fuzz_through_relay(settings, upstream, caplog, strategy, known=()) -> Counter[str]:
    """Run Hypothesis (in a worker thread) against one relay on this test's event loop."""
    async with start_relay(no_trace(settings)) as relay:
        fuzz = Fuzz(relay, upstream, settings.storage, caplog)

        def examples(tree: bytes) -> None:
            fuzz.check(tree)

        for tree in known:
            examples = hypothesis.example(tree)(examples)
        await asyncio.to_thread(FUZZ_SETTINGS(given(strategy)(examples)))
    return fuzz.outcomes


@pytest.mark.slow
async def test_fuzzed_mime_structures_are_forwarded_faithfully(settings, upstream, caplog):
    outcomes = await fuzz_through_relay(settings, upstream, caplog, MIME_TREES)
    assert outcomes["rewritten"] > 0 and outcomes["untouched"] > 0, outcomes


@pytest.mark.slow
async def test_fuzzed_html_is_forwarded_faithfully(settings, upstream, caplog):
    known = [BARE_LF_LONG_LINE, UTF16_QUOTED_PRINTABLE, BROKEN_QUOTES_LEAF]
    outcomes = await fuzz_through_relay(settings, upstream, caplog, html_leaves(), known)
    assert outcomes["rewritten"] > 0, outcomes
