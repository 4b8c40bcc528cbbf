"""Between SMTP in and forward: decision -> rewrite -> store.

`prepare` reads and strips the control headers, decides whether the message is rewritten, plans
the rewrite, commits the send and its links, and splices the tracking links in. Whatever goes
wrong on the way, the message is forwarded with its content untouched and the reason recorded;
the relay only ever sees a message to forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from aiosmtpd.smtp import Envelope

from clickrelay import cpu
from clickrelay.config import Settings
from clickrelay.mail import dkim, mime
from clickrelay.mail.headers import (
    HEADER_LIMIT,
    ControlHeaders,
    HeaderBlock,
    clean,
    control_field_names,
    field_spans,
    field_value,
    parse_header_block,
    read_control_headers,
)
from clickrelay.smtp.upstream import Reply
from clickrelay.storage.base import LinkKey, NewSend, RecordedSend, Store, StoreError
from clickrelay.tracking import clickmap, rewrite
from clickrelay.tracking.links import LinkRules
from clickrelay.tracking.tokens import Kind, Signer

log = logging.getLogger(__name__)
TOO_MANY_HEADERS = f"552 5.3.4 Message header section exceeds {HEADER_LIMIT} bytes"


@dataclass
class Prepared:
    message: bytes
    message_id: str
    control: ControlHeaders
    decision: str
    send_id: int | None = None
    tracked: int = 0
    skipped: int = 0
    refusal: str | None = None  # the reply refusing the message, instead of forwarding it

    def log_fields(self) -> str:
        return (
            f"msgid={self.message_id} campaign={self.control.campaign_id or '-'} "
            f"contact={self.control.contact_id or '-'} decision={self.decision} "
            f"links={self.tracked}/{self.skipped}"
        )


class MessagePipeline:
    def __init__(self, settings: Settings, store: Store, signer: Signer) -> None:
        self.settings = settings
        self.store = store
        self.signer = signer
        self.control_names = control_field_names(settings.headers)
        self.resigner = dkim.Resigner(dkim.load_keys(settings.dkim), settings.smtp.received_header)
        self._copied: set[str] = set()  # campaigns whose HTML copy this process has made
        tracking = settings.tracking
        self.rules = LinkRules(
            public_url=settings.web.public_url,
            trigger_patterns=tracking.trigger_url_patterns,
            system_patterns=tracking.system_url_patterns,
            affiliate_patterns=tracking.affiliate_url_patterns,
            track_url_text=tracking.track_url_text_links,
        )

    async def prepare(self, message: bytes, envelope: Envelope) -> Prepared:
        block = parse_header_block(message)
        if not block.complete:  # control headers could hide past what is read: refuse it all
            return Prepared(message=b"", message_id="-", control=ControlHeaders(),
                            decision="not_campaign", refusal=TOO_MANY_HEADERS)  # fmt: skip
        control = read_control_headers(message, block, self.settings.headers)
        if not control.track_contact:  # no identity kept, not even the envelope's
            control = replace(control, contact_id=None, contact_email=None)
        elif len(envelope.rcpt_tos) == 1:
            control = replace(
                control,
                contact_id=control.contact_id or envelope.rcpt_tos[0],
                contact_email=control.contact_email or envelope.rcpt_tos[0],
            )
        message_id = block.first("message-id")
        prepared = Prepared(
            message=message,
            message_id=clean(field_value(message, message_id, decode=False)) if message_id else "-",
            control=control,
            decision="not_campaign",
        )
        control_spans = field_spans(block, self.control_names)
        rewritten = None
        if control.campaign_id is not None:
            rewritten = await self._decide(prepared, message, block, control_spans)
        if rewritten is None:  # forwarded as it came, but for the control headers
            rewritten = mime.splice(message, [], control_spans)
        prepared.message = rewritten
        return prepared

    async def _decide(
        self,
        prepared: Prepared,
        message: bytes,
        block: HeaderBlock,
        control_spans: list[tuple[int, int]],
    ) -> bytes | None:
        """Decide, rewrite and record a campaign send: the rewritten message, or None to
        forward it untouched (also after any failure)."""
        control = prepared.control
        if control.test_send:
            prepared.decision = "test_send"  # test sends are not recorded at all
            return None
        rewritten = None
        try:
            prepared.decision = self._header_reason(control) or "tracked"
            if prepared.decision == "tracked":
                root = await cpu.run(len(message), mime.parse, message)
                prepared.decision = self._content_reason(message, block, root) or "tracked"
            if prepared.decision == "tracked":
                rewritten = await self._rewrite(prepared, message, block, root, control_spans)
        except StoreError as exc:
            log.error("storage failed, forwarding untouched: %s", exc)
            prepared.decision = "error"
            return None
        except Exception:
            log.exception("rewriting %s failed, forwarding it untouched", prepared.message_id)
            prepared.decision = "error"
        if prepared.send_id is None:
            await self._record(prepared)
        return rewritten

    def _header_reason(self, control: ControlHeaders) -> str | None:
        """Why the control headers say not to rewrite, if they do."""
        if not control.track_clicks:
            return "tracking_off"
        if control.campaign_type not in self.settings.tracking.tracked_campaign_types:
            return "campaign_type"
        return None

    def _content_reason(self, message: bytes, block: HeaderBlock, root: mime.Entity) -> str | None:
        """Why the message itself cannot be rewritten, if it cannot (DKIM-signed mail can when
        clickrelay can sign it anew)."""
        if mime.is_signed_or_encrypted(root):
            return "signed"
        dkim_signed = block.first("dkim-signature") is not None
        if dkim_signed and not self.resigner.resignable(message, block):
            return "dkim"
        return None

    async def _rewrite(
        self,
        prepared: Prepared,
        original: bytes,
        block: HeaderBlock,
        root: mime.Entity,
        control_spans: list[tuple[int, int]],
    ) -> bytes | None:
        unsubscribe = block.first("list-unsubscribe")
        rules = self.rules
        if unsubscribe is not None:
            urls = rewrite.list_unsubscribe_urls(field_value(original, unsubscribe))
            rules = replace(rules, unsubscribe_urls=urls)
        plain_text = self.settings.tracking.track_plain_text
        plan = await cpu.run(len(original), rewrite.plan, original, root, rules, plain_text)
        if plan is None:
            prepared.decision = "no_html"
            return None
        if plan.left_alone:
            log.warning(
                "%s: %d body part(s) left as they are (not decodable exactly)",
                prepared.message_id, plan.left_alone,
            )  # fmt: skip
            if not plan.parts:
                prepared.decision = "error"
                return None
        keys, untracked = plan.tracked_links, plan.untracked
        prepared.tracked, prepared.skipped = len(keys), sum(untracked.values())
        if not keys:
            prepared.decision = "no_links"  # its links not tracked are recorded, with why
        recorded = await self.store.record_send(self._send(prepared, keys, untracked))
        prepared.send_id = recorded.send_id
        if not keys and not prepared.control.track_opens:
            return None
        if keys:
            await self._keep_copy(prepared, plan, recorded, len(original))
        sign, base, ids = self.signer.sign, self.rules.tracking_prefix, recorded.link_ids

        def tracking_url(key: LinkKey, kind: Kind, placement: int | None) -> str:
            return base + sign(recorded.send_id, ids[key], recorded.sent_at, kind, placement)

        pixel = None
        if prepared.control.track_opens:
            opened = sign(recorded.send_id, 0, recorded.sent_at, Kind.OPEN)
            pixel = self.settings.web.public_url.rstrip("/") + "/o/" + opened
        try:
            rewritten = await cpu.run(len(original), plan.apply, tracking_url, control_spans, pixel)
            if block.first("dkim-signature") is not None:
                rewritten = await self._resigned(original, rewritten, control_spans)
            return rewritten
        except Exception:
            log.exception("splicing %s failed, forwarding it untouched", prepared.message_id)
            prepared.decision = "error"
            await self.store.set_send_decision(recorded.send_id, "error")
            return None

    async def _keep_copy(
        self, prepared: Prepared, plan: rewrite.RewritePlan, recorded: RecordedSend, size: int
    ) -> None:
        """Keep the HTML of the campaign's first tracked send (for its click map), once. A
        failure costs the map its copy, never the message its tracking."""
        control = prepared.control
        campaign = control.campaign_id
        html = next((part for part in plan.parts if part.kind is Kind.HTML), None)
        personal = [p for p in (control.contact_id, control.contact_email) if p]
        if (
            not self.settings.reports.keep_html_copy or html is None or campaign in self._copied
            or not personal  # a send without its contact: what to take out is unknown
            or len(html.decoded.text) > clickmap.MAX_COPY
        ):  # fmt: skip
            return
        assert campaign is not None
        try:
            copy = await cpu.run(size, clickmap.copy_of, html, recorded.link_ids, personal)
            await self.store.keep_html_copy(recorded.send_id, copy)
        except StoreError as exc:
            log.warning("storage failed, no HTML copy of campaign %r kept: %s", campaign, exc)
            return
        except Exception:
            log.exception("no HTML copy of campaign %r kept", campaign)
            return
        self._copied.add(campaign)

    async def _resigned(
        self, original: bytes, rewritten: bytes, control_spans: list[tuple[int, int]]
    ) -> bytes:
        """The rewritten message signed anew; as it is if rewriting changed nothing but the
        control headers (its signatures hold as they are)."""
        if rewritten == mime.splice(original, [], control_spans):
            return rewritten
        return await cpu.run(len(rewritten), self.resigner.resign, rewritten)

    async def _record(self, prepared: Prepared) -> None:
        try:
            recorded = await self.store.record_send(self._send(prepared, (), {}))
        except StoreError as exc:
            log.error("storage failed, send of %s not recorded: %s", prepared.message_id, exc)
            return
        prepared.send_id = recorded.send_id

    def _send(self, prepared: Prepared, links, untracked) -> NewSend:
        control = prepared.control
        anonymous = not control.track_contact
        assert control.campaign_id is not None
        return NewSend(
            campaign_key=control.campaign_id,
            campaign_name=control.campaign_name,
            campaign_type=control.campaign_type,
            contact_id=control.contact_id,
            email=control.contact_email,
            message_id=None if prepared.message_id == "-" or anonymous else prepared.message_id,
            decision=prepared.decision,
            tracked_links=links,
            untracked=untracked,
            anonymous=anonymous,
            variant=control.campaign_variant,
        )

    async def forwarded(self, prepared: Prepared, reply: Reply) -> None:
        if prepared.send_id is None:
            return
        outcome = "accepted" if reply.ok else "refused" if reply.code >= 500 else "deferred"
        try:
            await self.store.set_send_outcome(prepared.send_id, outcome)
        except StoreError as exc:
            log.error("storage failed, outcome of send %d not recorded: %s", prepared.send_id, exc)
