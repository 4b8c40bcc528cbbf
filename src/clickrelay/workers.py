"""`workers = N`: N processes serving the same listeners, one core each.

The supervisor forks the workers before any event loop exists. Each binds the listeners with
SO_REUSEPORT, so the kernel spreads new connections over them evenly, and runs `serve` on its
share of the connection caps. Worker 0 alone runs the background jobs (webhooks, retention).
The supervisor passes SIGTERM and SIGINT on and waits for every worker to finish its in-flight
work; a worker that dies is started again (a second later, if it died within a second of its
start). A worker that cannot start (a mistake to fix: port in use, unreadable TLS key) says why
in its one line; then all stop and the supervisor exits with status 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, replace

from clickrelay.config import Settings
from clickrelay.service import EXIT_USAGE, Parts, StartupError, serve

log = logging.getLogger("clickrelay")
RESTART_DELAY = 1.0  # seconds before a worker that died young is started again


def count(settings: Settings, parts: Parts) -> int:
    """How many processes serve `parts`: the larger `workers` of the two services run."""
    return max(settings.smtp.workers if parts.smtp else 1, settings.web.workers if parts.web else 1)


def share(settings: Settings, parts: Parts, index: int) -> tuple[Settings, Parts]:
    """What worker `index` runs: the services that have that many workers, each with its share
    of the connection caps (a cap of 0, none, stays 0), the jobs on worker 0 only."""
    smtp, web = settings.smtp, settings.web
    settings = replace(
        settings,
        smtp=replace(smtp, max_connections=_part(smtp.max_connections, smtp.workers),
                     max_connections_per_client=_part(smtp.max_connections_per_client,
                                                      smtp.workers)),
        web=replace(web, max_connections=_part(web.max_connections, web.workers),
                    max_connections_per_client=_part(web.max_connections_per_client,
                                                     web.workers)),
    )  # fmt: skip
    return settings, Parts(
        smtp=parts.smtp and index < smtp.workers,
        web=parts.web and index < web.workers,
        jobs=parts.jobs and index == 0,
        reuse_port=True,
    )


def _part(cap: int, workers: int) -> int:
    return math.ceil(cap / workers) if cap else 0


@dataclass
class _Worker:
    index: int
    pid: int
    started: float


def supervise(settings: Settings, parts: Parts) -> int:
    """Run the workers until a stop signal (exit status 0) or a worker's exit status 2.

    They start one after another, each once the one before listens: a mistake that stops the
    first (its one line said why) stops the start there.
    """
    workers: dict[int, _Worker] = {}
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    total = count(settings, parts)
    for index in range(total):
        worker = _start(settings, parts, index)
        if worker is None:
            stop(signal.SIGTERM, None)
            _wait_all(workers)
            return EXIT_USAGE
        workers[worker.pid] = worker
    log.info("%d workers serving", total)
    status = 0
    while workers:
        pid, wait_status = os.wait()
        worker = workers.pop(pid, None)
        if worker is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        log.error("worker %d (pid %d) ended with status %d; starting it again",
                  worker.index, pid, code)  # fmt: skip
        if time.monotonic() - worker.started < RESTART_DELAY:
            time.sleep(RESTART_DELAY)
        again = None if stopping else _start(settings, parts, worker.index)
        if again is not None:
            workers[again.pid] = again
        elif not stopping:
            status = EXIT_USAGE
            stop(signal.SIGTERM, None)
    log.info("all workers stopped")
    return status


def _wait_all(workers: dict[int, _Worker]) -> None:
    for pid in workers:
        os.waitpid(pid, 0)


def _start(settings: Settings, parts: Parts, index: int) -> _Worker | None:
    """Fork worker `index` and wait until it listens; None if it ended first (it said why)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(ready_r)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # serve() installs its own on its loop
        os._exit(_work(settings, parts, index, ready_w))
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        listening = ready.read(1) == b"1"  # else the end of the pipe: the worker is gone
    if not listening:
        os.waitpid(pid, 0)
        return None
    return _Worker(index, pid, time.monotonic())


def _work(settings: Settings, parts: Parts, index: int, ready_fd: int) -> int:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerName(index))
    own_settings, own_parts = share(settings, parts, index)

    def ready() -> None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)

    try:
        asyncio.run(serve(own_settings, own_parts, ready))
    except StartupError as exc:
        print(f"clickrelay: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except BaseException:
        log.exception("worker %d failed", index)
        return 1
    finally:
        logging.shutdown()
    return 0


class _WorkerName(logging.Filter):
    """Each line a worker logs says which worker it is."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.prefix = f"[worker {index}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True
