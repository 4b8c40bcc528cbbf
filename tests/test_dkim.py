"""DKIM re-signing: real keys (openssl), real signatures (dkimpy), verified against a DNS stub,
and end to end through the relay with an aiosmtpd upstream."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import dkim as dkimpy
import pytest

from clickrelay.config import ConfigError, DkimSettings
from clickrelay.mail import dkim
from clickrelay.mail.headers import parse_header_block

import pg
from support import ScriptedUpstream, message, relay_settings, send, start_relay

DOMAIN = "shop.example.com"
OTHER = "other.example.org"
HEADERS = [b"from", b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
           b"content-type", b"content-transfer-encoding", b"x-campaign-id"]  # fmt: skip
CAMPAIGN = {"X-Campaign-Id": "spring", "X-Track-Clicks": "yes", "X-Contact-Id": "42"}
HTML = (
    '<p>Hello</p>\r\n<a href="https://shop.example.com/spring">Shop</a>\r\n'
    '<a href="https://shop.example.com/summer">Summer</a>\r\n'
)
TRACK = b"http://click.test/c/"


@dataclass(frozen=True)
class KeyFile:
    path: Path
    dns: bytes  # the TXT record of its selector
    algorithm: bytes

    @property
    def secret(self) -> bytes:
        return dkim.read_key(self.path)[1]


def openssl(*args: str) -> bytes:
    return subprocess.run(["openssl", *args], check=True, capture_output=True).stdout


@pytest.fixture(scope="session")
def rsa(tmp_path_factory) -> KeyFile:
    path = tmp_path_factory.mktemp("dkim") / "rsa.key"
    openssl("genrsa", "-out", str(path), "2048")
    path.chmod(0o600)
    public = openssl("pkey", "-in", str(path), "-pubout", "-outform", "DER")
    return KeyFile(path, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public), dkim.RSA)


@pytest.fixture(scope="session")
def ed25519(tmp_path_factory) -> KeyFile:
    path = tmp_path_factory.mktemp("dkim") / "ed25519.key"
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(path))
    path.chmod(0o600)
    public = openssl("pkey", "-in", str(path), "-pubout", "-outform", "DER")[-32:]
    return KeyFile(path, b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public), dkim.ED25519)


def resolver(**records: KeyFile):
    """A dkimpy dnsfunc answering `{selector}._domainkey.{DOMAIN}` for each selector given."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        for selector, key in records.items():
            if name.rstrip(b".").lower() == f"{selector}._domainkey.{DOMAIN}".encode():
                return key.dns
        return None

    return dnsfunc


def campaign(headers: dict[str, str] | None = None, html: str = HTML) -> bytes:
    fields = {
        **CAMPAIGN,
        "Date": "Thu, 04 Dec 2025 10:00:00 +0000",
        "MIME-Version": "1.0",
        "Content-Type": "text/html; charset=utf-8",
        "Content-Transfer-Encoding": "8bit",
    }
    return message({**fields, **(headers or {})}, html)


def signed(raw: bytes, key: KeyFile, domain: str = DOMAIN, headers=HEADERS, selector=b"old"):
    """`raw` with a DKIM-Signature on top, as the sending system would make it (relaxed/simple,
    dkimpy's default; any header names it is told to sign)."""
    signer = dkimpy.DKIM(raw, signature_algorithm=key.algorithm)
    signer.should_not_sign = set()
    return signer.sign(selector, domain.encode(), key.secret, include_headers=headers) + raw


def tags(raw: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature field, whitespace removed."""
    found = []
    for sig in dkim.signatures(raw, parse_header_block(raw)):
        value = raw[sig.field.start : sig.field.end].split(b":", 1)[1]
        items = (item.partition("=") for item in re.sub(r"\s+", "", value.decode()).split(";"))
        found.append({name: text for name, _, text in items if name})
    return found


def resigner(*keys: KeyFile, adds_trace: bool = False) -> dkim.Resigner:
    entries = [DkimSettings(DOMAIN, f"s{n}", key.path) for n, key in enumerate(keys, 1)]
    return dkim.Resigner(dkim.load_keys(entries), adds_trace)


# ---------------------------------------------------------------- the module


def test_signatures_are_read_with_folding_and_case():
    raw = (
        b"DKIM-Signature: v=1; a=rsa-sha256; D = Shop.Example.COM ;\r\n\th=From :\r\n From:"
        b"Subject; b=abc\r\nDKIM-Signature: v=1; b=x\r\nFrom: a@b\r\n\r\nbody\r\n"
    )
    first, second = dkim.signatures(raw, parse_header_block(raw))
    assert first.domain == ""  # tag names are case-sensitive: D= is not d=
    raw = raw.replace(b"D = ", b"d = ")
    first, second = dkim.signatures(raw, parse_header_block(raw))
    assert (first.domain, first.headers) == (DOMAIN, (b"from", b"from", b"subject"))
    assert (second.domain, second.headers) == ("", ())


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_resigned_message_verifies_with_the_same_h(kind, request):
    key = request.getfixturevalue(kind)
    original = signed(campaign(), key)
    changed = original.replace(b"spring", b"autumn")
    assert not dkimpy.verify(changed, dnsfunc=resolver(old=key))  # the rewrite broke it
    out = resigner(key).resign(changed)
    (new,) = tags(out)
    (old,) = tags(original)
    assert out.startswith(b"DKIM-Signature:")
    assert new["h"] == old["h"] == ":".join(h.decode() for h in HEADERS)
    assert new["c"] == "relaxed/relaxed" and new["d"] == DOMAIN and new["s"] == "s1"
    assert new["a"] == key.algorithm.decode() and "l" not in new
    assert dkimpy.verify(out, dnsfunc=resolver(s1=key))


def test_signatures_of_one_domain_become_one(rsa, ed25519):
    twice = signed(signed(campaign(), ed25519, selector=b"ed"), rsa)
    out = resigner(rsa).resign(twice.replace(b"Hello", b"Hi"))
    assert [sig["s"] for sig in tags(out)] == ["s1"]
    assert dkimpy.verify(out, dnsfunc=resolver(s1=rsa))


def test_resignable_only_when_every_signature_can_be_kept(rsa):
    ours = resigner(rsa, adds_trace=True)

    def judged(raw: bytes) -> bool:
        return ours.resignable(raw, parse_header_block(raw))

    assert judged(signed(campaign(), rsa))
    assert not judged(campaign())  # not signed: nothing to re-sign
    assert not judged(signed(signed(campaign(), rsa, OTHER), rsa))  # OTHER's would break
    assert not judged(signed(campaign(), rsa, headers=[b"from", b"dkim-signature"]))
    raw = b"DKIM-Signature: v=1; d=shop.example.com; h=to:subject; b=x\r\n" + campaign()
    assert not judged(raw)  # no From in h=
    # Received oversigned: the relay's Received line on top would be covered.
    received = b"Received: from a by b; Thu, 04 Dec 2025 10:00:00 +0000\r\n"
    once = [*HEADERS, b"received"]
    assert judged(signed(received + campaign(), rsa, headers=once))
    assert not judged(signed(received + campaign(), rsa, headers=[*once, b"received"]))
    raw = signed(campaign(), rsa, headers=[*once, b"received"])
    assert resigner(rsa).resignable(raw, parse_header_block(raw))  # no Received added


def test_key_formats(tmp_path, rsa, ed25519):
    pkcs1 = tmp_path / "pkcs1.key"
    pkcs1.write_bytes(openssl("pkey", "-in", str(rsa.path), "-traditional"))
    raw = tmp_path / "dkimpy.key"  # dknewkey's Ed25519 file: the key in base64
    raw.write_bytes(ed25519.secret + b"\n")
    for path in (pkcs1, raw):
        path.chmod(0o600)
    for path, key in ((pkcs1, rsa), (raw, ed25519)):
        keys = dkim.load_keys([DkimSettings(DOMAIN, "s1", path)])
        assert keys[DOMAIN].algorithm == key.algorithm and "secret" not in repr(keys)
        out = dkim.Resigner(keys, adds_trace=False).resign(signed(campaign(), key))
        assert dkimpy.verify(out, dnsfunc=resolver(s1=key))


def key_problem(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        dkim.load_keys([DkimSettings(DOMAIN, "s1", path)])
    assert caught.value.key == "dkim[0].private_key"
    return caught.value.problem


def test_bad_keys_are_config_errors(tmp_path, rsa):
    public = tmp_path / "public.pem"
    public.write_bytes(openssl("pkey", "-in", str(rsa.path), "-pubout"))
    garbage = tmp_path / "garbage.key"
    garbage.write_text("hello\n")
    small = tmp_path / "small.key"
    small.write_bytes(openssl("genrsa", "512"))
    loose = tmp_path / "loose.key"
    loose.write_bytes(rsa.path.read_bytes())
    for path in (public, garbage, small):
        path.chmod(0o600)
    loose.chmod(0o644)
    assert key_problem(tmp_path / "missing.key").endswith("missing.key: No such file or directory")
    assert key_problem(tmp_path) == f"cannot read {tmp_path}: Is a directory"
    assert "holds a PUBLIC KEY, not an RSA or Ed25519 private key" in key_problem(public)
    assert "not an RSA or Ed25519 private key" in key_problem(garbage)
    assert "an RSA key of 512 bits" in key_problem(small)
    assert "every user may read or change it (mode 0644)" in key_problem(loose)


# ---------------------------------------------------------------- through the relay


@pytest.fixture
def settings(tmp_path, upstream, rsa):
    settings = relay_settings(tmp_path, upstream.port)  # with the relay's Received line
    return replace(settings, dkim=(DkimSettings(DOMAIN, "s1", rsa.path),))


def without_trace(raw: bytes) -> bytes:
    assert raw.startswith(b"Received: from ")
    block = parse_header_block(raw)
    return raw[block.fields[1].start :]


def control_stripped(raw: bytes) -> bytes:
    return re.sub(rb"(?im)^x-(campaign|contact|track)-[a-z]+:.*\r\n", b"", raw)


def decisions(settings) -> list[str]:
    return [row[0] for row in pg.query(settings.storage, "SELECT decision FROM sends ORDER BY id")]


async def test_signed_campaign_is_tracked_and_resigned(settings, upstream, rsa):
    original = signed(campaign(), rsa)
    async with start_relay(settings) as relay:
        replies = await send(relay.port, original)
    assert replies[-1].startswith("250")
    forwarded = upstream.received[0].content
    assert forwarded.count(TRACK) == 2 and b"X-Campaign-Id" not in forwarded
    (new,) = tags(forwarded)
    assert new["d"] == DOMAIN and new["s"] == "s1" and new["c"] == "relaxed/relaxed"
    assert new["h"] == tags(original)[0]["h"]
    assert without_trace(forwarded).startswith(b"DKIM-Signature:")  # just below the Received
    assert dkimpy.verify(forwarded, dnsfunc=resolver(s1=rsa))
    assert decisions(settings) == ["tracked"]

    # Through a second clickrelay (another click domain, so the links are tracked again): its
    # signature replaces the first one's, and the message still verifies.
    again = b"".join(f"{k}: {v}\r\n".encode() for k, v in CAMPAIGN.items()) + forwarded
    second = replace(settings, web=replace(settings.web, public_url="http://click2.test"))
    async with start_relay(second) as relay:
        await send(relay.port, again)
    twice = upstream.received[1].content
    assert twice.count(b"http://click2.test/c/") == 2 and twice.count(TRACK) == 0
    assert [sig["s"] for sig in tags(twice)] == ["s1"]
    assert tags(twice)[0]["b"] != new["b"]  # clickrelay's own signature, made anew
    assert dkimpy.verify(twice, dnsfunc=resolver(s1=rsa))


async def test_no_link_to_track_keeps_the_original_signature(settings, upstream, rsa):
    original = signed(campaign(html="<p>No links</p>\r\n"), rsa)
    async with start_relay(settings) as relay:
        await send(relay.port, original)
    forwarded = without_trace(upstream.received[0].content)
    assert forwarded == control_stripped(original)
    assert tags(forwarded)[0]["s"] == "old"


@pytest.mark.parametrize("others", [[OTHER], [OTHER, DOMAIN]], ids=["unconfigured", "mixed"])
async def test_other_signed_mail_passes_untouched(settings, upstream, rsa, others):
    original = campaign()
    for domain in others:
        original = signed(original, rsa, domain)
    async with start_relay(settings) as relay:
        await send(relay.port, original)
    assert without_trace(upstream.received[0].content) == control_stripped(original)
    assert decisions(settings) == ["dkim"]


async def test_signing_failure_forwards_untouched_with_error(settings, upstream, rsa, monkeypatch):
    def broken(*args):
        raise dkimpy.DKIMException("injected fault")

    original = signed(campaign(), rsa)
    async with start_relay(settings) as relay:
        monkeypatch.setattr(dkim, "sign", broken)  # (after the keys were tried at start)
        await send(relay.port, original)
    assert without_trace(upstream.received[0].content) == control_stripped(original)
    assert decisions(settings) == ["error"]


async def test_resigned_8bit_mail_is_refused_by_an_upstream_without_8bitmime(tmp_path, rsa):
    upstream = ScriptedUpstream(eightbitmime=False)
    await upstream.start()
    try:
        settings = relay_settings(tmp_path, upstream.port)
        settings = replace(settings, dkim=(DkimSettings(DOMAIN, "s1", rsa.path),))
        async with start_relay(settings) as relay:
            replies = await send(relay.port, signed(campaign(html=HTML + "Grüße\r\n"), rsa))
    finally:
        await upstream.stop()
    assert replies[-1].startswith("554 5.6.3") and upstream.received == []


# ---------------------------------------------------------------- config and CLI


def config_file(tmp_path: Path, dkim_tables: str) -> Path:
    path = tmp_path / "clickrelay.toml"
    path.write_text('[upstream]\nurl = "smtp://127.0.0.1:2526"\n' + dkim_tables)
    return path


def table(key: Path, domain: str = DOMAIN) -> str:
    return f'[[dkim]]\ndomain = "{domain}"\nselector = "s1"\nprivate_key = "{key}"\n'


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clickrelay", "check-config", "--config",
                           str(path)], capture_output=True, text=True, timeout=60)  # fmt: skip


def test_check_config_shows_the_key_path_not_the_key(tmp_path, rsa):
    result = check_config(config_file(tmp_path, table(rsa.path)))
    assert result.returncode == 0, result.stderr
    assert f'private_key = "{rsa.path}"' in result.stdout
    body = rsa.path.read_bytes().decode().splitlines()[1]
    assert "PRIVATE" not in result.stdout + result.stderr and body not in result.stdout


def unreadable_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    garbage.chmod(0o600)
    return {
        "missing": (tmp_path / "nope.key", "No such file or directory"),
        "directory": (tmp_path, "Is a directory"),
        "not a private key": (garbage, "not an RSA or Ed25519 private key"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "not a private key"])
def test_bad_key_file_is_exit_2_naming_the_key(tmp_path, case):
    key, problem = unreadable_cases(tmp_path)[case]
    result = check_config(config_file(tmp_path, table(key)))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("clickrelay: dkim[0].private_key: ") and problem in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode 000 file all the same")
def test_key_file_without_read_permission_is_exit_2(tmp_path, rsa):
    key = tmp_path / "locked.key"
    key.write_bytes(rsa.path.read_bytes())
    key.chmod(0)
    result = check_config(config_file(tmp_path, table(key)))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"clickrelay: dkim[0].private_key: cannot read {key}: Permission denied"
    )


def test_two_keys_for_one_domain_is_exit_2(tmp_path, rsa):
    result = check_config(
        config_file(tmp_path, table(rsa.path) + table(rsa.path, "Shop.Example.com"))
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"clickrelay: dkim[1].domain: {DOMAIN} is configured twice"
