"""Start the SMTP relay and/or the HTTP service, run until SIGTERM/SIGINT, stop gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import signal
import ssl
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web as aioweb

from clickrelay import secretfile
from clickrelay.clicks import ClickRecorder
from clickrelay.config import ReportsSettings, Settings
from clickrelay.pipeline import MessagePipeline
from clickrelay.relay import RelayServer
from clickrelay.store import SQLiteStore, StoreError, open_store
from clickrelay.tokens import Signer, load_secret
from clickrelay.upstream import create_upstream
from clickrelay.web import create_app, runner

log = logging.getLogger("clickrelay")


class StartupError(Exception):
    """A problem the user must fix before the service can start (exit status 2)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")


@dataclass
class Parts:
    smtp: bool = True
    web: bool = True


def prepare_embedded(settings: Settings, data_dir: Path) -> Settings:
    """For the no-config mode: create the data dir and the admin password, print how to log in."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = secretfile.read_or_create(
        data_dir / "admin-password", lambda: secrets.token_urlsafe(18).encode()
    )
    reports = ReportsSettings(username="admin", password=password.decode().strip())
    print(
        f"clickrelay: reports at {settings.web.public_url}/reports "
        f"(user admin, password in {data_dir / 'admin-password'}: {reports.password})",
        flush=True,
    )
    return replace(settings, reports=reports)


async def serve(settings: Settings, parts: Parts) -> None:
    """Run until a stop signal; raise StartupError for what the user must fix."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        store = await _open_store(settings, stack)
        signer = _signer(settings, store)
        if parts.web:
            await _start_web(settings, store, signer, stack)
        if parts.smtp:
            await _start_smtp(settings, store, signer, stack)
        await stop.wait()
        log.info("stopping")
    log.info("stopped")


async def _open_store(settings: Settings, stack: contextlib.AsyncExitStack) -> SQLiteStore:
    try:
        store = await open_store(settings.storage.database, settings.storage.synchronous)
    except StoreError as exc:
        raise StartupError("storage.database", str(exc)) from None
    stack.push_async_callback(store.close)
    return store


def _signer(settings: Settings, store: SQLiteStore) -> Signer:
    try:
        secret = load_secret(settings.tracking.secret_file)
    except (OSError, ValueError) as exc:
        raise StartupError("tracking.secret_file", str(exc)) from None
    return Signer(secret, store.instance_id)


async def _start_smtp(
    settings: Settings, store: SQLiteStore, signer: Signer, stack: contextlib.AsyncExitStack
) -> None:
    upstream = create_upstream(settings.upstream, settings.smtp.hostname or "localhost")
    tls = _tls_context("smtp", settings.smtp.tls_cert, settings.smtp.tls_key)
    pipeline = MessagePipeline(settings, store, signer)
    relay = RelayServer(settings, upstream, pipeline, tls)
    await _bind("smtp.listen", relay.start())
    stack.push_async_callback(relay.stop)
    if settings.upstream.url.scheme == "maildir":
        log.warning(
            "NO MAIL LEAVES THIS MACHINE: the upstream is the Maildir %s. "
            "Run with --config and set [upstream] url to relay for real.",
            settings.upstream.url.path,
        )
    log.info("smtp relay listening on %s, upstream %s", settings.smtp.listen, settings.upstream.url)


async def _start_web(
    settings: Settings, store: SQLiteStore, signer: Signer, stack: contextlib.AsyncExitStack
) -> None:
    recorder = ClickRecorder(store)
    stack.push_async_callback(recorder.close)  # after the runner: in-flight clicks get stored
    app = create_app(settings, store, signer, recorder)
    app_runner = runner(app)
    await app_runner.setup()
    stack.push_async_callback(app_runner.cleanup)
    listen = settings.web.listen
    tls = _tls_context("web", settings.web.tls_cert, settings.web.tls_key)
    site = aioweb.TCPSite(app_runner, listen.host, listen.port, ssl_context=tls)
    await _bind("web.listen", site.start())
    log.info("http service listening on %s, public URL %s", listen, settings.web.public_url)
    if not settings.reports.enabled:
        log.warning("report pages and API are off (403): set [reports] password or password_hash")


async def _bind(key: str, starting: object) -> None:
    try:
        await starting  # type: ignore[misc]
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(key, "address already in use") from None
        raise StartupError(key, exc.strerror or str(exc)) from None


def _tls_context(section: str, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"{section}.tls_key", f"cannot load {cert} / {key}: {exc}") from None
    return context
