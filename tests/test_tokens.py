"""Tracking tokens: fixed length, URL-safe, forgery-proof."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickrelay.tracking.tokens import (
    MAX_LINK_ID,
    MAX_PLACEMENT,
    MAX_SEND_ID,
    SENT_WRAP,
    TOKEN_LENGTH,
    Kind,
    Signer,
    load_secret,
)

SIGNER = Signer(b"k" * 32, "instance-a")


@given(st.integers(1, MAX_SEND_ID), st.integers(1, MAX_LINK_ID), st.floats(0, 4e9))
def test_roundtrip_has_fixed_length_and_url_safe_alphabet(send_id, link_id, sent_at):
    token = SIGNER.sign(send_id, link_id, sent_at)
    assert len(token) == TOKEN_LENGTH
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    data = SIGNER.verify(token)
    assert (data.send_id, data.link_id) == (send_id, link_id)
    assert data.seconds_since_send(sent_at + 7) == 7


def test_send_time_wraps_harmlessly():
    data = SIGNER.verify(SIGNER.sign(1, 1, SENT_WRAP - 2))
    assert data.seconds_since_send(SENT_WRAP + 3) == 5


@given(st.integers(0, TOKEN_LENGTH - 1), st.sampled_from("AbZ09_-"))
def test_any_changed_character_is_refused(position, replacement):
    token = SIGNER.sign(12345, 678, 1e9)
    forged = token[:position] + replacement + token[position + 1 :]
    if forged != token:
        assert SIGNER.verify(forged) is None


@pytest.mark.parametrize(
    "token",
    ["", "short", "x" * 31, "x" * 33, "A" * 10_000, "é" * 32, "\x00" * 32, "../../etc/passwd",
     "A" * 31 + "=", "%41" * 11 + "A"],
)  # fmt: skip
def test_garbage_is_refused_without_raising(token):
    assert SIGNER.verify(token) is None


def test_other_secret_or_database_instance_is_refused():
    token = SIGNER.sign(1, 2, 1e9)
    assert Signer(b"other" * 8, "instance-a").verify(token) is None
    assert Signer(b"k" * 32, "instance-b").verify(token) is None


def test_ids_out_of_range_cannot_be_signed():
    with pytest.raises(ValueError):
        SIGNER.sign(0, 1, 0)
    with pytest.raises(ValueError):
        SIGNER.sign(1, MAX_LINK_ID + 1, 0)
    with pytest.raises(ValueError):
        SIGNER.sign(MAX_SEND_ID + 1, 1, 0)


def test_secret_file_is_created_once_with_mode_0600(tmp_path):
    path = tmp_path / "state" / "secret"
    first = load_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(first) == 64
    assert load_secret(path) == first


def test_too_short_secret_file_is_refused(tmp_path):
    path = tmp_path / "secret"
    path.write_text("short\n")
    with pytest.raises(ValueError, match="fewer than 16 bytes"):
        load_secret(path)


def test_processes_creating_the_secret_at_once_agree_on_one(tmp_path):
    """Nodes on one host started together, with no secret file yet: one secret for all (the
    losers read the winner's whole file, never a half-written one)."""
    import subprocess
    import sys

    path = tmp_path / "secret"
    script = (
        "import sys; from pathlib import Path; from clickrelay.tracking.tokens import load_secret;"
        "sys.stdin.read(); print(load_secret(Path(sys.argv[1])).decode())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]  # fmt: skip
    for proc in procs:  # all imported and waiting: release them together
        proc.stdin.close()
    secrets = {proc.stdout.read().strip() for proc in procs}
    for proc in procs:
        proc.wait(timeout=60)
    assert all(proc.returncode == 0 for proc in procs)
    assert secrets == {path.read_text().strip()} and len(path.read_text().strip()) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no drafts left behind


@given(st.integers(1, MAX_SEND_ID), st.integers(1, MAX_LINK_ID), st.integers(0, 1000))
def test_an_html_click_token_carries_its_placement(send_id, link_id, placement):
    token = SIGNER.sign(send_id, link_id, 1_700_000_000, Kind.HTML, placement)
    assert len(token) == TOKEN_LENGTH and re.fullmatch(r"[A-Za-z0-9_-]+", token)
    data = SIGNER.verify(token)
    assert data is not None
    assert (data.send_id, data.link_id, data.kind) == (send_id, link_id, Kind.HTML)
    assert data.placement == min(placement, MAX_PLACEMENT)
    assert data.seconds_since_send(1_700_000_005) == 5


def test_tokens_without_a_placement_read_as_before():
    # made as every token was before placements: the layout and MAC of 12 bytes are unchanged
    for kind in Kind:
        data = SIGNER.verify(SIGNER.sign(7, 0 if kind is Kind.OPEN else 9, 100, kind))
        assert data is not None and data.kind is kind and data.placement is None


def test_a_placed_token_with_any_byte_changed_is_refused():
    raw = bytearray(base64.urlsafe_b64decode(SIGNER.sign(7, 9, 100, Kind.HTML, 3)))
    for position in range(len(raw)):
        forged = raw.copy()
        forged[position] ^= 0x01
        assert SIGNER.verify(base64.urlsafe_b64encode(bytes(forged)).decode()) is None, position


def test_only_html_clicks_have_a_placement():
    for kind in (Kind.TEXT, Kind.OPEN):
        with pytest.raises(ValueError):
            SIGNER.sign(7, 9, 100, kind, 0)
    with pytest.raises(ValueError):
        SIGNER.sign(7, 9, 100, Kind.HTML, -1)
