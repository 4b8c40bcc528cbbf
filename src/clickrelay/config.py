"""Settings: TOML file (or embedded defaults) -> typed, validated, immutable values.

Every user mistake becomes a `ConfigError` naming the key, which the CLI turns into one line on
stderr and exit status 2. Each field declares how its TOML value is parsed (`_field(parser)`), so
one generic loader validates every section.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SECRET_KEYS = frozenset({"upstream.password", "reports.password", "reports.password_hash"})
_ALTERNATIVES = {"storage": ("database", "url")}  # (section, keys of which one at most is set)


class ConfigError(Exception):
    """A user mistake in the configuration; `key` names what to fix."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamURL:
    """`smtp://`, `smtp+starttls://`, `smtps://` host and port, or a `maildir:` directory."""

    scheme: str
    host: str = ""
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        if self.scheme == "maildir":
            return f"maildir:{self.path}"
        return f"{self.scheme}://{HostPort(self.host, self.port)}"


# ---------------------------------------------------------------- value parsers
# Each takes the raw TOML value and returns the typed value, or raises ValueError(problem).


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_toml_type(value)}")
    return value


def _nonempty_str(value: Any) -> str:
    if not _str(value).strip():
        raise ValueError("must not be empty")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_toml_type(value)}")
    return value


def _int_range(low: int, high: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_toml_type(value)}")
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}" if high else f"must be >= {low}")
        return value

    return parse


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {_toml_type(value)}")
    if value <= 0:
        raise ValueError("must be greater than 0")
    return float(value)


def _str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {_toml_type(value)}")
    return tuple(value)


def _regex_list(value: Any) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for text in _str_list(value):
        try:
            patterns.append(re.compile(text, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"invalid regular expression {text!r}: {exc}") from None
    return tuple(patterns)


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    nets = []
    for text in _str_list(value):
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP network (like 10.0.0.0/8)") from None
    return tuple(nets)


def _host_port(value: Any) -> HostPort:
    text = _str(value)
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\s\[\]]+):(\d{1,5})", text)
    if not match:
        raise ValueError(f"expected host:port (like 127.0.0.1:2525), got {text!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return HostPort(host, port)


def _path(value: Any) -> Path:
    return Path(_nonempty_str(value)).expanduser()


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if _str(value) not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    return parse


def _public_url(value: Any) -> str:
    text = _str(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL like https://click.example.com, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    return text


_UPSTREAM_PORTS = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}


def _upstream_url(value: Any) -> UpstreamURL:
    text = _str(value)
    if text.startswith("maildir:"):
        path = text.removeprefix("maildir:").removeprefix("//")
        if not path.strip():
            raise ValueError("maildir: needs a directory, like maildir:/var/mail/outbox")
        return UpstreamURL("maildir", path=Path(path).expanduser())
    parts = urlsplit(text)
    if parts.scheme not in _UPSTREAM_PORTS or not parts.hostname:
        raise ValueError(
            "expected smtp://host:port, smtp+starttls://host:port, smtps://host:port "
            f"or maildir:/path, got {text!r}"
        )
    if parts.username or parts.password:
        raise ValueError("put credentials in upstream.username and upstream.password, not the URL")
    if parts.path not in ("", "/"):
        raise ValueError(f"unexpected path {parts.path!r}")
    try:
        port = parts.port or _UPSTREAM_PORTS[parts.scheme]
    except ValueError:
        raise ValueError(f"invalid port in {text!r}") from None
    return UpstreamURL(parts.scheme, parts.hostname, port)


@dataclass(frozen=True)
class StorageURL:
    """`sqlite:///path` or a PostgreSQL URL (libpq's form, as asyncpg takes it). Shown (`str`)
    with its password masked: the URL itself is only handed to the database driver."""

    scheme: str  # "sqlite" or "postgresql"
    url: str = field(repr=False)
    path: Path | None = None

    def __str__(self) -> str:
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        host = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return parts._replace(netloc=f"{user}:********@{host}").geturl()


def _storage_url(value: Any) -> StorageURL:
    text = _nonempty_str(value)
    parts = urlsplit(text)
    if parts.scheme == "sqlite":
        if parts.netloc or not parts.path.strip("/"):
            raise ValueError("expected sqlite:///absolute/path/to/file.sqlite3")
        return StorageURL("sqlite", text, Path(parts.path))
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(
            f"expected sqlite:///path or postgresql://user@host:5432/database, got {parts.scheme!r}"
        )
    try:
        parts.port  # noqa: B018 (validates it)
    except ValueError:
        raise ValueError("invalid port in the URL") from None
    return StorageURL("postgresql", text)


def _webhook_url(value: Any) -> str:
    text = _nonempty_str(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {text!r}")
    if parts.username or parts.password:
        raise ValueError("no credentials in the URL: receivers verify the signature instead")
    return text


WEBHOOK_EVENTS = ("click", "bot_click", "send")


def _webhook_events(value: Any) -> tuple[str, ...]:
    events = _str_list(value)
    unknown = sorted(set(events) - set(WEBHOOK_EVENTS))
    if unknown or not events:
        raise ValueError(f"expected some of {', '.join(WEBHOOK_EVENTS)}; got {events!r}")
    return tuple(dict.fromkeys(events))


def _tables(cls: type, section: str, unique: str) -> Callable[[Any], tuple[Any, ...]]:
    """The parser of an array of `[[section]]` tables of `cls`, no two with the same `unique`
    value."""

    def parse(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ValueError(f"expected [[{section}]] tables, got {_toml_type(value)}")
        tables = tuple(_build(cls, table, f"{section}[{n}]") for n, table in enumerate(value))
        values = [getattr(table, unique) for table in tables]
        for n, item in enumerate(values):
            if item in values[:n]:
                raise ConfigError(f"{section}[{n}].{unique}", f"{item} is configured twice")
        return tables

    return parse


_DNS_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*", re.IGNORECASE)


def _dns_name(value: Any) -> str:
    """A domain or selector (ASCII, as DNS and DKIM's d= and s= write it), lower-cased."""
    if not _DNS_NAME.fullmatch(_str(value)):
        raise ValueError(f"expected a DNS name like shop.example.com, got {value!r}")
    return value.lower()


def _password_hash(value: Any) -> str:
    from clickrelay.passwords import is_password_hash

    if not is_password_hash(_str(value)):
        raise ValueError("not a password hash; make one with `clickrelay hash-password`")
    return value


def _users(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of name = password hash, got {_toml_type(value)}")
    users = {}
    for name, hashed in value.items():
        try:
            users[name] = _password_hash(hashed)
        except ValueError as exc:
            raise ValueError(f"user {name!r}: {exc}") from None
    return users


def _field(parse: Callable[[Any], Any], default: Any = MISSING, **kwargs: Any) -> Any:
    if isinstance(default, list | dict | set):
        raise TypeError("use default_factory for mutable defaults")
    return field(default=default, metadata={"parse": parse}, **kwargs)


def _toml_type(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- sections

LOOPBACK = ("127.0.0.0/8", "::1/128")
MAX_WORKERS = 64  # processes per service


@dataclass(frozen=True)
class SmtpSettings:
    listen: HostPort = _field(_host_port, HostPort("127.0.0.1", 2525))
    allowed_clients: tuple[IPNetwork, ...] = _field(_networks, _networks(list(LOOPBACK)))
    max_message_size: int = _field(_int_range(1024), 33554432)
    tls_cert: Path | None = _field(_path, None)
    tls_key: Path | None = _field(_path, None)
    users: dict[str, str] = field(default_factory=dict, metadata={"parse": _users})
    hostname: str = _field(_str, "")  # empty: the machine's FQDN
    received_header: bool = _field(_bool, True)
    shutdown_timeout_seconds: float = _field(_positive_number, 30.0)
    max_connections: int = _field(_int_range(0), 1000)  # 0: no limit
    max_connections_per_client: int = _field(_int_range(0), 100)
    idle_timeout_seconds: float = _field(_positive_number, 300.0)
    workers: int = _field(_int_range(1, MAX_WORKERS), 1)


@dataclass(frozen=True)
class UpstreamSettings:
    url: UpstreamURL = _field(_upstream_url, UpstreamURL("maildir", path=Path("outbox")))
    username: str | None = _field(_str, None)
    password: str | None = _field(_str, None)
    timeout_seconds: float = _field(_positive_number, 60.0)
    tls_verify: bool = _field(_bool, True)
    ca_file: Path | None = _field(_path, None)


@dataclass(frozen=True)
class WebSettings:
    listen: HostPort = _field(_host_port, HostPort("127.0.0.1", 8080))
    public_url: str = _field(_public_url, "http://127.0.0.1:8080")
    trusted_proxies: tuple[IPNetwork, ...] = _field(_networks, ())
    tls_cert: Path | None = _field(_path, None)
    tls_key: Path | None = _field(_path, None)
    max_connections: int = _field(_int_range(0), 4096)  # 0: as many as file descriptors allow
    max_connections_per_client: int = _field(_int_range(0), 256)  # 0: no per-client cap
    idle_timeout_seconds: float = _field(_positive_number, 15.0)
    workers: int = _field(_int_range(1, MAX_WORKERS), 1)


@dataclass(frozen=True)
class ReportsSettings:
    username: str = _field(_nonempty_str, "admin")
    password: str | None = _field(_nonempty_str, None)
    password_hash: str | None = _field(_password_hash, None)
    keep_html_copy: bool = _field(_bool, True)  # one copy per campaign, for its click map

    @property
    def enabled(self) -> bool:
        return bool(self.password or self.password_hash)


@dataclass(frozen=True)
class StorageSettings:
    """Either `database` (a SQLite file) or `url` (`sqlite:///path` or `postgresql://...`)."""

    database: Path = _field(_path, Path("/var/lib/clickrelay/clickrelay.sqlite3"))
    url: StorageURL | None = _field(_storage_url, None)
    password_file: Path | None = _field(_path, None)  # PostgreSQL's, kept out of the URL
    pool_size: int = _field(_int_range(1, 1000), 10)
    synchronous: str = _field(_choice("normal", "full"), "normal")

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file in use, or None for PostgreSQL."""
        if self.url is None:
            return self.database
        return self.url.path


@dataclass(frozen=True)
class TrackingSettings:
    secret_file: Path = _field(_path, Path("/var/lib/clickrelay/secret"))
    tracked_campaign_types: tuple[str, ...] = _field(_str_list, ("standard",))
    trigger_url_patterns: tuple[re.Pattern[str], ...] = _field(_regex_list, ())
    system_url_patterns: tuple[re.Pattern[str], ...] = _field(_regex_list, ())
    affiliate_url_patterns: tuple[re.Pattern[str], ...] = _field(_regex_list, ())
    track_url_text_links: bool = _field(_bool, False)
    track_plain_text: bool = _field(_bool, False)  # track URLs in text/plain parts too


@dataclass(frozen=True)
class BotSettings:
    min_seconds_after_send: int = _field(_int_range(0), 5)
    burst_links: int = _field(_int_range(0), 4)
    burst_seconds: float = _field(_positive_number, 2.0)
    max_clicks_per_minute: int = _field(_int_range(0), 10)
    user_agent_patterns: tuple[re.Pattern[str], ...] = _field(_regex_list, ())

    @property
    def settle_seconds(self) -> float:
        """How long after a click its judgement may still change (a burst re-marks it as a
        bot's): events wait that long before they are told."""
        return self.burst_seconds if self.burst_links else 0.0


@dataclass(frozen=True)
class HeaderNames:
    campaign_id: str = _field(_nonempty_str, "X-Campaign-Id")
    campaign_name: str = _field(_nonempty_str, "X-Campaign-Name")
    campaign_type: str = _field(_nonempty_str, "X-Campaign-Type")
    contact_id: str = _field(_nonempty_str, "X-Contact-Id")
    contact_email: str = _field(_nonempty_str, "X-Contact-Email")
    track_clicks: str = _field(_nonempty_str, "X-Track-Clicks")
    test_send: str = _field(_nonempty_str, "X-Test-Send")
    track_contact: str = _field(_nonempty_str, "X-Track-Contact")
    campaign_variant: str = _field(_nonempty_str, "X-Campaign-Variant")
    track_opens: str = _field(_nonempty_str, "X-Track-Opens")


@dataclass(frozen=True)
class PrivacySettings:
    store_ip: str = _field(_choice("full", "truncated", "none"), "truncated")
    retention_days: int = _field(_int_range(0, 36500), 0)  # 0: keep everything


@dataclass(frozen=True)
class WebhookSettings:
    """One `[[webhooks]]` endpoint."""

    url: str = _field(_webhook_url)
    secret_file: Path = _field(_path)  # "whsec_" + base64 key; created 0600 if absent
    events: tuple[str, ...] = _field(_webhook_events, ("click",))
    timeout_seconds: float = _field(_positive_number, 10.0)
    max_attempts: int = _field(_int_range(1, 100), 12)
    max_concurrency: int = _field(_int_range(1, 100), 4)  # requests in flight to this endpoint


@dataclass(frozen=True)
class DkimSettings:
    """One `[[dkim]]` signing key: DKIM-signed campaign mail of `domain` is signed anew."""

    domain: str = _field(_dns_name)  # the d= it signs for
    selector: str = _field(_dns_name)  # its public key is the TXT of {selector}._domainkey.{domain}
    private_key: Path = _field(_path)  # RSA or Ed25519, PEM (PKCS#1 or #8) or dkimpy's base64


@dataclass(frozen=True)
class Settings:
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    web: WebSettings = field(default_factory=WebSettings)
    reports: ReportsSettings = field(default_factory=ReportsSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    bots: BotSettings = field(default_factory=BotSettings)
    headers: HeaderNames = field(default_factory=HeaderNames)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    webhooks: tuple[WebhookSettings, ...] = field(
        default=(), metadata={"parse": _tables(WebhookSettings, "webhooks", "url")}
    )
    dkim: tuple[DkimSettings, ...] = field(
        default=(), metadata={"parse": _tables(DkimSettings, "dkim", "domain")}
    )
    # Where the settings came from: None means the embedded defaults.
    source: Path | None = field(default=None, compare=False)

    @property
    def embedded(self) -> bool:
        return self.source is None


# ---------------------------------------------------------------- loading

_REQUIRED_IN_FILE = ("upstream.url",)


def load(path: Path) -> Settings:
    """Read and validate a config file. Raises ConfigError naming the key or the file."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    for key in _REQUIRED_IN_FILE:
        section, name = key.split(".")
        if name not in data.get(section, {}):
            raise ConfigError(key, "required in a config file (no silent fallback to a Maildir)")
    for section, (first, second) in _ALTERNATIVES.items():
        table = data.get(section)
        if isinstance(table, dict) and {first, second} <= table.keys():
            raise ConfigError(f"{section}.{second}", f"set {first} or {second}, not both")
    settings = _build(Settings, data, "")
    settings = replace(settings, source=path)
    _check_consistency(settings)
    return settings


def embedded_defaults(data_dir: Path) -> Settings:
    """The no-config settings: everything under `data_dir`, mail kept in a local Maildir."""
    return Settings(
        upstream=UpstreamSettings(url=UpstreamURL("maildir", path=data_dir / "outbox")),
        storage=StorageSettings(database=data_dir / "clickrelay.sqlite3"),
        tracking=TrackingSettings(secret_file=data_dir / "secret"),
    )


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a table, got {_toml_type(data)}")
    known = {f.name: f for f in fields(cls) if f.name != "source"}
    for key in data:
        if key not in known:
            raise ConfigError(_join(prefix, key), "unknown key")
    for name, spec in known.items():
        if name not in data and spec.default is MISSING and spec.default_factory is MISSING:
            raise ConfigError(_join(prefix, name), "required")
    values = {}
    for name, value in data.items():
        spec = known[name]
        key = _join(prefix, name)
        if "parse" in spec.metadata:
            try:
                values[name] = spec.metadata["parse"](value)
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from None
        else:  # a nested section
            values[name] = _build(spec.default_factory, value, key)  # type: ignore[arg-type]
    return cls(**values)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check_consistency(settings: Settings) -> None:
    for section in ("smtp", "web"):
        conf = getattr(settings, section)
        if (conf.tls_cert is None) != (conf.tls_key is None):
            missing = "tls_key" if conf.tls_key is None else "tls_cert"
            raise ConfigError(f"{section}.{missing}", "tls_cert and tls_key go together")
        for key in ("tls_cert", "tls_key"):
            _check_readable(f"{section}.{key}", getattr(conf, key))
    if settings.smtp.users and settings.smtp.tls_cert is None:
        raise ConfigError("smtp.users", "AUTH is only offered over TLS: set smtp.tls_cert/tls_key")
    up = settings.upstream
    if (up.username is None) != (up.password is None):
        key = "upstream.password" if up.password is None else "upstream.username"
        raise ConfigError(key, "upstream.username and upstream.password go together")
    if up.username is not None and up.url.scheme == "maildir":
        raise ConfigError("upstream.username", "a maildir: upstream takes no credentials")
    _check_readable("upstream.ca_file", up.ca_file)
    storage = settings.storage
    if storage.password_file is not None and storage.sqlite_path is not None:
        raise ConfigError("storage.password_file", "only for a postgresql:// storage.url")
    _check_readable("storage.password_file", storage.password_file)
    if settings.reports.password and settings.reports.password_hash:
        raise ConfigError("reports.password", "set password or password_hash, not both")
    if settings.dkim:
        from clickrelay.mail import dkim  # (it imports this module)

        dkim.load_keys(settings.dkim)  # each key read and tried now, not at the first message


def _check_readable(key: str, path: Path | None) -> None:
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


# ---------------------------------------------------------------- display


def describe(settings: Settings) -> str:
    """The effective settings as TOML-like text, secrets masked (for `check-config`)."""
    lines = [f"# effective settings ({settings.source or 'embedded defaults'})"]
    for section in fields(Settings):
        if section.name == "source":
            continue
        conf = getattr(settings, section.name)
        tables = conf if isinstance(conf, tuple) else (conf,)
        heading = f"[[{section.name}]]" if isinstance(conf, tuple) else f"[{section.name}]"
        for table in tables:
            lines.append(f"\n{heading}")
            for spec in fields(table):
                value = getattr(table, spec.name)
                lines.append(f"{spec.name} = {_show(f'{section.name}.{spec.name}', value)}")
    return "\n".join(lines) + "\n"


def _show(key: str, value: Any) -> str:
    if value is None:
        return "# (not set)"
    if key in SECRET_KEYS or key == "smtp.users":
        if isinstance(value, dict):
            return "{ " + ", ".join(f'{name} = "********"' for name in value) + " }"
        return '"********"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(key, v) for v in value) + "]"
    if isinstance(value, re.Pattern):
        value = value.pattern
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
