"""The envelope as ESMTP carries it: MAIL and RCPT arguments and their parameters.

The relay reads them itself rather than through aiosmtpd, which upper-cases every parameter
(an ENVID or ORCPT is case-sensitive) and knows none of DSN's. What may be sent on depends on
what the upstream offers in its EHLO (`Extensions`): a parameter it does not offer is left out
where that is harmless (SMTPUTF8 for an all-ASCII envelope, BODY, DSN's) and the message is
refused where it is not (RFC 6531: 553 5.6.7 for a non-ASCII address).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Extensions", "MailCommand", "ParameterError", "RcptCommand", "parse_mail", "parse_rcpt"]

MAX_PATH = 512  # octets of an address (RFC 5321 allows 256; some senders are generous)


@dataclass(frozen=True)
class Extensions:
    """What a server offers in its EHLO reply, as far as the envelope is concerned."""

    size: bool = False
    eightbitmime: bool = False
    smtputf8: bool = False
    dsn: bool = False
    pipelining: bool = False

    @classmethod
    def from_ehlo(cls, offered: Mapping[str, str]) -> Extensions:
        """From the EHLO keywords (lower case) and their parameters."""
        return cls(
            size="size" in offered,
            eightbitmime="8bitmime" in offered,
            smtputf8="smtputf8" in offered,
            dsn="dsn" in offered,
            pipelining="pipelining" in offered,
        )


class ParameterError(Exception):
    """The client's command cannot be taken; `reply` says why (a full reply line)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class MailCommand:
    address: str  # the reverse-path's mailbox as written, "" for the null sender
    size: int | None = None
    body: str | None = None  # "7BIT" or "8BITMIME"
    smtputf8: bool = False
    ret: str | None = None  # DSN: "FULL" or "HDRS"
    envid: str | None = None  # DSN: the envelope id, as written (xtext)

    def upstream_line(self, offered: Extensions) -> str:
        """The argument of MAIL for an upstream that offers `offered` (the caller has checked
        that the address itself may go there)."""
        words = [f"FROM:<{self.address}>"]
        if self.size is not None and offered.size:
            words.append(f"SIZE={self.size}")
        if self.body is not None and offered.eightbitmime:
            words.append(f"BODY={self.body}")
        if self.smtputf8 and offered.smtputf8:
            words.append("SMTPUTF8")
        if offered.dsn:
            words += [f"RET={self.ret}"] if self.ret else []
            words += [f"ENVID={self.envid}"] if self.envid else []
        return " ".join(words)


@dataclass(frozen=True)
class RcptCommand:
    address: str
    notify: str | None = None  # DSN: "NEVER" or a list of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None  # DSN: "addr-type;xtext", as written

    def upstream_line(self, offered: Extensions) -> str:
        words = [f"TO:<{self.address}>"]
        if offered.dsn:
            words += [f"NOTIFY={self.notify}"] if self.notify else []
            words += [f"ORCPT={self.orcpt}"] if self.orcpt else []
        return " ".join(words)


# RFC 5321 4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"); a value is any
# printable character but "=" and space (RFC 6531 adds UTF-8).
_PARAMETER = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*+)(?:=([^=\s\x00-\x1f\x7f]++))?")
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})++")  # RFC 3461 4: xtext
_NOTIFY = re.compile(r"NEVER|(?:SUCCESS|FAILURE|DELAY)(?:,(?:SUCCESS|FAILURE|DELAY))*+", re.I)
_ORCPT = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*+;[^\s\x00-\x1f\x7f]++")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*+"')  # a quoted string of a local part
_UNQUOTED_SPECIAL = re.compile(r"[\s<>]")  # outside one: a path cannot hold these
_DIGITS = re.compile(r"[0-9]{1,19}")  # (str.isdigit takes "²", which int() does not)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\udc80-\udcff]")  # (and bytes that were not UTF-8)

Check = Callable[[str | None], str | None]  # the value to keep, or None if it is not valid


def _choice(*allowed: str) -> Check:
    return lambda value: value.upper() if value and value.upper() in allowed else None


def _matching(pattern: re.Pattern[str], limit: int) -> Check:
    return lambda value: (
        value if value and len(value) <= limit and pattern.fullmatch(value) else None
    )


_MAIL = {
    "SIZE": lambda value: value if value and _DIGITS.fullmatch(value) else None,
    "BODY": _choice("7BIT", "8BITMIME"),
    "SMTPUTF8": lambda value: "" if value is None else None,
}
_MAIL_DSN = {"RET": _choice("FULL", "HDRS"), "ENVID": _matching(_XTEXT, 100)}
_MAIL_AUTH = {"AUTH": _matching(_XTEXT, 500)}  # RFC 4954 5: a mailbox as xtext, or "<>"
_NOT_OFFERED = {("BODY", "BINARYMIME")}  # a value of an extension not offered: 555, not 501
_RCPT_DSN = {"NOTIFY": lambda value: value.upper() if value and _NOTIFY.fullmatch(value) else None,
             "ORCPT": _matching(_ORCPT, 500)}  # fmt: skip


def parse_mail(arg: str | None, dsn: bool, esmtp: bool = True, auth: bool = False) -> MailCommand:
    """The argument of MAIL ("FROM:<a@b> SIZE=10 ..."); `dsn`: whether DSN was offered, `esmtp`:
    whether the session began with EHLO (else no parameter is allowed), `auth`: whether AUTH
    was (RFC 4954's AUTH= is then taken, and not passed on).

    Raises ParameterError with the reply for anything that cannot be taken.
    """
    address, parameters = _split(arg, "FROM:", "501 5.5.4 Syntax: MAIL FROM:<address>", esmtp)
    _check_address(address, "5.1.7", allow_empty=True)
    accepted = {**_MAIL, **(_MAIL_DSN if dsn else {}), **(_MAIL_AUTH if auth else {})}
    values = _read(parameters, accepted)
    size = values.get("SIZE")
    return MailCommand(
        address=address, size=int(size) if size is not None else None, body=values.get("BODY"),
        smtputf8="SMTPUTF8" in values, ret=values.get("RET"), envid=values.get("ENVID"),
    )  # fmt: skip


def parse_rcpt(arg: str | None, dsn: bool, esmtp: bool = True) -> RcptCommand:
    """The argument of RCPT ("TO:<a@b> NOTIFY=..."); raises ParameterError."""
    address, parameters = _split(arg, "TO:", "501 5.5.4 Syntax: RCPT TO:<address>", esmtp)
    _check_address(address, "5.1.3", allow_empty=False)
    values = _read(parameters, _RCPT_DSN if dsn else {})
    return RcptCommand(address, values.get("NOTIFY"), values.get("ORCPT"))


def _read(
    parameters: list[tuple[str, str | None]], accepted: Mapping[str, Check]
) -> dict[str, str]:
    """The valid values by keyword; ParameterError for an unknown, bad or repeated one (RFC 5321
    4.1.1.11: 555 for a parameter not recognised or not offered)."""
    values: dict[str, str] = {}
    for keyword, value in parameters:
        check = accepted.get(keyword)
        if check is None or (keyword, (value or "").upper()) in _NOT_OFFERED:
            option = f"{keyword}={value}" if check is not None else keyword
            raise ParameterError(f"555 5.5.4 Unsupported option: {printable(option)}")
        if keyword in values:
            raise ParameterError(f"501 5.5.4 Duplicate {keyword} parameter")
        valid = check(value)
        if valid is None:
            raise ParameterError(f"501 5.5.4 Bad {keyword} parameter")
        values[keyword] = valid
    return values


def _split(
    arg: str | None, keyword: str, syntax: str, esmtp: bool
) -> tuple[str, list[tuple[str, str | None]]]:
    """The mailbox (source route dropped) and the parameters, keywords upper-cased."""
    if arg is None or arg[: len(keyword)].upper() != keyword:
        raise ParameterError(syntax)
    rest = arg[len(keyword) :].lstrip(" ")
    if rest.startswith("<"):
        end = _path_end(rest)
        if end < 0:
            raise ParameterError(syntax)
        address, rest = rest[1:end], rest[end + 1 :]
        if address.startswith("@"):  # a source route (RFC 5321 4.1.1.3: may be ignored)
            address = address.partition(":")[2]
    else:  # a bare address, as lenient servers take it
        address, _, rest = rest.partition(" ")
    if (rest and not rest.startswith(" ")) or (rest.strip() and not esmtp):
        raise ParameterError(syntax)
    parameters = []
    for word in rest.split():
        found = _PARAMETER.fullmatch(word)
        if found is None:
            raise ParameterError(f"501 5.5.4 Bad parameter syntax: {printable(word)}")
        parameters.append((found[1].upper(), found[2]))
    return address, parameters


def _path_end(text: str) -> int:
    """The offset of the ">" closing the path that `text` starts with (quoted strings and their
    escapes skipped), or -1."""
    quoted = escaped = False
    for offset, char in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return offset
    return -1


def _check_address(address: str, code: str, *, allow_empty: bool) -> None:
    if not address and not allow_empty:
        raise ParameterError(f"501 {code} Bad address syntax: empty address")
    if len(address.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise ParameterError(f"501 {code} Address too long")
    if _CONTROL.search(address) or _UNQUOTED_SPECIAL.search(_QUOTED.sub("", address)):
        raise ParameterError(f"501 {code} Bad address syntax")


def printable(text: str) -> str:
    """`text` fit to show in a reply or a log line: printable ASCII, at most 64 characters."""
    return "".join(c if " " < c < "\x7f" else "?" for c in text[:64])
