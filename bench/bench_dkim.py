"""DKIM re-signing cost: signing the rewritten 60 KB, 40-link newsletter anew (dkimpy: relaxed
body and header canonicalization, SHA-256, the signature), with an RSA 2048 key and an Ed25519
key made by openssl, in ms per message and against the rewrite of the same message (bench_rewrite's
whole CPU path) in the same process.

    python bench/bench_dkim.py [--seconds 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_rewrite import campaign_message, rewrite_message, timed  # noqa: E402
from newsletter import newsletter  # noqa: E402

from clickrelay.config import DkimSettings  # noqa: E402
from clickrelay.mail import dkim  # noqa: E402
from clickrelay.mail.headers import parse_header_block  # noqa: E402

DOMAIN = "news.example.com"
SIGNED = [b"from", b"from", b"to", b"subject", b"mime-version", b"content-type"]
KEYS = {"rsa-sha256, RSA 2048": ["genrsa", "2048"], "ed25519-sha256": ["genpkey", "-algorithm",
        "ed25519"]}  # fmt: skip


def resigner(folder: Path, command: list[str]) -> dkim.Resigner:
    """A resigner with a new key made by `openssl {command}`."""
    path = folder / f"{len(os.listdir(folder))}.key"
    openssl = ["openssl", command[0], "-out", str(path), *command[1:]]
    subprocess.run(openssl, check=True, capture_output=True)
    path.chmod(0o600)
    return dkim.Resigner(dkim.load_keys([DkimSettings(DOMAIN, "s1", path)]), adds_trace=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    args = parser.parse_args()
    print(f"# {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; one core, best of rounds")  # fmt: skip
    raw = campaign_message(newsletter().encode())
    rewrite = timed(lambda: rewrite_message(raw), args.seconds)
    print(f"rewrite of the {len(raw) / 1024:.1f} KB newsletter: {rewrite * 1e3:.2f} ms/message")
    with tempfile.TemporaryDirectory() as folder:
        for name, command in KEYS.items():
            ours = resigner(Path(folder), command)
            key = ours.keys[DOMAIN]
            message = dkim.sign(raw, key, SIGNED) + raw  # as the sending system signed it
            assert ours.resignable(message, parse_header_block(message))
            rewritten = rewrite_message(message)
            cost = timed(lambda: ours.resign(rewritten), args.seconds)  # noqa: B023
            print(f"re-sign, {name}: {cost * 1e3:.2f} ms/message, "
                  f"{cost / rewrite:.2f}x the rewrite")  # fmt: skip


if __name__ == "__main__":
    main()
