"""The HTTP service: health probe (click redirects and reports join here)."""

from __future__ import annotations

from aiohttp import web


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")
