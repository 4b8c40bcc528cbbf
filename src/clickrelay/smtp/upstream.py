"""The real mail server behind the relay: an SMTP server (via `client`) or a local Maildir.

An upstream hands out one `Transaction` per client transaction. Every step returns the
upstream's `Reply`, every line of it (or a 4xx `Reply` when the upstream could not be reached or
timed out), so the relay can mirror it to its client: nothing is ever acknowledged that the
upstream did not. What goes to an SMTP upstream fits what its EHLO offers (`esmtp.Extensions`):
parameters it does not offer are left out, 8-bit content is converted for one without 8BITMIME,
and a message that needs SMTPUTF8 where it is not offered is refused (553 5.6.7, as Postfix).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Protocol

from clickrelay import cpu
from clickrelay.config import UpstreamSettings
from clickrelay.mail import downgrade
from clickrelay.mail.headers import parse_header_block
from clickrelay.smtp import client
from clickrelay.smtp.client import ClientError, Reply
from clickrelay.smtp.esmtp import Extensions, MailCommand, RcptCommand

__all__ = ["Reply", "Transaction", "Upstream", "create_upstream", "crlf", "unavailable"]

log = logging.getLogger(__name__)

IDLE_CONNECTIONS = 8  # kept open between transactions, like Postfix's connection cache
IDLE_SECONDS = 30.0
PROBE_WAIT = 2.0  # seconds an EHLO waits to learn what the upstream offers
PROBE_BACKOFF = 10.0  # seconds before asking an upstream that failed to answer again


def unavailable(problem: str) -> Reply:
    """The reply for an upstream that cannot answer: the sender keeps the message and retries."""
    return Reply(451, f"4.4.1 Upstream unavailable, try again later ({problem})")


NEEDS_SMTPUTF8 = "5.6.7 SMTPUTF8 is required, but was not offered by the upstream"


class Transaction(Protocol):
    def rcpt(self, rcpt: RcptCommand) -> Awaitable[Reply]:
        """Pass RCPT on; its reply, awaited in the order of the calls. An upstream that offers
        PIPELINING gets the command at once, before the replies to earlier ones are in."""

    async def data(self, pieces: Sequence[bytes]) -> Reply:
        """Send the message, given as consecutive pieces that each start a line (a trace header,
        then the message): written in order, never joined into one more copy."""

    async def finish(self, *, aborted: bool) -> None:
        """End the transaction: release the connection, or reset/close it if aborted."""


class Upstream(Protocol):
    offered: Extensions | None  # what the upstream offered in its latest EHLO, if known

    async def extensions(self) -> Extensions | None:
        """What the upstream offers, asked if not known yet (None: it cannot be reached)."""

    async def begin(self, mail: MailCommand) -> tuple[Reply, Transaction | None]:
        """Start a transaction (MAIL FROM): the reply and, if it was 2xx, the transaction."""

    async def close(self) -> None: ...


def create_upstream(settings: UpstreamSettings, local_hostname: str) -> Upstream:
    if settings.url.scheme == "maildir":
        assert settings.url.path is not None
        return MaildirUpstream(settings.url.path)
    return SmtpUpstream(settings, local_hostname)


# ---------------------------------------------------------------- SMTP


class SmtpUpstream:
    def __init__(self, settings: UpstreamSettings, local_hostname: str) -> None:
        self.settings = settings
        self.local_hostname = local_hostname
        self._idle: list[tuple[client.Connection, float]] = []
        self._tls_context = _client_tls_context(settings) if settings.url.scheme != "smtp" else None
        self.offered: Extensions | None = None  # as of the latest EHLO
        self._probe: asyncio.Task[None] | None = None
        self._probe_again_at = 0.0

    async def extensions(self) -> Extensions | None:
        """As of the latest EHLO; else asked now, by one connection for all who ask meanwhile
        (kept for the next transaction), waiting for its answer at most PROBE_WAIT seconds: an
        upstream that hangs must not hold up every EHLO. After a failure, not asked again for
        PROBE_BACKOFF seconds (each transaction connects anyway)."""
        if self.offered is None and (self._probe is None or self._probe.done()):
            if time.monotonic() < self._probe_again_at:
                return None
            self._probe = asyncio.get_running_loop().create_task(self._learn())
        if self._probe is not None and not self._probe.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._probe), PROBE_WAIT)
        return self.offered

    async def _learn(self) -> None:
        try:
            self._release(await self._connect())
        except _FAILURES as exc:
            self._probe_again_at = time.monotonic() + PROBE_BACKOFF
            log.warning("upstream %s unreachable: %s", self.settings.url, _describe(exc))

    async def begin(self, mail: MailCommand) -> tuple[Reply, Transaction | None]:
        while True:
            conn, reused = self._take_idle(), True
            if conn is None:
                reused = False
                try:
                    conn = await self._connect()
                except _FAILURES as exc:
                    log.warning("upstream %s unreachable: %s", self.settings.url, _describe(exc))
                    return unavailable(_describe(exc)), None
            offered = Extensions.from_ehlo(conn.extensions)
            if not (mail.address.isascii() or offered.smtputf8):
                self._release(conn)
                return Reply(553, NEEDS_SMTPUTF8), None
            try:
                reply = await conn.command(b"MAIL", mail.upstream_line(offered).encode())
            except _FAILURES as exc:
                conn.close()
                if reused:  # a cached connection the server closed meanwhile: try a fresh one
                    continue
                return unavailable(_describe(exc)), None
            if reply.code == 421:  # it is closing: a cached connection may just be too old
                conn.close()
                if reused:
                    continue
                return _mirrored(reply), None
            if not reply.ok:
                self._release(conn)
                return _mirrored(reply), None
            return _mirrored(reply), SmtpTransaction(self, conn, mail, offered)

    async def _connect(self) -> client.Connection:
        url, conf = self.settings.url, self.settings
        assert url.host is not None and url.port is not None
        login = None
        if conf.username is not None:
            login = client.Login(conf.username, conf.password or "")
        conn = await client.connect(
            url.host,
            url.port,
            local_hostname=self.local_hostname,
            timeout_seconds=conf.timeout_seconds,
            tls=self._tls_context if url.scheme == "smtps" else None,
            starttls=self._tls_context if url.scheme == "smtp+starttls" else None,
            login=login,
        )
        self.offered = Extensions.from_ehlo(conn.extensions)
        return conn

    def _take_idle(self) -> client.Connection | None:
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if conn.is_connected and now - since < IDLE_SECONDS:
                return conn
            conn.close()
        return None

    def _release(self, conn: client.Connection) -> None:
        if conn.is_connected and len(self._idle) < IDLE_CONNECTIONS:
            self._idle.append((conn, time.monotonic()))
        else:
            conn.close()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            with contextlib.suppress(*_FAILURES):
                await asyncio.wait_for(conn.quit(), 2)


class SmtpTransaction:
    def __init__(
        self, upstream: SmtpUpstream, conn: client.Connection, mail: MailCommand,
        offered: Extensions,
    ) -> None:  # fmt: skip
        self.upstream = upstream
        self.conn = conn
        self.mail = mail
        self.offered = offered
        self.broken = False
        self._replies: asyncio.Task[Reply] | None = None  # the latest RCPT's, read in turn

    def rcpt(self, rcpt: RcptCommand) -> asyncio.Future[Reply]:
        if not (rcpt.address.isascii() or self.offered.smtputf8):
            return _done(Reply(553, NEEDS_SMTPUTF8))
        line = rcpt.upstream_line(self.offered).encode()
        sent = self.offered.pipelining and not self.broken
        if sent:
            try:
                self.conn.send(b"RCPT", line)
            except ClientError as exc:
                self.broken = True
                return _done(unavailable(_describe(exc)))
        previous = self._replies
        self._replies = asyncio.get_running_loop().create_task(
            self._rcpt_reply(previous, None if sent else line)
        )
        return self._replies

    async def _rcpt_reply(
        self, previous: asyncio.Task[Reply] | None, unsent: bytes | None
    ) -> Reply:
        """The reply to the next RCPT, once the earlier ones are read; `unsent`: the command,
        for an upstream that does not pipeline (written only now)."""
        if previous is not None:
            await asyncio.wait([previous])
        if self.broken:
            return unavailable("the connection broke on an earlier recipient")
        try:
            if unsent is not None:
                self.conn.send(b"RCPT", unsent)
            reply = await self.conn.reply()
        except _FAILURES as exc:
            self.broken = True
            return unavailable(_describe(exc))
        if reply.code == 421:
            self.broken = True
        return _mirrored(reply)

    async def data(self, pieces: Sequence[bytes]) -> Reply:
        """Send DATA and the message; the answer is the upstream's reply to the final dot.

        Each piece is dot-stuffed in one pass and written in chunks, each once the socket has
        taken the one before: a 30 MB message costs little more than itself.
        """
        try:
            pieces = [*pieces[:-1], await self._fitted(pieces[-1])]
        except downgrade.Refused as refused:
            return Reply(refused.code, refused.text)
        try:
            start = await self.conn.command(b"DATA")
            if start.code != 354:
                return _mirrored(start)
            wire = b""
            for piece in pieces:
                wire = dot_stuff(piece)
                await _write(self.conn, wire)
            await self.conn.write(b".\r\n" if wire.endswith(b"\r\n") else b"\r\n.\r\n")
            reply = await self.conn.reply()
        except _FAILURES as exc:
            self.broken = True
            return unavailable(_describe(exc))
        except asyncio.CancelledError:  # our client went away mid-transfer: never reuse this
            self.broken = True
            raise
        if reply.code == 421:
            self.broken = True
        return Reply(reply.code, _lines(reply.text))

    async def _fitted(self, message: bytes) -> bytes:
        """The message as this upstream can take it; raises downgrade.Refused if it cannot."""
        if self.mail.smtputf8 and not self.offered.smtputf8:
            block = parse_header_block(message)
            if not message[: block.body_start].isascii():
                raise downgrade.Refused(553, NEEDS_SMTPUTF8)
        if self.offered.eightbitmime or message.isascii():
            return message
        return await cpu.run(len(message), downgrade.seven_bit, message)

    async def finish(self, *, aborted: bool) -> None:
        if self._replies is not None and not self._replies.done():
            self._replies.cancel()  # replies still to come: the connection is out of step
            self.broken = True
        if self.broken or not self.conn.is_connected:
            self.conn.close()
            return
        if aborted:
            try:
                reply = await self.conn.command(b"RSET")
            except _FAILURES:
                reply = None
            if reply is None or not reply.ok:
                self.conn.close()
                return
        self.upstream._release(self.conn)


WRITE_CHUNK = 256 * 1024


async def _write(conn: client.Connection, data: bytes) -> None:
    """Write in chunks of a memoryview, each once the socket has taken most of the one before:
    the transport copies whatever it cannot send at once, and a 30 MB write would be buffered
    whole."""
    view = memoryview(data)
    for start in range(0, len(view), WRITE_CHUNK):
        await conn.write(view[start : start + WRITE_CHUNK])


def _done(reply: Reply) -> asyncio.Future[Reply]:
    future = asyncio.get_running_loop().create_future()
    future.set_result(reply)
    return future


def dot_stuff(message: bytes) -> bytes:
    """SMTP transparency (RFC 5321 4.5.2). Every line end is CRLF already (relay.canonical, and
    quoted-printable made so): `crlf` only makes sure, at the cost of counting."""
    stuffed = crlf(message).replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def crlf(data: bytes) -> bytes:
    """`data` with every CR, LF and CRLF a CRLF: three C-speed passes where there is any other
    line end than CRLF (a regex substitution took seconds on 32 MB of short lines)."""
    ends = data.count(b"\r\n")
    if data.count(b"\n") == ends and data.count(b"\r") == ends:
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


_FAILURES = (ClientError, TimeoutError, OSError, ssl.SSLError)


def _mirrored(reply: Reply) -> Reply:
    """The upstream's own answer, every line, except that a 421 (it is closing on us) becomes a
    451."""
    if reply.code == 421 or not 200 <= reply.code < 600:
        return unavailable(f"{reply.code} {_one_line(reply.text)}")
    return Reply(reply.code, _lines(reply.text))


def _lines(text: str) -> str:
    """Each line of a reply's text fit to pass on: printable ASCII."""
    lines = [_one_line(line) for line in text.split("\n")]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    clean = " ".join(text.split())
    return clean.encode("ascii", "replace").decode("ascii") or "(no text)"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return _one_line(str(exc)) or type(exc).__name__


def _client_tls_context(settings: UpstreamSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.ca_file)
    if not settings.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# ---------------------------------------------------------------- Maildir


class MaildirUpstream:
    """Delivers into a Maildir (tmp/ then rename into new/): the embedded default, no mail leaves.

    Each transaction becomes one file; like Postfix's local delivery it starts with a Return-Path
    line and one Delivered-To line per recipient.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._counter = itertools.count(1)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")

    offered = Extensions(size=True, eightbitmime=True, smtputf8=True)  # files take anything

    async def extensions(self) -> Extensions:
        return self.offered

    async def begin(self, mail: MailCommand) -> tuple[Reply, Transaction | None]:
        return Reply(250, "2.1.0 Ok"), MaildirTransaction(self, mail.address)

    def deliver(self, sender: str, recipients: list[str], pieces: Sequence[bytes]) -> str:
        for sub in ("tmp", "new", "cur"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(self._counter)}.{self._host}"
        envelope = [b"Return-Path: <" + sender.encode("utf-8", "replace") + b">"]
        envelope += [b"Delivered-To: " + r.encode("utf-8", "replace") for r in recipients]
        tmp = self.root / "tmp" / name
        with open(tmp, "wb") as fh:
            fh.write(b"\r\n".join(envelope) + b"\r\n")
            for piece in pieces:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, self.root / "new" / name)
        return name

    async def close(self) -> None:
        return None


class MaildirTransaction:
    def __init__(self, maildir: MaildirUpstream, sender: str) -> None:
        self.maildir = maildir
        self.sender = sender
        self.recipients: list[str] = []

    def rcpt(self, rcpt: RcptCommand) -> asyncio.Future[Reply]:
        self.recipients.append(rcpt.address)
        return _done(Reply(250, "2.1.5 Ok"))

    async def data(self, pieces: Sequence[bytes]) -> Reply:
        try:
            name = await asyncio.to_thread(
                self.maildir.deliver, self.sender, self.recipients, pieces
            )
        except OSError as exc:
            log.error("maildir delivery to %s failed: %s", self.maildir.root, exc)
            return Reply(451, "4.3.0 Local Maildir delivery failed, try again later")
        return Reply(250, f"2.0.0 Ok: queued as {name}")

    async def finish(self, *, aborted: bool) -> None:
        return None
