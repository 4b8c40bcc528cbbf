"""The service as users run it: a child process, stopped by SIGTERM, started on defaults."""

from __future__ import annotations

import asyncio
import signal

from support import RawClient, ServiceProcess, free_port, message, send, write_config


async def test_sigterm_finishes_in_flight_transactions_and_exits_0(tmp_path, upstream):
    upstream.script.data_delay = 1.0
    smtp_port = free_port()
    cfg = write_config(tmp_path / "c.toml", upstream.port, smtp_port, free_port())
    service = ServiceProcess("smtp", "--config", str(cfg))
    await service.start("smtp relay listening")
    try:
        # one client mid-DATA (the upstream is still thinking), one with an open envelope
        in_flight = asyncio.create_task(send(smtp_port, message()))
        idle = await RawClient.connect(smtp_port)
        await idle.cmd("EHLO idle")
        await idle.cmd("MAIL FROM:<idle@x.test>")
        await idle.cmd("RCPT TO:<r@x.test>")
        await upstream.data_started.wait()
        service.signal(signal.SIGTERM)
        replies = await in_flight
        code = await service.wait()
        leftover = await idle.reader.read()  # the unfinished envelope is closed, not acknowledged
    finally:
        await service.kill()
    assert replies[-1] == "250 2.0.0 Ok: queued as Q1"
    assert code == 0
    assert b"250 " not in leftover
    assert [r.mail_from for r in upstream.received] == ["s@x.test"]
    assert any("waiting for 2 SMTP transaction(s)" in line for line in service.log)
    assert not any("Traceback" in line for line in service.log)


async def test_embedded_defaults_deliver_to_the_local_maildir(tmp_path):
    service = ServiceProcess("run", cwd=tmp_path)
    await service.start("smtp relay listening")
    try:
        replies = await send(2525, message())
        health = await _http_get(8080, "/healthz")
        service.signal(signal.SIGTERM)
        code = await service.wait()
    finally:
        await service.kill()
    data = tmp_path / "clickrelay-data"
    delivered = list((data / "outbox" / "new").iterdir())
    assert code == 0
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    assert len(delivered) == 1 and delivered[0].read_bytes().endswith(message())
    assert health.startswith("HTTP/1.1 200")
    assert any("NO MAIL LEAVES THIS MACHINE" in line for line in service.log)
    password = (data / "admin-password").read_text()
    assert (data / "admin-password").stat().st_mode & 0o777 == 0o600
    assert any(password in line and "/reports" in line for line in service.log)


async def _http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data.decode(errors="replace")
