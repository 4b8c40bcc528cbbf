"""The limits shared by the relay and the HTTP service, and the password pool, on their own."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from clickrelay import passwords
from clickrelay.config import _networks
from clickrelay.limits import AuthThrottle, ConnectionLimits, client_key, forwarded_client
from clickrelay.web.bots import RepeatCounter


def test_the_total_cap_counts_every_client():
    limits = ConnectionLimits(total=3, per_client=0)
    admitted = [limits.admit(f"192.0.2.{i}") for i in range(5)]
    assert admitted == [True, True, True, False, False]
    assert limits.open == 3
    limits.release("192.0.2.0")
    assert limits.open == 2 and limits.admit("192.0.2.9")


def test_the_per_client_cap_and_its_exemptions():
    limits = ConnectionLimits(10, 2, exempt=_networks(["10.0.0.0/8"]), name="smtp")
    assert [limits.admit("192.0.2.1") for _ in range(3)] == [True, True, False]
    assert limits.admit("192.0.2.2")  # another client
    assert [limits.admit("10.1.2.3") for _ in range(5)] == [True] * 5  # a proxy: exempt
    assert limits.open == 8
    assert [limits.admit("10.1.2.3") for _ in range(3)] == [True, True, False]  # total: 10
    limits.release("192.0.2.1")
    assert limits.admit("192.0.2.1")  # its own count went down with the release
    assert limits.open == 10
    limits.release("10.1.2.3")
    assert limits.admit("192.0.2.1") is False  # room in the total, but 2 from this client
    assert limits.admit("192.0.2.3")


def test_ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4():
    limits = ConnectionLimits(0, 2)
    assert limits.admit("2001:db8:1:2::1") and limits.admit("2001:db8:1:2:ffff::9")
    assert not limits.admit("2001:db8:1:2:abcd::7")
    assert limits.admit("2001:db8:1:3::1")  # the next /64
    assert limits.admit("192.0.2.7") and limits.admit("::ffff:192.0.2.7")
    assert not limits.admit("192.0.2.7")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"


def test_unknown_addresses_count_in_the_total_only_and_release_never_goes_negative():
    limits = ConnectionLimits(2, 1)
    assert limits.admit(None) and limits.admit(None)
    assert not limits.admit(None)
    for _ in range(5):
        limits.release(None)
    assert limits.open == 0
    assert limits.admit("192.0.2.1") and not limits.admit("192.0.2.1")


def test_memory_follows_the_open_connections():
    limits = ConnectionLimits(0, 5)
    for i in range(1000):
        assert limits.admit(f"198.51.{i // 256}.{i % 256}")
    for i in range(1000):
        limits.release(f"198.51.{i // 256}.{i % 256}")
    assert limits.open == 0 and limits._clients == {}


def test_forwarded_client_believes_trusted_proxies_only():
    trusted = _networks(["127.0.0.0/8"])
    assert forwarded_client("127.0.0.1", "203.0.113.9, 198.51.100.7", trusted) == "198.51.100.7"
    assert forwarded_client("192.0.2.1", "203.0.113.9", trusted) == "192.0.2.1"
    assert forwarded_client("127.0.0.1", "", trusted) == "127.0.0.1"
    assert forwarded_client("127.0.0.1", "127.0.0.5", trusted) == "127.0.0.5"


async def test_one_check_per_address_at_a_time():
    throttle = AuthThrottle(free_failures=100)
    running: dict[str, int] = {}
    most: dict[str, int] = {}

    async def attempt(ip: str) -> None:
        await throttle.before(ip)
        running[ip] = running.get(ip, 0) + 1
        most[ip] = max(most.get(ip, 0), running[ip])
        await asyncio.sleep(0.01)  # the check, taking a while
        running[ip] -= 1
        throttle.failed(ip)

    await asyncio.gather(*(attempt(ip) for ip in ["192.0.2.1"] * 5 + ["192.0.2.2"] * 5))
    assert most == {"192.0.2.1": 1, "192.0.2.2": 1}
    both = asyncio.gather(attempt("192.0.2.3"), attempt("192.0.2.4"))
    started = time.perf_counter()
    await both
    assert time.perf_counter() - started < 0.018  # two addresses: at the same time


def test_delays_grow_after_the_free_failures_and_stop_at_the_cap():
    throttle = AuthThrottle(free_failures=2, base_delay=10, max_delay=35)
    seen = []
    for _ in range(6):
        seen.append(round(throttle.delay("192.0.2.1")))
        throttle.failed("192.0.2.1")
    assert seen == [0, 0, 10, 20, 35, 35]
    assert throttle.delay("192.0.2.2") == 0  # per address
    throttle.succeeded("192.0.2.1")
    assert throttle.delay("192.0.2.1") == 0


async def test_the_delay_is_waited_and_decays_after_a_quiet_period():
    throttle = AuthThrottle(free_failures=1, base_delay=0.2, max_delay=1, decay_seconds=0.3)
    throttle.failed("192.0.2.1")
    started = time.perf_counter()
    await throttle.before("192.0.2.1")
    waited = time.perf_counter() - started
    throttle.failed("192.0.2.1")  # two failures now: 0.4 s
    assert 0.15 < waited < 0.4
    assert 0.3 < throttle.delay("192.0.2.1") <= 0.4
    deadline = time.monotonic() + 3
    while throttle.delay("192.0.2.1") > 0:  # halved after 0.3 s quiet: one failure, free
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_a_cancelled_wait_gives_the_turn_back():
    throttle = AuthThrottle(free_failures=0, base_delay=30)
    throttle.failed("192.0.2.1")
    waiting = asyncio.create_task(throttle.before("192.0.2.1"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    throttle.succeeded("192.0.2.1")  # e.g. the right password from elsewhere cleared the count
    await asyncio.wait_for(throttle.before("192.0.2.1"), 1)  # the turn is free again
    throttle.succeeded("192.0.2.1")


async def test_addresses_remembered_are_bounded_but_never_one_in_use():
    throttle = AuthThrottle(free_failures=100, size=100)
    await throttle.before("192.0.2.1")  # in use throughout
    for i in range(1000):
        throttle.failed(f"198.51.{i // 256}.{i % 256}")
    assert len(throttle._clients) <= 101
    assert "192.0.2.1" in throttle._clients
    throttle.succeeded("192.0.2.1")


async def test_an_unknown_user_costs_what_a_known_one_does():
    hashed = passwords.hash_password("right")
    assert await passwords.check("right", hashed)
    assert not await passwords.check("right", None)
    timings = {"known": [], "unknown": []}
    for _ in range(5):
        for kind, value in (("known", hashed), ("unknown", None)):
            started = time.perf_counter()
            assert not await passwords.check("wrong", value)
            timings[kind].append(time.perf_counter() - started)
    known, unknown = (sorted(timings[k])[2] for k in ("known", "unknown"))
    assert 0.5 < unknown / known < 2.0, (known, unknown)


async def test_too_many_waiting_checks_fail_at_once_and_log_once(caplog):
    caplog.set_level(logging.WARNING, logger="clickrelay.passwords")
    hashed = passwords.hash_password("right")
    over = passwords.MAX_WAITING_CHECKS + 30
    results = await asyncio.gather(
        *(passwords.check("right", hashed) for _ in range(over)), return_exceptions=True
    )
    refusals = [r for r in caplog.records if r.name == "clickrelay.passwords"]
    assert results.count(True) == passwords.MAX_WAITING_CHECKS
    assert [type(r) for r in results].count(passwords.Busy) == 30  # "try later", not "wrong"
    assert len(refusals) == 1 and "password check refused" in refusals[0].getMessage()
    assert passwords._checker.waiting == 0


def test_the_dummy_hash_costs_what_new_hashes_cost():
    new = passwords.hash_password("x").split("$")[:4]
    assert passwords.DUMMY_HASH.split("$")[:4] == new
    assert passwords.is_password_hash(passwords.DUMMY_HASH)


def test_repeats_are_counted_in_a_sliding_minute():
    counter = RepeatCounter(limit=3)
    key = (1, 7)
    over = [counter.hit(key, t) for t in (0, 10, 20, 30, 59, 71, 95)]
    # at 71: 20, 30 and 59 came within the minute before; at 95 only 59 and 71 did
    assert over == [False, False, False, True, True, True, False]
    assert counter.hit((2, 7), 95) is False  # per send and link


def test_repeat_memory_is_bounded_and_forgets_quiet_links():
    counter = RepeatCounter(limit=10, size=1000)
    for i in range(5000):
        counter.hit((i, 1), 100.0)
    assert len(counter._hits) == 1000
    counter.hit((99999, 1), 200.0)  # a minute later: every other link is quiet
    assert list(counter._hits) == [(99999, 1)]
    assert RepeatCounter(limit=0).hit((1, 1), 0) is False
