"""Redirects per second and latency: the real click service (durable clicks, group commit) vs. a
bare aiohttp handler that only answers 302, same run, same load generator.

The server is pinned to CPU 0 and the load generator to CPU 1 (taskset), so the generator's own
CPU does not hide the difference. The load generator is wrk (Debian package) when installed,
else a bounded aiohttp client loop.

    python bench/bench_redirect.py [--seconds 10] [--connections 64]

bench_postgres.py reuses these pieces (seeding, server start/stop, the load generators) to run
the same load against PostgreSQL and against several web nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
BARE = """
import sys
from aiohttp import web
async def hit(request):
    return web.Response(status=302, headers={"Location": "https://example.com/landing",
                        "Cache-Control": "no-store"})
app = web.Application()
app.router.add_get("/c/{token}", hit)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""
WRK_SCRIPT = """
local tokens = {}
for line in io.lines("%s") do tokens[#tokens + 1] = line end
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/c/" .. tokens[(n %% #tokens) + 1])
end
"""
# With several servers, wrk's threads are dealt out over them (thread i -> server i mod n).
WRK_SPREAD = """
local ports = {%s}
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread.addr = wrk.lookup("127.0.0.1", ports[(threads - 1) %% #ports + 1])[1]
end
"""
WRK_THREADS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(cpus: int | str | None) -> list[str]:
    """A command prefix that runs on `cpus` ("0", "0,1"; None: no prefix, the caller's CPUs)."""
    if cpus is None or not shutil.which("taskset") or os.cpu_count() < 2:
        return []
    return ["taskset", "-c", str(cpus)]


async def seed(storage, secret: Path, sends: int, links: int) -> list[str]:
    """`sends` sends of one campaign into `storage` (StorageSettings); returns one token per
    (send, link), signed with the secret in `secret` (created if absent)."""
    from clickrelay.storage import open_store
    from clickrelay.storage.base import NewSend
    from clickrelay.tracking.tokens import Signer, load_secret

    store = await open_store(storage)
    signer = Signer(load_secret(secret), store.instance_id)
    urls = tuple(f"https://shop.example.com/item/{i}?utm_source=bench" for i in range(links))
    tokens = []
    for i in range(sends):
        recorded = await store.record_send(NewSend(
            "bench", "Bench", "standard", f"contact-{i}", None, None, "tracked",
            [(url, None) for url in urls],
            sent_at=time.time() - 86400,
        ))  # fmt: skip
        tokens += [
            signer.sign(recorded.send_id, link_id, recorded.sent_at)
            for link_id in recorded.link_ids.values()
        ]
    await store.close()
    return tokens


def web_config(path: Path, port: int, storage: str, secret: Path, workers: int = 1) -> Path:
    """A `clickrelay web` config at `path`: listen on `port` with `workers`, `storage` the
    [storage] lines."""
    path.write_text(
        f'[upstream]\nurl = "smtp://127.0.0.1:25"\n[web]\nlisten = "127.0.0.1:{port}"\n'
        f"workers = {workers}\n"
        f'[storage]\n{storage}\n[tracking]\nsecret_file = "{secret}"\n'
    )
    return path


def web_node(config: Path, cpus: int | str | None = 0, log_level: str = "warning") -> list[str]:
    """The command of a `clickrelay web` node (on `cpus`)."""
    return [*pinned(cpus), sys.executable, "-m", "clickrelay", "--log-level", log_level, "web",
            "--config", str(config)]  # fmt: skip


def wait_for_line(proc: subprocess.Popen, text: str) -> None:
    """Read the node's log (stderr) until a line holds `text` (the log ends: an error)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if text.encode() in line:
            return
    raise RuntimeError(f"the node ended before logging {text!r}")


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_wrk(
    port: int | Sequence[int], tokens_file: Path, seconds: int, connections: int,
    cpus: int | str | None = 1,
) -> dict:  # fmt: skip
    """wrk on `cpus` against the server on `port`, or its threads spread over several ports."""
    ports = [port] if isinstance(port, int) else list(port)
    script = tokens_file.with_suffix(f".{len(ports)}.lua")
    spread = WRK_SPREAD % ", ".join(f'"{p}"' for p in ports) if len(ports) > 1 else ""
    script.write_text(WRK_SCRIPT % tokens_file + spread)
    threads = max(WRK_THREADS, len(ports))
    out = subprocess.run(
        [*pinned(cpus), "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-s", str(script), f"http://127.0.0.1:{ports[0]}"],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    latency = {p: _ms(re.search(rf"\s{p}%\s+([\d.]+\w+)", out).group(1)) for p in ("50", "99")}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "p50": latency["50"], "p99": latency["99"],
            "bad": int(errors.group(1)) if errors else 0, "requests": requests}  # fmt: skip


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def load_python(
    port: int | Sequence[int], tokens_file: Path, seconds: int, connections: int,
    cpus: int | str | None = 1,
) -> dict:  # fmt: skip
    """Fallback load generator: aiohttp clients in a child process on `cpus` (CPU 1); with
    several ports, client k talks to port k mod n."""
    ports = [port] if isinstance(port, int) else list(port)
    code = f"""
import asyncio, json, time, aiohttp
tokens = open({str(tokens_file)!r}).read().split()
ports = {ports!r}
async def worker(session, deadline, lat, start):
    i = start
    bad = 0
    base = f"http://127.0.0.1:{{ports[start % len(ports)]}}/c/"
    while time.monotonic() < deadline:
        t = time.perf_counter()
        async with session.get(base + tokens[i % len(tokens)], allow_redirects=False) as r:
            await r.read()
            bad += r.status != 302
        lat.append(time.perf_counter() - t)
        i += {connections}
    return bad
async def main():
    lat = []
    conn = aiohttp.TCPConnector(limit={connections})
    async with aiohttp.ClientSession(connector=conn) as s:
        deadline = time.monotonic() + {seconds}
        t0 = time.monotonic()
        workers = (worker(s, deadline, lat, k) for k in range({connections}))
        bad = sum(await asyncio.gather(*workers))
        elapsed = time.monotonic() - t0
    lat.sort()
    print(json.dumps({{"rps": len(lat) / elapsed, "p50": lat[len(lat) // 2] * 1000,
                      "p99": lat[int(len(lat) * 0.99)] * 1000, "bad": bad,
                      "requests": len(lat)}}))
asyncio.run(main())
"""
    out = subprocess.run([*pinned(cpus), sys.executable, "-c", code], capture_output=True,
                         text=True, check=True, timeout=seconds + 60).stdout  # fmt: skip
    return json.loads(out)


def load_generator():
    """wrk when installed, else the aiohttp client loop."""
    return load_wrk if shutil.which("wrk") else load_python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from clickrelay.config import StorageSettings

    load = load_generator()
    folder = Path(tempfile.mkdtemp(prefix="clickrelay-bench-"))
    storage = StorageSettings(database=folder / "db.sqlite3")
    tokens = asyncio.run(seed(storage, folder / "secret", args.sends, links=10))
    tokens_file = folder / "tokens.txt"
    tokens_file.write_text("\n".join(tokens) + "\n")
    web_port, bare_port = free_port(), free_port()
    config = web_config(folder / "clickrelay.toml", web_port,
                        f'database = "{storage.database}"', folder / "secret")  # fmt: skip
    print(f"# {load.__name__.removeprefix('load_')} load, {args.connections} connections, "
          f"{args.rounds} interleaved rounds of {args.seconds} s; server on CPU 0, load on CPU 1; "
          f"{os.cpu_count()} CPUs; medians")  # fmt: skip
    servers = {
        "bare aiohttp 302": ([*pinned(0), sys.executable, "-c", BARE, str(bare_port)], bare_port),
        "clickrelay (durable clicks)": (web_node(config, 0), web_port),
    }
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    for _ in range(args.rounds):
        for name, (cmd, port) in servers.items():
            proc = start(cmd, port)
            try:
                load(port, tokens_file, 2, args.connections)  # warm up
                runs[name].append(load(port, tokens_file, args.seconds, args.connections))
            finally:
                stop(proc)
    results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
               for name, rs in runs.items()}  # fmt: skip
    for name, r in results.items():
        print(f"{name:30} {r['rps']:9.0f} req/s   p50 {r['p50']:6.2f} ms   p99 {r['p99']:6.2f} ms"
              f"   non-302: {r['bad']:.0f}")  # fmt: skip
    bare, ours = results["bare aiohttp 302"], results["clickrelay (durable clicks)"]
    import sqlite3

    with sqlite3.connect(folder / "db.sqlite3") as db:
        stored = db.execute("SELECT count(*) FROM clicks").fetchone()[0]
    pairs = zip(runs["clickrelay (durable clicks)"], runs["bare aiohttp 302"], strict=True)
    ratios = [o["rps"] / b["rps"] for o, b in pairs]
    print(f"\nratio req/s {ours['rps'] / bare['rps']:.2f}x of bare (target >= 0.9; per round: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}), p99 {ours['p99'] / bare['p99']:.2f}x of bare "
          f"(target <= 1.5); {stored} clicks stored")  # fmt: skip
    workers_scaling(args, load, folder, storage, tokens_file)
    shutil.rmtree(folder)


def workers_scaling(args, load, folder: Path, storage, tokens_file: Path) -> None:
    """`[web] workers = 2` against 1, the nodes and the load generator sharing both CPUs (a
    machine of two cannot give the load its own)."""
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for n in runs:
            port = free_port()
            where = f'database = "{storage.database}"'
            config = web_config(folder / f"workers-{n}.toml", port, where, folder / "secret", n)
            proc = start(web_node(config, "0,1", "info"), port)
            try:
                wait_for_line(proc, f"{n} workers serving" if n > 1 else "listening")
                load(port, tokens_file, 2, args.connections, "0,1")  # warm up
                runs[n].append(load(port, tokens_file, args.seconds, args.connections, "0,1"))
            finally:
                stop(proc)
    rps = {n: statistics.median(r["rps"] for r in rs) for n, rs in runs.items()}
    ratios = [two["rps"] / one["rps"] for one, two in zip(runs[1], runs[2], strict=True)]
    print(f"workers, nodes and load sharing both CPUs: 1 worker {rps[1]:.0f} req/s, 2 workers "
          f"{rps[2]:.0f} req/s = {statistics.median(ratios):.2f}x (per round: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
