"""Start the SMTP relay and/or the HTTP service, run until SIGTERM/SIGINT, stop gracefully.

`running` is the whole wiring (storage, signer, relay, web service); `serve` runs it until a
stop signal. Tests start servers with `running` too, so they test what production runs.

At start the soft file descriptor limit is raised to the hard one, and connection caps that
would still need more descriptors than that are scaled down to fit (one log line says so), so
that a flood of connections meets the caps, not "too many open files". Should descriptors run
out anyway, asyncio's accept failures are logged at most once a minute, without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import resource
import secrets
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from clickrelay import secretfile
from clickrelay.config import ReportsSettings, Settings
from clickrelay.events import signing
from clickrelay.events.webhooks import NodeLoad, Webhooks
from clickrelay.limits import LogThrottle
from clickrelay.retention import Retention
from clickrelay.smtp.pipeline import MessagePipeline
from clickrelay.smtp.relay import RelayServer
from clickrelay.smtp.upstream import create_upstream
from clickrelay.storage import PasswordFileError, Store, StoreError, open_store
from clickrelay.storage.base import Erased
from clickrelay.tracking.tokens import Signer, load_secret
from clickrelay.web.app import LimitedSite, create_app, limited_site, runner
from clickrelay.web.recorder import ClickRecorder

log = logging.getLogger("clickrelay")
SWITCH_INTERVAL = 0.001  # seconds

FD_RESERVE = 100  # descriptors beyond the connection caps: storage, logs, lingering refusals
ACCEPT_FAILURE = "socket.accept() out of system resource"  # asyncio's message


EXIT_USAGE = 2  # the exit status for a mistake the user must fix


class StartupError(Exception):
    """A problem the user must fix before the service can start (exit status 2)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")


@dataclass
class Parts:
    smtp: bool = True
    web: bool = True
    jobs: bool = True  # with web: webhook delivery, retention (one worker of several runs them)
    reuse_port: bool = False  # listen with SO_REUSEPORT, beside other workers


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


@dataclass
class WebService:
    runner: web.AppRunner
    site: LimitedSite
    recorder: ClickRecorder

    @property
    def port(self) -> int:
        return self.runner.addresses[0][1]


@dataclass
class Node:
    """What `running` started: the parts asked for, on one store."""

    settings: Settings
    store: Store
    signer: Signer
    relay: RelayServer | None = None
    web: WebService | None = None
    webhooks: Webhooks | None = None
    retention: Retention | None = None


async def serve(settings: Settings, parts: Parts, ready: Callable[[], None] | None = None) -> None:
    """Run until a stop signal; raise StartupError for what the user must fix. `ready` is
    called once every part listens."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    quiet_accept_failures(loop)
    # Big messages are rewritten in worker threads; the loop (every SMTP session, click and
    # /healthz) gets the interpreter back from them within a millisecond, not Python's 5 ms.
    sys.setswitchinterval(SWITCH_INTERVAL)
    return_big_buffers()
    settings = fit_caps(settings, parts, raise_file_limit())
    async with running(settings, parts):
        if ready is not None:
            ready()
        await stop.wait()
        log.info("stopping")
    log.info("stopped")


@contextlib.asynccontextmanager
async def running(
    settings: Settings, parts: Parts, store: Store | None = None
) -> AsyncIterator[Node]:
    """The parts started on the configured storage (or on `store`, left open at the end);
    stopped in reverse order when the block ends."""
    async with contextlib.AsyncExitStack() as stack:
        if store is None:
            store = await _open_store(settings, stack)
        node = Node(settings, store, _signer(settings, store))
        if parts.web:
            node.web = await _start_web(node, stack, parts.reuse_port)
            if settings.webhooks and parts.jobs:
                node.webhooks = await _start_webhooks(node, node.web.recorder, stack)
            if settings.privacy.retention_days and parts.jobs:
                node.retention = Retention(node.store, settings.privacy.retention_days)
                node.retention.start()
                stack.push_async_callback(node.retention.close)
        if parts.smtp:
            node.relay = await _start_smtp(node, stack, parts.reuse_port)
        yield node


async def migrate(settings: Settings) -> None:
    """Apply the storage schema (as every node also does at start) and close it."""
    async with contextlib.AsyncExitStack() as stack:
        await _open_store(settings, stack)


async def erase_contact(settings: Settings, contact_id: str | None, email: str | None) -> Erased:
    """`clickrelay erase`: every trace of one contact removed, counts kept."""
    async with contextlib.AsyncExitStack() as stack:
        store = await _open_store(settings, stack)
        return await store.erase_contact(contact_id, email)


async def _open_store(settings: Settings, stack: contextlib.AsyncExitStack) -> Store:
    key = "storage.database" if settings.storage.url is None else "storage.url"
    try:
        store = await open_store(settings.storage)
    except PasswordFileError as exc:
        raise StartupError("storage.password_file", str(exc)) from None
    except StoreError as exc:
        raise StartupError(key, str(exc)) from None
    stack.push_async_callback(store.close)
    log.info("storage: %s", settings.storage.url or settings.storage.database)
    return store


def _signer(settings: Settings, store: Store) -> Signer:
    try:
        secret = load_secret(settings.tracking.secret_file)
    except (OSError, ValueError) as exc:
        raise StartupError("tracking.secret_file", str(exc)) from None
    return Signer(secret, store.instance_id)


async def _start_webhooks(
    node: Node, recorder: ClickRecorder, stack: contextlib.AsyncExitStack
) -> Webhooks:
    """The web nodes deliver webhooks (each event from one node at a time), giving way to
    the redirects when the node is saturated with them."""
    keys = {}
    for n, endpoint in enumerate(node.settings.webhooks):
        try:
            keys[endpoint.url] = signing.load_key(endpoint.secret_file)
        except (OSError, ValueError) as exc:
            raise StartupError(f"webhooks[{n}].secret_file", str(exc)) from None
    webhooks = Webhooks(node.store, node.settings, keys, NodeLoad(lambda: recorder.received))
    await webhooks.start()
    stack.push_async_callback(webhooks.close)
    return webhooks


async def _start_smtp(
    node: Node, stack: contextlib.AsyncExitStack, reuse_port: bool
) -> RelayServer:
    settings = node.settings
    upstream = create_upstream(settings.upstream, settings.smtp.hostname or "localhost")
    tls = _tls_context("smtp", settings.smtp.tls_cert, settings.smtp.tls_key)
    pipeline = MessagePipeline(settings, node.store, node.signer)
    relay = RelayServer(settings, upstream, pipeline, tls)
    await _bind("smtp.listen", relay.start(reuse_port))
    stack.push_async_callback(relay.stop)
    if settings.upstream.url.scheme == "maildir":
        log.warning(
            "NO MAIL LEAVES THIS MACHINE: the upstream is the Maildir %s. "
            "Run with --config and set [upstream] url to relay for real.",
            settings.upstream.url.path,
        )
    log.info("smtp relay listening on %s, upstream %s", settings.smtp.listen, settings.upstream.url)
    return relay


async def _start_web(node: Node, stack: contextlib.AsyncExitStack, reuse_port: bool) -> WebService:
    settings = node.settings
    recorder = ClickRecorder(node.store)
    stack.push_async_callback(recorder.close)  # after the runner: in-flight clicks get stored
    app = create_app(settings, node.store, node.signer, recorder)
    web_settings = settings.web
    app_runner = runner(app, web_settings.idle_timeout_seconds)
    await app_runner.setup()
    stack.push_async_callback(app_runner.cleanup)
    tls = _tls_context("web", web_settings.tls_cert, web_settings.tls_key)
    site = limited_site(app_runner, web_settings, tls, reuse_port)
    await _bind("web.listen", site.start())
    log.info(
        "http service listening on %s, public URL %s (connections: at most %s, %s per client; "
        "idle timeout %g s)", web_settings.listen, web_settings.public_url,
        web_settings.max_connections or "no cap",
        web_settings.max_connections_per_client or "no cap", web_settings.idle_timeout_seconds,
    )  # fmt: skip
    if not settings.reports.enabled:
        log.warning("report pages and API are off (403): set [reports] password or password_hash")
    return WebService(app_runner, site, recorder)


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


# ---------------------------------------------------------------- memory

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
BIG_BUFFER = 1 << 20  # bytes


def return_big_buffers() -> None:
    """Buffers of BIG_BUFFER bytes or more (a big message, its decoded part) are mapped from
    the kernel and given back when freed. glibc otherwise raises that threshold after each big
    free, up to 32 MiB, and keeps what was freed in its heap: the peak of one 30 MB message
    would stay the process's size, and the next one's would come on top of it. (Not glibc:
    left as it is.)"""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, BIG_BUFFER)


# ---------------------------------------------------------------- file descriptors


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (no privilege needed); the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("file descriptors: cannot raise the limit from %d to %d: %s",
                        soft, target, exc)  # fmt: skip
            return soft
        log.info("file descriptors: limit raised from %d to %d", soft, target)
        return target
    return soft


@dataclass(frozen=True)
class _Cap:
    """A connection cap and the descriptors each of its connections may take."""

    section: str
    value: int
    weight: int  # an SMTP client connection also opens one upstream


def fit_caps(settings: Settings, parts: Parts, limit: int) -> Settings:
    """The settings with connection caps scaled down so that every capped connection (web
    max_connections, plus 2 x smtp max_connections: each has an upstream connection too) and
    FD_RESERVE fit in `limit` descriptors; unchanged when they fit. A cap of 0 (none) is left
    alone: the accept-failure handler covers it."""
    caps = _caps(settings, parts)
    need = sum(cap.value * cap.weight for cap in caps)
    log.debug("file descriptors: limit %d; the connection caps need %d, plus %d in reserve",
              limit, need, FD_RESERVE)  # fmt: skip
    if not need or need + FD_RESERVE <= limit:
        return settings
    factor = max(limit - FD_RESERVE, 0) / need
    changes = [(cap, max(1, int(cap.value * factor))) for cap in caps]
    log.warning(
        "file descriptors: the limit is %d, but the connection caps need %d plus %d in reserve; "
        "scaled down to fit: %s (raise LimitNOFILE / ulimit -n to keep them)",
        limit, need, FD_RESERVE,
        ", ".join(f"{cap.section}.max_connections {cap.value} -> {new}" for cap, new in changes),
    )  # fmt: skip
    for cap, new in changes:
        section = getattr(settings, cap.section)
        settings = replace(settings, **{cap.section: replace(section, max_connections=new)})
    return settings


def _caps(settings: Settings, parts: Parts) -> list[_Cap]:
    caps = [
        _Cap("web", settings.web.max_connections, 1) if parts.web else None,
        _Cap("smtp", settings.smtp.max_connections, 2) if parts.smtp else None,
    ]
    return [cap for cap in caps if cap is not None and cap.value > 0]


def quiet_accept_failures(loop: asyncio.AbstractEventLoop) -> None:
    """Out of descriptors, asyncio reports every failed accept (retrying each second) with a
    traceback; this logs it as one line at most once a minute. Anything else goes on to the
    handler there was before."""
    throttle = LogThrottle(log, "failed accepts", level=logging.ERROR)
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if _late_accept_retry(context):
            return
        if context.get("message") != ACCEPT_FAILURE or not isinstance(exc, OSError):
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        name = errno.errorcode.get(exc.errno or 0, "?")
        throttle.event(
            f"cannot accept new connections: {exc.strerror} ({name}); retrying each second. "
            "Raise LimitNOFILE (ulimit -n) or lower the connection caps"
        )

    loop.set_exception_handler(handler)


def _late_accept_retry(context: dict[str, Any]) -> bool:
    """asyncio schedules a retry for every accept that failed (up to the backlog's worth); a
    retry that comes after its listener was closed, at shutdown, fails on the closed socket
    (ValueError: Invalid file descriptor: -1). Nothing is lost: there is nothing to report."""
    callback = getattr(context.get("handle"), "_callback", None)
    return getattr(callback, "__name__", "") == "_start_serving" and isinstance(
        context.get("exception"), ValueError
    )
