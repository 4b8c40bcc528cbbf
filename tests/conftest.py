"""Shared fixtures: a real aiosmtpd upstream, a relay under test, certificates, the corpus."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from clickrelay.config import BotSettings, Settings

from postfix import UPSTREAM_LISTENERS, PostfixInstance, SmtpSink
from support import ScriptedUpstream, corpus_path, free_port, relay_settings, start_relay


@pytest.fixture
async def upstream():
    server = ScriptedUpstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def settings(tmp_path: Path, upstream: ScriptedUpstream) -> Settings:
    return relay_settings(tmp_path, upstream.port)


@pytest.fixture
def report_settings(settings: Settings) -> Settings:
    """Reports on (password "pw"); every click judged at once (no bot timing rules)."""
    return replace(
        settings,
        reports=replace(settings.reports, password="pw"),
        bots=BotSettings(min_seconds_after_send=0, burst_links=0),
    )


@pytest.fixture
async def relay(settings: Settings):
    async with start_relay(settings) as server:
        yield server


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The shared real-world corpus; tests that need it skip where it is absent."""
    path = corpus_path()
    if not (path / "html").is_dir() or not (path / "eml").is_dir():
        pytest.skip(f"real-world corpus not found at {path} (set CLICKRELAY_CORPUS to use it)")
    return path


# Postfix (tests/postfix.py): a real Postfix as the relay's upstream or client, smtp-sink as a
# recording upstream. The processes live for the session (a Postfix start costs ~0.3 s); each
# test gets them with an empty queue and no dumps from earlier tests.


@pytest.fixture(scope="session")
def smtp_sink_session():
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def smtp_sink(smtp_sink_session: SmtpSink) -> SmtpSink:
    """smtp-sink (all its extensions, no SMTPUTF8) without the dumps of earlier tests."""
    smtp_sink_session.reset()
    return smtp_sink_session


@pytest.fixture
def make_smtp_sink():
    """Start an smtp-sink with its own flags, stopped after the test: make_smtp_sink('-8')."""
    sinks: list[SmtpSink] = []

    def make(*flags: str) -> SmtpSink:
        sinks.append(SmtpSink(flags))
        sinks[-1].start()
        return sinks[-1]

    yield make
    for sink in sinks:
        sink.stop()


@pytest.fixture(scope="session")
def postfix_upstream_session(smtp_sink_session: SmtpSink):
    with PostfixInstance(smtp_sink_session.port, UPSTREAM_LISTENERS) as instance:
        yield instance


@pytest.fixture
def postfix_upstream(
    postfix_upstream_session: PostfixInstance, smtp_sink_session: SmtpSink
) -> PostfixInstance:
    """Postfix relaying everything to `smtp_sink`, its queue emptied; listener_port('full'),
    ('legacy': no SMTPUTF8, no 8BITMIME) and ('nodsn': no DSN) are the relay's upstream ports."""
    postfix_upstream_session.clear_queue()
    smtp_sink_session.reset()
    return postfix_upstream_session


@pytest.fixture(scope="session")
def postfix_client_session():
    with PostfixInstance(free_port()) as instance:
        yield instance


@pytest.fixture
def postfix_client(postfix_client_session: PostfixInstance) -> PostfixInstance:
    """Postfix relaying everything to 127.0.0.1:`relayhost_port` (start the relay there), its
    queue emptied; `submit` puts mail into it."""
    postfix_client_session.clear_queue()
    return postfix_client_session
