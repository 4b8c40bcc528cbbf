"""PIPELINING (RFC 2920) from the client through the relay to the upstream.

The upstream sits behind a proxy that puts it 10 ms away each way and counts the RCPTs that are
on the wire before their replies come back: more than one means the relay pipelined them.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
from latency import DelayProxy

from support import RawClient, ScriptedUpstream, message, relay_settings, start_relay, wire


@contextlib.asynccontextmanager
async def far_upstream(tmp_path, pipelining: bool = True):
    upstream = ScriptedUpstream(pipelining=pipelining)
    await upstream.start()
    proxy = DelayProxy(upstream.port, delay=0.010)
    await proxy.start()
    settings = relay_settings(tmp_path, proxy.port)
    settings = replace(settings, smtp=replace(settings.smtp, received_header=False))
    try:
        async with start_relay(settings) as relay:
            yield upstream, proxy, relay
    finally:
        await proxy.stop()
        await upstream.stop()


async def replies(client: RawClient, count: int) -> list[str]:
    return [await client.reply() for _ in range(count)]


def recipients(count: int) -> list[str]:
    return [f"r{n}@x.test" for n in range(count)]


def refusing_some(upstream: ScriptedUpstream, rcpts: list[str]) -> list[str]:
    """Script a refusal of its own words for every seventh recipient; the replies expected."""
    expected = []
    for n, rcpt in enumerate(rcpts):
        if n % 7 == 3:
            upstream.script.rcpt[rcpt] = f"550 5.1.1 <{rcpt}>: no such user (number {n})"
            expected.append(upstream.script.rcpt[rcpt])
        else:
            expected.append("250 2.1.5 Recipient ok")
    return expected


@pytest.mark.parametrize("pipelining", [True, False])
async def test_each_rcpt_gets_the_upstreams_own_reply_in_order(tmp_path, pipelining):
    """A client's pipelined group (MAIL, 60 RCPTs, DATA in one write) gets every reply in order,
    each the upstream's own. To an upstream that offers PIPELINING the RCPTs go on together;
    to one that does not, one at a time."""
    rcpts = recipients(60)
    async with far_upstream(tmp_path, pipelining) as (upstream, proxy, relay):
        expected = refusing_some(upstream, rcpts)
        client = await RawClient.connect(relay.port)
        assert "250-PIPELINING" in (await client.cmd("EHLO client.test")).splitlines()
        group = ["MAIL FROM:<s@x.test>", *(f"RCPT TO:<{r}>" for r in rcpts), "DATA"]
        client.writer.write("".join(f"{line}\r\n" for line in group).encode())
        got = await replies(client, len(group))
        final = await client.cmd(wire(message()) + b".")
        await client.close()
    assert got[0].startswith("250")
    assert got[1:-1] == expected
    assert got[-1].startswith("354")
    assert final.startswith("250 2.0.0 Ok: queued as Q1")
    accepted = [r for r, reply in zip(rcpts, expected, strict=True) if reply.startswith("250")]
    assert upstream.received[0].rcpt_tos == accepted
    assert proxy.most_rcpts_in_flight == (len(rcpts) if pipelining else 1)


async def test_local_refusals_and_other_commands_keep_their_place(tmp_path):
    """Replies the relay gives itself (a parameter not offered, an undeclared unicode address)
    come between the upstream's in the order of the commands, and RSET, NOOP and MAIL after a
    pipelined group wait for its replies: RSET empties the envelope they made."""
    async with far_upstream(tmp_path) as (upstream, _, relay):
        client = await RawClient.connect(relay.port)
        await client.cmd("EHLO client.test")
        group = [
            "MAIL FROM:<s@x.test>",
            "RCPT TO:<a@x.test>",
            "RCPT TO:<b@x.test> MT-PRIORITY=3",
            "RCPT TO:<b@x.test>",
            "RCPT TO:<\u00fc@x.test>",
            "RCPT TO:<c@x.test>",
            "RSET",
            "NOOP",
            "MAIL FROM:<t@x.test>",
            "RCPT TO:<d@x.test>",
            "DATA",
        ]
        client.writer.write("".join(f"{line}\r\n" for line in group).encode())
        got = await replies(client, len(group))
        final = await client.cmd(wire(message()) + b".")
        await client.close()
    codes = [reply[:3] for reply in got]
    assert codes == ["250", "250", "555", "250", "553", "250", "250", "250", "250", "250", "354"]
    assert final.startswith("250")
    assert [(r.mail_from, r.rcpt_tos) for r in upstream.received] == [("t@x.test", ["d@x.test"])]


async def test_a_client_gone_with_replies_outstanding_leaves_no_reply_out_of_step(tmp_path):
    """The client hangs up while RCPT replies are on their way: that upstream connection is not
    used again (its replies would answer the next client's commands), and the next transaction
    gets its own replies."""
    async with far_upstream(tmp_path) as (upstream, _, relay):
        client = await RawClient.connect(relay.port)
        await client.cmd("EHLO client.test")
        assert (await client.cmd("MAIL FROM:<gone@x.test>")).startswith("250")
        client.writer.write(b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients(20)))
        await client.writer.drain()
        await client.close()

        rcpts = recipients(5)
        expected = refusing_some(upstream, rcpts)
        client = await RawClient.connect(relay.port)
        got = await client.send("s@x.test", rcpts, message())
        await client.close()
    assert got[2:7] == expected
    assert got[-1].startswith("250")
    assert [(r.mail_from, r.rcpt_tos) for r in upstream.received] == [
        ("s@x.test", [r for r, e in zip(rcpts, expected, strict=True) if e.startswith("250")])
    ]
