"""A software TPM 2.0 (swtpm) on loopback ports: for the tests, and for trying skyguard's TPM
features on a host without a TPM.

    with Swtpm(tmp / "tpm1") as emulator:          # swtpm_setup --create-ek-cert, then swtpm socket
        tpm = Tpm(emulator.tcti)
        emulator.reboot()                           # a power cycle: PCRs back to zero, keys kept

Each emulator has its own state folder and its own local CA (swtpm_localca), so its EK
certificate chains to `ca_certificate` and nothing is written under /var/lib. The process is
started by this object and stopped by its pid only. With `netns` (a network namespace path, e.g.
a lab's host namespace) it listens on that namespace's loopback: where a daemon running there,
and the commands run beside it, find it.
Not here: anything skyguard does with a TPM.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from skyguard.tpm.device import TpmUnavailable

READY_TIMEOUT_S = 10.0


def _free_port_pair() -> int:
    """A port P with P and P+1 free on loopback: the swtpm TCTI talks to the control channel on
    the server port plus one."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise TpmUnavailable("no two consecutive free loopback ports for swtpm")


class Swtpm:
    def __init__(self, directory: Path, netns: str | None = None):
        for tool in ("swtpm", "swtpm_setup"):
            if shutil.which(tool) is None:
                raise TpmUnavailable(f"{tool} is not installed (Debian packages swtpm and swtpm-tools)")
        self.directory = Path(directory)
        self.state = self.directory / "state"
        self.ca = self.directory / "ca"
        self.port = 0
        self.netns = netns
        self.proc: subprocess.Popen | None = None

    def _in_netns(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.netns}", "--", *argv] if self.netns else argv

    def _answers(self) -> bool:
        if not self.netns:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False
        probe = f"import socket; socket.create_connection(('127.0.0.1', {self.port}), timeout=0.5).close()"
        import sys

        return subprocess.run(self._in_netns([sys.executable, "-c", probe]), capture_output=True).returncode == 0

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def ca_certificate(self) -> Path:
        """The local CA's certificate that signed the EK certificate."""
        return self.ca / "issuercert.pem"

    def setup(self) -> None:
        """Manufacture the TPM: EKs persisted (RSA at 0x81010001) with certificates in NV."""
        self.state.mkdir(parents=True, exist_ok=True)
        self.ca.mkdir(parents=True, exist_ok=True)
        localca = self.directory / "swtpm-localca.conf"
        localca.write_text(f"statedir = {self.ca}\nsigningkey = {self.ca}/signkey.pem\n"
                           f"issuercert = {self.ca}/issuercert.pem\ncertserial = {self.ca}/certserial\n")
        setup_conf = self.directory / "swtpm_setup.conf"
        setup_conf.write_text(f"create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {localca}\n"
                              f"create_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n")
        proc = subprocess.run(["swtpm_setup", "--tpm2", "--tpm-state", str(self.state), "--create-ek-cert",
                               "--config", str(setup_conf), "--overwrite"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise TpmUnavailable(f"swtpm_setup failed: {(proc.stderr or proc.stdout).strip()[-400:]}")

    def start(self) -> None:
        if not (self.state / "tpm2-00.permall").exists():
            self.setup()
        if not self.port:  # a restart keeps its ports: a saved TCTI still names this TPM
            self.port = _free_port_pair()
        ctrl = self.port + 1
        self.proc = subprocess.Popen(self._in_netns(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TpmUnavailable(f"swtpm exited: {self.proc.stderr.read().decode(errors='replace')[-300:]}")
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise TpmUnavailable(f"swtpm did not listen on 127.0.0.1:{self.port} within {READY_TIMEOUT_S} s")

    def stop(self) -> None:
        """An orderly power-off: TPM2_Shutdown first (a TPM that loses power without it counts a
        dictionary-attack strike, and after a few enters lockout), then the process."""
        if self.proc is not None:
            if self.proc.poll() is None:
                import os

                subprocess.run(self._in_netns(["tpm2_shutdown"]), capture_output=True, timeout=10,
                               env=dict(os.environ, TPM2TOOLS_TCTI=self.tcti))
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stderr.close()
            self.proc = None

    def reboot(self) -> None:
        """Stop and start again: a power cycle (PCRs reset, persistent keys and NV kept)."""
        self.stop()
        self.start()

    def __enter__(self) -> Swtpm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
