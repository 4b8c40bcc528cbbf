"""A small ESMTP client for the upstream, over asyncio streams.

Commands can be written ahead of their replies, which are then read in order (PIPELINING,
RFC 2920): aiosmtplib reads one reply per command and drops what arrives beyond it, so it could
not. The rest is what a relay needs of a client and no more: the greeting, EHLO (HELO where EHLO
is refused), implicit TLS or STARTTLS, AUTH PLAIN or LOGIN, and replies kept line by line.
Whatever goes wrong with the connection raises `ClientError` (or OSError, ssl.SSLError,
TimeoutError from below it): the caller answers its own client with a 4xx.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from dataclasses import dataclass

MAX_REPLY_LINE = 4096  # octets (RFC 5321 allows 512; generous, but bounded)
MAX_REPLY_LINES = 100
NEWLINE = "\n"  # (no backslash inside an f-string's braces before Python 3.12)


class ClientError(Exception):
    """The upstream broke off, refused to start a session, or said something unreadable."""


@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # the text of each line (enhanced status code included), lines joined by "\n"

    def __str__(self) -> str:
        """The reply as the SMTP wire carries it: "550-first\r\n550 last"."""
        *first, last = self.text.split("\n")
        return "".join(f"{self.code}-{line}\r\n" for line in first) + f"{self.code} {last}"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def first_line(self) -> str:
        return f"{self.code} {self.text.split(NEWLINE, 1)[0]}"


@dataclass(frozen=True)
class Login:
    username: str
    password: str


class Connection:
    """One session with the upstream. `send` writes a command at once; `reply` reads the
    next reply, each within `timeout` seconds."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        self.extensions: dict[str, str] = {}  # EHLO keyword (lower case) -> its parameters

    @property
    def is_connected(self) -> bool:
        return not (self._writer.is_closing() or self._reader.at_eof())

    def send(self, verb: bytes, argument: bytes = b"") -> None:
        if self._writer.is_closing():
            raise ClientError("Connection lost")
        self._writer.write(verb + b" " + argument + b"\r\n" if argument else verb + b"\r\n")

    async def command(self, verb: bytes, argument: bytes = b"") -> Reply:
        self.send(verb, argument)
        return await self.reply()

    async def reply(self) -> Reply:
        async with asyncio.timeout(self.timeout):
            code, lines = -1, []
            while len(lines) < MAX_REPLY_LINES:
                line = await self._line()
                if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                    raise ClientError(f"malformed reply {_printable(line)!r}")
                if lines and int(line[:3]) != code:
                    raise ClientError("malformed reply: its lines have different codes")
                code = int(line[:3])
                lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
                if line[3:4] != b"-":
                    return Reply(code, "\n".join(lines))
            raise ClientError(f"reply of more than {MAX_REPLY_LINES} lines")

    async def _line(self) -> bytes:
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise ClientError("Connection lost") from None
        except asyncio.LimitOverrunError:
            raise ClientError(f"reply line longer than {MAX_REPLY_LINE} octets") from None
        return line.rstrip(b"\r\n")

    async def write(self, data: bytes | memoryview) -> None:
        """Write `data` and wait (within `timeout`) while the socket is behind: a big message
        is never buffered whole a second time, and an upstream that stops reading times out."""
        self._writer.write(data)
        async with asyncio.timeout(self.timeout):
            await self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    async def quit(self) -> None:
        try:
            await self.command(b"QUIT")
        finally:
            self.close()

    async def _hello(self, local_hostname: str) -> None:
        reply = await self.command(b"EHLO", local_hostname.encode("ascii", "replace"))
        if reply.ok:
            self.extensions = dict(_keyword(line) for line in reply.text.split("\n")[1:])
            return
        self.extensions = {}
        expect(await self.command(b"HELO", local_hostname.encode("ascii", "replace")), 250)

    async def _start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        if "starttls" not in self.extensions:
            raise ClientError("STARTTLS is not offered")
        expect(await self.command(b"STARTTLS"), 220)
        await self._writer.start_tls(context, server_hostname=server_hostname)

    async def _login(self, login: Login) -> None:
        mechanisms = self.extensions.get("auth", "").upper().split()
        user, password = login.username.encode(), login.password.encode()
        if "PLAIN" in mechanisms:
            expect(
                await self.command(b"AUTH", b"PLAIN " + _b64(b"\0" + user + b"\0" + password)), 235
            )
        elif "LOGIN" in mechanisms:
            expect(await self.command(b"AUTH", b"LOGIN"), 334)
            expect(await self.command(_b64(user)), 334)
            expect(await self.command(_b64(password)), 235)
        else:
            raise ClientError("no AUTH mechanism offered that the relay knows (PLAIN, LOGIN)")


async def connect(
    host: str,
    port: int,
    *,
    local_hostname: str,
    timeout_seconds: float,
    tls: ssl.SSLContext | None = None,
    starttls: ssl.SSLContext | None = None,
    login: Login | None = None,
) -> Connection:
    """A session ready for MAIL: greeted, EHLO'd (again after STARTTLS) and logged in."""
    try:
        async with asyncio.timeout(timeout_seconds):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls, server_hostname=host if tls else None, limit=MAX_REPLY_LINE
            )
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ClientError(f"cannot connect to {host} port {port}: {reason}") from None
    conn = Connection(reader, writer, timeout_seconds)
    try:
        expect(await conn.reply(), 220)
        await conn._hello(local_hostname)
        if starttls is not None:
            await conn._start_tls(starttls, host)
            await conn._hello(local_hostname)
        if login is not None:
            await conn._login(login)
    except BaseException:
        conn.close()
        raise
    return conn


def expect(reply: Reply, code: int) -> None:
    """Raise ClientError (with the upstream's words) unless `reply` has `code`."""
    if reply.code != code:
        raise ClientError(f"{reply.code} {_printable(reply.text.encode())}")


def _keyword(line: str) -> tuple[str, str]:
    keyword, _, parameters = line.partition(" ")
    return keyword.lower(), parameters.strip()


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _printable(data: bytes) -> str:
    text = " ".join(data.decode("ascii", "replace").split())
    return text[:200]
