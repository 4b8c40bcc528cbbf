"""The SMTP relay: an aiosmtpd listener whose every answer mirrors the upstream's.

Semantics follow Postfix's before-queue proxy (SMTPD_PROXY_README): the upstream transaction opens
when the client sends MAIL, each RCPT gets the upstream's answer, and the reply to DATA is sent only
after the upstream has answered the message. There is no queue, so nothing is acknowledged that the
upstream has not acknowledged. What happens to the content in between is the pipeline's business.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import secrets
import socket
import ssl
import time
from email.utils import formatdate
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from clickrelay import passwords
from clickrelay.config import Settings
from clickrelay.upstream import Reply, Transaction, Upstream

log = logging.getLogger(__name__)


class Pipeline(Protocol):
    """Turns the received message into the one to forward, and reports what it did."""

    async def prepare(self, message: bytes, envelope: Envelope) -> Prepared: ...

    async def forwarded(self, prepared: Prepared, reply: Reply) -> None:
        """Called once the upstream has answered DATA."""


class Prepared(Protocol):
    message: bytes

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
        self.settings = settings
        self.upstream = upstream
        self.pipeline = pipeline
        self.hostname = settings.smtp.hostname or socket.getfqdn()
        self.handler = RelayHandler(self)
        self.connections: set[RelaySMTP] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._tls = tls

    async def start(self) -> None:
        """Bind the listener; OSError (port in use, ...) propagates to the caller."""
        listen = self.settings.smtp.listen
        self._server = await asyncio.get_running_loop().create_server(
            self._new_connection, listen.host, listen.port
        )

    @property
    def port(self) -> int:
        assert self._server is not None
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


class RelaySMTP(SMTP):
    """One client connection. Holds the open upstream transaction, if any."""

    # The stream limit: what a command line may buffer. DATA reads past it (see smtp_DATA).
    line_length_limit = 64 * 1024

    def __init__(self, relay: RelayServer, handler: RelayHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.relay = relay
        self.transaction: Transaction | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self.relay.connections.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.relay.connections.discard(self)
        if self.transaction is not None:
            asyncio.get_running_loop().create_task(self.end_transaction(aborted=True))
        super().connection_lost(error)

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
        if content is None:
            status = "552 5.3.4 Message exceeds the fixed maximum message size"
        else:
            self.envelope.content = self.envelope.original_content = content
            status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def _read_content(self) -> bytes | None:
        """The message up to the lone dot, dot-unstuffed; None if it exceeded the size limit
        (read to its end all the same, so that the session stays in step)."""
        data = bytearray()
        limit = self.data_size_limit
        too_big = False
        line_start = True  # only a dot after CRLF is special (RFC 5321 4.5.2)
        after_cr = False  # the previous piece ended in CR: a lone LF now ends a CRLF line
        while True:
            try:
                piece = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                # A very long line: take what is buffered, which stops short of the LF (so a
                # CRLF can come in two pieces).
                piece = await self._reader.read(exc.consumed)
            if line_start and piece == b".\r\n":
                return None if too_big else bytes(data)
            if line_start and piece[:1] == b".":
                piece = piece[1:]
            line_start = piece.endswith(b"\r\n") or (after_cr and piece == b"\n")
            after_cr = piece.endswith(b"\r")
            if not too_big:
                data += piece
                too_big = bool(limit) and len(data) > limit
                if too_big:
                    data = bytearray()  # let the memory go now

    # AUTH: aiosmtpd's built-in PLAIN/LOGIN call a synchronous authenticator, but checking a
    # password hash takes tens of milliseconds, so these variants check it in a worker thread.

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
        hashed = self.relay.settings.smtp.users.get(name)
        secret = password.decode("utf-8", "surrogateescape")
        ok = hashed is not None and await asyncio.to_thread(passwords.verify, secret, hashed)
        if not ok:
            log.warning("AUTH failed for user %r from %s", name, _peer_ip(self.session))
        return AuthResult(success=ok, handled=False, auth_data=LoginPassword(login, b""))


class RelayHandler:
    """aiosmtpd hooks; per-connection state lives on the `RelaySMTP` passed as `server`."""

    def __init__(self, relay: RelayServer) -> None:
        self.relay = relay

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if self.relay.closing:
            asyncio.get_running_loop().call_soon(server.close)
            return "421 4.3.2 Service shutting down, try again later"
        if not (session.authenticated or self._allowed(session)):
            log.warning("refused client %s: not in smtp.allowed_clients", _peer_ip(session))
            return "554 5.7.1 Relay access denied: client not allowed"
        if server.transaction is not None:  # EHLO/HELO reset aiosmtpd's state mid-transaction
            await server.end_transaction(aborted=True)
        reply, transaction = await self.relay.upstream.begin(
            address, options, smtputf8="SMTPUTF8" in options
        )
        if transaction is not None:
            server.begin_transaction(transaction)
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return str(reply)

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if server.transaction is None:
            return "503 5.5.1 Error: need MAIL command"
        reply = await server.transaction.rcpt(address, options)
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return str(reply)

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
            pieces = [self._trace(session, envelope), prepared.message]
            del raw
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
            await server.end_transaction(aborted=reply is None)
        return data_reply(reply)

    def _allowed(self, session: Session) -> bool:
        ip = _peer_ip(session)
        if ip is None:
            return False
        return any(ip in net for net in self.relay.settings.smtp.allowed_clients)

    def _trace(self, session: Session, envelope: Envelope) -> bytes:
        if not self.relay.settings.smtp.received_header:
            return b""
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        helo = "".join(c for c in (session.host_name or "unknown") if 32 < ord(c) < 127)[:100]
        line = (
            f"Received: from {helo} ([{_peer_ip(session)}])\r\n"
            f"\tby {self.relay.hostname} (clickrelay) with {protocol} id {secrets.token_hex(6)};"
            f"\r\n\t{formatdate(localtime=False, usegmt=True)}\r\n"
        )
        return line.encode("ascii", "replace")


def data_reply(reply: Reply | None) -> str:
    """The client's answer to DATA: 250 with the upstream's text, the same 5xx, or else 451."""
    if reply is None:
        return "451 4.3.0 Local error in processing, try again later"
    if reply.ok:
        return f"250 {reply.text}"
    if 500 <= reply.code < 600:
        return str(reply)
    if reply.code == 451:
        return str(reply)
    return f"451 4.4.0 Upstream deferred the message, try again later ({reply})"


def _peer_ip(session: Session) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    peer = session.peer
    if not isinstance(peer, tuple):
        return None
    try:
        ip = ipaddress.ip_address(peer[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
