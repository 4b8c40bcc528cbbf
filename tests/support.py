"""Test helpers: a scriptable real aiosmtpd upstream, a relay on an ephemeral port, clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from email.message import Message
from email.parser import BytesHeaderParser
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session
from ports import LOOPBACK, listening_port
from ports import free_port as free_port  # (tests take it from here)

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
from clickrelay.mail import mime
from clickrelay.service import Parts, running
from clickrelay.smtp.relay import RelayServer
from clickrelay.storage import Store, open_store
from clickrelay.tracking.tokens import Signer

import pg

BROWSER = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0 Safari/537.36"
)


def corpus_path() -> Path:
    """The shared real-world corpus: $CLICKRELAY_CORPUS, else ../shared/corpus of the repo."""
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
    return Path(os.environ.get("CLICKRELAY_CORPUS", default))


def assert_headers_as_the_email_package_reads_them(raw: bytes) -> None:
    """Each entity's headers hold what BytesHeaderParser makes of its header block: the same
    fields, payload, defects (by kind) and everything else a Message keeps."""

    def state(message: Message) -> dict[str, object]:
        found = dict(vars(message))
        found["defects"] = [type(defect) for defect in found["defects"]]
        return found

    for entity in mime.parse(raw).walk():
        expected = BytesHeaderParser().parsebytes(raw[entity.start : entity.body_start])
        expected.set_default_type(entity.headers.get_default_type())
        assert state(entity.headers) == state(expected)


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
        self, tls=None, starttls=None, require_auth: tuple[str, str] | None = None,
        smtputf8: bool = True, eightbitmime: bool = True, pipelining: bool = True,
    ) -> None:  # fmt: skip
        self.script = Script()
        self.pipelining = pipelining  # offer PIPELINING (aiosmtpd reads commands in turn anyway)
        self.smtputf8 = smtputf8  # offer SMTPUTF8 (aiosmtpd then refuses the parameter: 501)
        self.eightbitmime = eightbitmime  # offer 8BITMIME (else aiosmtpd refuses BODY: 555)
        self.received: list[Received] = []
        self.mail_options: list[list[str]] = []  # the parameters of each MAIL it accepted
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
                enable_SMTPUTF8=self.smtputf8,
                decode_data=not self.eightbitmime,
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
        return listening_port(self._server)

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

    async def handle_EHLO(self, server, session, envelope, hostname, responses) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]] if self.pipelining else responses

    async def handle_MAIL(self, server, session, envelope: Envelope, address, options) -> str:
        if self.script.mail:
            return self.script.mail
        self.mail_options.append(list(options))
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


def upstream_on(settings: Settings, port: int, timeout_seconds: float) -> Settings:
    """`settings` relaying to the upstream a test serves itself on `port`."""
    upstream = settings.upstream
    url = replace(upstream.url, port=port)
    return replace(settings, upstream=replace(upstream, url=url, timeout_seconds=timeout_seconds))


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
        storage=pg.storage_for(tmp_path),
        tracking=TrackingSettings(secret_file=tmp_path / "secret"),
    )


@dataclass
class RunningRelay:
    server: RelayServer
    store: Store
    signer: Signer

    @property
    def port(self) -> int:
        return self.server.port

    async def resolve(self, tracking_url: str) -> str:
        """The original URL behind a tracking link (via the token and the database)."""
        ids = self.signer.verify(tracking_url.rsplit("/c/", 1)[1])
        assert ids is not None, f"forged or foreign tracking link {tracking_url}"
        link = await self.store.get_link(ids[1])
        assert link is not None
        return link.url


@contextlib.asynccontextmanager
async def start_relay(settings: Settings) -> AsyncIterator[RunningRelay]:
    """The relay as `clickrelay smtp` runs it (service.running)."""
    async with running(settings, Parts(smtp=True, web=False)) as node:
        assert node.relay is not None
        yield RunningRelay(node.relay, node.store, node.signer)


class RawClient:
    """A line-level SMTP client: sends exactly the bytes it is given, returns raw replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, source: str | None = None) -> RawClient:
        """Connected and greeted; `source`: the local address to connect from (127.0.0.2...)."""
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection(
            LOOPBACK, port, limit=2**20, local_addr=local
        )
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
        """EHLO and a whole transaction; returns every reply from EHLO to the end of DATA."""
        replies = [await self.cmd("EHLO client.test")]
        rcpt_args = [f"<{r}>" for r in rcpts]
        return replies + await self.transaction(f"<{mail_from}>", rcpt_args, message, timeout)

    async def transaction(
        self, mail: str, rcpts: list[str], message: bytes | None, timeout: float = 10
    ) -> list[str]:
        """MAIL FROM:`mail`, RCPT TO: each of `rcpts` (written as given, parameters too), and
        DATA unless `message` is None: every reply from MAIL on."""
        replies = [await self.cmd(f"MAIL FROM:{mail}".encode())]
        replies += [await self.cmd(f"RCPT TO:{r}".encode()) for r in rcpts]
        if message is None:
            return replies
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


def growth(func, small, large) -> float:
    """How many times longer `func(large)` takes than `func(small)`: each the best of three runs
    (the others are noise from a busy machine). Linear work on 8x the input: about 8."""
    import time

    def best(argument) -> float:
        fastest = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            func(argument)
            fastest = min(fastest, time.perf_counter() - started)
        return fastest

    return best(large) / max(best(small), 1e-4)


class ServiceProcess:
    """`python -m clickrelay ...` as a child process; waits until it logs `ready_text`."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.args = args
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task | None = None
        self._new_line = asyncio.Event()

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
                self._new_line.set()
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

    async def wait_for_log(self, text: str, count: int = 1, timeout: float = 30) -> None:
        """Until `count` lines of the log contain `text` (bounded)."""
        async with asyncio.timeout(timeout):
            while sum(text in line for line in self.log) < count:
                self._new_line.clear()
                await self._new_line.wait()

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
    path: Path,
    upstream_port: int,
    smtp_port: int,
    web_port: int,
    extra: str = "",
    storage: StorageSettings | None = None,
) -> Path:
    """A config for child processes; `storage` (default: new storage of the test backend)."""
    storage = storage or pg.storage_for(path.parent)
    where = f'url = "{storage.url.url}"' if storage.url else f'database = "{storage.database}"'
    path.write_text(
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\nhostname = "relay.test"\n'
        f"shutdown_timeout_seconds = 3\n"
        f'[upstream]\nurl = "smtp://127.0.0.1:{upstream_port}"\ntimeout_seconds = 10\n'
        f'[web]\nlisten = "127.0.0.1:{web_port}"\npublic_url = "http://click.test"\n'
        f"[storage]\n{where}\n"
        f'[tracking]\nsecret_file = "{path.parent}/secret"\n' + extra
    )
    return path


async def assert_faithful(
    original: str, rewritten: str, relay: RunningRelay, charset: str = "utf-8"
) -> int:
    """`rewritten` is `original` with tracked hrefs replaced and opt-out attributes removed.

    Every link of the rewritten HTML leads where the original one did (tracking links are
    resolved through the token and the database, to the URL a browser opens from a document in
    `charset`), and all text between links is identical. Returns the number of tracking links.
    """
    from clickrelay.tracking.links import find_links, splice
    from clickrelay.tracking.urls import encode_query

    before = find_links(original)
    expected = splice(original, [(link, None) for link in before])  # opt-out attributes gone
    old, new = find_links(expected), find_links(rewritten)
    assert len(old) == len(new)
    tracked, pos_old, pos_new = 0, 0, 0
    for o, n in zip(old, new, strict=True):
        assert expected[pos_old : o.start] == rewritten[pos_new : n.start]
        if n.url.startswith(relay.server.settings.web.public_url + "/c/") and o.url != n.url:
            assert await relay.resolve(n.url) == encode_query(o.url, charset)
            tracked += 1
        else:
            assert n.url == o.url
        pos_old, pos_new = o.end, n.end
    assert expected[pos_old:] == rewritten[pos_new:]
    return tracked


def basic_auth(user: str = "admin", password: str = "pw") -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class RunningWeb:
    """The real aiohttp app on 127.0.0.1 with a real SQLite store, and an HTTP client."""

    settings: Settings
    store: Store
    signer: Signer
    recorder: object
    base: str
    session: object
    sent: dict = field(default_factory=dict)  # send id -> send time, to sign tokens

    async def send(
        self, campaign="c1", contact="42", urls=("https://example.com/a",),
        sent_at: float | None = None, **fields,
    ) -> tuple[int, dict[str, int]]:  # fmt: skip
        """Record a tracked send (as the relay would) of unlabelled links; its id and its link
        ids by URL."""
        import time

        from clickrelay.storage.sqlite import NewSend

        sent_at = time.time() - 3600 if sent_at is None else sent_at
        recorded = await self.store.record_send(NewSend(
            campaign_key=campaign, campaign_name=fields.get("name"), campaign_type="standard",
            contact_id=contact, email=fields.get("email"), message_id=None, decision="tracked",
            tracked_links=[(url, None) for url in urls], untracked=fields.get("untracked", {}),
            sent_at=sent_at,
        ))  # fmt: skip
        self.sent[recorded.send_id] = sent_at
        return recorded.send_id, {url: id_ for (url, _), id_ in recorded.link_ids.items()}

    def token(self, send_id: int, link_id: int) -> str:
        return self.signer.sign(send_id, link_id, self.sent.get(send_id, 0.0))

    async def get(self, path: str, **kwargs):
        kwargs.setdefault("allow_redirects", False)
        async with self.session.get(self.base + path, **kwargs) as response:
            await response.read()
            return response

    async def api(self, path: str):
        async with self.session.get(self.base + path, headers=basic_auth()) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def click(self, send_id: int, link_id: int, method: str = "GET", agent: str = BROWSER):
        async with self.session.request(
            method, f"{self.base}/c/{self.token(send_id, link_id)}",
            headers={"User-Agent": agent}, allow_redirects=False,
        ) as response:  # fmt: skip
            await response.read()
            return response


@contextlib.asynccontextmanager
async def start_web(settings: Settings, store_wrapper=None) -> AsyncIterator[RunningWeb]:
    """The web service as `clickrelay web` runs it (service.running); `store_wrapper` wraps
    its store (to count or fail calls)."""
    import aiohttp

    async with contextlib.AsyncExitStack() as stack:
        store = wrapped = None
        if store_wrapper is not None:
            store = await open_store(settings.storage)
            stack.push_async_callback(store.close)
            wrapped = store_wrapper(store)
        node = await stack.enter_async_context(
            running(settings, Parts(smtp=False, web=True), store=wrapped)
        )
        assert node.web is not None
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield RunningWeb(
            settings, store or node.store, node.signer, node.web.recorder,
            f"http://{LOOPBACK}:{node.web.port}", session,
        )  # fmt: skip
