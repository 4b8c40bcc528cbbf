"""Which clicks come from machines: security scanners, link previewers, HTTP libraries.

Every hit is stored; the verdict decides only whether it counts in the human figures. Reasons:
`head` (a HEAD request), `user_agent` (a known scanner, previewer or library, or one of
`[bots] user_agent_patterns`), `too_soon` (within `min_seconds_after_send` of the send), `burst`
(`burst_links` distinct links of one send within `burst_seconds`: scanners open every link),
`repeat` (more than `max_clicks_per_minute` hits on one tracking link of one send within a
sliding minute: a replayed link; people do not click one link ten times a minute).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

from clickrelay.config import BotSettings

# Substrings (case-insensitive) of user agents that are never a person reading mail.
KNOWN_AGENTS = (
    # mail security gateways and link scanners
    "safelinks", "microsoft office", "ms-office", "microsoft defender", "msoffice",
    "mimecast", "proofpoint", "barracuda", "symantec", "messagelabs", "trend micro", "sophos",
    "fortinet", "fortiguard", "forcepoint", "zscaler", "cisco", "ironport", "checkpoint",
    "paloalto", "trustwave", "spamtitan", "hornetsecurity", "sendinblue-linkcheck",
    "google-safety", "googleimageproxy", "google-read-aloud", "googlebot", "adsbot-google",
    "google-inspectiontool", "feedfetcher", "bingbot", "bingpreview", "yahoo! slurp", "yandex",
    "baiduspider", "duckduckbot", "applebot", "amazonbot", "virustotal", "urlscan",
    # chat and social link previewers
    "slackbot", "slack-imgproxy", "skypeuripreview", "discordbot", "telegrambot",
    "whatsapp", "facebookexternalhit", "facebot", "twitterbot", "linkedinbot", "pinterest",
    "redditbot", "embedly", "iframely", "mattermost", "rocket.chat", "viber", "snapchat",
    # HTTP libraries and tools
    "curl/", "wget/", "python-requests", "python-urllib", "python-httpx", "aiohttp/",
    "go-http-client", "java/", "okhttp", "apache-httpclient", "libwww-perl", "php/", "guzzle",
    "ruby", "node-fetch", "axios/", "undici", "postmanruntime", "httpie", "scrapy",
    "headlesschrome", "phantomjs", "crawler", "spider", "preview", "scanner",
)  # fmt: skip
# ...and anything calling itself a bot ("Googlebot/2.1", "AhrefsBot;"), but not a "CUBOT" phone.
_GENERIC = r"bot[/;]|\bbot\b"
_KNOWN = re.compile("|".join([*(re.escape(agent) for agent in KNOWN_AGENTS), _GENERIC]))
BURST_MEMORY = 100_000  # sends whose recent clicks are remembered for the burst rule
AGENT_MEMORY = 10_000  # user agents whose verdict is remembered (they repeat a lot)
REPEAT_MEMORY = 50_000  # tracking links (of one send) whose clicks of the last minute are kept
REPEAT_WINDOW = 60.0


def agent_verdict(user_agent: str | None, extra: tuple[re.Pattern[str], ...]) -> bool:
    """True if the user agent is a machine (missing user agents count as machines too)."""
    if not user_agent:
        return True
    return _KNOWN.search(user_agent.lower()) is not None or any(p.search(user_agent) for p in extra)


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # None: a human click
    burst_since: float | None = None  # re-mark this send's human clicks since then as `burst`


class BotJudge:
    def __init__(self, settings: BotSettings) -> None:
        self.settings = settings
        self._agents: dict[str, bool] = {}
        self._recent: OrderedDict[int, dict[int, float]] = OrderedDict()
        self._repeats = RepeatCounter(settings.max_clicks_per_minute)

    def judge(
        self, *, method: str, user_agent: str | None, send_id: int, link_id: int, now: float,
        seconds_since_send: float,
    ) -> Verdict:  # fmt: skip
        burst_since = self._remember(send_id, link_id, now)
        repeated = self._repeats.hit((send_id, link_id), now)
        if method == "HEAD":
            return Verdict("head")
        if self._is_machine(user_agent):
            return Verdict("user_agent")
        if burst_since is not None:
            return Verdict("burst", burst_since)
        if repeated:
            return Verdict("repeat")
        too_soon = self.settings.min_seconds_after_send
        if too_soon and seconds_since_send < too_soon:
            return Verdict("too_soon")
        return Verdict(None)

    def _is_machine(self, user_agent: str | None) -> bool:
        key = user_agent or ""
        verdict = self._agents.get(key)
        if verdict is None:
            if len(self._agents) >= AGENT_MEMORY:
                self._agents.clear()
            verdict = self._agents[key] = agent_verdict(
                user_agent, self.settings.user_agent_patterns
            )
        return verdict

    def _remember(self, send_id: int, link_id: int, now: float) -> float | None:
        """Record the click; if this send now shows a burst, the time the burst started.

        Per send, only the last click time of each link within the window is kept, so the
        memory per send is bounded by the campaign's number of links.
        """
        links, window = self.settings.burst_links, self.settings.burst_seconds
        if not links:
            return None
        recent = self._recent.pop(send_id, {})
        recent = {link: at for link, at in recent.items() if at >= now - window}
        recent.pop(link_id, None)
        recent[link_id] = now
        self._recent[send_id] = recent
        if len(self._recent) > BURST_MEMORY:
            self._recent.popitem(last=False)
        return min(recent.values()) if len(recent) >= links else None


class RepeatCounter:
    """Hits per key (a send's tracking link) within a sliding minute, in bounded memory.

    Per key, the times of its last `limit` hits; the hit that finds all of them within the
    window is one too many. Keys are kept in last-hit order, so those quiet for a whole window
    are dropped from the old end as new hits come; at most REPEAT_MEMORY keys are kept.
    """

    def __init__(self, limit: int, window: float = REPEAT_WINDOW, size: int = REPEAT_MEMORY):
        self.limit = limit
        self.window = window
        self.size = size
        self._hits: OrderedDict[tuple[int, int], list[float]] = OrderedDict()

    def hit(self, key: tuple[int, int], now: float) -> bool:
        """Record a hit; True if `limit` hits on `key` came before it within the window."""
        if not self.limit:
            return False
        since = now - self.window
        times = [t for t in self._hits.pop(key, ()) if t > since]
        over = len(times) >= self.limit
        times.append(now)
        self._hits[key] = times[-self.limit :]
        self._forget(since)
        return over

    def _forget(self, since: float) -> None:
        """Drop keys whose last hit is out of the window (oldest first), and beyond `size`."""
        while self._hits:
            key, times = next(iter(self._hits.items()))
            if times[-1] > since and len(self._hits) <= self.size:
                return
            del self._hits[key]
