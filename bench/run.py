"""All of clickrelay's end-to-end benchmarks in one command: SMTP relay throughput and memory
(bench_smtp.py), link rewriting (bench_rewrite.py), redirects (bench_redirect.py), each against
its baseline in the same run, DKIM re-signing against the rewrite (bench_dkim.py), durable
storage on PostgreSQL against SQLite with one and two web nodes (bench_postgres.py), and
redirects with webhooks configured (bench_webhooks.py), report pages at 100k sends against 1k
(bench_reports.py).
Prints the machine's description and every bench's output, then writes the figures against
their targets to bench/RESULTS.md (a "## Notes" section already in that file is kept).
The defaults keep the whole run to about eight minutes.

    python bench/run.py [--smtp-messages 1000] [--rounds 3] [--redirect-seconds 5]
                        [--pg-seconds 4] [--pg-rounds 2] [--pg-messages 300]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTES = "\n## Notes"


@dataclass
class Row:
    figure: str
    value: str
    target: str = ""
    met: bool | None = None  # None: no target, shown for scale


@dataclass
class Section:
    title: str
    script: str
    args: list[str]
    timeout: float  # seconds
    output: str = ""
    error: str = ""
    rows: list[Row] = field(default_factory=list)

    @property
    def command(self) -> list[str]:
        return ["python", f"bench/{self.script}", *self.args]

    def add(self, figure: str, value: str, target: str = "", met: bool | None = None) -> None:
        self.rows.append(Row(figure, value, target, met))


# ---------------------------------------------------------------- machine


def machine() -> list[tuple[str, str]]:
    cpu = _first_value(Path("/proc/cpuinfo"), "model name") or platform.processor() or "unknown"
    memory = _first_value(Path("/proc/meminfo"), "MemTotal")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} logical CPUs"),
        ("memory", memory or "unknown"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("kernel", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("load average at start (1, 5, 15 min)", load),
        ("code", _git_revision()),
    ]


def _first_value(path: Path, key: str) -> str | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), None)


def _git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=HERE, capture_output=True, text=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"git {commit}" + (" with uncommitted changes" if dirty else "") if commit else "unknown"


# ---------------------------------------------------------------- running the benches


def run(section: Section, extra: list[str]) -> None:
    """Run one bench, echoing its output as it comes; a failure is recorded, not raised."""
    print(f"\n$ {shlex.join(section.command)}", flush=True)
    command = [sys.executable, str(HERE / section.script), *section.args, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=HERE.parent, env=env) as proc:  # fmt: skip
        watchdog = threading.Timer(section.timeout, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                lines.append(line)
            status = proc.wait()
        finally:
            watchdog.cancel()
    section.output = "".join(lines)
    if status:
        section.error = f"exit status {status}" + (" (timed out)" if status == -9 else "")


def grab(pattern: str, text: str) -> tuple[str, ...] | None:
    found = re.search(pattern, text, re.MULTILINE)
    return found.groups() if found else None


def unparsed(section: Section, what: str) -> None:
    section.add(what, "not found in the bench's output", "", False)


# ---------------------------------------------------------------- figures per bench


SMTP_TARGETS = {  # ratio -> its target (at least)
    "tracked/straight": 0.25,
    "untouched/straight": 0.4,
    "tracked/lean": 0.8,
    "untouched/lean": 0.8,
}
SMTP_PATHS = {
    "straight": "smtp-source into smtp-sink straight (the ceiling)",
    "lean": "lean plain relay (aiosmtpd + aiosmtplib)",
    "untouched": "clickrelay, no campaign (untouched)",
    "tracked": "clickrelay, tracking on",
}


def smtp_rows(section: Section, figures: dict) -> None:
    throughput = figures["throughput"]
    for name, target in SMTP_TARGETS.items():
        ratio = throughput["ratios"][name]
        rounds = ", ".join(f"{r:.2f}" for r in ratio["rounds"])
        section.add(f"messages/s, {name} (median of rounds)",
                    f"{ratio['median']:.2f}x (rounds: {rounds})", f">= {target}",
                    ratio["median"] >= target)  # fmt: skip
    for path, name in SMTP_PATHS.items():
        p = throughput["paths"][path]
        cpu = (
            f", relay CPU {p['relay_cpu_ms_per_msg']:.2f} ms/message" if path != "straight" else ""
        )
        section.add(f"{name}: messages/s, MB/s", f"{p['msgs_per_s']:.0f}, {p['mb_per_s']:.1f}{cpu}")
    workers = figures["workers"]
    rounds = ", ".join(f"{r:.2f}" for r in workers["ratios"])
    one, two = workers["msgs_per_s"]["1"], workers["msgs_per_s"]["2"]
    section.add("tracked messages/s, 2 workers / 1 (relay, smtp-source and smtp-sink sharing "
                "both CPUs)", f"{workers['ratio']:.2f}x ({two:.0f} vs {one:.0f}; rounds: {rounds})",
                ">= 1.7", workers["ratio"] >= 1.7)  # fmt: skip
    failed = sum(p["failed_rounds"] for p in throughput["paths"].values())
    section.add("rounds where smtp-source met an unexpected reply", str(failed), "0", failed == 0)
    for name, links_wanted in (("tracked", True), ("untouched", False)):
        c = throughput["checked"][name]
        ok = c["arrived"] == c["sent"] and c["with_tracking_links"] == (c["sent"] * links_wanted)
        section.add(f"check: {name} copies arrived, with tracking links (of {c['sent']})",
                    f"{c['arrived']}, {c['with_tracking_links']}",
                    "all, all" if links_wanted else "all, none", ok)  # fmt: skip
    for name, m in figures["memory"].items():
        baseline = name.startswith("lean")
        section.add(f"peak RSS above idle: {name}, {m['message_mb']:.0f} MB message",
                    f"{m['above_idle_mb']:.0f} MB = {m['ratio']:.1f}x (idle {m['idle_mb']:.0f} MB)",
                    "" if baseline else "< 4x",
                    None if baseline else m["ratio"] < 4 and m["accepted"])  # fmt: skip
    for name, r in figures["recipients"].items():
        as_expected = f"{r['relay_expected_replies']}/{r['expected']} replies as expected"
        value = (f"{r['relay_seconds']:.2f} s ({as_expected}; the client straight to the "
                 f"upstream: {r['direct_seconds']:.2f} s)")  # fmt: skip
        ok = r["relay_expected_replies"] == r["expected"]
        if name == "pipelining":
            section.add("500 RCPTs, upstream 20 ms away, offering PIPELINING", value, "<= 1 s",
                        ok and r["relay_seconds"] <= 1.0)  # fmt: skip
        else:
            section.add("500 RCPTs, upstream 20 ms away, without PIPELINING (as before)", value,
                        "all replies", ok)  # fmt: skip


def rewrite_rows(section: Section) -> None:
    text = section.output
    total = grab(r"all documents: ([\d.]+) MB/s rewrite.*?([\d.]+) MB/s html.parser", text)
    letter = grab(r"^newsletter.*?([\d.]+) ms\s+([\d.]+) MB/s\s+x\s*([\d.]+) vs html", text)
    if total is None or letter is None:
        unparsed(section, "rewrite MB/s")
        return
    mb_s = float(total[0])
    section.add(
        "rewrite, all documents (corpus + newsletter)", f"{mb_s} MB/s", ">= 100", mb_s >= 100
    )
    section.add("rewrite, 60 KB 40-link newsletter", f"{letter[1]} MB/s, {letter[0]} ms/message")
    section.add("html.parser parse alone, all documents (scale)", f"{total[1]} MB/s")
    both = grab(r"^plain text \+ opens.*?on ([\d.]+) MB/s.*?off ([\d.]+) MB/s.*?x([\d.]+)", text)
    if both is None:
        unparsed(section, "plain text + opens")
        return
    section.add("rewrite with plain-text tracking + opens, on vs off (newsletter, HTML + text)",
                f"{both[0]} vs {both[1]} MB/s = {both[2]}x")  # fmt: skip


def dkim_rows(section: Section) -> None:
    found = re.findall(r"^re-sign, (.+?): ([\d.]+) ms/message, ([\d.]+)x the rewrite",
                       section.output, re.MULTILINE)  # fmt: skip
    if not found:
        unparsed(section, "re-signing ms/message")
    for name, ms, ratio in found:
        section.add(f"re-sign the 60 KB newsletter, {name}", f"{ms} ms/message = {ratio}x rewrite")


def redirect_rows(section: Section) -> None:
    text = section.output
    server = r"\s+(\d+) req/s\s+p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms\s+non-302: (\d+)"
    ours = grab(r"^clickrelay \(durable clicks\)" + server, text)
    bare = grab(r"^bare aiohttp 302" + server, text)
    ratio = r"ratio req/s ([\d.]+)x of bare.*?p99 ([\d.]+)x of bare.*?(\d+) clicks stored"
    ratios = grab(ratio, text)
    if ours is None or bare is None or ratios is None:
        unparsed(section, "redirect figures")
        return
    rps, p99 = float(ratios[0]), float(ratios[1])
    section.add("requests/s, clickrelay / bare aiohttp", f"{rps:.2f}x", ">= 0.9", rps >= 0.9)
    section.add("p99 latency, clickrelay / bare aiohttp", f"{p99:.2f}x", "<= 1.5", p99 <= 1.5)
    for name, figures in (("clickrelay (durable clicks)", ours), ("bare aiohttp 302", bare)):
        section.add(f"{name}: req/s, p50, p99", f"{figures[0]}, {figures[1]} ms, {figures[2]} ms")
    section.add("answers other than 302 (clickrelay)", ours[3], "0", ours[3] == "0")
    section.add("clicks stored", ratios[2])
    workers = grab(r"^workers.*?1 worker (\d+) req/s, 2 workers (\d+) req/s = ([\d.]+)x", text)
    if workers is None:
        unparsed(section, "web workers")
        return
    section.add("req/s, 2 web workers / 1 (nodes and wrk sharing both CPUs)",
                f"{workers[2]}x ({workers[1]} vs {workers[0]})", ">= 1.7",
                float(workers[2]) >= 1.7)  # fmt: skip


def postgres_rows(section: Section, figures: dict) -> None:
    pg = figures["postgres"]
    section.add("PostgreSQL server (tests/pg.py, durable) against SQLite synchronous=full",
                f"{pg['server_version'].split()[0]}: fsync {pg['fsync']}, synchronous_commit "
                f"{pg['synchronous_commit']}, wal_sync_method {pg['wal_sync_method']}")  # fmt: skip
    section.add("CPUs", "pinned: the web node(s) and every PostgreSQL process on CPU 0, wrk on "
                "CPU 1; shared: nothing pinned (wrk shares both CPUs with them)")  # fmt: skip
    web = figures["redirects"]
    for name, ratio in web["ratios"].items():
        rounds = ", ".join(f"{r:.2f}" for r in ratio["rounds"])
        section.add(f"redirects/s, {name}", f"{ratio['median']:.2f}x (rounds: {rounds})")
    for key, name in web["names"].items():
        m = web["medians"][key]
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in m["cpu"].items())
        section.add(f"{name}: req/s, p50, p99 (CPU, % of one: {', '.join(m['cpu'])})",
                    f"{m['rps']:.0f}, {m['p50']:.2f} ms, {m['p99']:.2f} ms ({cpu})")  # fmt: skip
    bad = sum(m["bad"] for m in web["medians"].values())
    section.add(f"answers other than 302 ({web['generator']} load, all setups)", str(bad), "0",
                bad == 0)  # fmt: skip
    for backend, stored in web["stored"].items():
        answered = web["answered"][backend]
        section.add(f"clicks stored / 302s answered, {backend}", f"{stored} / {answered}",
                    ">= answered", stored >= answered)  # fmt: skip
    mail = figures["smtp"]
    rounds = ", ".join(f"{r:.2f}" for r in mail["ratios"])
    section.add("SMTP tracked messages/s, PostgreSQL / SQLite full",
                f"{mail['ratio']:.2f}x (rounds: {rounds})")  # fmt: skip
    for key, name in (("sqlite", "SQLite full"), ("postgresql", "PostgreSQL")):
        p = mail["paths"][key]
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in p["cpu_ms_per_msg"].items())
        section.add(f"SMTP on {name}: messages/s (ms of CPU per message)",
                    f"{p['msgs_per_s']:.0f} ({cpu})")  # fmt: skip
        expected = p["sent"] + p["warm"]
        ok = p["bad_replies"] == 0 and p["sends"] == {"accepted": expected}
        section.add(f"SMTP on {name}: bad replies; sends stored as accepted / sent",
                    f"{p['bad_replies']}; {p['sends'].get('accepted', 0)} / {expected}",
                    "0; all", ok)  # fmt: skip


def webhook_rows(section: Section, figures: dict) -> None:
    hot = figures["redirects"]
    for name, ratio in hot["ratios"].items():
        m = hot["medians"][name]
        section.add(f"redirect req/s with one webhook endpoint, {name} / none",
                    f"{ratio:.2f}x ({m['rps']:.0f} req/s, p99 {m['p99']:.2f} ms, "
                    f"{hot['p99_ratios'][name]:.2f}x)", ">= 0.95x", ratio >= 0.95)  # fmt: skip
    base = hot["medians"]["none"]
    section.add("redirects with no webhook (the baseline)",
                f"{base['rps']:.0f} req/s, p99 {base['p99']:.2f} ms")  # fmt: skip
    for concurrency, flow in figures["delivery"].items():
        section.add(f"webhook delivery to a fast local receiver, max_concurrency {concurrency}",
                    f"{flow['events_per_s']:.0f} events/s ({flow['events']} events)")  # fmt: skip


def report_rows(section: Section) -> None:
    pattern = r"^(\S.{25}) +([\d.]+) +([\d.]+) +([\d.]+)x  (ok|MISSED|\(info\))$"
    found = re.findall(pattern, section.output, re.MULTILINE)
    if not found:
        unparsed(section, "report page times")
    for name, small, large, ratio, verdict in found:
        info = verdict == "(info)"
        target, met = ("", None) if info else ("<= 3x and < 300 ms", verdict == "ok")
        section.add(f"{name.strip()}: ms at 1k sends, at 100k sends",
                    f"{small}, {large} = {ratio}x", target, met)  # fmt: skip


# ---------------------------------------------------------------- RESULTS.md


def markdown(
    command: str,
    started: datetime.datetime,
    seconds: float,
    about: list[tuple[str, str]],
    sections: list[Section],
) -> str:
    out = [
        "# Benchmark results",
        "",
        f"Produced by `{command}` (from the repository root) on {started:%Y-%m-%d %H:%M} UTC; "
        f"the whole run took {seconds / 60:.1f} min.",
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in about),
    ]
    for section in sections:
        out += ["", f"## {section.title}", "", f"`{shlex.join(section.command)}`", ""]
        if section.error:
            out += [f"**The bench failed ({section.error}); figures below may be missing.**", ""]
        out += ["| figure | value | target | met? |", "|---|---|---|---|"]
        for row in section.rows:
            met = "" if row.met is None else "yes" if row.met else "**no**"
            out.append(f"| {row.figure} | {row.value} | {row.target} | {met} |")
    out += ["", "## Raw output"]
    for section in sections:
        out += [
            "",
            f"<details><summary>{section.title}</summary>",
            "",
            "```",
            section.output.rstrip(),
            "```",
            "",
            "</details>",
        ]
    return "\n".join(out) + "\n"


def kept_notes(path: Path) -> str:
    """The hand-written "## Notes" section of the previous RESULTS.md, if any."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    start = text.find(NOTES)
    if start < 0:
        return ""
    end = text.find("\n## ", start + len(NOTES))
    return text[start : end if end >= 0 else len(text)].rstrip() + "\n"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smtp-messages",
        type=int,
        default=1000,
        help="copies per path and round",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, SMTP and HTTP")
    parser.add_argument("--redirect-seconds", type=int, default=5)
    parser.add_argument("--rewrite-seconds", type=float, default=1.0)
    parser.add_argument("--pg-seconds", type=int, default=4, help="per PostgreSQL measurement")
    parser.add_argument("--pg-rounds", type=int, default=2)
    parser.add_argument("--pg-messages", type=int, default=300, help="SMTP copies per round")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    started, clock = datetime.datetime.now(datetime.UTC), time.monotonic()
    about = machine()
    for key, value in about:
        print(f"{key}: {value}")
    with tempfile.TemporaryDirectory() as folder:
        smtp_json = Path(folder) / "smtp.json"
        rounds = ["--rounds", str(args.rounds)]
        smtp = Section(
            "SMTP relay",
            "bench_smtp.py",
            ["--messages", str(args.smtp_messages), *rounds],
            timeout=1200,
        )
        rewrite = Section(
            "Link rewriting",
            "bench_rewrite.py",
            ["--seconds", str(args.rewrite_seconds)],
            timeout=600,
        )
        resign = Section(
            "DKIM re-signing",
            "bench_dkim.py",
            ["--seconds", str(args.rewrite_seconds)],
            timeout=300,
        )
        redirect = Section(
            "Redirects",
            "bench_redirect.py",
            ["--seconds", str(args.redirect_seconds), *rounds],
            timeout=900,
        )
        postgres_json = Path(folder) / "postgres.json"
        postgres = Section(
            "PostgreSQL and two web nodes",
            "bench_postgres.py",
            ["--seconds", str(args.pg_seconds), "--rounds", str(args.pg_rounds),
             "--messages", str(args.pg_messages)],
            timeout=900,
        )  # fmt: skip
        webhooks_json = Path(folder) / "webhooks.json"
        hooks = Section(
            "Webhooks beside the hot path",
            "bench_webhooks.py",
            ["--seconds", str(args.redirect_seconds), *rounds],
            timeout=900,
        )
        reports = Section("Report pages at 100k sends", "bench_reports.py", [], timeout=900)
        benches: list[tuple[Section, list[str], Callable[[Section], None]]] = [
            (smtp, ["--json", str(smtp_json)],
             lambda s: smtp_rows(s, json.loads(smtp_json.read_text()))),
            (rewrite, [], rewrite_rows),
            (resign, [], dkim_rows),
            (redirect, [], redirect_rows),
            (postgres, ["--json", str(postgres_json)],
             lambda s: postgres_rows(s, json.loads(postgres_json.read_text()))),
            (hooks, ["--json", str(webhooks_json)],
             lambda s: webhook_rows(s, json.loads(webhooks_json.read_text()))),
            (reports, [], report_rows),
        ]  # fmt: skip
        for section, extra, figures in benches:
            run(section, extra)
            try:
                figures(section)
            except (OSError, ValueError, KeyError) as exc:
                unparsed(section, f"figures ({type(exc).__name__}: {exc})")
    sections = [smtp, rewrite, resign, redirect, postgres, hooks, reports]
    script = os.path.relpath(Path(sys.argv[0]).resolve(), HERE.parent)
    command = shlex.join(["python", script, *sys.argv[1:]])
    text = markdown(command, started, time.monotonic() - clock, about, sections)
    args.output.write_text(text + kept_notes(args.output))
    print(f"\nfigures written to {args.output}")


if __name__ == "__main__":
    main()
