"""Test helpers: a scriptable real aiosmtpd upstream, a relay on an ephemeral port, clients."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from clickrelay.config import (
    HostPort,
    Settings,
    SmtpSettings,
    StorageSettings,
    TrackingSettings,
    UpstreamSettings,
    UpstreamURL,
    WebSettings,
)
from clickrelay.pipeline import MessagePipeline
from clickrelay.relay import RelayServer
from clickrelay.upstream import create_upstream

LOOPBACK = "127.0.0.1"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


@dataclass
class Script:
    """What the upstream answers. Codes are full reply lines, e.g. '550 5.1.1 no such user'."""

    rcpt: dict[str, str] = field(default_factory=dict)
    data: str | None = None
    data_delay: float = 0.0
    mail: str | None = None


class LenientSMTP(SMTP):
    line_length_limit = 2**24  # like Postfix: long lines are the recipient's business


class ScriptedUpstream:
    """A real aiosmtpd server on 127.0.0.1 that records what it accepted and obeys a `Script`."""

    def __init__(
        self, tls=None, starttls=None, require_auth: tuple[str, str] | None = None
    ) -> None:
        self.script = Script()
        self.received: list[Received] = []
        self.connections = 0
        self.data_started = asyncio.Event()
        self._tls = tls
        self._starttls = starttls
        self._auth = require_auth
        self._server: asyncio.AbstractServer | None = None
        self._protocols: list[SMTP] = []

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, LOOPBACK, port, ssl=self._tls
        )

    def _protocol(self) -> SMTP:
        self.connections += 1
        kwargs = {}
        if self._auth:
            kwargs = dict(
                authenticator=self._authenticate, auth_required=True, auth_require_tls=False
            )
        with warnings.catch_warnings():  # AUTH without STARTTLS is fine for implicit TLS
            warnings.simplefilter("ignore", UserWarning)
            smtp = LenientSMTP(
                self,
                hostname="upstream.test",
                enable_SMTPUTF8=True,
                tls_context=self._starttls,
                **kwargs,
            )
        self._protocols.append(smtp)
        return smtp

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult

        ok = (auth_data.login.decode(), auth_data.password.decode()) == self._auth
        return AuthResult(success=ok)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for smtp in self._protocols:
                if smtp.transport is not None:
                    smtp.transport.close()
            self._server = None

    def drop_connections(self) -> None:
        for smtp in self._protocols:
            if smtp.transport is not None:
                smtp.transport.close()

    async def handle_MAIL(self, server, session, envelope: Envelope, address, options) -> str:
        if self.script.mail:
            return self.script.mail
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(self, server, session, envelope: Envelope, address, options) -> str:
        if address in self.script.rcpt:
            return self.script.rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server, session: Session, envelope: Envelope) -> str:
        self.data_started.set()
        if self.script.data_delay:
            await asyncio.sleep(self.script.data_delay)
        if self.script.data:
            return self.script.data
        self.received.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.received)}"


def relay_settings(tmp_path: Path, upstream_port: int, **smtp_changes) -> Settings:
    """Settings for a relay on an ephemeral loopback port in front of the scripted upstream."""
    return Settings(
        smtp=replace(
            SmtpSettings(listen=HostPort(LOOPBACK, 0), hostname="relay.test"), **smtp_changes
        ),
        upstream=UpstreamSettings(
            url=UpstreamURL("smtp", LOOPBACK, upstream_port), timeout_seconds=5
        ),
        web=WebSettings(listen=HostPort(LOOPBACK, 0), public_url="http://click.test"),
        storage=StorageSettings(database=tmp_path / "clickrelay.sqlite3"),
        tracking=TrackingSettings(secret_file=tmp_path / "secret"),
    )


@contextlib.asynccontextmanager
async def start_relay(settings: Settings, tls=None) -> AsyncIterator[RelayServer]:
    upstream = create_upstream(settings.upstream, "relay.test")
    server = RelayServer(settings, upstream, MessagePipeline(settings), tls)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class RawClient:
    """A line-level SMTP client: sends exactly the bytes it is given, returns raw replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(LOOPBACK, port, limit=2**20)
        client = cls(reader, writer)
        await client.reply()  # greeting
        return client

    async def reply(self, timeout: float = 10) -> str:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), timeout)).decode()
            lines.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def cmd(self, line: str | bytes, timeout: float = 10) -> str:
        data = line.encode() if isinstance(line, str) else line
        self.writer.write(data + b"\r\n")
        return await self.reply(timeout)

    async def send(
        self, mail_from: str, rcpts: list[str], message: bytes, timeout: float = 10
    ) -> list[str]:
        """A whole transaction; returns every reply from MAIL to the end of DATA."""
        replies = [await self.cmd("EHLO client.test")]
        replies.append(await self.cmd(f"MAIL FROM:<{mail_from}>"))
        replies += [await self.cmd(f"RCPT TO:<{r}>") for r in rcpts]
        data = await self.cmd("DATA")
        replies.append(data)
        if data.startswith("354"):
            replies.append(await self.cmd(wire(message) + b".", timeout))
        return replies

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def wire(message: bytes) -> bytes:
    """Dot-stuff a CRLF message for DATA (without the final dot line)."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed if stuffed.endswith(b"\r\n") else stuffed + b"\r\n"


def message(headers: dict[str, str] | None = None, body: str = "Hello.\r\n") -> bytes:
    lines = {
        "From": "sender@example.com",
        "To": "rcpt@example.com",
        "Subject": "test",
        "Message-ID": "<m1@example.com>",
    }
    lines.update(headers or {})
    head = "".join(f"{k}: {v}\r\n" for k, v in lines.items())
    return (head + "\r\n" + body).encode()


async def send(port: int, message_bytes: bytes, rcpts=("rcpt@example.com",), sender="s@x.test"):
    client = await RawClient.connect(port)
    try:
        return await client.send(sender, list(rcpts), message_bytes)
    finally:
        await client.close()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """`python -m clickrelay ...` as a child process; waits until it logs `ready_text`."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.args = args
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task | None = None

    async def start(self, ready_text: str, timeout: float = 30) -> None:
        import sys

        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clickrelay",
            *self.args,
            cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        ready = asyncio.Event()

        async def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            async for line in self.proc.stdout:
                self.log.append(line.decode(errors="replace").rstrip())
                if ready_text in self.log[-1]:
                    ready.set()

        self._reader = asyncio.create_task(read())
        await asyncio.wait(
            [asyncio.create_task(ready.wait()), self._reader],
            timeout=timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not ready.is_set():
            raise RuntimeError("service did not start:\n" + "\n".join(self.log))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None and self._reader is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def write_config(
    path: Path, upstream_port: int, smtp_port: int, web_port: int, extra: str = ""
) -> Path:
    path.write_text(
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\nhostname = "relay.test"\n'
        f"shutdown_timeout_seconds = 3\n"
        f'[upstream]\nurl = "smtp://127.0.0.1:{upstream_port}"\ntimeout_seconds = 10\n'
        f'[web]\nlisten = "127.0.0.1:{web_port}"\npublic_url = "http://click.test"\n'
        f'[storage]\ndatabase = "{path.parent}/clickrelay.sqlite3"\n'
        f'[tracking]\nsecret_file = "{path.parent}/secret"\n' + extra
    )
    return path
