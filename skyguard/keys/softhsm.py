"""A SoftHSM token of its own, in a folder: for tests, benchmarks and hosts without hardware.

    token = SoftHsmToken.create(tmp_dir, label="skyguard", pin=b"...")
    os.environ.update(token.env)      # SOFTHSM2_CONF for every process that opens the token

SoftHSM finds its tokens through the config file SOFTHSM2_CONF names, so one token per folder
never touches the machine's /var/lib/softhsm. The PIN never appears on a command line (see
create()); skyguard itself reads it from the sealed store. Not here: using keys (pkcs11.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from skyguard.keys.types import KeyCustodyError

MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")


def softhsm_module() -> str:
    for path in MODULE_CANDIDATES:
        if os.path.exists(path):
            return path
    raise KeyCustodyError("SoftHSM is not installed (Debian: apt-get install softhsm2); run scripts/setup")


@dataclass(frozen=True)
class SoftHsmToken:
    directory: Path
    label: str
    module: str

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    @classmethod
    def create(cls, directory: Path | str, label: str, pin: bytes, so_pin: bytes | None = None) -> SoftHsmToken:
        directory = Path(directory)
        tokens = directory / "tokens"
        tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = cls(directory, label, softhsm_module())
        if token.conf.exists():  # another token in the same folder (SoftHSM reads them all at start)
            return token._init(pin, so_pin)
        token.conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                              "log.level = ERROR\nslots.removable = false\n")
        return token._init(pin, so_pin)

    def _init(self, pin: bytes, so_pin: bytes | None) -> SoftHsmToken:
        token, label = self, self.label
        util = shutil.which("softhsm2-util")
        if util is None:
            raise KeyCustodyError("softhsm2-util is missing (Debian: apt-get install softhsm2)")
        # softhsm2-util takes PINs only as arguments, which `ps` shows: the token is made with
        # one-time PINs, then the user PIN is changed (C_SetPIN) by a child reading it on stdin.
        first = secrets.token_hex(8)
        out = subprocess.run([util, "--init-token", "--free", "--label", label,
                              "--so-pin", secrets.token_hex(8) if so_pin is None else so_pin.decode(),
                              "--pin", first],
                             env=dict(os.environ, **token.env), capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise KeyCustodyError(f"softhsm2-util could not create token {label!r}: {out.stderr.strip()[:300]}")
        change = subprocess.run([sys.executable, "-c", _SET_PIN, token.module, label],
                                input=first.encode() + b"\n" + pin + b"\n", env=dict(os.environ, **token.env),
                                capture_output=True, timeout=60)
        if change.returncode != 0:
            raise KeyCustodyError(f"could not set the PIN of token {label!r}: {change.stderr.decode()[-300:]}")
        return token


_SET_PIN = """
import sys, pkcs11
old, new = sys.stdin.buffer.read().split(b"\\n")[:2]
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
with token.open(user_pin=old.decode(), rw=True) as session:
    session.set_pin(old.decode(), new.decode())
"""
