"""Command line: `clickrelay run|smtp|web|migrate|erase|check-config|hash-password`.

User mistakes (config, ports, TLS files) end with exit status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from pathlib import Path

from clickrelay import __version__, config, passwords, workers
from clickrelay.service import (
    EXIT_USAGE,
    Parts,
    StartupError,
    erase_contact,
    migrate,
    prepare_embedded,
    serve,
)
from clickrelay.storage import StoreError

EMBEDDED_DATA_DIR = Path("clickrelay-data")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.command(args)
    except (config.ConfigError, StartupError) as exc:
        print(f"clickrelay: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _log_level_option(default: str) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clickrelay", description="Click-tracking SMTP relay.",
        parents=[_log_level_option("info")],
    )  # fmt: skip
    # After the command, --log-level has no default of its own: a subparser's defaults
    # overwrite the namespace, so `clickrelay --log-level debug run` would lose the debug.
    common = _log_level_option(argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"clickrelay {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, func, help_text: str, config_required: bool | None) -> None:
        cmd = sub.add_parser(name, help=help_text, parents=[common])
        if config_required is not None:
            cmd.add_argument(
                "--config",
                type=Path,
                required=config_required,
                metavar="FILE",
                help="TOML config file" + ("" if config_required else " (default: embedded)"),
            )
        cmd.set_defaults(command=func)

    command("run", _run, "SMTP relay and HTTP service in one process", False)
    command("smtp", _smtp, "the SMTP relay alone", True)
    command("web", _web, "the HTTP service (clicks, reports) alone", True)
    command("migrate", _migrate, "apply the storage schema (as every node does at start)", True)
    command("check-config", _check_config, "validate a config file and print it", True)
    erase = sub.add_parser(
        "erase", help="remove every trace of one contact (counts stay)", parents=[common]
    )
    erase.add_argument("--config", type=Path, required=True, metavar="FILE")
    who = erase.add_mutually_exclusive_group(required=True)
    who.add_argument("--contact", metavar="ID", help="the contact id (X-Contact-Id)")
    who.add_argument("--email", metavar="ADDR", help="the contact's address")
    erase.set_defaults(command=_erase)
    command("hash-password", _hash_password, "make a password hash for the config", None)
    return parser


def _run(args: argparse.Namespace) -> int:
    return _serve(args, Parts(smtp=True, web=True))


def _smtp(args: argparse.Namespace) -> int:
    return _serve(args, Parts(smtp=True, web=False))


def _web(args: argparse.Namespace) -> int:
    return _serve(args, Parts(smtp=False, web=True))


def _serve(args: argparse.Namespace, parts: Parts) -> int:
    if args.config is None:
        settings = config.embedded_defaults(EMBEDDED_DATA_DIR)
        settings = prepare_embedded(settings, EMBEDDED_DATA_DIR)
    else:
        settings = config.load(args.config)
    if workers.count(settings, parts) > 1:
        return workers.supervise(settings, parts)
    asyncio.run(serve(settings, parts))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    asyncio.run(migrate(settings))
    print(f"storage schema up to date: {settings.storage.url or settings.storage.database}")
    return 0


def _erase(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    try:
        erased = asyncio.run(erase_contact(settings, args.contact, args.email))
    except StoreError as exc:
        print(f"clickrelay: nothing erased, storage failed: {exc}", file=sys.stderr)
        return 1
    who = f"contact {args.contact}" if args.contact is not None else args.email
    print(f"erased {who}: {erased.sends} send(s), {erased.clicks} click(s); counts kept")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    sys.stdout.write(config.describe(settings))
    print("config OK", file=sys.stderr)
    return 0


def _hash_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("clickrelay: the passwords differ", file=sys.stderr)
            return EXIT_USAGE
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("clickrelay: empty password", file=sys.stderr)
        return EXIT_USAGE
    print(passwords.hash_password(password))
    return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiosmtpd logs every command of every session at INFO; keep its voice for real problems.
    if level != "debug":
        logging.getLogger("mail.log").setLevel(logging.WARNING)
