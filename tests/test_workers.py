"""`workers = N`: several processes on one listener each, as `clickrelay run` starts them."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket

import aiohttp

from support import ServiceProcess, free_port, message, send, write_config


def with_workers(config_text: str) -> str:
    """The config with `workers = 2` in [smtp] and [web] (the sections exist already)."""
    return config_text.replace("[smtp]\n", "[smtp]\nworkers = 2\n").replace(
        "[web]\n", "[web]\nworkers = 2\n"
    )


def workers_config(tmp_path, upstream_port: int) -> tuple:
    smtp_port, web_port = free_port(), free_port()
    cfg = write_config(tmp_path / "c.toml", upstream_port, smtp_port, web_port)
    cfg.write_text(with_workers(cfg.read_text()))
    return cfg, smtp_port, web_port


def worker_pids(supervisor: int) -> set[int]:
    children = f"/proc/{supervisor}/task/{supervisor}/children"
    with open(children) as fh:
        return {int(pid) for pid in fh.read().split()}


async def test_two_workers_share_the_listeners_and_stop_on_sigterm(tmp_path, upstream):
    """Both workers take SMTP connections and answer HTTP; each message is relayed exactly
    once; SIGTERM stops the supervisor and every worker, with status 0."""
    cfg, smtp_port, web_port = workers_config(tmp_path, upstream.port)
    service = ServiceProcess("run", "--config", str(cfg))
    await service.start("2 workers serving")
    try:
        assert service.proc is not None
        pids = worker_pids(service.proc.pid)
        sends = [send(smtp_port, message({"Message-ID": f"<m{n}@x.test>"})) for n in range(40)]
        replies = await asyncio.gather(*sends)
        async with aiohttp.ClientSession() as http:
            for _ in range(10):  # (a fresh connection each time: spread over the workers)
                async with http.get(
                    f"http://127.0.0.1:{web_port}/healthz", headers={"Connection": "close"}
                ) as response:
                    assert response.status == 200
        service.signal(signal.SIGTERM)
        code = await service.wait()
    finally:
        await service.kill()
    assert len(pids) == 2
    assert all(r[-1].startswith("250 2.0.0 Ok: queued as") for r in replies)
    ids = sorted(r.content.split(b"Message-ID: ")[1].split(b"\r\n")[0] for r in upstream.received)
    assert ids == sorted(f"<m{n}@x.test>".encode() for n in range(40))
    relayed_by = {
        m[1] for line in service.log if (m := re.search(r"\[worker (\d)\] smtp from=", line))
    }
    assert relayed_by == {"0", "1"}  # 40 connections hashed onto one of two: 1 in 2**39
    assert code == 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not any("Traceback" in line for line in service.log)


async def test_a_worker_that_dies_is_started_again(tmp_path, upstream):
    cfg, smtp_port, _ = workers_config(tmp_path, upstream.port)
    service = ServiceProcess("smtp", "--config", str(cfg))
    await service.start("2 workers serving")
    try:
        assert service.proc is not None
        killed = min(worker_pids(service.proc.pid))
        os.kill(killed, signal.SIGKILL)
        await service.wait_for_log("smtp relay listening", count=3)
        after = worker_pids(service.proc.pid)
        replies = await send(smtp_port, message())
        service.signal(signal.SIGTERM)
        code = await service.wait()
    finally:
        await service.kill()
    assert killed not in after and len(after) == 2
    assert replies[-1].startswith("250")
    assert code == 0


async def test_a_port_in_use_stops_the_start_with_one_line_and_status_2(tmp_path, upstream):
    cfg, smtp_port, _ = workers_config(tmp_path, upstream.port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", smtp_port))
        taken.listen()
        service = ServiceProcess("smtp", "--config", str(cfg))
        await service.start("", timeout=30)
        code = await service.wait()
    errors = [line for line in service.log if line.startswith("clickrelay:")]
    assert code == 2
    assert errors == ["clickrelay: smtp.listen: address already in use"]
    assert not any("Traceback" in line for line in service.log)
