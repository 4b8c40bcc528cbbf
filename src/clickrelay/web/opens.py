"""Opens: `GET /o/{token}` records a load of a send's pixel and answers a 1x1 transparent GIF.

Which loads are a person opening the mail: many are not. Apple Mail Privacy Protection fetches
every image of a message through Apple's proxies when it arrives, whether or not anyone reads
it; Google and Yahoo fetch images through their own proxies (Gmail when the message is shown,
but from Google's servers, and often once for many views); security gateways and prefetchers
fetch them too. Those loads are `machine_opens`, counted apart and never in `unique_opens`.
The reasons: `apple_mpp`, `google_proxy`, `yahoo_proxy`, `user_agent` (a known scanner or
library, as for clicks, or none at all) and `head`.
"""

from __future__ import annotations

import base64
import ipaddress
import time

from aiohttp import web

from clickrelay.config import IPNetwork
from clickrelay.limits import forwarded_client
from clickrelay.storage.base import NewOpen
from clickrelay.tracking.tokens import Kind, Signer
from clickrelay.web.bots import agent_verdict
from clickrelay.web.recorder import ClickRecorder

__all__ = ["PIXEL", "OpenService", "machine_reason"]

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
PIXEL_HEADERS = {
    "Content-Type": "image/gif",
    "Cache-Control": "no-store, max-age=0",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
    "X-Content-Type-Options": "nosniff",
}
# Apple's own network: Mail Privacy Protection's proxies fetch from it (with a bare
# "Mozilla/5.0" user agent, which no mail client sends by itself).
APPLE_NETWORK = ipaddress.ip_network("17.0.0.0/8")
_PROXIES = (("googleimageproxy", "google_proxy"), ("ggpht.com", "google_proxy"),
            ("yahoomailproxy", "yahoo_proxy"))  # fmt: skip


def machine_reason(method: str, user_agent: str | None, ip: str | None) -> str | None:
    """Why this load of a pixel is no person opening the mail, or None if it may be one."""
    if method == "HEAD":
        return "head"
    agent = (user_agent or "").strip()
    if agent == "Mozilla/5.0" or _in_apple_network(ip):
        return "apple_mpp"
    lowered = agent.lower()
    for marker, reason in _PROXIES:
        if marker in lowered:
            return reason
    return "user_agent" if agent_verdict(user_agent, ()) else None


def _in_apple_network(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip) in APPLE_NETWORK
    except ValueError:
        return False


class OpenService:
    def __init__(
        self, signer: Signer, recorder: ClickRecorder, trusted: tuple[IPNetwork, ...] = ()
    ) -> None:
        self.signer = signer
        self.recorder = recorder
        self.trusted = trusted  # proxies whose X-Forwarded-For names the client

    async def pixel(self, request: web.Request) -> web.Response:
        """The GIF, once the open is stored (or held while storage is down); 404 for anything
        but a genuine open token (a click token is no open)."""
        token = self.signer.verify(request.match_info["token"])
        if token is None or token.kind is not Kind.OPEN:
            return web.Response(status=404, headers=PIXEL_HEADERS, body=PIXEL)
        ip = forwarded_client(request.remote, request.headers.get("X-Forwarded-For", ""),
                              self.trusted)  # fmt: skip
        reason = machine_reason(request.method, request.headers.get("User-Agent"), ip)
        await self.recorder.record_open(NewOpen(token.send_id, time.time(), reason))
        return web.Response(headers=PIXEL_HEADERS, body=PIXEL)
