"""Which TPM skyguard uses and how it talks to it: tpm2-tools, one command at a time.

The TPM is named by a TCTI string as tpm2-tools take it (`device:/dev/tpmrm0`, or
`swtpm:host=127.0.0.1,port=2321` for the emulator). Where it comes from, first match wins: the
`--tcti` of a command, $SKYGUARD_TPM_TCTI, what `skyguard tpm init` saved in the state dir
(`tpm/tpm.json`), then /dev/tpmrm0 (the kernel's resource manager) or /dev/tpm0 when present.

Transient handles are flushed after every command that may load an object (the emulator without
a resource manager has three object slots: without the flush it runs out after a few commands).
Contexts are kept in files of a private temporary folder, so a flushed object is simply loaded
again by the next command. Commands of skyguard processes sharing one state dir are serialised by
a lock file: an extend and its event-log line, or a quote and the log it embeds, are one step. A
waiter gives up after config.LOCK_WAIT_S (TpmLockBusy naming the lock and its holder): a holder stuck
on a hung TPM must not hang a part unsealing the store key, nor a policy load.

Not here: what is measured or quoted (measure.py, quote.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from skyguard import config, fsutil
from skyguard.errors import BadInput, SkyguardError

DEVICES = ("/dev/tpmrm0", "/dev/tpm0")
# skyguard's PCR. 8-9 are GRUB's, 10 IMA's, 11-12 systemd-stub's, 14 shim's (MokList), 15
# systemd's (machine-id, volume keys, with unified kernel images), 16 and 23 are resettable at
# locality 0 (a root process could rewind them). 13 is extended only by systemd-stub for system
# extension images of a unified kernel image, which skyguard hosts do not boot; `skyguard doctor`
# says so when something else extends it (its value then does not replay from the event log).
DEFAULT_PCR = 13
ALLOWED_PCRS = range(8, 16)
PLATFORM_PCRS = (0, 1, 2, 3, 4, 5, 6, 7)  # firmware, boot loader and Secure Boot state
BANK = "sha256"
AK_HANDLE = 0x81010002  # persistent handle of skyguard's attestation key (owner hierarchy)
EK_HANDLES = (0x81010001,)  # where the RSA EK is commonly persisted (TCG provisioning guidance)
EK_CERT_NV = 0x01C00002  # NV index of the RSA 2048 EK certificate (TCG EK credential profile)
COMMAND_TIMEOUT_S = 30
CONFIG_FILE = "tpm.json"


class TpmError(SkyguardError):
    """A TPM command failed, or the TPM refused (a policy check, a bad locality)."""


class TpmUnavailable(TpmError):
    """No TPM is configured or reachable, or tpm2-tools are missing."""


class TpmLockBusy(TpmError):
    """Another process held the TPM lock for the whole wait: nothing was sent to the TPM, and the
    same step can be tried again (the daemon retries a measurement, skyguard/tpm/hook.py)."""


@dataclass
class TpmConfig:
    """What `skyguard tpm init` saves in <state dir>/tpm/tpm.json (nothing in it is secret)."""

    tcti: str = ""
    pcr: int = DEFAULT_PCR
    ak_handle: int = AK_HANDLE
    ak_public: str = ""  # PEM
    ak_name: str = ""  # hex, the TPM name (hash of the public area) bound to the EK
    ek_public: str = ""  # PEM

    @staticmethod
    def path(state_dir: Path) -> Path:
        return Path(state_dir) / "tpm" / CONFIG_FILE

    @classmethod
    def load(cls, state_dir: Path) -> TpmConfig:
        path = cls.path(state_dir)
        try:
            raw = json.loads(fsutil.read_regular_file(path))  # a FIFO is refused, never waited on
        except FileNotFoundError:
            return cls()
        except OSError as e:
            raise TpmError(f"cannot read {path}: {e.strerror or e}; move it away and run `skyguard tpm init` "
                           f"again") from None
        except ValueError as e:
            raise TpmError(f"cannot read {path}: {e}; run `skyguard tpm init` again") from None
        known = {k: raw[k] for k in asdict(cls()) if k in raw}
        config = cls(**known)
        check_pcr(config.pcr)
        return config

    def save(self, state_dir: Path) -> None:
        path = self.path(state_dir)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fsutil.write_private(path, json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n")


def check_pcr(pcr) -> int:
    if not isinstance(pcr, int) or pcr not in ALLOWED_PCRS:
        raise BadInput(f"skyguard's PCR must be one of 8-15 (never 16 or 23: resettable at locality 0, "
                       f"so root could rewind them), not {pcr!r}")
    return pcr


def find_tcti(state_dir: Path | None, tcti: str | None = None) -> str | None:
    """The TCTI to use, or None when no TPM is configured or present (see the module text)."""
    if tcti:
        return tcti
    if os.environ.get("SKYGUARD_TPM_TCTI"):
        return os.environ["SKYGUARD_TPM_TCTI"]
    if state_dir is not None:
        saved = TpmConfig.load(state_dir).tcti
        if saved:
            return saved
    for device in DEVICES:
        if os.path.exists(device):
            return f"device:{device}"
    return None


_ERROR_LINE = re.compile(r"^ERROR:.*?(?:\) - )?(.*)$")


def tpm_reason(stderr: str) -> str:
    """The TPM's own words from tpm2-tools' stderr (`tpm:session(1):a policy check failed`), without
    the library noise around them."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("ERROR:") and " - " in line:
            return line.split(" - ", 1)[1]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors[0] if errors else (lines[-1] if lines else "no output"))[:300]


class Tpm:
    """One TPM reached through `tcti`. `lock_file` serialises skyguard's processes (None: no lock)."""

    def __init__(self, tcti: str, lock_file: Path | None = None):
        if shutil.which("tpm2_pcrread") is None:
            raise TpmUnavailable("tpm2-tools are not installed (Debian package tpm2-tools)")
        self.tcti = tcti
        self.lock_file = Path(lock_file) if lock_file else None
        self._workdir: tempfile.TemporaryDirectory | None = None

    def __repr__(self) -> str:
        return f"Tpm({self.tcti!r})"

    @classmethod
    def for_state_dir(cls, state_dir: Path, tcti: str | None = None) -> Tpm:
        found = find_tcti(state_dir, tcti)
        if found is None:
            raise TpmUnavailable(f"no TPM: neither {' nor '.join(DEVICES)} exists and none is configured "
                                 f"(give --tcti, set SKYGUARD_TPM_TCTI, or run `skyguard tpm init --tcti T`)")
        return cls(found, Path(state_dir) / "tpm" / "lock")

    # ---- running tpm2-tools ---------------------------------------------------------------

    def run(self, tool: str, *args: str, flush: bool = True, input: bytes | None = None) -> str:
        """Run one tpm2-tools command; its stdout. Raises TpmError naming the TPM's reason."""
        return self.run_bytes(tool, *args, flush=flush, input=input).decode(errors="replace")

    def run_bytes(self, tool: str, *args: str, flush: bool = True, input: bytes | None = None) -> bytes:
        """run() for a command whose stdout is binary (tpm2_unseal): never logged or quoted."""
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        env.pop("TSS2_LOG", None)
        try:
            proc = subprocess.run([tool, *args], capture_output=True, env=env, input=input,
                                  timeout=COMMAND_TIMEOUT_S, cwd=self.workdir)
        except FileNotFoundError:
            raise TpmUnavailable(f"{tool} is not installed (Debian package tpm2-tools)") from None
        except subprocess.TimeoutExpired:
            raise TpmError(f"{tool} did not answer within {COMMAND_TIMEOUT_S} s (TPM at {self.tcti})") from None
        finally:
            if flush:
                self.flush_transient()
        if proc.returncode != 0:
            reason = tpm_reason(proc.stderr.decode(errors="replace"))
            if "tcti" in reason.lower() or "Connection refused" in proc.stderr.decode(errors="replace"):
                raise TpmUnavailable(f"cannot reach the TPM at {self.tcti}: {reason}")
            raise TpmError(f"{tool} failed: {reason}")
        return proc.stdout

    def flush_transient(self) -> None:
        subprocess.run(["tpm2_flushcontext", "-t"], capture_output=True, timeout=COMMAND_TIMEOUT_S,
                       env=dict(os.environ, TPM2TOOLS_TCTI=self.tcti))

    @property
    def workdir(self) -> str:
        """A private folder for context and blob files of this process's commands."""
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="skyguard-tpm-")
        return self._workdir.name

    def file(self, name: str) -> Path:
        return Path(self.workdir) / name

    @contextmanager
    def locked(self, wait_s: float | None = None):
        """One step of several commands, alone among skyguard's processes on this state dir. The
        lock is waited for at most `wait_s` (config.LOCK_WAIT_S by default): a holder stuck on a
        hung TPM must not hang its waiters (a part unsealing the store key, a policy load measuring
        the policy); past that, TpmLockBusy naming the lock file and its holder (nothing was sent
        to the TPM)."""
        if self.lock_file is None:
            yield
            return
        self.lock_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            with fsutil.exclusive_lock(self.lock_file, config.LOCK_WAIT_S if wait_s is None else wait_s):
                yield
        except fsutil.LockTimeout as e:
            raise TpmLockBusy(f"the TPM lock {e}: nothing was sent to the TPM; try again once it is done") from None

    # ---- PCRs -------------------------------------------------------------------------------

    def pcr_read(self, pcrs) -> dict[int, bytes]:
        selection = f"{BANK}:" + ",".join(str(p) for p in sorted(pcrs))
        return parse_pcr_listing(self.run("tpm2_pcrread", selection, flush=False))

    def pcr_extend(self, pcr: int, digest: bytes) -> None:
        if len(digest) != 32:
            raise ValueError("a sha256 extend takes a 32-byte digest")
        self.run("tpm2_pcrextend", f"{pcr}:{BANK}={digest.hex()}", flush=False)

    def pcr_reset(self, pcr: int) -> None:
        self.run("tpm2_pcrreset", str(pcr), flush=False)

    def handle_exists(self, handle: int) -> bool:
        out = self.run("tpm2_getcap", "handles-persistent", flush=False)
        return any(line.strip().lstrip("- ").lower() == f"{handle:#x}" for line in out.splitlines())

    def read_public_pem(self, handle: int) -> tuple[str, str]:
        """(PEM public key, hex TPM name) of a loaded or persistent object."""
        pem, name = self.file("pub.pem"), self.file("pub.name")
        self.run("tpm2_readpublic", "-c", f"{handle:#x}", "-f", "pem", "-o", str(pem), "-n", str(name))
        return pem.read_text(), name.read_bytes().hex()


def parse_pcr_listing(text: str) -> dict[int, bytes]:
    """PCR values from the YAML that tpm2_pcrread and tpm2_quote print (`  13: 0xAB...`). Only the
    sha256 bank is read: skyguard selects no other."""
    values: dict[int, bytes] = {}
    bank = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith(":") and not stripped[:-1].strip().isdigit():
            bank = stripped[:-1].strip()
            continue
        index, sep, value = stripped.partition(":")
        if sep and index.strip().isdigit() and bank == BANK:
            hexvalue = value.strip().lower().removeprefix("0x")
            try:
                values[int(index)] = bytes.fromhex(hexvalue)
            except ValueError:
                raise TpmError(f"unreadable PCR listing line {stripped[:80]!r}") from None
    return values
