"""What a click came from, coarsely: device type, operating system, browser or mail client.

The user agent is parsed by ua-parser (uap-core's regexes, kept up to date by that project, run
by its Rust matcher where installed). Only the families are kept: "iOS", not "iOS 17.4.1".
ua-parser names no device type, so the type follows from what it found: iPads, Kindles and
Android devices without "Mobile" in the agent are tablets (Google's own rule for Android),
phones' operating systems are mobile, desktop ones desktop, the rest "other".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import ua_parser

from clickrelay.storage.base import cleaned

MOBILE_SYSTEMS = frozenset({
    "iOS", "Android", "Windows Phone", "BlackBerry OS", "BlackBerry Tablet OS", "KaiOS",
    "Firefox OS", "HarmonyOS", "Tizen", "Sailfish", "Symbian OS", "webOS",
})  # fmt: skip
DESKTOP_SYSTEMS = frozenset({
    "Windows", "Mac OS X", "macOS", "Linux", "Chrome OS", "Ubuntu", "Fedora", "Debian",
    "FreeBSD", "OpenBSD", "NetBSD", "Solaris", "Red Hat", "SUSE", "Mint", "Arch Linux",
})  # fmt: skip
UNKNOWN = "Other"  # ua-parser's own word for a family it does not know
MAX_AGENT = 512  # characters read (as many as a click keeps)


@dataclass(frozen=True)
class Device:
    kind: str  # "mobile", "tablet", "desktop" or "other"
    os: str
    client: str  # the browser or mail client


@functools.lru_cache(maxsize=4096)
def describe(user_agent: str | None) -> Device:
    """The device of a user agent (`other` throughout for none). What no backend can store
    (NUL, text that is not UTF-8) is cleaned out first."""
    if not user_agent:
        return Device("other", UNKNOWN, UNKNOWN)
    try:
        found = ua_parser.parse((cleaned(user_agent) or "")[:MAX_AGENT])
    except Exception:  # a parser bug must not fail a click: the device is merely unknown
        return Device("other", UNKNOWN, UNKNOWN)
    os = found.os.family if found.os else UNKNOWN
    client = found.user_agent.family if found.user_agent else UNKNOWN
    return Device(_kind(user_agent, os, found.device), os, client)


def _kind(user_agent: str, os: str, device: ua_parser.Device | None) -> str:
    family, brand = (device.family, device.brand or "") if device else ("", "")
    if family == "iPad" or "Tablet" in brand or family.startswith("Kindle"):
        return "tablet"
    if os == "Android" and "Mobile" not in user_agent:
        return "tablet"
    if os in MOBILE_SYSTEMS:
        return "mobile"
    return "desktop" if os in DESKTOP_SYSTEMS else "other"


def warm_up() -> None:
    """Compile the parser's regexes now (a third of a second), not at the first click."""
    describe.cache_clear()
    describe("Mozilla/5.0")
    describe.cache_clear()
