"""Configuration: typed values, embedded defaults, and one clear line (exit 2) per mistake."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from clickrelay import config
from clickrelay.config import ConfigError, HostPort, UpstreamURL
from clickrelay.passwords import hash_password
from clickrelay.storage.sqlite import MIGRATIONS

import pg
from support import free_port

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = '[upstream]\nurl = "smtp://127.0.0.1:2526"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clickrelay.toml"
    path.write_text(text)
    return path


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clickrelay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_example_config_is_valid_and_documents_every_key(tmp_path):
    example = ROOT / "config.example.toml"
    settings = config.load(example)
    assert settings.upstream.url == UpstreamURL("smtp", "127.0.0.1", 25)
    text = example.read_text()
    for section in config.fields(config.Settings):
        if section.name == "source":
            continue
        assert f"[{section.name}]" in text
        kind = section.type.removeprefix("tuple[").removesuffix(", ...]")  # [[webhooks]]
        for spec in config.fields(getattr(config, kind)):
            documented = f"{spec.name} =" in text or f"[{section.name}.{spec.name}]" in text
            assert documented, f"{section.name}.{spec.name} is not documented"


def test_minimal_file_gets_documented_defaults(tmp_path):
    settings = config.load(write(tmp_path, MINIMAL))
    assert settings.smtp.listen == HostPort("127.0.0.1", 2525)
    assert settings.smtp.max_message_size == 33554432
    assert [str(n) for n in settings.smtp.allowed_clients] == ["127.0.0.0/8", "::1/128"]
    assert settings.web.listen == HostPort("127.0.0.1", 8080)
    assert settings.tracking.tracked_campaign_types == ("standard",)
    assert settings.bots.min_seconds_after_send == 5
    assert settings.headers.campaign_id == "X-Campaign-Id"
    assert not settings.reports.enabled


def test_embedded_defaults_keep_everything_local(tmp_path):
    settings = config.embedded_defaults(tmp_path)
    assert settings.embedded
    assert settings.upstream.url == UpstreamURL("maildir", path=tmp_path / "outbox")
    assert settings.storage.database == tmp_path / "clickrelay.sqlite3"
    assert settings.tracking.secret_file == tmp_path / "secret"
    assert settings.web.public_url == "http://127.0.0.1:8080"
    assert str(settings.smtp.listen) == "127.0.0.1:2525"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[smtp]\nlisten = "127.0.0.1:2525"\n', "upstream.url"),
        (MINIMAL + '[smtp]\nlisen = "127.0.0.1:25"\n', "smtp.lisen"),
        (MINIMAL + "[smpt]\n", "smpt"),
        (MINIMAL + '[smtp]\nlisten = "localhost"\n', "smtp.listen"),
        (MINIMAL + '[smtp]\nlisten = "127.0.0.1:99999"\n', "smtp.listen"),
        (MINIMAL + "[web]\nlisten = 8080\n", "web.listen"),
        (MINIMAL + '[smtp]\nmax_message_size = "32M"\n', "smtp.max_message_size"),
        (MINIMAL + '[smtp]\nallowed_clients = ["10.0.0.0/33"]\n', "smtp.allowed_clients"),
        (MINIMAL + '[smtp]\nallowed_clients = "10.0.0.0/8"\n', "smtp.allowed_clients"),
        (
            MINIMAL + '[smtp]\ntls_cert = "/nonexistent/cert.pem"\n'
            'tls_key = "/nonexistent/key.pem"\n',
            "smtp.tls_cert",
        ),
        (MINIMAL + '[smtp]\ntls_cert = "/etc/hostname"\n', "smtp.tls_key"),
        (MINIMAL + '[smtp.users]\napp = "plaintext"\n', "smtp.users"),
        ('[upstream]\nurl = "smtp://user:pw@mail.example.com"\n', "upstream.url"),
        ('[upstream]\nurl = "imap://mail.example.com"\n', "upstream.url"),
        ('[upstream]\nurl = "smtp://mail.example.com:notaport"\n', "upstream.url"),
        ('[upstream]\nurl = "smtp://127.0.0.1"\nusername = "u"\n', "upstream.password"),
        ('[upstream]\nurl = "smtp://127.0.0.1"\ntimeout_seconds = 0\n', "upstream.timeout_seconds"),
        (MINIMAL + '[web]\npublic_url = "click.example.com"\n', "web.public_url"),
        (MINIMAL + '[reports]\npassword_hash = "nope"\n', "reports.password_hash"),
        (
            MINIMAL + '[tracking]\ntrigger_url_patterns = ["(unclosed"]\n',
            "tracking.trigger_url_patterns",
        ),
        (
            MINIMAL + '[tracking]\ntracked_campaign_types = "standard"\n',
            "tracking.tracked_campaign_types",
        ),
        (MINIMAL + "[bots]\nburst_links = -1\n", "bots.burst_links"),
        (MINIMAL + "[bots]\nburst_links = true\n", "bots.burst_links"),
        (MINIMAL + '[privacy]\nstore_ip = "some"\n', "privacy.store_ip"),
        (MINIMAL + '[headers]\ncampaign_id = ""\n', "headers.campaign_id"),
        ("smtp = 1\n" + MINIMAL, "smtp"),
    ],
)
def test_mistakes_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    assert caught.value.key == key


def test_unreadable_and_invalid_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[smtp\n"))


def test_check_config_prints_settings_with_secrets_masked(tmp_path, tls_files):
    cert, key = tls_files
    hashed = hash_password("hunter2")
    path = write(
        tmp_path,
        '[upstream]\nurl = "smtp+starttls://mail.example.com"\nusername = "relay"\n'
        'password = "upstream-secret"\n[reports]\npassword = "report-secret"\n'
        f'[smtp]\ntls_cert = "{cert}"\ntls_key = "{key}"\n[smtp.users]\napp = "{hashed}"\n',
    )
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert 'url = "smtp+starttls://mail.example.com:587"' in result.stdout
    assert 'username = "relay"' in result.stdout
    for secret in ("upstream-secret", "report-secret", hashed):
        assert secret not in result.stdout + result.stderr
    assert result.stdout.count('"********"') == 3


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    result = cli("check-config", "--config", str(write(tmp_path, MINIMAL + "[smtp]\nport = 25\n")))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["clickrelay: smtp.port: unknown key"]
    assert "Traceback" not in result.stderr


def test_port_in_use_is_exit_2_naming_the_key(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(
            tmp_path,
            MINIMAL + f'[smtp]\nlisten = "127.0.0.1:{port}"\n[storage]\n'
            f'database = "{tmp_path}/db.sqlite3"\n[tracking]\nsecret_file = "{tmp_path}/s"\n',
        )
        result = cli("smtp", "--config", str(path))
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1] == "clickrelay: smtp.listen: address already in use"
    )
    assert "Traceback" not in result.stderr


def test_bad_tls_key_is_exit_2(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    path = write(
        tmp_path,
        MINIMAL
        + f'[web]\nlisten = "127.0.0.1:{free_port()}"\ntls_cert = "{junk}"\ntls_key = "{junk}"\n'
        + f'[storage]\ndatabase = "{tmp_path}/db.sqlite3"\n'
        + f'[tracking]\nsecret_file = "{tmp_path}/s"\n',
    )
    result = cli("web", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("clickrelay: web.tls_key: cannot load")


def test_hash_password_reads_stdin(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "clickrelay", "hash-password"],
        input="correct horse\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    from clickrelay.passwords import verify

    assert verify("correct horse", result.stdout.strip())
    assert not verify("wrong horse", result.stdout.strip())


def test_storage_url_and_database_are_alternatives_and_passwords_are_masked(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "smtp://127.0.0.1:25"\n[storage]\ndatabase = "/tmp/x.sqlite3"\n'
        'url = "postgresql://cr@db:5432/cr"\n'
    )
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert caught.value.key == "storage.url"
    path.write_text(
        '[upstream]\nurl = "smtp://127.0.0.1:25"\n[storage]\n'
        'url = "postgresql://cr:Sup3rSecret@db:5432/cr"\n'
    )
    shown = config.describe(config.load(path))
    assert "Sup3rSecret" not in shown
    assert 'url = "postgresql://cr:********@db:5432/cr"' in shown


def test_migrate_applies_the_schema_and_exits(tmp_path, capsys):
    from clickrelay import cli

    path = tmp_path / "c.toml"
    database = tmp_path / "data" / "db.sqlite3"
    path.write_text(
        f'[upstream]\nurl = "smtp://127.0.0.1:25"\n[storage]\ndatabase = "{database}"\n'
    )
    assert cli.main(["migrate", "--config", str(path)]) == 0
    assert f"storage schema up to date: {database}" in capsys.readouterr().out
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    blocked = tmp_path / "c2.toml"
    blocked.write_text(
        f'[upstream]\nurl = "smtp://127.0.0.1:25"\n[storage]\ndatabase = "{path}/sub/db.sqlite3"\n'
    )
    assert cli.main(["migrate", "--config", str(blocked)]) == 2
    assert capsys.readouterr().err.startswith("clickrelay: storage.database: cannot open")


@pytest.mark.skipif(pg.binaries() is None, reason="no PostgreSQL server binaries here")
def test_password_file_logs_in_with_its_trailing_newline_stripped(tmp_path, capsys):
    from clickrelay import cli

    server = pg.server()
    password = 'p"w \\ ünïcode'
    server.psql(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{pg.PASSWORD_USER}')"
        f" THEN CREATE ROLE {pg.PASSWORD_USER} LOGIN; END IF; END $$"
    )
    server.psql(f"ALTER ROLE {pg.PASSWORD_USER} PASSWORD '{password}'")
    database = f"owned_{tmp_path.name[-20:]}".replace("-", "_").lower()
    server.psql(f'CREATE DATABASE "{database}" OWNER {pg.PASSWORD_USER}')
    secret = tmp_path / "db-password"
    secret.write_text(password + "\n")
    path = tmp_path / "c.toml"

    def configure(password_file: Path) -> None:
        path.write_text(
            '[upstream]\nurl = "smtp://127.0.0.1:25"\n[storage]\n'
            f'url = "{server.url(database, pg.PASSWORD_USER)}"\n'
            f'password_file = "{password_file}"\n'
        )

    configure(secret)
    assert cli.main(["check-config", "--config", str(path)]) == 0
    shown = capsys.readouterr().out
    assert f'password_file = "{secret}"' in shown and "ünïcode" not in shown
    assert cli.main(["migrate", "--config", str(path)]) == 0
    assert "storage schema up to date" in capsys.readouterr().out
    owner = "SELECT tableowner FROM pg_tables WHERE tablename = 'clicks'"
    assert server.psql(owner, database) == pg.PASSWORD_USER

    wrong = tmp_path / "wrong-password"
    wrong.write_text(password + "x\n")
    configure(wrong)
    assert cli.main(["migrate", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("clickrelay: storage.url: cannot open the PostgreSQL database:")
    assert "password authentication failed" in error and error.count("\n") == 1
    assert "ünïcode" not in error

    configure(tmp_path / "missing")
    assert cli.main(["migrate", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"clickrelay: storage.password_file: cannot read {tmp_path}/missing")


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('url = "https://crm.example/h"\n', "webhooks[0].secret_file"),
        ('url = "ftp://crm.example/h"\nsecret_file = "s"\n', "webhooks[0].url"),
        ('url = "https://u:p@crm.example/h"\nsecret_file = "s"\n', "webhooks[0].url"),
        ('url = "https://crm.example/h"\nsecret_file = "s"\nevents = ["open"]\n',
         "webhooks[0].events"),
        ('url = "https://crm.example/h"\nsecret_file = "s"\nevents = []\n', "webhooks[0].events"),
        ('url = "https://crm.example/h"\nsecret_file = "s"\nretries = 3\n', "webhooks[0].retries"),
        ('url = "https://crm.example/h"\nsecret_file = "s"\n[[webhooks]]\n'
         'url = "https://crm.example/h"\nsecret_file = "t"\n', "webhooks[1].url"),
    ],
)  # fmt: skip
def test_webhook_mistakes_name_the_endpoint_and_key(tmp_path, table, key):
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + "[[webhooks]]\n" + table)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.key == key


def test_webhooks_are_shown_by_check_config_and_a_bad_key_file_stops_the_start(tmp_path):
    secret = tmp_path / "hook-secret"
    path = write_webhook_config(tmp_path, secret)
    shown = config.describe(config.load(path))
    assert '[[webhooks]]\nurl = "https://crm.example/h"' in shown
    assert 'events = ["click", "send"]' in shown
    secret.write_text("not a key\n")
    result = cli("web", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"clickrelay: webhooks[0].secret_file: {secret} does not hold a whsec_... key"
    )
    assert "Traceback" not in result.stderr


def write_webhook_config(tmp_path: Path, secret: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'{MINIMAL}[web]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[storage]\ndatabase = "{tmp_path}/db.sqlite3"\n'
        f'[tracking]\nsecret_file = "{tmp_path}/secret"\n'
        f'[[webhooks]]\nurl = "https://crm.example/h"\nsecret_file = "{secret}"\n'
        'events = ["click", "send"]\n'
    )
    return path
