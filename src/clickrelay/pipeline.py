"""What happens to a message between SMTP in and forward: read the control headers, strip them.

(Link rewriting and storage join here in a later step; the relay only sees `prepare`/`forwarded`.)
"""

from __future__ import annotations

from dataclasses import dataclass

from aiosmtpd.smtp import Envelope

from clickrelay.config import Settings
from clickrelay.headers import (
    ControlHeaders,
    control_field_names,
    field_value,
    parse_header_block,
    read_control_headers,
    remove_fields,
)
from clickrelay.upstream import Reply


@dataclass
class Prepared:
    message: bytes
    message_id: str
    control: ControlHeaders
    decision: str

    def log_fields(self) -> str:
        return (
            f"msgid={self.message_id} campaign={self.control.campaign_id or '-'} "
            f"contact={self.control.contact_id or '-'} decision={self.decision}"
        )


class MessagePipeline:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.control_names = control_field_names(settings.headers)

    async def prepare(self, message: bytes, envelope: Envelope) -> Prepared:
        block = parse_header_block(message)
        control = read_control_headers(message, block, self.settings.headers)
        message_id = block.first("message-id")
        return Prepared(
            message=remove_fields(message, block, self.control_names),
            message_id=field_value(message, message_id) if message_id else "-",
            control=control,
            decision="not_campaign" if control.campaign_id is None else "forwarded",
        )

    async def forwarded(self, prepared: Prepared, reply: Reply) -> None:
        return None
