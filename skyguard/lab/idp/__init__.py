"""The lab's OpenID provider as a process: node-oidc-provider (idp.mjs beside this file, its
packages installed by scripts/setup into /var/cache/skyguard/idp) run in the lab's `internet`
namespace on idp.test's address, TLS with a lab-CA certificate, clients and users from a fixture.

Started by the tests of the identity-aware proxy (and by hand, in the running lab:
`python -m skyguard.lab.idp [--fixture FILE]`); not by `lab up`, which stays as fast as it was for everything else. Not here:
the provider itself (the npm package) or the proxy (skyguard/apps).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from skyguard.errors import LabError
from skyguard.lab.addressing import addresses_for_name
from skyguard.lab.ca import LabCA

HOST_NAME = "idp.test"
PORT = 9443  # the sealed internet's echo server has 443 on every address
ISSUER = f"https://{HOST_NAME}:{PORT}"
MODULES = Path("/var/cache/skyguard/idp")  # where scripts/setup ran `npm ci`
PROGRAM = Path(__file__).with_name("idp.mjs")
DEFAULT_FIXTURE = Path(__file__).with_name("fixture.json")
READY_TIMEOUT = 30.0  # seconds for node to load the provider and bind


class LabIdp:
    """One provider for one lab. `fixture` is a JSON file ({"clients": [...], "users": [...]});
    the provider reads its users again on every lookup, so a test may rewrite them (write_users)."""

    def __init__(self, lab, fixture: Path | None = None, work_dir: Path | None = None):
        self.lab = lab
        self.work_dir = Path(work_dir or lab.lab_dir / "idp")
        self.fixture = Path(fixture or DEFAULT_FIXTURE)
        self.proc: subprocess.Popen | None = None
        # idp.test's A and AAAA. The provider listens on port PORT of every address of the internet
        # namespace (IPv6 cannot bind one address of a local route there), dual stack.
        self.addresses = [str(a) for a in addresses_for_name(HOST_NAME)]
        self.ready_file = self.work_dir / "idp.ready"
        self.log_path = self.work_dir / "idp.log"

    def start(self) -> LabIdp:
        if shutil.which("node") is None or not (MODULES / "node_modules" / "oidc-provider").is_dir():
            raise LabError(f"the lab's OpenID provider is not installed (node and {MODULES}); run scripts/setup")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        chain, key = LabCA(self.lab.lab_dir / "ca").leaf_files(HOST_NAME)
        self.ready_file.unlink(missing_ok=True)
        argv = ["node", str(PROGRAM), "--modules", str(MODULES), "--fixture", str(self.fixture),
                "--issuer", ISSUER, "--cert", str(chain), "--key", str(key), "--listen", "::",
                "--port", str(PORT), "--ready", str(self.ready_file)]
        with open(self.log_path, "ab") as log:
            self.proc = self.lab.popen("internet", argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise LabError(f"the lab's OpenID provider exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(f"the lab's OpenID provider did not start in {READY_TIMEOUT:.0f}s: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def write_users(self, users: list[dict]) -> None:
        """Replace the fixture's users (atomically): the next lookup sees them."""
        data = json.loads(self.fixture.read_text())
        data["users"] = users
        tmp = self.fixture.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.fixture)


def main(argv=None) -> int:
    import argparse
    import signal
    import threading

    from skyguard.lab import Lab

    parser = argparse.ArgumentParser(description="Run the lab's OpenID provider until interrupted.")
    parser.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE)
    args = parser.parse_args(argv)
    idp = LabIdp(Lab(), fixture=args.fixture).start()
    print(f"{ISSUER} at {' and '.join(idp.addresses)}, users from {args.fixture}; Ctrl-C stops it", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5) and idp.running():
            pass
    except KeyboardInterrupt:
        pass
    idp.stop()
    return 0

