"""The SMTP relay: an aiosmtpd listener whose every answer mirrors the upstream's.

Semantics follow Postfix's before-queue proxy (SMTPD_PROXY_README): the upstream transaction opens
when the client sends MAIL, each RCPT gets the upstream's answer, and the reply to DATA is sent only
after the upstream has answered the message. There is no queue, so nothing is acknowledged that the
upstream has not acknowledged. What happens to the content in between is the pipeline's business.

What this module reads itself rather than through aiosmtpd: MAIL and RCPT (their parameters are
`esmtp`'s), DATA (lines of any length, one buffer), AUTH (only where offered, throttled, checked
in the password pool), and which extensions EHLO lists (DSN when the upstream offers it, AUTH only
with a mechanism to offer).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import functools
import ipaddress
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from email.utils import formatdate
from typing import Any, AnyStr, Protocol

from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

from clickrelay import cpu, passwords
from clickrelay.config import Settings
from clickrelay.limits import AuthThrottle, ConnectionLimits, LogThrottle, in_networks
from clickrelay.smtp.esmtp import (
    MailCommand,
    ParameterError,
    RcptCommand,
    parse_mail,
    parse_rcpt,
    printable,
)
from clickrelay.smtp.upstream import Reply, Transaction, Upstream, crlf

log = logging.getLogger(__name__)

# Lines a client sent, which may hold credentials (an AUTH blob sent after a refusal reads as an
# unknown command), and replies that echo them ('500 Error: command "<BLOB>" not recognized'):
# aiosmtpd logs them in these records; they are dropped.
_CLIENT_LINE_RECORDS = frozenset({
    "_handle_client readline: %r", "%r >> %r", "%r << %r", "%r unrecognised: %s",
    "%r can't decode base64: %s", "DATA readline: %s", "%r << challenge: %r",
})  # fmt: skip


class _NoClientLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in _CLIENT_LINE_RECORDS


logging.getLogger("mail.log").addFilter(_NoClientLines())


class Pipeline(Protocol):
    """Turns the received message into the one to forward, and reports what it did."""

    async def prepare(self, message: bytes, envelope: Envelope) -> Prepared: ...

    async def forwarded(self, prepared: Prepared, reply: Reply) -> None:
        """Called once the upstream has answered DATA."""


class Prepared(Protocol):
    message: bytes
    refusal: str | None  # a reply refusing the message instead of forwarding it

    def log_fields(self) -> str: ...


class RelayServer:
    """Owns the listening socket, the open connections and the graceful shutdown."""

    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        pipeline: Pipeline,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        smtp = settings.smtp
        self.settings = settings
        self.upstream = upstream
        self.pipeline = pipeline
        self.hostname = smtp.hostname or socket.getfqdn()
        self.handler = RelayHandler(self)
        self.connections: set[RelaySMTP] = set()
        self.limits = ConnectionLimits(smtp.max_connections, 0, name="smtp")
        # Clients not allowed to relay (they may still authenticate) have a cap per address,
        # and half the total at most: a flood of them cannot lock the sending systems out.
        self.strangers = ConnectionLimits(
            smtp.max_connections // 2, smtp.max_connections_per_client, name="smtp"
        )
        self.refusals = LogThrottle(log, "refused")
        self.auth_throttle = AuthThrottle()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._tls = tls

    async def start(self, reuse_port: bool = False) -> None:
        """Bind the listener (beside other workers' with `reuse_port`); OSError (port in use,
        ...) propagates to the caller."""
        listen = self.settings.smtp.listen
        self._server = await asyncio.get_running_loop().create_server(
            self._new_connection, listen.host, listen.port, reuse_port=reuse_port
        )

    def allowed(self, address: str | None) -> bool:
        return in_networks(address, self.settings.smtp.allowed_clients)

    def admit(self, address: str | None, allowed: bool) -> bool:
        """Count a new connection from `address` (`allowed`: in allowed_clients), or refuse it
        (False) if over a cap."""
        if allowed:
            return self.limits.admit(address)
        if not self.strangers.admit(address):
            return False
        if self.limits.admit(address):
            return True
        self.strangers.release(address)
        return False

    def release(self, address: str | None, allowed: bool) -> None:
        self.limits.release(address)
        if not allowed:
            self.strangers.release(address)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the relay is not listening")
        return self._server.sockets[0].getsockname()[1]

    def _new_connection(self) -> RelaySMTP:
        smtp = self.settings.smtp
        return RelaySMTP(
            self,
            self.handler,
            data_size_limit=smtp.max_message_size,
            enable_SMTPUTF8=True,
            hostname=self.hostname,
            ident="clickrelay",
            tls_context=self._tls,
            auth_require_tls=True,
            auth_exclude_mechanism=[] if smtp.users else ["LOGIN", "PLAIN"],
            timeout=smtp.idle_timeout_seconds,
        )

    async def stop(self) -> None:
        """Stop listening, let in-flight transactions finish (bounded), then close everything."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        busy = [c.idle.wait() for c in self.connections if not c.idle.is_set()]
        if busy:
            log.info("waiting for %d SMTP transaction(s) to finish", len(busy))
            try:
                await asyncio.wait_for(
                    asyncio.gather(*busy), self.settings.smtp.shutdown_timeout_seconds
                )
            except TimeoutError:
                log.warning("shutdown: closing SMTP transactions that did not finish in time")
        for conn in list(self.connections):
            conn.close()
        await self.upstream.close()


PIPELINE_DEPTH = 100  # RCPT replies outstanding at most: the next RCPT waits for the oldest
TOO_MANY = b"421 4.7.0 Too many connections, try again later\r\n"
UNDECLARED_UNICODE = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"  # as Postfix
AUTH_BUSY = "454 4.7.0 Temporary authentication failure, try again later"  # RFC 4954


class RelaySMTP(SMTP):
    """One client connection. Holds the open upstream transaction, if any."""

    # The stream limit: what a command line may buffer. DATA reads past it (see smtp_DATA).
    line_length_limit = 64 * 1024
    command_size_limit = 2048  # MAIL and RCPT with DSN parameters need more than 512

    def __init__(self, relay: RelayServer, handler: RelayHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        # aiosmtpd's EHLO raises the MAIL limit in this dict (a class attribute): keep it ours.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)
        self.relay = relay
        self.transaction: Transaction | None = None
        self.dsn_offered = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.peer: str | None = None  # the client's IP address
        self.allowed = False  # it is in smtp.allowed_clients
        self.admitted = False  # counted by relay.admit (until connection_lost)
        # PIPELINING: an RCPT's reply may still be on its way (from the upstream) when the next
        # command is read. Every other command waits until those are written, so replies go
        # out in the order of the commands and each command sees the envelope they made.
        self._rcpt_replies: collections.deque[asyncio.Task[None]] = collections.deque()
        self._data_timer_set: float | None = None  # reading DATA: when the idle timer was set
        self._smtp_methods = {
            name: method if name == "RCPT" else self._after_rcpt_replies(method)
            for name, method in self._smtp_methods.items()
        }

    def _after_rcpt_replies(
        self, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        @functools.wraps(method)  # (keeps the syntax for HELP)
        async def in_turn(arg: str | None) -> None:
            await self.rcpt_replies_written()
            await method(arg)

        return in_turn

    async def rcpt_replies_written(self) -> None:
        if self._rcpt_replies:  # (each waits for the one before it)
            await asyncio.wait([self._rcpt_replies[-1]])

    async def push(self, status: AnyStr) -> None:
        await self.rcpt_replies_written()
        await super().push(status)

    def _reply_in_turn(self, reply: Coroutine[Any, Any, str]) -> None:
        """Write `reply` once it is in and the RCPT replies before it are written."""
        previous = self._rcpt_replies[-1] if self._rcpt_replies else None

        async def write() -> None:
            try:
                if previous is not None:
                    await asyncio.wait([previous])
                text = await reply
            except Exception as error:
                text = await self.relay.handler.handle_exception(error)
            finally:
                reply.close()  # (not awaited if the client went away first)
            with contextlib.suppress(ConnectionError):  # the client is gone: nothing to tell
                await SMTP.push(self, text)

        task = self.loop.create_task(write())
        task.add_done_callback(self._rcpt_replies.remove)
        self._rcpt_replies.append(task)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the second call, after STARTTLS
            self.peer = _peer_address(transport.get_extra_info("peername"))
            self.allowed = self.relay.allowed(self.peer)
            if not self.relay.admit(self.peer, self.allowed):
                transport.write(TOO_MANY)  # type: ignore[attr-defined]
                transport.close()
                return
            self.admitted = True
            self.relay.connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self.admitted:  # refused at once: aiosmtpd never started
            return
        self.relay.release(self.peer, self.allowed)
        self.admitted = False
        self.relay.connections.discard(self)
        for pending in list(self._rcpt_replies):
            pending.cancel()
        if self.transaction is not None:
            asyncio.get_running_loop().create_task(self.end_transaction(aborted=True))
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if not self.admitted:
            return False
        return super().eof_received()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def begin_transaction(self, transaction: Transaction) -> None:
        self.transaction = transaction
        self.idle.clear()

    async def end_transaction(self, *, aborted: bool) -> None:
        transaction, self.transaction = self.transaction, None
        try:
            if transaction is not None:
                await transaction.finish(aborted=aborted)
        finally:
            self.idle.set()

    # MAIL and RCPT: aiosmtpd's upper-case every parameter and refuse DSN's; these parse the
    # command themselves and hand it to the handler.

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if not (await self.check_helo_needed() or await self.check_auth_needed("MAIL")):
            await self.push(await self._mail(arg))

    async def _mail(self, arg: str | None) -> str:
        assert self.session is not None
        if self.transaction is not None:
            return "503 5.5.1 Error: nested MAIL command"
        try:
            mail = parse_mail(
                arg, self.dsn_offered, self.session.extended_smtp, auth=self.auth_offered()
            )
        except ParameterError as error:
            return error.reply
        if self.data_size_limit and (mail.size or 0) > self.data_size_limit:
            return "552 5.3.4 Message size exceeds fixed maximum message size"
        if not (mail.address.isascii() or mail.smtputf8):
            return UNDECLARED_UNICODE
        return await self.relay.handler.mail(self, mail)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """The reply is written once the upstream's is in, and the next command is read
        meanwhile (at most PIPELINE_DEPTH ahead)."""
        while len(self._rcpt_replies) >= PIPELINE_DEPTH:
            await asyncio.wait([self._rcpt_replies[0]])
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        reply = self._rcpt(arg)
        if isinstance(reply, str):
            await self.push(reply)
        else:
            self._reply_in_turn(reply)

    def _rcpt(self, arg: str | None) -> str | Coroutine[Any, Any, str]:
        assert self.session is not None and self.envelope is not None
        if self.transaction is None:
            return "503 5.5.1 Error: need MAIL command"
        try:
            rcpt = parse_rcpt(arg, self.dsn_offered, self.session.extended_smtp)
        except ParameterError as error:
            return error.reply
        if not (rcpt.address.isascii() or self.envelope.smtp_utf8):
            return UNDECLARED_UNICODE
        return self.relay.handler.rcpt(self, rcpt)

    # DATA: aiosmtpd's own refuses lines over 1,001 octets and keeps the message as a list of
    # lines (about three times its size in memory). Real mail breaks the line rule and only the
    # size limit may refuse content (as with Postfix), so this one reads lines of any length
    # into one buffer.

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._read_content()
        self._timeout_handle.cancel()  # the idle timer waits again once the reply is out
        if content is None:
            status = "552 5.3.4 Message exceeds the fixed maximum message size"
        else:
            content = await cpu.run(len(content), canonical, content)
            self.envelope.content = self.envelope.original_content = content
            status = await self._call_handler_hook("DATA")
        await self.end_transaction(aborted=True)  # if the handler has not: refused here
        self._set_post_data_state()
        await self.push(status)
        self._reset_timeout()

    async def _read_content(self) -> bytes | None:
        """The message up to the lone dot, dot-unstuffed; None if it exceeded the size limit
        (read to its end all the same, so that the session stays in step).

        Read in pieces that end at ".\r\n" or at the stream limit, not line by line: a dot
        ends the data only at the start of a line (after CRLF, RFC 5321 4.5.2), which is
        checked on the whole, as is the unstuffing, at C speed.
        """
        data = bytearray()
        limit = self.data_size_limit
        too_big = False
        self._data_timer_set = self.loop.time()
        try:
            while True:
                try:
                    data += await self._reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as exc:
                    data += await self._reader.read(exc.consumed)  # no ".\r\n" in it
                else:
                    dot = len(data) - 3
                    if dot == 0 or data[dot - 2 : dot] == b"\r\n":
                        del data[dot:]
                        if too_big or (limit and len(data) > limit):
                            return None
                        return unstuffed(data)
                if limit and len(data) > limit:
                    too_big = True
                    del data[:-2]  # let the memory go now; the last CRLF may precede the dot
        finally:
            self._data_timer_set = None

    def data_received(self, data: bytes) -> None:
        """Message data arriving is no idle session: the idle timer starts again (once in a
        while, not for every chunk of a big message)."""
        every = min(1.0, self._timeout_duration / 4)
        if self._data_timer_set is not None and self.loop.time() - self._data_timer_set > every:
            self._reset_timeout()
            self._data_timer_set = self.loop.time()
        super().data_received(data)

    # AUTH: offered only over TLS to configured users. aiosmtpd's built-in PLAIN/LOGIN call a
    # synchronous authenticator, but checking a password hash takes tens of milliseconds, so
    # these variants wait their turn (AuthThrottle) and check in the password pool.

    def auth_offered(self) -> bool:
        return bool(self.relay.settings.smtp.users) and self._tls_protocol is not None

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        if not self.auth_offered():
            await self.push("503 5.5.1 Error: authentication not enabled")
            return
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        blob = await self._auth_response(args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split the response")
            return AuthResult(success=False, handled=True)
        return await self._check_password(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        login = await self._auth_response(args, "Username:")
        password = await self._auth_response([], "Password:") if login is not None else None
        if login is None or password is None:
            return AuthResult(success=False, handled=True)
        return await self._check_password(login, password)

    async def _auth_response(self, args: list[str], challenge: str) -> bytes | None:
        """The client's decoded answer (inline or to a 334 challenge); None once it has been
        refused with a 501 (undecodable, or cancelled with '*': aiosmtpd answers those)."""
        if len(args) > 1:
            try:
                return base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Cannot decode response")
                return None
        answer = await self.challenge_auth(challenge)
        return answer if isinstance(answer, bytes) else None

    async def _check_password(self, login: bytes, password: bytes) -> AuthResult:
        name = login.decode("utf-8", "replace")
        peer = self.peer
        throttle = self.relay.auth_throttle
        await throttle.before(peer)
        try:
            hashed = self.relay.settings.smtp.users.get(name)
            ok = await passwords.check(password.decode("utf-8", "surrogateescape"), hashed)
        except passwords.Busy:
            throttle.unjudged(peer)
            return AuthResult(success=False, handled=False, message=AUTH_BUSY)
        except BaseException:  # cancelled counts as failed: hanging up must not dodge delays
            throttle.failed(peer)
            raise
        (throttle.succeeded if ok else throttle.failed)(peer)
        if not ok:
            log.warning("AUTH failed for user %r from %s", printable(name), peer)
        return AuthResult(success=ok, handled=False, auth_data=LoginPassword(login, b""))


class RelayHandler:
    """aiosmtpd hooks and the relay's commands; per-connection state lives on the `RelaySMTP`
    passed as `server`."""

    def __init__(self, relay: RelayServer) -> None:
        self.relay = relay

    async def handle_EHLO(
        self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        """aiosmtpd's keywords, but AUTH only with a mechanism to offer, DSN only when the
        upstream offers it (the relay can pass DSN's parameters on, not act on them), and
        PIPELINING (RFC 2920) always: RCPTs go on to the upstream before its replies are in."""
        session.host_name = hostname
        await server.end_transaction(aborted=True)  # EHLO resets the transaction too
        upstream = self.relay.upstream
        # (a client that may not relay makes no connection upstream)
        offered = await upstream.extensions() if server.allowed else upstream.offered
        server.dsn_offered = offered is not None and offered.dsn
        keywords = [r for r in responses if not r.startswith("250-AUTH") or server.auth_offered()]
        if server.dsn_offered:
            keywords.insert(-1, "250-DSN")
        keywords.insert(-1, "250-PIPELINING")
        return keywords

    async def handle_HELO(
        self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        session.host_name = hostname
        server.dsn_offered = False
        await server.end_transaction(aborted=True)
        return f"250 {server.hostname}"

    async def mail(self, server: RelaySMTP, mail: MailCommand) -> str:
        session, envelope = server.session, server.envelope
        assert session is not None and envelope is not None
        if self.relay.closing:
            asyncio.get_running_loop().call_soon(server.close)
            return "421 4.3.2 Service shutting down, try again later"
        if not (session.authenticated or server.allowed):
            self.relay.refusals.event(f"refused client {server.peer}: not in smtp.allowed_clients")
            return "554 5.7.1 Relay access denied: client not allowed"
        reply, transaction = await self.relay.upstream.begin(mail)
        if transaction is not None:
            server.begin_transaction(transaction)
            envelope.mail_from = mail.address
            envelope.smtp_utf8 = mail.smtputf8
        return str(reply)

    def rcpt(self, server: RelaySMTP, rcpt: RcptCommand) -> Coroutine[Any, Any, str]:
        """Passed on at once; the reply to the client once the upstream's is in."""
        assert server.transaction is not None and server.envelope is not None
        envelope, upstream_reply = server.envelope, server.transaction.rcpt(rcpt)

        async def reply() -> str:
            answer = await upstream_reply
            if answer.ok:
                envelope.rcpt_tos.append(rcpt.address)
            return str(answer)

        return reply()

    async def handle_RSET(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        await server.end_transaction(aborted=True)
        return "250 2.0.0 Ok"

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        transaction = server.transaction
        if transaction is None:
            return "503 5.5.1 Error: need MAIL command"
        started = time.monotonic()
        reply = None
        try:
            raw = envelope.original_content or b""
            envelope.content = envelope.original_content = None  # let the big buffers go early
            prepared = await self.relay.pipeline.prepare(raw, envelope)
            del raw
            if prepared.refusal is not None:
                log.info("smtp refused %s: %s", prepared.log_fields(), prepared.refusal)
                return prepared.refusal
            pieces = [self._trace(server, session, envelope), prepared.message]
            reply = await transaction.data(pieces)
            await self.relay.pipeline.forwarded(prepared, reply)
            log.info(
                "smtp from=<%s> rcpts=%d size=%d %s upstream=%r ms=%d",
                envelope.mail_from,
                len(envelope.rcpt_tos),
                sum(map(len, pieces)),
                prepared.log_fields(),
                str(reply),
                (time.monotonic() - started) * 1000,
            )
        except Exception:
            log.exception("smtp transaction failed before the upstream answered; sender will retry")
        finally:
            await server.end_transaction(aborted=reply is None or not reply.ok)
        return data_reply(reply)

    async def handle_exception(self, error: Exception) -> str:
        """A command that failed on the relay's side. A client's broken TLS handshake (or its
        connection gone) is logged once a minute at most, with no traceback: clients cause
        those at will; anything else is a bug, logged in full."""
        if isinstance(error, ssl.SSLError | ConnectionError | TLSSetupException):
            self.relay.refusals.event(f"SMTP session ended: {type(error).__name__}: {error}")
        else:
            log.exception("SMTP command failed")
        return "500 5.3.0 Error: the command could not be processed"

    def _trace(self, server: RelaySMTP, session: Session, envelope: Envelope) -> bytes:
        if not self.relay.settings.smtp.received_header:
            return b""
        helo = "".join(c for c in (session.host_name or "unknown") if 32 < ord(c) < 127)[:100]
        line = (
            f"Received: from {helo} ([{server.peer}])\r\n"
            f"\tby {self.relay.hostname} (clickrelay) with {_protocol(session, envelope)}"
            f" id {secrets.token_hex(6)};\r\n\t{formatdate(localtime=False, usegmt=True)}\r\n"
        )
        return line.encode("ascii", "replace")


def _protocol(session: Session, envelope: Envelope) -> str:
    """The WITH of the Received line (RFC 3848, RFC 6531 3.7.3): ESMTP, ESMTPS, UTF8SMTPSA..."""
    if not session.extended_smtp:
        return "SMTP"
    protocol = ("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP") + ("S" if session.ssl else "")
    return protocol + ("A" if session.authenticated else "")


def data_reply(reply: Reply | None) -> str:
    """The client's answer to DATA: 250 with the upstream's text, the same 5xx, or else 451."""
    if reply is None:
        return "451 4.3.0 Local error in processing, try again later"
    if reply.ok:
        return str(Reply(250, reply.text))
    if 500 <= reply.code < 600 or reply.code == 451:
        return str(reply)
    return f"451 4.4.0 Upstream deferred the message, try again later ({reply.first_line})"


def unstuffed(data: bytearray) -> bytes:
    """SMTP transparency undone: a dot that starts a line is dropped (the first line too)."""
    unstuffed = bytes(data).replace(b"\r\n.", b"\r\n")
    return unstuffed[1:] if unstuffed[:1] == b"." else unstuffed


def canonical(message: bytes) -> bytes:
    """The message as the relay reads it and writes it on, made so once at the door:

    - every line end CRLF, the only one the SMTP wire knows, so that a line end means the same
      when the headers are read as when the message is written (a bare CR must not hide a
      header from the control-header check that the upstream would then see as one);
    - no NUL characters: a lenient upstream could take one for the end of a line and so find
      another end of the data than the relay did. No mail needs one (RFC 5321 and 2045 allow
      none in 7bit and 8bit data; base64 and quoted-printable never hold one), and removing
      them, as Postfix's message_strip_characters does, keeps the rest of the message flowing.
    """
    if b"\0" in message:
        log.warning("removed %d NUL character(s) from a message", message.count(b"\0"))
        message = message.replace(b"\0", b"")
    return crlf(message)


def _peer_address(peer: object) -> str | None:
    """The client's IP address as text (an IPv4-mapped IPv6 address as IPv4), or None."""
    if not isinstance(peer, tuple):
        return None
    try:
        ip = ipaddress.ip_address(peer[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
