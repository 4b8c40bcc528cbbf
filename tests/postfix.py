"""Postfix in the test rig: a private Postfix instance (as the relay's upstream or its client)
and Postfix's smtp-sink as a recording upstream. Debian's `postfix` package, run as root
(`.ci/run` installs it); nothing else on the machine is touched: every instance has its own
config, queue and log directory under the temp dir, listens on 127.0.0.1 only, and is stopped
for sure (see `PostfixInstance.stop`)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from pathlib import Path

import pytest

from support import LOOPBACK, RawClient, free_port, wire

POSTFIX = Path("/usr/sbin/postfix")
POSTSUPER = Path("/usr/sbin/postsuper")
POSTQUEUE = Path("/usr/sbin/postqueue")
SMTP_SINK = Path("/usr/sbin/smtp-sink")
MASTER_CF = (Path("/etc/postfix/master.cf"), Path("/usr/share/postfix/master.cf.dist"))
WAIT_SECONDS = 10.0  # default bound of every wait for another process
POLL_SECONDS = 0.02
START_ATTEMPTS = 5  # an ephemeral port picked by free_port() may be taken before we bind it

_running: set[SmtpSink | PostfixInstance] = set()


@atexit.register
def _stop_leftovers() -> None:  # a last resort: fixtures stop what they start
    for thing in list(_running):
        thing.stop()


# Run by _Watchdog in a process of its own: argv = base dir, "cwd" or "argv", marker, [config].
_WATCHDOG = r"""
import os, shutil, signal, subprocess, sys, time
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(number, signal.SIG_IGN)
if sys.stdin.buffer.read() == b"stopped":
    sys.exit()
base, mode, marker, config = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]


def ours():
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            state = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[0]
            if mode == "cwd":
                hit = os.readlink(f"/proc/{name}/cwd") == marker
            else:
                hit = marker.encode() in open(f"/proc/{name}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if hit and state != "Z":
            found.append(int(name))
    return found


if config and ours():
    subprocess.run(["/usr/sbin/postfix", "-c", config[0], "stop"], capture_output=True, timeout=15)
for pid in [] if config else ours():
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
deadline = time.monotonic() + 5
while ours() and time.monotonic() < deadline:
    time.sleep(0.05)
for pid in ours():
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
shutil.rmtree(base, ignore_errors=True)
"""


class _Watchdog:
    """A process in a session of its own that waits for its stdin to end. When the test process
    dies without stop() (SIGKILL, a CI timeout's SIGTERM) it stops what that started (the
    processes working in `marker` (mode "cwd") or with `marker` as an argument ("argv")) and
    removes `base`; after stop() it is told so and just exits."""

    def __init__(self, base: Path, mode: str, marker: str, config: Path | None = None) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(base), mode, marker]
            + ([str(config)] if config else []),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def release(self) -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self._proc.communicate(b"stopped", timeout=10)


def require_postfix() -> None:
    """pytest.fail (never skip) unless we are root and Debian's postfix binaries are here."""
    missing = [str(p) for p in (POSTFIX, POSTSUPER, POSTQUEUE, SMTP_SINK) if not p.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: these tests need Debian's postfix package "
            "(a private Postfix instance and smtp-sink); .ci/run installs it "
            "(apt-get install postfix, with no system instance configured)"
        )
    if os.geteuid() != 0:
        pytest.fail(
            "the Postfix rig must run as root (Postfix's master and smtp-sink -u need it); "
            ".ci/run runs the tests as root"
        )


def _private_dir(prefix: str) -> Path:
    """A fresh directory that Postfix's and smtp-sink's unprivileged users can traverse
    (pytest's tmp_path lives under a 0700 directory they cannot enter)."""
    path = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
    path.chmod(0o755)
    return path


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _listening(pid: int, port: int) -> bool:
    """`pid` holds a TCP socket listening on 127.0.0.1:`port` (no connection needed)."""
    inodes = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A" and fields[9] in inodes:
            return True
    return False


def _working_in(directory: Path) -> list[int]:
    """Live processes whose current directory is `directory`: for a Postfix queue directory,
    exactly that instance's master and daemons (each chdir()s there), never anyone else's."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "cwd") == str(directory) and _alive(int(entry.name)):
                    found.append(int(entry.name))
    return found


def _open_files(pid: int) -> set[str]:
    found = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


# --- smtp-sink ---------------------------------------------------------------------------


@dataclass
class SinkDump:
    """One transaction as smtp-sink captured it (see `man smtp-sink`, DUMP FILE FORMAT)."""

    path: Path
    client_addr: str
    proto: str  # SMTP or ESMTP
    helo: str | None  # the argument of the last HELO/EHLO
    mail: str  # the text after `MAIL FROM:`, e.g. '<a@b> BODY=8BITMIME ENVID=x'
    rcpts: list[str]  # the text after each accepted `RCPT TO:`
    message: bytes  # as received, un-dot-stuffed, with CRLF line ends (see `parse`)

    @property
    def sender(self) -> str:
        return self.mail.split(">", 1)[0].lstrip("<")

    @property
    def mail_params(self) -> list[str]:
        return self.mail.split(">", 1)[1].split()

    @property
    def recipients(self) -> list[str]:
        return [rcpt.split(">", 1)[0].lstrip("<") for rcpt in self.rcpts]

    @property
    def rcpt_params(self) -> list[list[str]]:
        return [rcpt.split(">", 1)[1].split() for rcpt in self.rcpts]

    @property
    def headers(self) -> Message:
        return BytesHeaderParser().parsebytes(self.message)

    @property
    def body(self) -> bytes:
        return self.message.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.message else b""

    @classmethod
    def parse(cls, path: Path, data: bytes) -> SinkDump:
        """smtp-sink writes the data stream without any CR (bare CRs are lost too), with the
        dot-stuffing undone, and adds one empty line; `message` gets CRLF line ends back, so
        a message sent with CRLF throughout compares equal byte for byte."""
        lines = data.split(b"\n")
        fields: dict[str, list[str]] = {}
        index = 0
        while not lines[index].startswith(b"Received: "):
            name, _, value = lines[index].decode("utf-8", "surrogateescape").partition(": ")
            fields.setdefault(name, []).append(value)
            index += 1
        index += 3  # smtp-sink's own three-line Received header ends its records
        assert lines[-2:] == [b"", b""], f"{path}: no end-of-dump empty line"
        message = b"\r\n".join(lines[index:-2]) + b"\r\n" if lines[index:-2] else b""
        return cls(
            path=path,
            client_addr=fields["X-Client-Addr"][0],
            proto=fields["X-Client-Proto"][0],
            helo=fields.get("X-Helo-Args", [None])[0],
            mail=fields["X-Mail-Args"][0],
            rcpts=fields.get("X-Rcpt-Args", []),
            message=message,
        )


class SmtpSink:
    """/usr/sbin/smtp-sink on 127.0.0.1 (ephemeral port) as an unprivileged user, dumping each
    transaction to its own file; `flags` are extra smtp-sink options, e.g. ['-8'] (no
    8BITMIME), ['-N'] (no DSN), ['-f', 'RCPT'] (reject RCPT). smtp-sink never announces
    SMTPUTF8 and takes any MAIL/RCPT parameter."""

    def __init__(self, flags: Sequence[str] = (), user: str = "nobody") -> None:
        self.flags = list(flags)
        self.user = user
        self.port = 0
        self.dir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._watchdog: _Watchdog | None = None

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def dump_dir(self) -> Path:
        assert self.dir is not None, "SmtpSink not started"
        return self.dir / "dumps"

    def start(self) -> None:
        """Start smtp-sink and return once it listens (bounded; retries a port lost to a race)."""
        require_postfix()
        self.dir = _private_dir("clickrelay-smtp-sink-")
        self.dump_dir.mkdir()
        shutil.chown(self.dump_dir, self.user)
        template = f"{self.dump_dir}/%M."
        _running.add(self)
        self._watchdog = _Watchdog(self.dir, "argv", template)
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            command = [SMTP_SINK, "-u", self.user, *self.flags]
            command += ["-d", template, f"{LOOPBACK}:{self.port}", "64"]
            with (self.dir / "stderr").open("wb") as errors:
                self._proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors
                )
            deadline = time.monotonic() + WAIT_SECONDS
            while self._proc.poll() is None and time.monotonic() < deadline:
                if _listening(self._proc.pid, self.port):
                    return
                time.sleep(POLL_SECONDS)
            self._kill()
            if "in use" not in self.stderr():
                break
        errors = self.stderr()
        self.stop()
        raise RuntimeError(f"smtp-sink did not start on port {self.port}:\n{errors}")

    def stderr(self) -> str:
        """What smtp-sink wrote to stderr (errors; the conversation with -v)."""
        path = self.dir / "stderr" if self.dir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)

    def stop(self) -> None:
        """Stop smtp-sink (for sure) and remove its directory."""
        self._kill()
        if self._watchdog is not None:
            self._watchdog.release()
            self._watchdog = None
        _running.discard(self)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def reset(self) -> None:
        """Forget every dump so far (finished or still being written)."""
        for path in self.dump_dir.iterdir():
            path.unlink(missing_ok=True)

    def dumps(self) -> list[SinkDump]:
        """The finished transactions so far, oldest first. A dump file is created at MAIL and
        closed at the end of DATA (deleted at RSET): finished means no longer open by smtp-sink.
        smtp-sink closes it before it answers the final dot."""
        assert self._proc is not None
        paths = list(self.dump_dir.iterdir())  # listed before we look at what is still open
        writing = _open_files(self._proc.pid)
        found = []
        for path in paths:
            if str(path) in writing:
                continue
            with contextlib.suppress(FileNotFoundError):
                found.append((path.stat().st_mtime_ns, SinkDump.parse(path, path.read_bytes())))
        return [dump for _, dump in sorted(found, key=lambda item: (item[0], str(item[1].path)))]

    async def wait(
        self, count: int = 1, *, match: bytes | None = None, timeout: float = WAIT_SECONDS
    ) -> list[SinkDump]:
        """Wait (bounded) until at least `count` finished dumps (whose message contains
        `match`, if given) are there; returns them all, oldest first."""
        deadline = time.monotonic() + timeout
        while True:
            found = [d for d in self.dumps() if match is None or match in d.message]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"smtp-sink: {len(found)} of {count} transactions after {timeout}s "
                    f"(match={match!r}); stderr:\n{self.stderr()}"
                )
            await asyncio.sleep(POLL_SECONDS)


# --- a private Postfix instance ------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    """An smtpd listener on 127.0.0.1:port (0: pick a free one) with `-o name=value` overrides."""

    overrides: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    name: str | None = None


REFUSED_RECIPIENT = "check_recipient_access inline:{refused@example.com=REJECT}, permit"

# The listeners of the `postfix_upstream` fixture (tests/conftest.py), by name.
UPSTREAM_LISTENERS = (
    # `refused@example.com` is refused (554 5.7.1), so a Postfix client in front bounces it
    Listener({"smtpd_recipient_restrictions": REFUSED_RECIPIENT}, name="full"),
    Listener({"smtputf8_enable": "no", "smtpd_discard_ehlo_keywords": "8bitmime"}, name="legacy"),
    Listener({"smtpd_discard_ehlo_keywords": "dsn"}, name="nodsn"),
)


def unique_id(domain: str = "rig.test") -> str:
    """A fresh Message-ID value (without <>): tests find their own mail by it."""
    return f"{uuid.uuid4().hex}@{domain}"


@dataclass
class Submission:
    replies: list[str]  # EHLO, MAIL, each RCPT, DATA, end of data (as far as it got)
    queue_id: str | None  # from '250 2.0.0 Ok: queued as ID', None unless accepted


def _option(name: str, value: str) -> str:
    if re.search(r"[\s{}]", value):
        return f"-o {{ {name} = {value} }}"
    return f"-o {name}={value}"


class PostfixInstance:
    """A private Postfix (master + daemons) with its own config, queue, data and log under a
    temp dir: listens only on `listeners` (127.0.0.1), sends everything to
    [127.0.0.1]:`relayhost_port`, delivers nothing locally, retries deferred mail within
    seconds. `main` adds or overrides main.cf parameters."""

    def __init__(
        self,
        relayhost_port: int,
        listeners: Sequence[Listener | tuple[int, Mapping[str, str]]] = (Listener(),),
        main: Mapping[str, str] | None = None,
        hostname: str = "postfix.test",
    ) -> None:
        self.relayhost_port = relayhost_port
        self.listeners = [
            item if isinstance(item, Listener) else Listener(item[1], item[0]) for item in listeners
        ]
        self.main = dict(main or {})
        self.hostname = hostname
        self.ports: list[int] = []
        self.base: Path | None = None
        self._watchdog: _Watchdog | None = None

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The first listener's port."""
        return self.ports[0]

    def listener_port(self, name: str) -> int:
        for listener, port in zip(self.listeners, self.ports, strict=True):
            if listener.name == name:
                return port
        raise KeyError(name)

    @property
    def config_dir(self) -> Path:
        assert self.base is not None, "PostfixInstance not started"
        return self.base / "config"

    @property
    def log_path(self) -> Path:
        assert self.base is not None, "PostfixInstance not started"
        return self.base / "maillog"

    def main_cf(self) -> dict[str, str]:
        assert self.base is not None
        base = self.base
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": f"{base}/queue",
            "data_directory": f"{base}/data",
            "myhostname": self.hostname,
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "smtp_bind_address": LOOPBACK,
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 no local delivery in the test rig",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "relayhost": f"[{LOOPBACK}]:{self.relayhost_port}",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(base),  # else postlogd refuses maillog_file
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            # Mail from 127.0.0.1 would count as local and get Date/Message-ID/addresses added.
            "local_header_rewrite_clients": "",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            "smtputf8_enable": "yes",
            # No DNS: CI has network only to package registries.
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            # Seconds, not minutes: a test can watch a deferral being retried.
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "queue_run_delay": "1s",
            "transport_retry_time": "1s",
            "in_flow_delay": "0s",
            "smtpd_error_sleep_time": "0s",
            "smtp_connect_timeout": "5s",
            "smtp_helo_timeout": "15s",
            "smtp_mail_timeout": "15s",
            "smtp_rcpt_timeout": "15s",
            "smtp_data_init_timeout": "15s",
            "smtp_data_xfer_timeout": "15s",
            "smtp_data_done_timeout": "30s",
            "smtp_quit_timeout": "5s",
            "smtpd_timeout": "30s",
        }
        settings.update(self.main)
        return settings

    def master_cf(self) -> str:
        """The packaged master.cf without chroot and without its `smtp inet` (any inet)
        listener, plus our listeners."""
        source = next(path for path in MASTER_CF if path.exists())
        out, skipping = [], False
        for line in source.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                out.append(line)
            elif line[0].isspace():  # continuation of the previous service
                if not skipping:
                    out.append(line)
            else:
                fields = line.split()
                skipping = fields[1] == "inet"
                if not skipping:
                    fields[4] = "n"  # chroot: our queue is no chroot jail
                    out.append(" ".join(fields))
        for listener, port in zip(self.listeners, self.ports, strict=True):
            out.append(f"{LOOPBACK}:{port} inet n - n - - smtpd")
            out += [f"  {_option(k, v)}" for k, v in listener.overrides.items()]
        return "\n".join(out) + "\n"

    def _postfix(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self) -> None:
        """Write the configuration, create the queue, start Postfix (`postfix start` returns
        once master has bound every listener). Retries with other ports when one was taken."""
        require_postfix()
        for _ in range(START_ATTEMPTS):
            self.base = _private_dir("clickrelay-postfix-")
            self.ports = [item.port or free_port() for item in self.listeners]
            self.config_dir.mkdir()
            (self.config_dir / "main.cf").write_text(
                "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
            )
            (self.config_dir / "master.cf").write_text(self.master_cf())
            _running.add(self)
            self._watchdog = _Watchdog(self.base, "cwd", str(self.base / "queue"), self.config_dir)
            # Postfix waits (in 0.3-s naps) until a just-written main.cf is a second old
            past = time.time() - 60
            for name in ("main.cf", "master.cf"):
                os.utime(self.config_dir / name, (past, past))
            self._create_queue()
            started = self._postfix("start")
            if started.returncode == 0:
                return
            log = self.log()
            self.stop()
            if "in use" not in log or all(item.port for item in self.listeners):
                raise RuntimeError(f"postfix did not start:\n{started.stderr}{log}")
        raise RuntimeError("postfix did not start: no free ports")

    def _create_queue(self) -> None:
        assert self.base is not None
        (self.base / "queue").mkdir()
        created = self._postfix("post-install", "create-missing")
        if created.returncode != 0:
            log = self.log()
            self.stop()
            raise RuntimeError(f"postfix post-install failed:\n{created.stderr}{log}")

    def processes(self) -> list[int]:
        """Process ids of this instance's master and daemons that are alive."""
        return _working_in(self.base / "queue") if self.base is not None else []

    def stop(self) -> None:
        """`postfix stop`, wait (bounded) for its master and daemons to exit, SIGKILL any left;
        then remove the instance's directory."""
        if self.base is None:
            return
        if self.processes():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._postfix("stop", timeout=15)
            deadline = time.monotonic() + 5
            while self.processes() and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._watchdog is not None:
            self._watchdog.release()
            self._watchdog = None
        _running.discard(self)
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None

    # -- what it did

    def log(self) -> str:
        """The whole maillog so far."""
        if self.base is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_mark(self) -> int:
        """A position in the log: pass as `since` to look only at what comes later."""
        return len(self.log())

    async def wait_for_log(
        self, pattern: str, *, since: int = 0, timeout: float = WAIT_SECONDS
    ) -> re.Match[str]:
        """Wait (bounded) for a log line matching the regex `pattern` (re.search, per line)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log()[since:].splitlines():
                if found := regex.search(line):
                    return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no Postfix log line matching {pattern!r} after {timeout}s:\n"
                    + self.log()[since:][-6000:]
                )
            await asyncio.sleep(POLL_SECONDS)

    async def wait_for_delivery(
        self, queue_id: str, status: str = "sent", *, timeout: float = WAIT_SECONDS
    ) -> re.Match[str]:
        """Wait for `ID: to=<...>, relay=..., dsn=..., status=<status> (reply)` (`status` is a
        regex: 'sent', 'bounced', 'deferred', 'sent|bounced'); the match has groups to, relay,
        dsn, status, reply. With several recipients: the first such line."""
        return await self.wait_for_log(
            rf"{queue_id}: to=<(?P<to>[^>]*)>,.* relay=(?P<relay>[^,]*),.* dsn=(?P<dsn>[^,]*),"
            rf" status=(?P<status>{status}) \((?P<reply>.*)\)$",
            timeout=timeout,
        )

    async def queue_id_of(self, message_id: str, *, timeout: float = WAIT_SECONDS) -> str:
        """The queue id Postfix gave the message with this Message-ID (from cleanup's log)."""
        found = await self.wait_for_log(
            rf"\]: (\w+): message-id=<?{re.escape(message_id)}>?$", timeout=timeout
        )
        return found[1]

    def queued(self) -> list[str]:
        """Queue ids of every message still queued (maildrop, incoming, active, deferred,
        hold): [] once Postfix is done with everything."""
        assert self.base is not None
        found = []
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.base / "queue" / name):
                found += files
        return sorted(found)

    def clear_queue(self) -> None:
        """Delete every queued message (`postsuper -d ALL`): a test's leftovers stay its own."""
        subprocess.run(
            [POSTSUPER, "-c", str(self.config_dir), "-d", "ALL"],
            capture_output=True, check=True, timeout=30,
        )  # fmt: skip

    def flush(self) -> None:
        """Attempt delivery of all deferred mail now (`postqueue -f`)."""
        subprocess.run(
            [POSTQUEUE, "-c", str(self.config_dir), "-f"],
            capture_output=True, check=True, timeout=30,
        )  # fmt: skip

    async def submit(
        self,
        mail: str,
        rcpts: Sequence[str],
        message: bytes,
        *,
        port: int | None = None,
        ehlo: str = "client.test",
    ) -> Submission:
        """One SMTP transaction into Postfix's smtpd (the first listener unless `port`): `mail`
        and each of `rcpts` are sent verbatim after `MAIL FROM:` / `RCPT TO:`, e.g.
        '<a@b> SMTPUTF8 BODY=8BITMIME RET=HDRS ENVID=x' and
        '<r@x> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;r@x' (UTF-8 on the wire); `message` is
        dot-stuffed for DATA. Stops after MAIL or RCPT when nothing was accepted."""
        client = await RawClient.connect(port or self.port)
        try:
            replies = [await client.cmd(f"EHLO {ehlo}")]
            replies.append(await client.cmd(f"MAIL FROM:{mail}"))
            replies += [await client.cmd(f"RCPT TO:{rcpt}") for rcpt in rcpts]
            queue_id = None
            if replies[1].startswith("250") and any(r.startswith("250") for r in replies[2:]):
                data = await client.cmd("DATA")
                replies.append(data)
                if data.startswith("354"):
                    replies.append(await client.cmd(wire(message) + b"."))
                    if found := re.match(r"250 .*queued as (\w+)", replies[-1]):
                        queue_id = found[1]
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await client.cmd("QUIT", timeout=5)
            return Submission(replies, queue_id)
        finally:
            await client.close()
