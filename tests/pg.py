"""A private PostgreSQL server for the tests, and which backend the suite runs on.

`CLICKRELAY_TEST_BACKEND=postgresql` runs every test that stores anything on PostgreSQL (each
test its own database); the default is SQLite. The server is started once per test session from
the machine's PostgreSQL binaries (Debian's postgresql package: /usr/lib/postgresql/*/bin) in a
temporary directory on a free loopback port, as the `postgres` user when the tests run as root,
and stopped at exit. Durability settings are relaxed (fsync off) except for benchmarks.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ports import free_port

from clickrelay.config import StorageSettings, StorageURL

BACKEND = os.environ.get("CLICKRELAY_TEST_BACKEND", "sqlite")
PASSWORD_USER = "secretive"  # a role that must log in with a password (scram-sha-256)
if BACKEND not in ("sqlite", "postgresql"):
    raise SystemExit(f"CLICKRELAY_TEST_BACKEND must be sqlite or postgresql, not {BACKEND!r}")


def binaries() -> Path | None:
    """The directory of the newest installed PostgreSQL server's binaries, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version)
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def _version(path: str) -> int:
    part = Path(path).parent.parent.name
    return int(part) if part.isdigit() else 0


class PostgresServer:
    def __init__(self, durable: bool = False) -> None:
        bindir = binaries()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (install Debian's postgresql)")
        self.bindir = bindir
        self.durable = durable
        self.folder = Path(tempfile.mkdtemp(prefix="clickrelay-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self._names = itertools.count(1)
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        self._initdb()
        self.start()

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        return subprocess.run(
            [*prefix, *argv], check=check, capture_output=True, text=True, timeout=120
        )

    def _initdb(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync",
        )  # fmt: skip
        hba = self.data / "pg_hba.conf"
        rules = f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
        if self._as_postgres:
            self._run("sh", "-c", f"printf '%s' '{rules}' | cat - {hba} > {hba}.new")
            self._run("mv", f"{hba}.new", str(hba))
        else:
            hba.write_text(rules + hba.read_text())
        relaxed = "" if self.durable else "fsync = off\nfull_page_writes = off\n"
        conf = (
            f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{self.folder}'\nmax_connections = 400\n"
            f"shared_buffers = 128MB\n{relaxed}"
        )
        self._run("sh", "-c", f"printf '%s' \"{conf}\" >> {self.data}/postgresql.auto.conf")

    def start(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
            str(self.folder / "log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop",
                  check=False)  # fmt: skip

    def restart(self) -> None:
        self.stop()
        self.start()

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
             "postgres", "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return result.stdout.strip()

    def url(self, database: str, user: str = "postgres", password: str | None = None) -> str:
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


_server: PostgresServer | None = None


def server() -> PostgresServer:
    """The session's PostgreSQL server, started on first use."""
    global _server
    if _server is None:
        _server = PostgresServer()
        atexit.register(_server.close)
    return _server


def storage_for(tmp_path: Path, backend: str = BACKEND) -> StorageSettings:
    """Storage for one test: a SQLite file in `tmp_path`, or a new PostgreSQL database."""
    if backend == "sqlite":
        return StorageSettings(database=tmp_path / "clickrelay.sqlite3")
    url = server().new_database()
    return StorageSettings(url=StorageURL("postgresql", url))


def query(storage: StorageSettings, sql: str, *args: object) -> list[tuple]:
    """Rows of a read-only query straight on the test's storage, either backend (`?`
    placeholders; for PostgreSQL each becomes $1, $2, ...). For tests that look under the
    interface: what is really stored, not what an API shows."""
    path = storage.sqlite_path
    if path is not None:
        import contextlib
        import sqlite3

        with contextlib.closing(sqlite3.connect(path)) as db:
            return [tuple(row) for row in db.execute(sql, args).fetchall()]
    assert storage.url is not None
    numbered = iter(range(1, sql.count("?") + 1))
    translated = "".join(f"${next(numbered)}" if c == "?" else c for c in sql)
    return _in_thread(_pg_rows(storage.url.url, translated, args))


async def _pg_rows(url: str, sql: str, args: tuple) -> list[tuple]:
    import asyncpg

    con = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await con.fetch(sql, *args)]
    finally:
        await con.close()


def _in_thread(coroutine):
    """Run `coroutine` on an event loop of its own (callable from sync and async tests)."""
    import asyncio
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result(timeout=60)
