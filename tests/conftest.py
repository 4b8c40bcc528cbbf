"""Shared fixtures: a real aiosmtpd upstream, a relay under test, certificates, the corpus."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from clickrelay.config import Settings

from support import ScriptedUpstream, corpus_path, relay_settings, start_relay


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
