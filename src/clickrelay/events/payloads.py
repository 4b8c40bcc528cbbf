"""Events as JSON (DESIGN.md, "Events out"): one shape for webhook bodies and the feed."""

from __future__ import annotations

import json
from typing import Any

from clickrelay.isotime import iso
from clickrelay.storage.base import Event


def data_of(event: Event) -> dict[str, Any]:
    if event.type == "send":
        return {
            "campaign_id": event.campaign_id, "campaign_name": event.campaign_name,
            "contact_id": event.contact_id, "email": event.email,
            "message_id": event.message_id, "sent_at": iso(event.sent_at),
        }  # fmt: skip
    return {
        "campaign_id": event.campaign_id, "campaign_name": event.campaign_name,
        "variant": event.variant, "contact_id": event.contact_id, "email": event.email,
        "link_id": event.link_id, "url": event.url, "label": event.label,
        "clicked_at": iso(event.at), "bot": event.bot_reason is not None,
        "bot_reason": event.bot_reason,
    }  # fmt: skip


def feed_item(event: Event) -> dict[str, Any]:
    return {"id": event.event_id, **message_of(event)}


def message_of(event: Event) -> dict[str, Any]:
    return {"type": event.type, "timestamp": iso(event.at), "data": data_of(event)}


def webhook_body(event: Event) -> bytes:
    return json.dumps(message_of(event), ensure_ascii=False, separators=(",", ":")).encode()
