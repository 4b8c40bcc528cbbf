"""Hostile input elsewhere (issue 10): report cursors and ids, download file names, the report
login (throttled, no timing leak, its own thread pool), replayed links, private SQLite files,
the log level, and file descriptors. Real sockets, the real app, real files and processes."""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote, unquote

import aiohttp
import pytest

from clickrelay import config, passwords, service
from clickrelay.config import _networks
from clickrelay.passwords import hash_password
from clickrelay.storage.base import NewSend
from clickrelay.storage.sqlite import open_sqlite

import pg
from support import BROWSER, ServiceProcess, basic_auth, free_port, start_web, write_config

A = "https://shop.example.com/a"


@pytest.fixture
def web_settings(settings):
    return replace(settings, reports=replace(settings.reports, password="pw"))


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# ---------------------------------------------------------------- configuration


def test_the_new_keys_have_their_documented_defaults_and_name_mistakes(tmp_path):
    minimal = '[upstream]\nurl = "smtp://127.0.0.1:2526"\n'
    settings = config.load(_write(tmp_path, minimal))
    assert (settings.web.max_connections, settings.web.max_connections_per_client,
            settings.web.idle_timeout_seconds) == (4096, 256, 15.0)  # fmt: skip
    assert settings.bots.max_clicks_per_minute == 10
    for text, key in [
        ("[web]\nmax_connections = -1\n", "web.max_connections"),
        ('[web]\nmax_connections_per_client = "many"\n', "web.max_connections_per_client"),
        ("[web]\nidle_timeout_seconds = 0\n", "web.idle_timeout_seconds"),
        ("[bots]\nmax_clicks_per_minute = 1.5\n", "bots.max_clicks_per_minute"),
    ]:
        with pytest.raises(config.ConfigError) as caught:
            config.load(_write(tmp_path, minimal + text))
        assert caught.value.key == key
    off = config.load(_write(tmp_path, minimal + "[web]\nmax_connections = 0\n"))
    assert off.web.max_connections == 0  # no cap


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clickrelay.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- report input

BAD_CURSORS = {
    "deeply nested JSON": cursor("[" * 3000 + "]" * 3000),
    "nested, short enough": cursor("[" * 700 + "]" * 700),
    "not base64": "!!!not-a-cursor!!!",
    "not JSON": cursor("hello"),
    "wrong shape": cursor('{"last": 1}'),
    "wrong types": cursor('["x", 1]'),
    "not finite": cursor('[NaN, "c1"]'),
    "lone surrogate": cursor('[1.0, "\\ud800"]'),
}
CONTACT_ROUTES = ["/reports/campaigns/c1/links/{}", "/api/campaigns/c1/links/{}",
                  "/reports/campaigns/c1/links/{}/export.csv"]  # fmt: skip


@pytest.mark.parametrize("bad", list(BAD_CURSORS.values()), ids=list(BAD_CURSORS))
async def test_a_malformed_cursor_is_a_400_on_every_route(web_settings, bad):
    async with start_web(web_settings) as web:
        send_id, links = await web.send(urls=(A,))
        await web.click(send_id, links[A])
        answers = []
        for route in CONTACT_ROUTES:
            path = route.format(links[A]) + "?after=" + quote(bad, safe="")
            async with web.session.get(web.base + path, headers=basic_auth()) as response:
                answers.append((response.status, await response.text()))
        good = await web.get(route.format(links[A]), headers=basic_auth())
    for status, text in answers:
        assert status == 400, text
        assert "cursor" in text and "Traceback" not in text
    assert good.status == 200


@pytest.mark.parametrize(
    "link_id",
    [str(2**63), str(2**64 + 5), str(10**40), "9" * 5000],
    ids=["2^63", "2^64+5", "10^40", "5000-digits"],
)
async def test_a_link_id_beyond_sqlite_integers_is_a_400(web_settings, link_id):
    async with start_web(web_settings) as web:
        await web.send(urls=(A,))
        statuses = [
            (await web.get(route.format(link_id), headers=basic_auth())).status
            for route in CONTACT_ROUTES
        ]
        largest = [
            (await web.get(route.format(2**63 - 1), headers=basic_auth())).status
            for route in CONTACT_ROUTES
        ]
    assert statuses == [400, 400, 400]
    assert largest == [404, 404, 404]  # the largest id there can be is merely unknown


HOSTILE_ID = 'Q1 "launch"\r\nSet-Cookie: x=1; évé/../2026'


async def test_download_names_from_campaign_ids_are_safe(web_settings):
    async with start_web(web_settings) as web:
        await web.send(campaign=HOSTILE_ID, urls=(A,), untracked={("mailto:x@y.z", "scheme"): 1})
        segment = quote(HOSTILE_ID, safe="")
        dispositions = []
        for suffix in ("/export.csv", "/untracked/export.csv"):
            path = f"/reports/campaigns/{segment}{suffix}"
            async with web.session.get(web.base + path, headers=basic_auth()) as response:
                assert response.status == 200, await response.text()
                assert "set-cookie" not in response.headers
                dispositions.append(response.headers["Content-Disposition"])
    for header, name in zip(dispositions, ("-links.csv", "-untracked.csv"), strict=True):
        assert header.isascii() and "\r" not in header and "\n" not in header
        fallback = re.fullmatch(r'attachment; filename="([^"]*)"; filename\*=UTF-8\'\'(\S+)',
                                header)  # fmt: skip
        assert fallback, header
        assert re.fullmatch(r"[A-Za-z0-9._-]+", fallback.group(1)), fallback.group(1)
        assert unquote(fallback.group(2), errors="strict") == HOSTILE_ID + name  # exactly


# ---------------------------------------------------------------- the report login


def from_address(address: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def timed_get(session: aiohttp.ClientSession, url: str, **kwargs) -> tuple[int, float]:
    started = time.perf_counter()
    async with session.get(url, **kwargs) as response:
        await response.read()
        return response.status, time.perf_counter() - started


async def test_failed_logins_slow_that_client_down_and_no_other(web_settings):
    """Plain `password` configured: compared in constant time, and throttled all the same."""
    async with start_web(web_settings) as web:
        url = web.base + "/api/campaigns"
        free = [await timed_get(web.session, url, headers=basic_auth("admin", f"guess{i}"))
                for i in range(3)]  # fmt: skip
        fourth = await timed_get(web.session, url, headers=basic_auth("admin", "guess4"))
        async with from_address("127.0.0.2") as other:
            elsewhere = await timed_get(other, url, headers=basic_auth())
        right = await timed_get(web.session, url, headers=basic_auth())  # waits too
        after = await timed_get(web.session, url, headers=basic_auth("admin", "guess5"))
    assert [status for status, _ in free] == [401] * 3
    assert all(seconds < 0.5 for _, seconds in free)
    assert fourth[0] == 401 and fourth[1] >= 0.9  # 1 s after the third failure
    assert elsewhere[0] == 200 and elsewhere[1] < 0.5
    assert right[0] == 200 and right[1] >= 0.9  # 2 s after the fourth failure (minus its own)
    assert after[0] == 401 and after[1] < 0.5  # the success cleared the count


async def test_a_wrong_user_name_costs_what_a_wrong_password_costs(web_settings):
    """Each attempt comes from its own address (through a trusted proxy): no throttle delays."""
    hashed = hash_password("s3cret")
    reports = replace(web_settings.reports, password=None, password_hash=hashed)
    web_conf = replace(web_settings.web, trusted_proxies=_networks(["127.0.0.0/8"]))
    one_check = min(_verify_seconds(hashed) for _ in range(3))
    async with start_web(replace(web_settings, reports=reports, web=web_conf)) as web:
        url = web.base + "/api/campaigns"
        times: dict[str, list[float]] = {"user": [], "password": []}
        for i in range(6):
            for kind, creds in (("user", ("root", "s3cret")), ("password", ("admin", "nope"))):
                headers = {**basic_auth(*creds), "X-Forwarded-For": f"198.51.100.{i * 2 + 1}"}
                status, seconds = await timed_get(web.session, url, headers=headers)
                assert status == 401
                times[kind].append(seconds)
        good = await timed_get(web.session, url, headers=basic_auth("admin", "s3cret"))
    wrong_user, wrong_password = (statistics.median(times[k]) for k in ("user", "password"))
    assert good[0] == 200
    assert wrong_user >= 0.7 * one_check, (wrong_user, one_check)  # a hash check was made
    assert 0.5 < wrong_user / wrong_password < 2.0, (wrong_user, wrong_password)


def _verify_seconds(hashed: str) -> float:
    started = time.perf_counter()
    passwords.verify("not it", hashed)
    return time.perf_counter() - started


async def test_a_login_flood_leaves_the_default_executor_free(web_settings):
    """Message rewriting uses asyncio.to_thread; report logins must not queue in front of it.

    Measured: how long a job handed to the default executor waits for a thread to start it,
    all along a flood of 40 logins (the garbage collector is paused meanwhile: its pauses
    would delay any thread, and are not what this is about)."""
    hashed = hash_password("s3cret")
    reports = replace(web_settings.reports, password=None, password_hash=hashed)
    web_conf = replace(web_settings.web, trusted_proxies=_networks(["127.0.0.0/8"]))
    async with start_web(replace(web_settings, reports=reports, web=web_conf)) as web:
        url = web.base + "/api/campaigns"
        gc.disable()
        try:
            started = time.perf_counter()
            flood = [
                asyncio.create_task(timed_get(web.session, url, headers={
                    **basic_auth("admin", f"guess{i}"), "X-Forwarded-For": f"203.0.113.{i}"}))
                for i in range(40)
            ]  # fmt: skip
            waits = []
            while not all(task.done() for task in flood) and len(waits) < 1000:
                submitted = time.perf_counter()
                began = await asyncio.to_thread(time.perf_counter)  # as a rewrite would
                waits.append(began - submitted)
            flooded = await asyncio.gather(*flood)
            flood_seconds = time.perf_counter() - started
        finally:
            gc.enable()
    assert {status for status, _ in flooded} == {401}
    assert len(waits) >= 5 and flood_seconds > 0.2  # measured all along a real flood
    assert max(waits) < 0.05, f"a job waited up to {max(waits) * 1000:.0f} ms for a thread"


# ---------------------------------------------------------------- replayed links


async def test_a_replayed_link_counts_ten_human_clicks_a_minute(web_settings):
    async with start_web(web_settings) as web:
        send_id, links = await web.send(urls=(A,))
        statuses = [(await web.click(send_id, links[A])).status for _ in range(50)]
        report = await web.api("/api/campaigns/c1")
    reasons = [
        r for (r,) in pg.query(web_settings.storage, "SELECT bot_reason FROM clicks ORDER BY id")
    ]
    assert statuses == [302] * 50  # still redirected
    assert (report["total_clicks"], report["bot_clicks"], report["unique_clicks"]) == (10, 40, 1)
    assert reasons == [None] * 10 + ["repeat"] * 40


async def test_the_repeat_rule_can_be_turned_off(web_settings):
    settings = replace(web_settings, bots=replace(web_settings.bots, max_clicks_per_minute=0))
    async with start_web(settings) as web:
        send_id, links = await web.send(urls=(A,))
        for _ in range(30):
            await web.click(send_id, links[A], agent=BROWSER)
        report = await web.api("/api/campaigns/c1")
    assert (report["total_clicks"], report["bot_clicks"]) == (30, 0)


# ---------------------------------------------------------------- SQLite files

sqlite_files = pytest.mark.skipif(
    pg.BACKEND != "sqlite", reason="SQLite file specifics (file modes of the database and WAL)"
)


def modes(database: Path) -> dict[str, int]:
    return {
        path.name: path.stat().st_mode & 0o777
        for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm"))
    }


@sqlite_files
@pytest.mark.parametrize("umask", [0o022, 0o000])
async def test_database_files_are_private_whatever_the_umask(tmp_path, umask):
    database = tmp_path / "data" / "clickrelay.sqlite3"
    old = os.umask(umask)
    try:
        store = await open_sqlite(database)
        await store.record_send(
            NewSend("c1", None, "standard", "42", None, None, "tracked", ((A, None),))
        )
        found = modes(database)  # while open: WAL and shared-memory files exist
        await store.close()
    finally:
        os.umask(old)
    assert found == {"clickrelay.sqlite3": 0o600, "clickrelay.sqlite3-wal": 0o600,
                     "clickrelay.sqlite3-shm": 0o600}  # fmt: skip


@sqlite_files
async def test_existing_database_files_are_made_private(tmp_path):
    database = tmp_path / "clickrelay.sqlite3"
    old = os.umask(0o022)
    try:
        other = sqlite3.connect(database)  # another process, holding the WAL files open
        other.execute("PRAGMA journal_mode = WAL")
        other.execute("CREATE TABLE t (x)")
        before = modes(database)
        store = await open_sqlite(database)
        after = modes(database)
        await store.close()
        other.close()
    finally:
        os.umask(old)
    assert set(before.values()) == {0o644}
    assert set(after.values()) == {0o600}


# ---------------------------------------------------------------- the service process


def web_config(tmp_path: Path, extra: str = "") -> tuple[Path, int]:
    web_port = free_port()
    return write_config(tmp_path / "c.toml", 2526, free_port(), web_port, extra), web_port


async def stop(service: ServiceProcess) -> int:
    service.signal(signal.SIGTERM)
    return await service.wait()


@pytest.mark.parametrize(
    ("args", "debug_expected"),
    [(("--log-level", "debug", "web"), True), (("web", "--log-level", "debug"), True),
     (("--log-level", "debug", "run"), True), (("web",), False)],
)  # fmt: skip
async def test_the_log_level_before_the_command_is_honoured(tmp_path, args, debug_expected):
    cfg, _ = web_config(tmp_path)
    service = ServiceProcess(*args, "--config", str(cfg))
    await service.start("http service listening")
    try:
        code = await stop(service)
    finally:
        await service.kill()
    debug_lines = [line for line in service.log if " DEBUG " in line]
    assert code == 0
    assert bool(debug_lines) == debug_expected, service.log
    assert any("DEBUG clickrelay: file descriptors: limit" in line for line in debug_lines) == (
        debug_expected
    )


class LimitedProcess(ServiceProcess):
    """`python -m clickrelay ...` started under `prlimit --nofile=SOFT:HARD`."""

    def __init__(self, soft: int, hard: int, *args: str) -> None:
        super().__init__(*args)
        self.nofile = f"--nofile={soft}:{hard}"

    async def start(self, ready_text: str, timeout: float = 30) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "prlimit", self.nofile, sys.executable, "-m", "clickrelay", *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        while not any(ready_text in line for line in self.log):
            assert not self._reader.done(), "\n".join(self.log)
            await asyncio.wait([self._reader], timeout=0.05)
            timeout -= 0.05
            assert timeout > 0, "service did not start:\n" + "\n".join(self.log)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.log.append(line.decode(errors="replace").rstrip())


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files line")


async def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path):
    cfg, _ = web_config(tmp_path)
    service = LimitedProcess(256, 8192, "web", "--config", str(cfg))
    await service.start("http service listening")
    try:
        limits = open_files_limit(service.proc.pid)
        code = await stop(service)
    finally:
        await service.kill()
    assert limits == (8192, 8192)
    assert code == 0
    assert any("file descriptors: limit raised from 256 to 8192" in line for line in service.log)
    assert not any("scaled down" in line for line in service.log)


async def test_caps_beyond_the_descriptor_limit_are_scaled_down_to_fit(tmp_path):
    cfg, port = web_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[web]\n", "[web]\nidle_timeout_seconds = 60\n"))
    service = LimitedProcess(300, 300, "web", "--config", str(cfg))
    await service.start("http service listening")
    writers = []
    try:
        for _ in range(200):  # the scaled cap: (300 - 100 in reserve) / 4096 of 4096
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            writers.append(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        over = await reader.read()
        writers.append(writer)
        code = await stop(service)
    finally:
        for writer in writers:
            writer.close()
        await service.kill()
    assert over.startswith(b"HTTP/1.1 503")
    assert code == 0
    scaled = [line for line in service.log if "scaled down to fit" in line]
    assert len(scaled) == 1
    assert "web.max_connections 4096 -> 200" in scaled[0]
    assert any("at most 200, 256 per client" in line for line in service.log)
    assert not any("Traceback" in line for line in service.log)


async def test_both_halves_share_the_descriptors_when_run_together(tmp_path):
    cfg, _ = web_config(tmp_path)
    service = LimitedProcess(600, 600, "run", "--config", str(cfg))
    await service.start("smtp relay listening")
    try:
        code = await stop(service)
    finally:
        await service.kill()
    # (4096 + 2 x 1000) need 6096 > 600 - 100: each cap gets 500/6096 of itself
    (scaled,) = [line for line in service.log if "scaled down to fit" in line]
    assert "web.max_connections 4096 -> 335, smtp.max_connections 1000 -> 82" in scaled
    assert any("at most 335, 256 per client" in line for line in service.log)
    assert code == 0


ACCEPT_FLOOD = """
import asyncio, logging, resource, sys
from clickrelay.service import quiet_accept_failures

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")

async def main():
    loop = asyncio.get_running_loop()
    quiet_accept_failures(loop)
    ours = loop.get_exception_handler()
    def counting(loop, context):  # reports each call on stdout, then lets ours handle it
        print("accept failure", flush=True)
        ours(loop, context)
    loop.set_exception_handler(counting)
    held = []
    def protocol():
        return asyncio.Protocol()
    server = await loop.create_server(protocol, "127.0.0.1", 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))
    print("port", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


UNITS = sorted((Path(__file__).parent.parent / "systemd").glob("clickrelay-*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=[unit.name for unit in UNITS])
def test_the_units_allow_descriptors_for_every_default_connection(unit, tmp_path):
    """systemd's default soft limit (1024) would scale the caps down: the units raise it so
    that the default caps of both halves (as `clickrelay run` has them) fit."""
    limits = re.findall(r"(?m)^LimitNOFILE=(\d+)$", unit.read_text())
    assert len(limits) == 1, f"{unit.name}: no LimitNOFILE= line"
    settings = config.embedded_defaults(tmp_path)
    assert service.fit_caps(settings, service.Parts(), int(limits[0])) is settings


async def test_out_of_descriptors_the_service_logs_one_line_and_recovers(tmp_path):
    """`clickrelay run` on its own listeners: its soft limit is lowered (prlimit --pid) to just
    above what it holds, so accepting fails with EMFILE while clients hold connections. One
    log line, no traceback; once they let go, both halves answer again."""
    cfg, web_port = web_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[web]\n", "[web]\nidle_timeout_seconds = 60\n"))
    service = ServiceProcess("run", "--config", str(cfg))
    await service.start("smtp relay listening")
    pid = service.proc.pid
    writers = []
    try:
        held = len(os.listdir(f"/proc/{pid}/fd"))
        soft, hard = open_files_limit(pid)
        prlimit(pid, held + 2, hard)
        for _ in range(20):
            writers.append((await asyncio.open_connection("127.0.0.1", web_port))[1])
        deadline = time.monotonic() + 15
        while not refusals(service.log) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        first = time.monotonic()
        while time.monotonic() < first + 2.5:  # asyncio retries the accept each second
            await asyncio.sleep(0.1)
        lines = refusals(service.log)
        for writer in writers:
            writer.close()
        prlimit(pid, soft, hard)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{web_port}/healthz") as response,
        ):
            healthy = response.status
        code = await stop(service)
    finally:
        for writer in writers:
            writer.close()
        await service.kill()
    assert len(lines) == 1, service.log
    assert "Too many open files (EMFILE); retrying each second" in lines[0]
    assert healthy == 200
    assert code == 0
    assert not any("Traceback" in line for line in service.log), "\n".join(service.log)


def refusals(log: list[str]) -> list[str]:
    return [line for line in log if "cannot accept new connections" in line]


def prlimit(pid: int, soft: int, hard: int) -> None:
    subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:{hard}"], check=True)


async def test_running_out_of_descriptors_logs_one_line_without_a_traceback(tmp_path):
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ACCEPT_FLOOD, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    writers = []
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        port = int(line.split()[1])
        for _ in range(60):  # far more than 32 descriptors' worth
            writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
        failures = 0
        while failures < 3:  # asyncio retries the accept every second
            line = await asyncio.wait_for(child.stdout.readline(), 10)
            failures += line == b"accept failure\n"
    finally:
        for writer in writers:
            writer.close()
        child.kill()
        stderr = (await child.communicate())[1].decode()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ERROR cannot accept new connections: Too many open files (EMFILE)")
    assert "(1 failed accepts since the last such line)" in lines[0]
    assert "Traceback" not in stderr
