"""Durable storage on PostgreSQL against SQLite, and two web nodes against one, in one run with
the same load generators:

(a) redirects/s and latency of one `clickrelay web` node on SQLite (`synchronous = "full"`)
    and on PostgreSQL (fsync on: tests/pg.py's PostgresServer(durable=True)); SQLite's default
    (`synchronous = "normal"`: WAL, not synced at each commit) for scale;
(b) total redirects/s of two `clickrelay web` processes on one PostgreSQL database against one;
(c) SMTP messages/s of the tracked 60 KB newsletter (bench_smtp.py's message, client and sink)
    through the relay on SQLite (synchronous full) and on PostgreSQL.

CPUs (the machine this is run on has 2). "pinned": the web node(s), the relay and its sink and
every PostgreSQL process on CPU 0, the load generator (wrk, or the SMTP client) on CPU 1, as in
bench_redirect.py and bench_smtp.py; SQLite's writer thread is in the node's process, so either
backend gets the same one CPU. "shared": nothing pinned; nodes, PostgreSQL and wrk share both
CPUs as the kernel sees fit. Each measurement prints the CPU time that the load generator, the
nodes and PostgreSQL (all its processes, autovacuum included) used, in % of one CPU, so what
each got is plain. Setups are interleaved over rounds (servers restarted each time), medians
reported. wrk sends no User-Agent, so every click is stored as a bot click (no burst re-marks).
The PostgreSQL database is analyzed after seeding, as autovacuum does within a minute.

    python bench/bench_postgres.py [--seconds 4] [--rounds 2] [--connections 64] [--sends 2000]
                                   [--messages 300] [--json FILE]
                                   [--profile DIR | --profile-only DIR]

With --profile, after the figures: pg_stat_statements and pg_stat_wal count what PostgreSQL
does per click batch and per message in one more redirect run and SMTP run, and py-spy samples
the node and the relay (raw stacks in DIR); those runs are slowed and are not figures.
--profile-only does that alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import asyncpg  # noqa: E402
import bench_redirect as redirect  # noqa: E402
import bench_smtp as smtp  # noqa: E402

from clickrelay.config import StorageSettings, StorageURL  # noqa: E402

from pg import PostgresServer  # noqa: E402  (tests/pg.py, used as it is)

WARM_SECONDS = 2
SETTLE_SECONDS = 20.0  # at most this long waiting for autovacuum to finish before a measurement


# ---------------------------------------------------------------- processes and their CPU


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [state, ppid, ...]; [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """User + system CPU of a process; with `reaped`, also of the children it has waited for."""
    fields = _stat(pid)
    if not fields:
        return 0.0
    ticks = sum(int(fields[i]) for i in ((11, 12, 13, 14) if reaped else (11, 12)))
    return ticks / os.sysconf("SC_CLK_TCK")


def children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def cpu_set(cpus: str) -> set[int]:
    return {int(c) for c in cpus.split(",")}


def can_pin() -> bool:
    return smtp.can_pin()


class Postgres:
    """tests/pg.py's private server with fsync on, and what the bench needs on top: its
    processes' CPU time and CPUs, a database per use, a few settings and counters."""

    def __init__(self) -> None:
        self.server = PostgresServer(durable=True)
        self.cpus: set[int] | None = None

    @property
    def postmaster(self) -> int:
        return int((self.server.data / "postmaster.pid").read_text().split()[0])

    def pin(self, cpus: str) -> None:
        """Every PostgreSQL process on `cpus`; backends forked later inherit the postmaster's."""
        if not can_pin():
            return
        self.cpus = cpu_set(cpus)
        root = self.postmaster
        for pid in [root, *children(root)]:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, self.cpus)

    def cpu_seconds(self) -> float:
        """CPU of the postmaster, of its live children and of those it has reaped."""
        root = self.postmaster
        return cpu_seconds(root, reaped=True) + sum(cpu_seconds(pid) for pid in children(root))

    def sql(self, query: str, database: str = "postgres") -> str:
        return self.server.psql(query, database)

    def settings(self) -> dict[str, str]:
        names = ("server_version", "fsync", "synchronous_commit", "full_page_writes",
                 "wal_sync_method", "shared_buffers")  # fmt: skip
        return {name: self.sql(f"SHOW {name}") for name in names}

    def new_database(self) -> tuple[str, str]:
        """A new empty database: (url, name)."""
        url = self.server.new_database()
        return url, url.rsplit("/", 1)[1]

    def drop(self, name: str) -> None:
        self.sql(f'DROP DATABASE "{name}" WITH (FORCE)')

    def analyze(self, database: str) -> None:
        """What autovacuum does within a minute of the seeding: without statistics, the click
        insert's plan scans all of a campaign's sends for every click (sends_by_campaign)."""
        self.sql("VACUUM ANALYZE", database)

    def settle(self) -> None:
        """Wait (bounded) until no autovacuum worker runs, so one does not land in a
        measurement of another setup."""
        deadline = time.monotonic() + SETTLE_SECONDS
        busy = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
        while time.monotonic() < deadline and self.sql(busy) != "0":
            time.sleep(0.5)

    def restart(self) -> None:
        self.server.restart()
        if self.cpus is not None:
            self.pin(",".join(map(str, sorted(self.cpus))))

    def close(self) -> None:
        self.server.close()


# ---------------------------------------------------------------- (a), (b): redirects


@dataclass(frozen=True)
class Setup:
    key: str
    name: str
    backend: str  # "sqlite" or "postgresql"
    nodes: int
    cpus: str  # the nodes' and PostgreSQL's CPUs
    load_cpus: str  # the load generator's
    storage: str = ""  # its [storage] lines' key in Bench.storage, if not `backend`


SETUPS = [
    Setup("sqlite", "SQLite full, 1 node, pinned", "sqlite", 1, "0", "1"),
    Setup("sqlite-normal", "SQLite normal, 1 node, pinned", "sqlite", 1, "0", "1", "sqlite-normal"),
    Setup("pg", "PostgreSQL, 1 node, pinned", "postgresql", 1, "0", "1"),
    Setup("pg2", "PostgreSQL, 2 nodes, pinned", "postgresql", 2, "0", "1"),
    Setup("pg-shared", "PostgreSQL, 1 node, shared", "postgresql", 1, "0,1", "0,1"),
    Setup("pg2-shared", "PostgreSQL, 2 nodes, shared", "postgresql", 2, "0,1", "0,1"),
]
RATIOS = {  # name: (setup, baseline)
    "PostgreSQL / SQLite full, req/s, 1 node pinned": ("pg", "sqlite"),
    "SQLite full / SQLite normal (the default, not durable), req/s, 1 node pinned":
        ("sqlite", "sqlite-normal"),
    "2 nodes / 1 node on PostgreSQL, req/s, pinned (the same one CPU)": ("pg2", "pg"),
    "2 nodes / 1 node on PostgreSQL, req/s, shared (both CPUs, with wrk)":
        ("pg2-shared", "pg-shared"),
}  # fmt: skip


@dataclass
class Bench:
    args: argparse.Namespace
    folder: Path
    pg: Postgres
    secret: Path = field(init=False)
    storage: dict[str, str] = field(default_factory=dict)  # backend: [storage] lines
    tokens: dict[str, Path] = field(default_factory=dict)
    answered: dict[str, int] = field(default_factory=dict)  # 302s incl. warm-ups, by backend
    database: str = ""  # the redirect runs' PostgreSQL database

    def __post_init__(self) -> None:
        self.secret = self.folder / "secret"


async def seed_backends(bench: Bench) -> None:
    sqlite_file = bench.folder / "redirect.sqlite3"
    url, bench.database = bench.pg.new_database()
    storages = {
        "sqlite": StorageSettings(database=sqlite_file, synchronous="full"),
        "postgresql": StorageSettings(url=StorageURL("postgresql", url)),
    }
    bench.storage = {
        "sqlite": f'database = "{sqlite_file}"\nsynchronous = "full"',
        "sqlite-normal": f'database = "{sqlite_file}"\nsynchronous = "normal"',
        "postgresql": f'url = "{url}"',
    }
    for backend, storage in storages.items():
        tokens = await redirect.seed(storage, bench.secret, bench.args.sends, links=10)
        path = bench.folder / f"tokens-{backend}.txt"
        path.write_text("\n".join(tokens) + "\n")
        bench.tokens[backend] = path
        bench.answered[backend] = 0
    bench.pg.analyze(bench.database)


def busy_seconds(cpus: set[int], iowait: bool = False) -> float:
    """CPU time the kernel spent running anything on `cpus` so far (/proc/stat: user, nice,
    system, irq, softirq); with `iowait`, the time they sat idle with disk I/O outstanding."""
    ticks = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name[3:].isdigit() and name.startswith("cpu") and int(name[3:]) in cpus:
            user, nice, system, _idle, io, irq, softirq = map(int, values[:7])
            ticks += io if iowait else user + nice + system + irq + softirq
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_now(nodes: list[int], pg: Postgres, measured: set[int]) -> dict[str, float]:
    """CPU seconds so far: the load generator (this process's waited-for children: wrk), the
    nodes, PostgreSQL, and everything on the `measured` CPUs ("busy")."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "load": usage.ru_utime + usage.ru_stime,
        "nodes": sum(cpu_seconds(pid) for pid in nodes),
        "postgres": pg.cpu_seconds(),
        "busy": busy_seconds(measured),
        "iowait": busy_seconds(measured, iowait=True),
    }


def cpu_shares(before: dict[str, float], after: dict[str, float], wall: float,
               load_measured: bool) -> dict[str, float]:  # fmt: skip
    """% of one CPU for each, "others": what else ran on the measured CPUs meanwhile, and
    "iowait": how long they sat idle waiting on the disk (the machine and its disk are shared;
    a round with much of either is disturbed)."""
    used = {k: 100 * (after[k] - before[k]) / wall for k in after}
    ours = used["nodes"] + used["postgres"] + (used["load"] if load_measured else 0)
    busy, iowait = used.pop("busy"), used.pop("iowait")
    return {**used, "others": max(0.0, busy - ours), "iowait": iowait}


def run_setup(bench: Bench, setup: Setup, load, tag: str) -> dict:
    """Start the setup's nodes, warm up, measure; the load's figures and CPU shares."""
    args = bench.args
    ports = [redirect.free_port() for _ in range(setup.nodes)]
    configs = [
        redirect.web_config(bench.folder / f"{setup.key}-{i}.toml", port,
                            bench.storage[setup.storage or setup.backend], bench.secret)
        for i, port in enumerate(ports)
    ]  # fmt: skip
    bench.pg.pin(setup.cpus)
    bench.pg.settle()
    tokens = bench.tokens[setup.backend]
    procs = []
    try:
        for config, port in zip(configs, ports, strict=True):
            procs.append(redirect.start(redirect.web_node(config, setup.cpus), port))
        warm = load(ports, tokens, WARM_SECONDS, args.connections, setup.load_cpus)
        pids = [proc.pid for proc in procs]
        measured = cpu_set(setup.cpus) if can_pin() else set(range(os.cpu_count() or 1))
        before, clock = cpu_now(pids, bench.pg, measured), time.monotonic()
        result = load(ports, tokens, args.seconds, args.connections, setup.load_cpus)
        wall = time.monotonic() - clock
        after = cpu_now(pids, bench.pg, measured)
    finally:
        for proc in procs:
            redirect.stop(proc)
    bench.answered[setup.backend] += warm["requests"] + result["requests"]
    load_measured = not can_pin() or cpu_set(setup.load_cpus) <= measured
    result["cpu"] = cpu_shares(before, after, wall, load_measured)
    cpu = ", ".join(f"{k} {v:.0f}" for k, v in result["cpu"].items())
    print(f"  {setup.name:30} {tag:8} {result['rps']:7.0f} req/s   p50 {result['p50']:6.2f} ms"
          f"   p99 {result['p99']:6.2f} ms   non-302: {result['bad']}   CPU % of one: {cpu}",
          flush=True)  # fmt: skip
    return result


def stored_clicks(bench: Bench) -> dict[str, int]:
    with sqlite3.connect(bench.folder / "redirect.sqlite3") as db:
        sqlite_count = db.execute("SELECT count(*) FROM clicks").fetchone()[0]
    pg_count = int(bench.pg.sql("SELECT count(*) FROM clicks", bench.database))
    return {"sqlite": sqlite_count, "postgresql": pg_count}


def redirects(bench: Bench) -> dict:
    load = redirect.load_generator()
    runs: dict[str, list[dict]] = {s.key: [] for s in SETUPS}
    for r in range(bench.args.rounds):
        for setup in SETUPS:
            runs[setup.key].append(run_setup(bench, setup, load, f"round {r + 1}"))
    medians = {
        key: {"rps": statistics.median(x["rps"] for x in rs),
              "p50": statistics.median(x["p50"] for x in rs),
              "p99": statistics.median(x["p99"] for x in rs),
              "bad": sum(x["bad"] for x in rs),
              "cpu": {k: statistics.median(x["cpu"][k] for x in rs) for k in rs[0]["cpu"]}}
        for key, rs in runs.items()
    }  # fmt: skip
    ratios = {
        name: [a["rps"] / b["rps"] for a, b in zip(runs[one], runs[base], strict=True)]
        for name, (one, base) in RATIOS.items()
    }
    stored = stored_clicks(bench)
    return {"generator": load.__name__.removeprefix("load_"), "runs": runs, "medians": medians,
            "names": {s.key: s.name for s in SETUPS},
            "ratios": {name: {"median": statistics.median(rs), "rounds": rs}
                       for name, rs in ratios.items()},
            "stored": stored, "answered": dict(bench.answered)}  # fmt: skip


def print_redirects(result: dict) -> None:
    print()
    for setup in SETUPS:
        m = result["medians"][setup.key]
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in m["cpu"].items())
        print(f"{setup.name:32} {m['rps']:7.0f} req/s   p50 {m['p50']:6.2f} ms   p99 "
              f"{m['p99']:6.2f} ms   non-302: {m['bad']}   CPU % of one: {cpu}")  # fmt: skip
    print()
    for name, ratio in result["ratios"].items():
        rounds = ", ".join(f"{r:.2f}" for r in ratio["rounds"])
        print(f"ratio {name}: {ratio['median']:.2f}x (per round: {rounds})")
    for backend, stored in result["stored"].items():
        print(f"clicks stored, {backend}: {stored} (302s answered: {result['answered'][backend]})")


# ---------------------------------------------------------------- (c): SMTP


def sends_by_outcome(bench: Bench, backend: str, where: str) -> dict[str, int]:
    query = "SELECT outcome, count(*) FROM sends GROUP BY outcome ORDER BY outcome"
    if backend == "sqlite":
        with sqlite3.connect(where) as db:
            return dict(db.execute(query).fetchall())
    lines = bench.pg.sql(query, where).splitlines()
    return {outcome: int(n) for outcome, n in (line.split("|") for line in lines)}


async def smtp_throughput(bench: Bench) -> dict:
    args = bench.args
    payload = smtp.wire(smtp.newsletter_message())
    log = bench.folder / "smtp-servers.log"
    url, database = bench.pg.new_database()
    sqlite_dir = bench.folder / "smtp-sqlite"
    sqlite_file = sqlite_dir / "clickrelay.sqlite3"
    where = {"sqlite": str(sqlite_file), "postgresql": database}
    bench.pg.pin("0")
    bench.pg.settle()
    sink = smtp.bench_server("sink").start(log)
    relays = {
        "sqlite": smtp.clickrelay_server(
            sqlite_dir, sink.port, f'database = "{sqlite_file}"\nsynchronous = "full"'
        ),
        "postgresql": smtp.clickrelay_server(bench.folder / "smtp-pg", sink.port, f'url = "{url}"'),
    }
    started = [sink]
    counts = argparse.Namespace(messages=args.messages, connections=args.smtp_connections)
    runs: dict[str, list[smtp.ClientRun]] = {key: [] for key in relays}
    try:
        for relay in relays.values():
            started.append(relay.start(log))
        for relay in relays.values():  # warm up: connections, caches, the campaign's links
            await smtp.blast(relay.port, 8 * counts.connections, counts.connections, payload,
                             "warm")  # fmt: skip
        for r in range(args.rounds):
            for key, relay in relays.items():
                pg_before, busy_before = bench.pg.cpu_seconds(), busy_seconds({0})
                run = await smtp.measure_client(key, relay, [sink], sink.port, payload, counts,
                                         f"{key}-{r + 1}")  # fmt: skip
                run.cpu_ms["postgres"] = (bench.pg.cpu_seconds() - pg_before) * 1e3 / args.messages
                if can_pin():  # what else ran on CPU 0 meanwhile
                    busy = (busy_seconds({0}) - busy_before) * 1e3 / args.messages
                    run.cpu_ms["others"] = max(0.0, busy - sum(run.cpu_ms.values()))
                cpu = ", ".join(f"{k} {v:.2f}" for k, v in run.cpu_ms.items())
                print(f"             CPU ms/msg: {cpu}", flush=True)
                runs[key].append(run)
    finally:
        for server in reversed(started):
            server.stop()
    result: dict = {"paths": {}}
    for key, rs in runs.items():
        result["paths"][key] = {
            "msgs_per_s": statistics.median(r.rate for r in rs),
            "bad_replies": sum(r.bad for r in rs),
            "sent": sum(r.messages for r in rs),
            "delivered": sum(r.delivered for r in rs),
            "rewritten": sum(r.rewritten for r in rs),
            "cpu_ms_per_msg": {k: statistics.median(r.cpu_ms[k] for r in rs) for k in rs[0].cpu_ms},
            "sends": sends_by_outcome(bench, key, where[key]),
            "warm": 8 * counts.connections,
        }
    pairs = zip(runs["postgresql"], runs["sqlite"], strict=True)
    result["ratios"] = [p.rate / s.rate for p, s in pairs]
    result["ratio"] = statistics.median(result["ratios"])
    bench.pg.drop(database)
    return result


def print_smtp(result: dict) -> None:
    print()
    names = {"sqlite": "SQLite full", "postgresql": "PostgreSQL"}
    for key, p in result["paths"].items():
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in p["cpu_ms_per_msg"].items())
        print(f"tracked relay on {names[key]:12} {p['msgs_per_s']:6.0f} msgs/s   bad replies "
              f"{p['bad_replies']}, delivered {p['delivered']}/{p['sent']}, rewritten "
              f"{p['rewritten']}   CPU ms/msg: {cpu}   sends stored: {p['sends']}")  # fmt: skip
    rounds = ", ".join(f"{r:.2f}" for r in result["ratios"])
    print(f"\nratio SMTP msgs/s PostgreSQL / SQLite full: {result['ratio']:.2f}x "
          f"(per round: {rounds})")  # fmt: skip


# ---------------------------------------------------------------- --profile

STATEMENTS = """
SELECT calls, rows, total_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 80)
FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '{db}')
    AND toplevel AND query NOT LIKE '%pg_stat_statements%' AND query NOT LIKE '%pg_stat_activity%'
ORDER BY calls DESC, total_exec_time DESC LIMIT 20"""
# asyncpg's pool resets a connection on release with these four in one query: one round trip.
RESET_RIDERS = ("CLOSE ALL", "UNLISTEN *", "RESET ALL")
WAITS = """SELECT state, wait_event_type, wait_event FROM pg_stat_activity
WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()"""
SAMPLE_SECONDS = 0.01
WAL_TYPES = re.compile(r"^(\S+)\s+(\d+) \(\s*[\d.]+\)\s+(\d+) \(\s*[\d.]+\)\s+(\d+) \(")


def enable_statement_stats(pg: Postgres) -> None:
    pg.sql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    pg.restart()


@dataclass
class Window:
    """What PostgreSQL did for one database between `start` and `stop`: statements
    (pg_stat_statements), WAL (exact, from the LSNs; fsyncs from pg_stat_wal) and where its
    client backends were (pg_stat_activity sampled every SAMPLE_SECONDS; the sampler's own
    statements are left out)."""

    pg: Postgres
    url: str
    database: str
    lsn: str = ""
    waits: Counter = field(default_factory=Counter)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _sampler: asyncio.Task | None = None

    async def start(self, max_seconds: float) -> None:
        self.pg.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", self.database)
        self.pg.sql("SELECT pg_stat_statements_reset()", self.database)
        self.pg.sql("SELECT pg_stat_reset_shared('wal')")
        self.lsn = self.pg.sql("SELECT pg_current_wal_insert_lsn()")
        self._sampler = asyncio.create_task(self._sample(max_seconds))

    async def _sample(self, max_seconds: float) -> None:
        con = await asyncpg.connect(self.url)
        try:
            deadline = time.monotonic() + max_seconds
            while not self._stop.is_set() and time.monotonic() < deadline:
                for row in await con.fetch(WAITS, self.database):
                    self.waits[_where(row["state"], row["wait_event_type"], row["wait_event"])] += 1
                await asyncio.sleep(SAMPLE_SECONDS)
        finally:
            await con.close()

    async def stop(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            await self._sampler

    def report(self, unit: str, units: int, note: str = "") -> None:
        """Print it per `unit` (`units` of them); call once the clients have gone (their
        backends' WAL statistics are flushed when they exit)."""
        units = max(units, 1)
        end = self.pg.sql("SELECT pg_current_wal_insert_lsn()")
        wal = int(self.pg.sql(f"SELECT pg_wal_lsn_diff('{end}', '{self.lsn}')"))
        syncs = int(self.pg.sql("SELECT wal_sync FROM pg_stat_wal"))
        rows = [line.split("|", 3) for line in self.pg.sql(
            STATEMENTS.format(db=self.database), self.database).splitlines()]  # fmt: skip
        print(f"\nPostgreSQL per {unit} ({units} of them{note}); top-level statements:")
        print(f"  {'calls':>7} {'per ' + unit:>11} {'rows':>7} {'mean ms':>8}  statement")
        trips = 0.0
        for calls, nrows, total, query in rows:
            n = int(calls)
            trips += 0 if query in RESET_RIDERS else n / units
            print(f"  {n:7} {n / units:11.2f} {nrows:>7} {float(total) / n:8.3f}  {query}")
        print(
            f"  => {trips:.2f} round trips per {unit} (the pool's 4-statement reset is one); "
            f"WAL {wal / units:.0f} bytes and about {syncs / units:.2f} fsyncs per {unit}"
        )
        for kind, count, size, fpi in self._wal_records(end)[:8]:
            print(
                f"  WAL {kind:24} {count / units:8.2f} records per {unit}, "
                f"{(size + fpi) / units:7.0f} bytes (full-page images {fpi / units:.0f})"
            )
        total = sum(self.waits.values())
        for where, count in self.waits.most_common(8):
            print(f"  backends: {100 * count / total:5.1f}% of samples {where}")

    def _wal_records(self, end: str) -> list[tuple[str, int, int, int]]:
        waldump = self.pg.server.bindir / "pg_waldump"
        out = subprocess.run(
            [str(waldump), "--path", str(self.pg.server.data / "pg_wal"), "--start", self.lsn,
             "--end", end, "--stats=record"],
            capture_output=True, text=True, timeout=60, check=False,
        ).stdout  # fmt: skip
        matches = [m for m in map(WAL_TYPES.match, out.splitlines()) if m and m[1] != "Total"]
        found = [(m[1], int(m[2]), int(m[3]), int(m[4])) for m in matches]
        return sorted(found, key=lambda r: -r[1])


def _where(state: str | None, kind: str | None, event: str | None) -> str:
    if state == "active":
        return f"executing, waiting on {kind}:{event}" if event else "executing (on CPU)"
    if state == "idle in transaction":
        return "in a transaction, waiting for the client's next statement"
    return "idle (between transactions)" if state == "idle" else f"{state}"


def profiler(output: Path, pid: int):
    proc = smtp.start_profiler(output, pid)
    if can_pin():  # py-spy runs with the load generator, off the measured CPU
        with contextlib.suppress(OSError):
            os.sched_setaffinity(proc.pid, {1})
    return proc


async def profile_redirects(bench: Bench, out: Path, nodes: int) -> None:
    """One redirect run on `nodes` web nodes pinned to CPU 0 with PostgreSQL (wrk on CPU 1),
    py-spy on the first node."""
    pg, args = bench.pg, bench.args
    url, database = pg.new_database()
    storage = StorageSettings(url=StorageURL("postgresql", url))
    tokens = await redirect.seed(storage, bench.secret, args.sends, links=10)
    pg.analyze(database)
    tokens_file = bench.folder / "tokens-profile.txt"
    tokens_file.write_text("\n".join(tokens) + "\n")
    ports = [redirect.free_port() for _ in range(nodes)]
    commands = [
        redirect.web_node(redirect.web_config(bench.folder / f"profile-{i}.toml", port,
                                              f'url = "{url}"', bench.secret), "0")
        for i, port in enumerate(ports)
    ]  # fmt: skip
    load = redirect.load_generator()
    procs = [redirect.start(command, port) for command, port in zip(commands, ports, strict=True)]
    try:  # warm-up on nodes of their own: their statistics are flushed when they stop
        load(ports, tokens_file, WARM_SECONDS, args.connections, "1")
    finally:
        for proc in procs:
            redirect.stop(proc)
    window = Window(pg, url, database)
    stacks = out / f"web-{nodes}.txt"
    procs = []
    try:
        for command, port in zip(commands, ports, strict=True):
            procs.append(redirect.start(command, port))
        spy = profiler(stacks, procs[0].pid)
        await window.start(args.seconds + 30)
        try:
            result = await asyncio.to_thread(load, ports, tokens_file, args.seconds,
                                             args.connections, "1")  # fmt: skip
        finally:
            await window.stop()
        smtp.stop_profiler(spy, stacks)
    finally:
        for proc in procs:
            redirect.stop(proc)
    batches = int(pg.sql(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
        " WHERE query LIKE '%INSERT INTO clicks%' AND toplevel", database,
    ))  # fmt: skip
    print(f"\nredirects, {nodes} node(s) on CPU 0, py-spy on one: {result['rps']:.0f} req/s, "
          f"{result['requests']} clicks answered, {result['requests'] / max(batches, 1):.1f} "
          "clicks per batch")  # fmt: skip
    window.report("batch", batches, f" click batches, {nodes} node(s)")
    pg.drop(database)


async def profile_smtp(bench: Bench, out: Path, connections: int) -> None:
    pg, args = bench.pg, bench.args
    url, database = pg.new_database()
    log = bench.folder / "profile-smtp.log"
    payload = smtp.wire(smtp.newsletter_message())
    sink = smtp.bench_server("sink").start(log)
    folder = bench.folder / f"profile-smtp-{connections}"
    relay = smtp.clickrelay_server(folder, sink.port, f'url = "{url}"')
    try:
        relay.start(log)
        try:  # warm-up: the campaign and its links; statistics flushed when the relay stops
            await smtp.blast(relay.port, 8 * connections, connections, payload, "warm")
        finally:
            relay.stop()
        window = Window(pg, url, database)
        relay.start(log)
        try:
            spy = profiler(out / f"smtp-{connections}.txt", relay.pid)
            await window.start(smtp.ROUND_TIMEOUT)
            try:
                seconds, bad = await smtp.blast(relay.port, args.messages, connections, payload,
                                                "profile")  # fmt: skip
            finally:
                await window.stop()
            smtp.stop_profiler(spy, out / f"smtp-{connections}.txt")
        finally:
            relay.stop()
    finally:
        sink.stop()
    print(
        f"\nSMTP under py-spy, {connections} connection(s): {args.messages / seconds:.0f} "
        f"msgs/s, bad replies {bad}"
    )
    window.report("message", args.messages, f" tracked messages, {connections} connection(s)")
    pg.drop(database)


async def profile(bench: Bench, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bench.pg.pin("0")
    enable_statement_stats(bench.pg)
    print(f"\n# --profile: pg_stat_statements on, py-spy on the node / relay (raw stacks in {out})")
    for nodes in (1, 2):
        await profile_redirects(bench, out, nodes)
    affinity = set(os.sched_getaffinity(0))
    if can_pin():
        os.sched_setaffinity(0, {1})  # the SMTP client
    try:
        for connections in sorted({bench.args.smtp_connections, 1}, reverse=True):
            await profile_smtp(bench, out, connections)
    finally:
        os.sched_setaffinity(0, affinity)


# ---------------------------------------------------------------- main


async def bench_all(bench: Bench) -> dict:
    args = bench.args
    settings = bench.pg.settings()
    layout = (
        "pinned: nodes, relay, sink and PostgreSQL on CPU 0, load generator on CPU 1; "
        "shared: nothing pinned"
        if can_pin()
        else "not pinned (needs 2 CPUs and taskset)"
    )
    print(f"# PostgreSQL {settings['server_version']} (fsync {settings['fsync']}, "
          f"synchronous_commit {settings['synchronous_commit']}, full_page_writes "
          f"{settings['full_page_writes']}, wal_sync_method {settings['wal_sync_method']}, "
          f"shared_buffers {settings['shared_buffers']}) vs SQLite synchronous=full (WAL); "
          f"{os.cpu_count()} CPUs; {layout}; {args.rounds} interleaved rounds, medians",
          flush=True)  # fmt: skip
    if args.profile_only:
        await profile(bench, args.profile_only)
        return {"postgres": settings}
    await seed_backends(bench)
    generator = redirect.load_generator().__name__.removeprefix("load_")
    print(f"\n# redirects: {generator} load, {args.connections} connections, {args.seconds} s "
          f"per measurement after {WARM_SECONDS} s warm-up; {args.sends} sends x 10 links",
          flush=True)  # fmt: skip
    result = {"postgres": settings, "redirects": redirects(bench)}
    print_redirects(result["redirects"])
    bench.pg.drop(bench.database)
    print(f"\n# SMTP: {args.messages} copies of the tracked newsletter per backend and round over "
          f"{args.smtp_connections} connections; relay, sink and PostgreSQL on CPU 0, client "
          "on CPU 1", flush=True)  # fmt: skip
    affinity = set(os.sched_getaffinity(0))
    if can_pin():
        os.sched_setaffinity(0, {1})  # the SMTP client runs in this process
    try:
        result["smtp"] = await smtp_throughput(bench)
    finally:
        os.sched_setaffinity(0, affinity)
    print_smtp(result["smtp"])
    if args.profile:
        await profile(bench, args.profile)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4, help="per redirect measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64, help="HTTP connections")
    parser.add_argument("--sends", type=int, default=2000, help="sends (x 10 links) to click")
    parser.add_argument("--messages", type=int, default=300, help="SMTP copies per backend, round")
    parser.add_argument("--smtp-connections", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", type=Path, help="profile PostgreSQL's runs, stacks here")
    parser.add_argument("--profile-only", type=Path, help="the same without the figures")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="clickrelay-bench-pg-"))
    pg = Postgres()
    try:
        result = asyncio.run(bench_all(Bench(args, folder, pg)))
    finally:
        pg.close()
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
