"""Webhooks beside the hot path: redirect req/s and p99 of one `clickrelay web` node with one
webhook endpoint configured (its receiver fast, or never answering) against none, interleaved in
one run; then delivery throughput (events/s) of a backlog to a fast local receiver.

The node runs on CPU 0; wrk and the receiver on CPU 1. wrk sends no User-Agent, so each click is
a bot click: the endpoint takes `bot_click` events, so every click is an event to deliver. The
burst rule is off in every setup (events are told at once, no settling window).

    python bench/bench_webhooks.py [--seconds 5] [--rounds 3] [--connections 64] [--events 5000]
                                   [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_redirect as redirect  # noqa: E402

RECEIVER = """
import asyncio, sys
from aiohttp import web
received = 0
hang = sys.argv[2] == "hang"
async def hook(request):
    global received
    await request.read()
    received += 1
    if hang:
        await asyncio.Event().wait()
    return web.Response(status=204)
async def count(request):
    return web.Response(text=str(received))
app = web.Application()
app.router.add_post("/hook", hook)
app.router.add_get("/count", count)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""
BOTS = "[bots]\nburst_links = 0\n"


def hook_lines(port: int, secret: Path, concurrency: int = 4) -> str:
    return (
        f'[[webhooks]]\nurl = "http://127.0.0.1:{port}/hook"\nsecret_file = "{secret}"\n'
        f'events = ["click", "bot_click"]\nmax_concurrency = {concurrency}\n'
    )


def received(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as response:
        return int(response.read())


def receiver(port: int, mode: str) -> subprocess.Popen:
    return redirect.start(
        [*redirect.pinned(1), sys.executable, "-c", RECEIVER, str(port), mode], port
    )


def node_config(folder: Path, name: str, port: int, database: Path, extra: str) -> Path:
    path = redirect.web_config(folder / f"{name}.toml", port, f'database = "{database}"',
                               folder / "secret")  # fmt: skip
    path.write_text(path.read_text() + BOTS + extra)
    return path


def redirects(args, folder: Path, tokens_file: Path, database: Path) -> dict:
    load = redirect.load_generator()
    fast_port, hang_port = redirect.free_port(), redirect.free_port()
    receivers = [receiver(fast_port, "fast"), receiver(hang_port, "hang")]
    web_port = redirect.free_port()
    setups = {
        "none": "",
        "fast receiver": hook_lines(fast_port, folder / "hook-secret"),
        "hanging receiver": hook_lines(hang_port, folder / "hook-secret"),
    }
    configs = {
        name: node_config(folder, name.replace(" ", "-"), web_port, database, extra)
        for name, extra in setups.items()
    }
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    try:
        for _ in range(args.rounds):
            for name, config in configs.items():
                node = redirect.start(redirect.web_node(config, 0), web_port)
                try:
                    runs[name].append(load(web_port, tokens_file, args.seconds, args.connections))
                finally:
                    redirect.stop(node)
        delivered = received(fast_port)
    finally:
        for proc in receivers:
            proc.kill()
            proc.wait()
    medians = {
        name: {key: statistics.median(r[key] for r in results) for key in ("rps", "p50", "p99")}
        | {"bad": sum(r["bad"] for r in results)}
        for name, results in runs.items()
    }
    base = medians["none"]
    return {
        "generator": load.__name__.removeprefix("load_"),
        "medians": medians,
        "ratios": {name: m["rps"] / base["rps"] for name, m in medians.items() if name != "none"},
        "p99_ratios": {
            name: m["p99"] / base["p99"] for name, m in medians.items() if name != "none"
        },
        "delivered_during_fast_runs": delivered,
    }


async def backlog(database: Path, secret: Path, events: int) -> None:
    """`events` clicks stored at once (as the recorder would): one event each."""
    from clickrelay.config import StorageSettings
    from clickrelay.storage import open_store
    from clickrelay.storage.base import NewClick, NewSend

    store = await open_store(StorageSettings(database=database))
    try:
        recorded = await store.record_send(NewSend(
            "backlog", None, "standard", "c", None, None, "tracked",
            (("https://x.example/", None),),
            sent_at=time.time() - 3600,
        ))  # fmt: skip
        (link,) = recorded.link_ids.values()
        now = time.time()
        for start in range(0, events, 1000):
            await store.add_clicks([
                NewClick(recorded.send_id, link, now - 60, None, None, "GET", "head")
                for _ in range(min(1000, events - start))
            ])  # fmt: skip
    finally:
        await store.close()


def delivery(args, folder: Path, concurrency: int) -> dict:
    """Events/s delivered from a backlog of `args.events` to a fast receiver."""
    database = folder / f"delivery-{concurrency}.sqlite3"
    port, web_port = redirect.free_port(), redirect.free_port()
    sink = receiver(port, "fast")
    config = node_config(folder, f"delivery-{concurrency}", web_port, database,
                         hook_lines(port, folder / "hook-secret", concurrency))  # fmt: skip
    try:
        node = redirect.start(redirect.web_node(config, 0), web_port)  # registers the endpoint
        time.sleep(1.5)  # (its first claim, which places the endpoint after the newest event)
        redirect.stop(node)
        asyncio.run(backlog(database, folder / "secret", args.events))
        node = redirect.start(redirect.web_node(config, 0), web_port)
        started = time.monotonic()
        deadline = started + 300
        while received(port) < args.events and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        redirect.stop(node)
        count = received(port)
    finally:
        sink.kill()
        sink.wait()
    return {"events": count, "seconds": elapsed, "events_per_s": count / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from clickrelay.config import StorageSettings

    folder = Path(tempfile.mkdtemp(prefix="clickrelay-bench-hooks-"))
    database = folder / "db.sqlite3"
    tokens = asyncio.run(redirect.seed(StorageSettings(database=database), folder / "secret",
                                       args.sends, links=10))  # fmt: skip
    tokens_file = folder / "tokens.txt"
    tokens_file.write_text("\n".join(tokens) + "\n")
    hot = redirects(args, folder, tokens_file, database)
    print(
        f"# {hot['generator']} load, {args.connections} connections, {args.rounds} interleaved "
        f"rounds of {args.seconds} s; node on CPU 0, load and receiver on CPU 1; medians"
    )
    for name, m in hot["medians"].items():
        ratio = f"  {hot['ratios'][name]:.2f}x req/s, {hot['p99_ratios'][name]:.2f}x p99" \
            if name in hot["ratios"] else ""  # fmt: skip
        print(
            f"{name:18} {m['rps']:8.0f} req/s  p50 {m['p50']:6.2f} ms  p99 {m['p99']:6.2f} ms"
            f"  non-302 {m['bad']}{ratio}"
        )
    print(f"webhooks delivered meanwhile to the fast receiver: {hot['delivered_during_fast_runs']}")
    flows = {n: delivery(args, folder, n) for n in (4, 16)}
    for n, flow in flows.items():
        print(
            f"delivery, max_concurrency {n}: {flow['events']} events in {flow['seconds']:.2f} s"
            f" = {flow['events_per_s']:.0f} events/s"
        )
    if args.json:
        args.json.write_text(json.dumps({"redirects": hot, "delivery": flows}))


if __name__ == "__main__":
    main()
