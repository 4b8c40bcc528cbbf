"""SMTP relay figures against the real ceilings, in one run: throughput, peak memory, and many
recipients to a distant upstream.

Throughput: Postfix's smtp-source sends copies of the 60 KB, 40-link newsletter (text/html,
quoted-printable) over kept sessions, and smtp-sink throws them away; both run on CPU 1, the
relay under test alone on CPU 0. Paths, interleaved over rounds (medians, the machine is noisy):
smtp-source into smtp-sink straight (the ceiling); through a lean plain relay (aiosmtpd handing
each message to aiosmtplib over kept connections); through clickrelay with a message that is no
campaign (untouched), and with the campaign newsletter (X-Track-Clicks: yes, links rewritten).
smtp-source stops at the first reply other than the expected one; a few copies of each message
go through a dumping smtp-sink afterwards to check what arrives.

Peak memory: a fresh relay forwarding one 30 MB message (one big HTML part, or an attachment).

Many recipients: 500 RCPTs pipelined by the client, to an upstream 20 ms away (a delaying
proxy), with and without PIPELINING offered by it.

    python bench/bench_smtp.py [--messages 2000] [--connections 8] [--rounds 3]
                               [--rss-mb 30] [--json FILE] [--profile FILE]

With --profile, py-spy samples the clickrelay process during the timed runs (raw collapsed
stacks into FILE, a summary printed); throughput figures of such a run are depressed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import signal
import socket
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

import aiosmtplib  # noqa: E402
from aiosmtpd.smtp import SMTP, Envelope, Session  # noqa: E402
from bench_rewrite import campaign_message  # noqa: E402
from latency import DelayProxy  # noqa: E402
from newsletter import newsletter  # noqa: E402

from clickrelay.smtp.upstream import dot_stuff  # noqa: E402

PUBLIC_URL = "https://click.example.com"
TRACKING_PREFIX = PUBLIC_URL.encode() + b"/c/"
CAMPAIGN_HEADERS = (
    b"Date: Tue, 01 Apr 2025 09:00:00 +0000\r\nX-Campaign-Id: spring-bench\r\n"
    b"X-Campaign-Name: Spring bench\r\nX-Track-Clicks: yes\r\n"
)
BIG_LIMIT = 64 * 1024 * 1024  # line and message limits of the bench's own servers
ROUND_TIMEOUT = 300.0  # seconds; one path's run never takes longer


# ---------------------------------------------------------------- bench servers (child processes)


class LongLineSMTP(SMTP):
    """aiosmtpd without its 1,001-octet line limit, like the relay under test."""

    line_length_limit = BIG_LIMIT


@dataclass
class SinkHandler:
    """Accepts and counts; `VRFY <stats@sink>` answers '252 messages octets tracked'."""

    messages: int = 0
    octets: int = 0
    tracked: int = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.messages += 1
        self.octets += len(content)
        self.tracked += TRACKING_PREFIX in content
        return "250 2.0.0 Ok: discarded"

    async def handle_VRFY(self, server: SMTP, session: Session, envelope, address: str) -> str:
        return f"252 {self.messages} {self.octets} {self.tracked}"


@dataclass
class LeanRelayHandler:
    """The baseline relay: forward each message with aiosmtplib over kept connections."""

    upstream_port: int
    idle: list[aiosmtplib.SMTP] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        conn = self.idle.pop() if self.idle else None
        if conn is None:
            conn = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.upstream_port, timeout=60)
            await conn.connect()
        try:
            await conn.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.original_content)
        except aiosmtplib.SMTPException as exc:
            conn.close()
            return f"451 4.4.1 upstream failed: {exc}"
        self.idle.append(conn)
        return "250 2.0.0 Ok: forwarded"


async def serve(kind: str, port: int, upstream_port: int) -> None:
    handler = SinkHandler() if kind == "sink" else LeanRelayHandler(upstream_port)
    server = await asyncio.get_running_loop().create_server(
        lambda: LongLineSMTP(handler, data_size_limit=BIG_LIMIT, hostname=f"{kind}.bench"),
        "127.0.0.1",
        port,
    )
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------- processes


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    proc: subprocess.Popen | None = None

    def start(self, log: Path) -> Server:
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(3) == b"220":
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start; see {log}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# The CPUs this process may use when it starts: main() then pins this process (the client) to
# CPU 1, which its children would inherit, so servers are started with `taskset -c 0`.
ALLOWED_CPUS = frozenset(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ())


def can_pin() -> bool:
    """Servers on CPU 0 and the client on CPU 1: needs both CPUs and taskset."""
    return {0, 1} <= ALLOWED_CPUS and shutil.which("taskset") is not None


def pinned(cpus: int | str) -> list[str]:
    """A command prefix that runs on `cpus` (0, 1 or "0,1")."""
    return ["taskset", "-c", str(cpus)] if can_pin() else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_server(kind: str, upstream_port: int = 0) -> Server:
    port = free_port()
    cmd = [*pinned(0), sys.executable, __file__, "serve", kind, str(port), str(upstream_port)]
    return Server(kind, cmd, port)


def clickrelay_server(
    folder: Path, upstream_port: int, storage: str | None = None, workers: int = 1,
    cpus: int | str = 0,
) -> Server:  # fmt: skip
    """clickrelay's SMTP relay with default settings but for its ports, its `workers` and a
    fresh database (a SQLite file in `folder`, or the [storage] lines `storage`), on `cpus`."""
    folder.mkdir(parents=True)
    port = free_port()
    config = folder / "clickrelay.toml"
    if storage is None:
        storage = f'database = "{folder}/clickrelay.sqlite3"'
    config.write_text(
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "relay.bench"\nworkers = {workers}\n'
        f'[upstream]\nurl = "smtp://127.0.0.1:{upstream_port}"\n'
        f'[web]\npublic_url = "{PUBLIC_URL}"\n'
        f"[storage]\n{storage}\n"
        f'[tracking]\nsecret_file = "{folder}/secret"\n'
    )
    cmd = [*pinned(cpus), sys.executable, "-m", "clickrelay", "smtp", "--config", str(config)]
    return Server("clickrelay", cmd, port)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), else 0."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kb(pid: int, key: str) -> int:
    """A /proc/<pid>/status figure such as VmRSS or VmHWM, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# ---------------------------------------------------------------- the lean client


def copy_headers(tag: str, i: int) -> bytes:
    """The only bytes that differ between copies; prepended, so the body needs no re-stuffing."""
    return f"Message-ID: <{tag}.{i}@bench.example>\r\nX-Contact-Id: contact-{i}\r\n".encode()


def wire(message: bytes) -> bytes:
    """The DATA payload: dot-stuffed once, CRLF-terminated, with the final dot."""
    stuffed = dot_stuff(message)
    return stuffed + (b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n")


class Client:
    """One SMTP session over asyncio streams; counts every unexpected reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.bad = reader, writer, 0

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = cls(reader, writer)
        await session.expect(220)
        await session.command(b"EHLO client.bench\r\n", 250)
        return session

    async def expect(self, code: int) -> str:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                break
        if int(line[:3]) != code:
            self.bad += 1
        return line.decode("ascii", "replace").strip()

    async def command(self, line: bytes, code: int) -> str:
        self.writer.write(line)
        return await self.expect(code)

    async def send(self, i: int, payload: bytes, headers: bytes) -> bool:
        bad = self.bad
        await self.command(b"MAIL FROM:<news@example.com>\r\n", 250)
        await self.command(b"RCPT TO:<r%d@example.com>\r\n" % i, 250)
        if self.bad == bad:
            await self.command(b"DATA\r\n", 354)
        if self.bad != bad:
            await self.command(b"RSET\r\n", 250)
            return False
        self.writer.writelines((headers, payload))
        await self.expect(250)
        return self.bad == bad

    async def close(self) -> None:
        await self.command(b"QUIT\r\n", 221)
        self.writer.close()
        await self.writer.wait_closed()


async def client_session(port: int, ids: range, payload: bytes, tag: str) -> int:
    session = await Client.open(port)
    for i in ids:
        await session.send(i, payload, copy_headers(tag, i))
    await session.close()
    return session.bad


async def blast(port: int, copies: int, connections: int, payload: bytes, tag: str) -> tuple:
    """Send `copies` copies over `connections` sessions; (seconds, unexpected replies)."""
    sessions = [
        client_session(port, range(k, copies, connections), payload, tag)
        for k in range(connections)
    ]
    start = time.perf_counter()
    bad = await asyncio.wait_for(asyncio.gather(*sessions), ROUND_TIMEOUT)
    return time.perf_counter() - start, sum(bad)


async def sink_stats(port: int) -> tuple[int, int, int]:
    """(messages, octets, messages with a tracking link) the sink has received so far."""
    session = await Client.open(port)
    line = await session.command(b"VRFY <stats@sink.bench>\r\n", 252)
    await session.close()
    messages, octets, tracked = map(int, line.split()[1:4])
    return messages, octets, tracked


@dataclass
class ClientRun:
    """A run of the Python client against the aiosmtpd sink (bench_postgres.py's SMTP part)."""

    path: str
    seconds: float
    messages: int
    megabytes: float
    bad: int
    delivered: int
    rewritten: int
    cpu_ms: dict[str, float]  # server process -> CPU ms per message

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


async def measure_client(path: str, server: Server, others: list[Server], sink_port: int,
                  payload: bytes, args, tag: str) -> ClientRun:  # fmt: skip
    """One path's run; CPU is counted for `server` and `others` (the sink behind a relay)."""
    measured = [server, *others]
    before_stats = await sink_stats(sink_port)
    before_cpu = [cpu_seconds(s.pid) for s in measured]
    seconds, bad = await blast(server.port, args.messages, args.connections, payload, tag)
    cpu = {s.name: (cpu_seconds(s.pid) - b) * 1e3 / args.messages
           for s, b in zip(measured, before_cpu, strict=True)}  # fmt: skip
    after_stats = await sink_stats(sink_port)
    delivered, octets, rewritten = (a - b for a, b in zip(after_stats, before_stats, strict=True))
    run = ClientRun(path, seconds, args.messages, octets / 1e6, bad, delivered, rewritten, cpu)
    print(f"  {tag:10} {run.rate:6.0f} msgs/s {run.megabytes / seconds:6.1f} MB/s  bad replies "
          f"{bad}  delivered {delivered}  rewritten {rewritten}", flush=True)  # fmt: skip
    return run


# ---------------------------------------------------------------- throughput

SMTP_SOURCE, SMTP_SINK = "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink"


def newsletter_message() -> bytes:
    return CAMPAIGN_HEADERS + campaign_message(newsletter().encode())


PATHS = {  # path -> (what it is, the message it sends)
    "straight": "smtp-source into smtp-sink straight (the ceiling)",
    "lean": "lean plain relay (aiosmtpd + aiosmtplib, kept connections)",
    "untouched": "clickrelay, a message that is no campaign (untouched)",
    "tracked": "clickrelay, tracking on (40 links rewritten)",
}


def postfix_sink(port: int, *flags: str, cpus: int | str = 1) -> Server:
    """Postfix's smtp-sink on `cpus` (with the load generator): it throws each message away."""
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    cmd = [*pinned(cpus), SMTP_SINK, *user, *flags, f"127.0.0.1:{port}", "256"]
    return Server("smtp-sink", cmd, port)


@dataclass
class Run:
    path: str
    seconds: float
    messages: int
    failed: bool  # smtp-source met a reply other than the expected one
    cpu_ms: float  # the relay's CPU ms per message (0 for straight)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def source(port: int, message: Path, args, cpus: int | str = 1) -> tuple[float, bool]:
    """Postfix's smtp-source on `cpus`: `args.messages` copies of `message` over
    `args.connections` sessions, each kept for its next message; (seconds, failed)."""
    cmd = [*pinned(cpus), SMTP_SOURCE, "-d", "-s", str(args.connections), "-m", str(args.messages),
           "-F", str(message), "-f", "news@example.com", "-t", "r@example.com",
           f"127.0.0.1:{port}"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=ROUND_TIMEOUT, check=False)  # fmt: skip
    return time.perf_counter() - start, done.returncode != 0 or bool(done.stderr)


def measure(path: str, port: int, relay: Server | None, message: Path, args, tag: str) -> Run:
    before = cpu_seconds(relay.pid) if relay else 0.0
    seconds, failed = source(port, message, args)
    cpu = (cpu_seconds(relay.pid) - before) * 1e3 / args.messages if relay else 0.0
    run = Run(path, seconds, args.messages, failed, cpu)
    print(f"  {tag:12} {run.rate:6.0f} msgs/s  relay CPU {cpu:5.2f} ms/msg"
          f"{'  FAILED' if failed else ''}", flush=True)  # fmt: skip
    return run


def smtp_source_file(folder: Path, name: str, message: bytes) -> Path:
    """The message as smtp-source -F reads it: lines ending in LF (it adds the CR)."""
    path = folder / name
    path.write_bytes(message.replace(b"\r\n", b"\n"))
    return path


async def throughput(args, folder: Path, log: Path) -> dict:
    tracked = smtp_source_file(folder, "tracked.eml", newsletter_message())
    untouched = smtp_source_file(folder, "untouched.eml", campaign_message(newsletter().encode()))
    sink = postfix_sink(free_port()).start(log)
    lean = bench_server("lean", sink.port)
    relay = clickrelay_server(folder / "throughput", sink.port)
    started = [sink]
    try:
        started += [lean.start(log), relay.start(log)]
        paths = {  # path -> (the server the load goes to, the relay measured, the message)
            "straight": (sink, None, tracked),
            "lean": (lean, lean, tracked),
            "untouched": (relay, relay, untouched),
            "tracked": (relay, relay, tracked),
        }
        for server, _, message in paths.values():  # warm up: connections, caches, lazy imports
            source(server.port, message, argparse.Namespace(messages=50, connections=8))
        profiler = start_profiler(args.profile, relay.pid) if args.profile else None
        runs: dict[str, list[Run]] = {path: [] for path in paths}
        for r in range(args.rounds):
            for path, (server, measured, message) in paths.items():
                runs[path].append(measure(path, server.port, measured, message, args,
                                          f"{path}-{r + 1}"))  # fmt: skip
        if profiler is not None:
            stop_profiler(profiler, args.profile)
        checked = await rewritten_check(folder, tracked, untouched, log)
    finally:
        for server in reversed(started):
            server.stop()
    return summarize(runs, len(newsletter_message())) | {"checked": checked}


async def rewritten_check(folder: Path, tracked: Path, untouched: Path, log: Path) -> dict:
    """Outside the timed runs: a few of each message through a second clickrelay into a
    dumping smtp-sink; how many arrived, and how many of each had tracking links."""
    dumps = folder / "dumps"
    dumps.mkdir()
    if os.geteuid() == 0:  # smtp-sink writes as nobody
        folder.chmod(0o711)
        shutil.chown(dumps, "nobody")
    sink = postfix_sink(free_port(), "-d", f"{dumps}/%M.").start(log)
    relay = clickrelay_server(folder / "check", sink.port).start(log)
    counts = {}
    try:
        for name, message in (("tracked", tracked), ("untouched", untouched)):
            before = set(dumps.iterdir())
            source(relay.port, message, argparse.Namespace(messages=20, connections=2))
            deadline = time.monotonic() + 30
            while len(set(dumps.iterdir()) - before) < 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            new = [p.read_bytes() for p in set(dumps.iterdir()) - before]
            links = sum(TRACKING_PREFIX in d for d in new)
            counts[name] = {"sent": 20, "arrived": len(new), "with_tracking_links": links}
    finally:
        relay.stop()
        sink.stop()
    return counts


def summarize(runs: dict[str, list[Run]], size: int) -> dict:
    result: dict = {"message_bytes": size, "paths": {}, "ratios": {}}
    for path, rs in runs.items():
        result["paths"][path] = {
            "msgs_per_s": statistics.median(r.rate for r in rs),
            "mb_per_s": statistics.median(r.rate for r in rs) * size / 1e6,
            "failed_rounds": sum(r.failed for r in rs),
            "sent": sum(r.messages for r in rs),
            "relay_cpu_ms_per_msg": statistics.median(r.cpu_ms for r in rs),
        }
    for path, baseline in (("tracked", "straight"), ("untouched", "straight"),
                           ("tracked", "lean"), ("untouched", "lean")):  # fmt: skip
        pairs = zip(runs[path], runs[baseline], strict=True)
        per_round = [a.rate / b.rate for a, b in pairs]
        result["ratios"][f"{path}/{baseline}"] = {
            "median": statistics.median(per_round), "rounds": per_round}  # fmt: skip
    return result


def print_throughput(result: dict) -> None:
    for path, p in result["paths"].items():
        print(f"{PATHS[path]:58} {p['msgs_per_s']:7.0f} msgs/s {p['mb_per_s']:6.1f} MB/s  "
              f"relay CPU {p['relay_cpu_ms_per_msg']:.2f} ms/msg  "
              f"failed rounds {p['failed_rounds']}")  # fmt: skip
    for name, r in result["ratios"].items():
        rounds = ", ".join(f"{x:.2f}" for x in r["rounds"])
        print(f"ratio {name}: {r['median']:.2f}x (rounds: {rounds})")
    for name, c in result["checked"].items():
        print(
            f"check, {name}: {c['arrived']}/{c['sent']} arrived, "
            f"{c['with_tracking_links']} with tracking links"
        )


# ---------------------------------------------------------------- workers

WORKERS_SESSIONS = 16  # smtp-source sessions: several for each worker


async def workers_scaling(args, folder: Path, log: Path) -> dict:
    """clickrelay with `workers = 2` against `workers = 1`, tracked copies, everything on both
    CPUs: on two cores the load generator and the sink cannot have a CPU of their own, so
    they take their share from the relay's (their CPU per message is what the straight path
    costs, measured above). Interleaved rounds, medians."""
    tracked = smtp_source_file(folder, "workers.eml", newsletter_message())
    sink = postfix_sink(free_port(), cpus="0,1").start(log)
    relays = {n: clickrelay_server(folder / f"workers-{n}", sink.port, workers=n, cpus="0,1")
              for n in (1, 2)}  # fmt: skip
    load = argparse.Namespace(messages=args.messages, connections=WORKERS_SESSIONS)
    rates: dict[int, list[float]] = {1: [], 2: []}
    try:
        for relay in relays.values():
            relay.start(log)
        await logged(log, "2 workers serving")  # (the first listens before the second starts)
        for relay in relays.values():
            source(relay.port, tracked, argparse.Namespace(messages=50, connections=16), "0,1")
        for r in range(args.rounds):
            for n, relay in relays.items():
                seconds, failed = source(relay.port, tracked, load, "0,1")
                rates[n].append(0.0 if failed else args.messages / seconds)
                print(f"  workers={n}-{r + 1}  {rates[n][-1]:6.0f} msgs/s", flush=True)
    finally:
        for relay in relays.values():
            relay.stop()
        sink.stop()
    ratios = [two / one if one else 0.0 for one, two in zip(rates[1], rates[2], strict=True)]
    return {"msgs_per_s": {n: statistics.median(r) for n, r in rates.items()},
            "ratio": statistics.median(ratios), "ratios": ratios}  # fmt: skip


async def logged(log: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {text!r} in {log}")
        await asyncio.sleep(0.1)


def print_workers(result: dict) -> None:
    one, two = result["msgs_per_s"][1], result["msgs_per_s"][2]
    rounds = ", ".join(f"{r:.2f}" for r in result["ratios"])
    print(f"\nworkers, tracked copies, relay, source and sink sharing both CPUs: 1 worker "
          f"{one:.0f} msgs/s, 2 workers {two:.0f} msgs/s = {result['ratio']:.2f}x "
          f"(rounds: {rounds})")  # fmt: skip


# ---------------------------------------------------------------- peak memory


def big_html_message(size: int) -> bytes:
    """A campaign message whose one text/html part (quoted-printable) is `size` bytes: the
    newsletter repeated (40 tracked links every 60 KB, the same 40 URLs)."""
    one = campaign_message(newsletter().encode())
    return CAMPAIGN_HEADERS + campaign_message(newsletter().encode() * max(1, size // len(one)))


def attachment_message(size: int) -> bytes:
    """A campaign message: the 60 KB newsletter (quoted-printable) and a base64 attachment
    making up the rest of `size`."""
    html = campaign_message(newsletter().encode()).split(b"\r\n\r\n", 1)[1]
    raw = random.Random(1).randbytes(max(1, (size - len(html)) * 57 // 78))
    attachment = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return CAMPAIGN_HEADERS + (
        b"From: news@example.com\r\nTo: r@example.com\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n" + html + b"\r\n--b1\r\nContent-Type: application/pdf; name=report.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=report.pdf\r\n\r\n" + attachment + b"--b1--\r\n"
    )


async def peak_rss(server: Server, message: bytes, warm: bytes, log: Path) -> dict:
    """Start a fresh relay, warm it with one small message, send one big one; memory in MB."""
    server.start(log)
    try:
        session = await Client.open(server.port)
        await session.send(0, wire(warm), copy_headers("rss-warm", 0))
        idle = memory_kb(server.pid, "VmRSS")
        ok = await asyncio.wait_for(
            session.send(1, wire(message), copy_headers("rss", 1)), ROUND_TIMEOUT
        )
        await session.close()
        peak = memory_kb(server.pid, "VmHWM")
    finally:
        server.stop()
    size = len(message) / 1e6
    above = (peak - idle) * 1024 / 1e6
    return {"message_mb": size, "idle_mb": idle * 1024 / 1e6, "peak_mb": peak * 1024 / 1e6,
            "above_idle_mb": above, "ratio": above / size, "accepted": ok}  # fmt: skip


async def memory(args, folder: Path, log: Path) -> dict:
    size = int(args.rss_mb * 1e6)
    warm, html = newsletter_message(), big_html_message(size)
    sink = bench_server("sink").start(log)
    cases = {
        "clickrelay, big HTML part": (html, clickrelay_server(folder / "rss-html", sink.port)),
        "clickrelay, attachment": (
            attachment_message(size),
            clickrelay_server(folder / "rss-attachment", sink.port),
        ),
        "lean relay, big HTML part": (html, bench_server("lean", sink.port)),
    }
    try:
        return {name: await peak_rss(server, message, warm, log)
                for name, (message, server) in cases.items()}  # fmt: skip
    finally:
        sink.stop()


def print_memory(results: dict) -> None:
    print("\npeak RSS (VmHWM) of a fresh relay process forwarding one big campaign message, above "
          "its idle VmRSS after one warm-up message. Big HTML part: one text/html quoted-printable "
          "part, the newsletter repeated (~20,000 links). Attachment: the 60 KB newsletter plus a "
          "base64 application/pdf part filling up the size.")  # fmt: skip
    for name, r in results.items():
        print(f"{name:36} message {r['message_mb']:5.1f} MB  idle {r['idle_mb']:5.1f} MB  "
              f"peak {r['peak_mb']:6.1f} MB  above idle {r['above_idle_mb']:6.1f} MB = "
              f"{r['ratio']:.2f}x the message (target < 4)  accepted: {r['accepted']}")  # fmt: skip


# ---------------------------------------------------------------- many recipients

RECIPIENTS = 500
UPSTREAM_DELAY = 0.010  # seconds each way: the upstream 20 ms away


async def pipelined_transaction(port: int, recipients: int) -> tuple[float, int]:
    """A client's pipelined group (MAIL, the RCPTs, DATA in one write), then the message;
    (seconds from the group's write to the reply to the message, replies of the expected
    code)."""
    session = await Client.open(port)
    rcpts = b"".join(b"RCPT TO:<r%d@example.com>\r\n" % n for n in range(recipients))
    start = time.perf_counter()
    session.writer.write(b"MAIL FROM:<news@example.com>\r\n" + rcpts + b"DATA\r\n")
    for code in (250, *[250] * recipients, 354):
        await session.expect(code)
    session.writer.write(wire(newsletter_message()))
    await session.expect(250)
    seconds = time.perf_counter() - start
    await session.close()
    return seconds, recipients + 3 - session.bad


async def many_recipients(folder: Path, log: Path) -> dict:
    """500 recipients in one transaction, the upstream (smtp-sink) 20 ms away behind a delaying
    proxy (tests/latency.py); with and without PIPELINING offered by the upstream (-p), and the
    client straight to the proxy as the scale."""
    result = {}
    for name, flags in (("pipelining", ()), ("no pipelining", ("-p",))):
        sink = postfix_sink(free_port(), *flags).start(log)
        proxy = DelayProxy(sink.port, UPSTREAM_DELAY)
        await proxy.start()
        relay = clickrelay_server(folder / f"rcpts-{name.replace(' ', '-')}", proxy.port)
        try:
            relay.start(log)
            direct = await pipelined_transaction(proxy.port, RECIPIENTS)
            through = await pipelined_transaction(relay.port, RECIPIENTS)
        finally:
            relay.stop()
            await proxy.stop()
            sink.stop()
        result[name] = {"relay_seconds": through[0], "relay_expected_replies": through[1],
                        "direct_seconds": direct[0], "expected": RECIPIENTS + 3}  # fmt: skip
    return result


def print_many_recipients(result: dict) -> None:
    print(f"\n{RECIPIENTS} RCPTs in one pipelined transaction, the upstream (smtp-sink) "
          f"{2 * UPSTREAM_DELAY * 1000:.0f} ms away:")  # fmt: skip
    for name, r in result.items():
        print(f"  upstream with {name:14} through clickrelay {r['relay_seconds']:6.2f} s "
              f"({r['relay_expected_replies']}/{r['expected']} replies as expected); "
              f"client straight to it {r['direct_seconds']:5.2f} s")  # fmt: skip


# ---------------------------------------------------------------- profile


def start_profiler(output: Path, pid: int) -> subprocess.Popen:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    cmd = [py_spy, "record", "-p", str(pid), "-f", "raw", "-o", str(output), "--rate", "200"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(proc: subprocess.Popen, output: Path) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    if output.exists():
        print_profile(output)


# py-spy takes these blocking waits for work on this kernel; they are idle time, not CPU.
IDLE_FRAMES = (
    "_connection_worker_thread (aiosqlite/core.py:59)",
    "EpollSelector.select (",
    "_worker (concurrent/futures/thread.py:81)",  # an idle worker thread waiting for work
)
LIBRARIES = ("clickrelay/", "aiosmtpd/", "aiosmtplib/", "aiosqlite/", "asyncpg/", "aiohttp/")
ALWAYS = ("clickrelay/cli.py", "clickrelay/__main__.py")  # on every stack: not worth a line


def print_profile(output: Path, top: int = 20) -> None:
    """Busy samples by function: inclusive for the libraries' and clickrelay's own functions
    (line numbers folded), and self time (innermost frame) for everything."""
    inclusive, own, total = Counter(), Counter(), 0
    for line in output.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_FRAMES):
            continue
        total += int(count)
        own[frames[-1]] += int(count)
        for function in {frame.rpartition(":")[0] + ")" for frame in frames}:
            if any(n in function for n in LIBRARIES) and not any(n in function for n in ALWAYS):
                inclusive[function] += int(count)
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"\nclickrelay profile, {title}, % of {total} busy samples:")
        for frame, count in counter.most_common(top):
            print(f"  {100 * count / total:5.1f}%  {frame[:110]}")


# ---------------------------------------------------------------- main


async def bench(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="clickrelay-bench-smtp-"))
    log = folder / "servers.log"
    try:
        print(f"# {args.messages} copies of the {len(newsletter()) / 1000:.0f} KB newsletter "
              f"({len(newsletter_message()) / 1000:.0f} KB as a message) "
              f"over {args.connections} sessions, {args.rounds} interleaved rounds; the relay on "
              f"CPU 0, smtp-source and smtp-sink on CPU 1; {os.cpu_count()} CPUs; medians",
              flush=True)  # fmt: skip
        result = {"throughput": await throughput(args, folder, log)}
        print_throughput(result["throughput"])
        result["workers"] = await workers_scaling(args, folder, log)
        print_workers(result["workers"])
        result["memory"] = await memory(args, folder, log)
        print_memory(result["memory"])
        result["recipients"] = await many_recipients(folder, log)
        print_many_recipients(result["recipients"])
        problems = [line for line in log.read_text().splitlines() if "ERROR" in line]
        if problems:
            print(f"\n{len(problems)} error line(s) in the servers' logs, e.g. {problems[0]}")
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        kind, port, upstream_port = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        asyncio.run(serve(kind, port, upstream_port))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="copies per path and round")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-mb", type=float, default=30.0, help="size of the big message")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of clickrelay here")
    args = parser.parse_args()
    if can_pin():
        os.sched_setaffinity(0, {1})  # the client; servers are started on CPU 0
    result = asyncio.run(bench(args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
