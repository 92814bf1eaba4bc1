"""Real VMs for the lab: one QEMU guest per workload, on a tap in the lab's `host` namespace.

The guest is Debian's cloud kernel with a busybox initramfs (skyguard/lab/guest/, built once by
scripts/setup into IMAGE_CACHE). The host side matches the namespace lab's veth exactly: QEMU
creates the tap (named by the workload's `interface`) in the host namespace and runs a per-guest
ifup script that gives it the gateway addresses 169.254.1.1 and fe80::1 and the /32 and /128
routes to the guest, routed, never bridged. The tap is QEMU's own (not persistent): when QEMU
dies, the tap and its routes go with it, as a real hypervisor's would. Inside, the guest's /etc/rc
configures the workload's MAC (QEMU's NIC), addresses, default routes and resolver from the
kernel command line.

Commands reach the guest through a virtio-serial port wired to a unix socket (the agent,
skyguard/lab/guest/agent): `run()` is what `skyguard lab exec` does for a guest, with the
command's exit status, stdout and stderr.

KVM is used when a probe guest boots with it; otherwise software emulation (TCG), and the lab
says which and why. This module never touches the daemon: it builds what the daemon attaches to.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import platform
import secrets
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from skyguard.errors import LabError
from skyguard.lab import addressing as plan
from skyguard.lab import procs

IMAGE_CACHE = Path(os.environ.get("SKYGUARD_GUEST_CACHE", "/var/cache/skyguard/guest"))
BUILD_SCRIPT = Path(__file__).resolve().parent / "guest" / "build-image"
# The KVM probe's answer, kept until reboot (in /run) per image and host kernel: every lab shares it.
ACCEL_CACHE = Path(os.environ.get("SKYGUARD_GUEST_ACCEL_CACHE", "/run/skyguard-guest-accel.json"))
QEMU = "qemu-system-x86_64"
MEMORY_MB = 256
BOOT_TIMEOUT = 120.0  # seconds; a bound against a hung guest on a loaded CI machine, not a goal
KVM_PROBE_TIMEOUT = 6.0  # a KVM guest that works prints its banner in well under a second
AGENT_TIMEOUT = 300.0  # default bound on one command in a guest
PING_WAIT = 0.5  # seconds before the agent handshake pings again
CONSOLE_TAIL = 3000  # characters of console log in a boot error
# Kernel options that shorten a software-emulated boot (no timer check, no crypto self-tests).
KERNEL_ARGS = "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests no_timer_check"


# ---- the image --------------------------------------------------------------------------------

@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    key: str


def find_image(cache: Path = IMAGE_CACHE) -> GuestImage:
    """The image scripts/setup built (cache/current), or LabError saying how to build it."""
    current = cache / "current"
    kernel, initrd = current / "vmlinuz", current / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        raise LabError(f"no guest image in {cache} (run ./scripts/setup, or {BUILD_SCRIPT} alone)")
    return GuestImage(kernel, initrd, current.resolve().name)


# ---- acceleration -----------------------------------------------------------------------------

def choose_accel(image: GuestImage, cached: Path = ACCEL_CACHE) -> tuple[str, str]:
    """("kvm" or "tcg", why). The probe boots the guest kernel under KVM with an init that exits
    at once; a working KVM prints the kernel banner and panics into QEMU's exit in well under a
    second. Here (ENVIRONMENT.md) /dev/kvm opens but the guest hangs after the BIOS, so the probe
    has a timeout. The answer is kept per image and host kernel in `cached`."""
    probe_key = f"{image.key} {platform.release()}"
    try:
        saved = json.loads(cached.read_text())
        if saved.get("key") == probe_key:
            return saved["accel"], saved["why"]
    except (OSError, ValueError, KeyError):
        pass
    accel, why = _probe_kvm(image, cached.parent)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": probe_key, "accel": accel, "why": why}))
    os.replace(tmp, cached)
    return accel, why


def _probe_kvm(image: GuestImage, work: Path) -> tuple[str, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "software emulation: /dev/kvm is not usable"
    if os.path.exists("/sys/module/kvm_pvm"):  # no probe needed: a stock kernel never boots there
        return "tcg", ("software emulation: this host's KVM is PVM (kvm_pvm), which runs only kernels "
                       "built for PVM guests")
    work.mkdir(parents=True, exist_ok=True)
    console = work / f"skyguard-kvm-probe.{os.getpid()}.log"
    console.unlink(missing_ok=True)
    argv = [QEMU, "-machine", "q35,accel=kvm", "-m", "128", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-kernel", str(image.kernel),
            "-initrd", str(image.initrd), "-append", "console=ttyS0 panic=-1 rdinit=/bin/true",
            "-serial", f"file:{console}"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=KVM_PROBE_TIMEOUT)
        banner = console.read_text(errors="replace") if console.exists() else ""
    except subprocess.TimeoutExpired:
        return "tcg", (f"software emulation: a KVM guest printed nothing within "
                       f"{KVM_PROBE_TIMEOUT:.0f}s (it hangs after the BIOS on this host)")
    finally:
        console.unlink(missing_ok=True)
    if "Linux version" in banner:
        return "kvm", "KVM: a probe guest booted"
    return "tcg", f"software emulation: KVM failed ({(proc.stderr.strip() or 'no output')[:200]})"


# ---- one guest --------------------------------------------------------------------------------

@dataclass
class GuestSpec:
    """What a guest is: the workload's identity, plus where its files live on the host."""

    name: str
    interface: str
    mac: str
    addresses: list[str]
    dir: Path
    kernel_args: str = ""  # appended (tests use it to make a guest fail)
    extra: dict = field(default_factory=dict)

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def agent_socket(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def ifup_script(self) -> Path:
        return self.dir / "ifup"


def write_ifup(spec: GuestSpec) -> Path:
    """The host side of the tap, as the namespace lab builds its veth: QEMU runs this with the
    tap's name once it has created it (in the host namespace, where QEMU runs)."""
    lines = ["#!/bin/sh", "# Written by skyguard lab (qemu.py): the host side of one guest's tap.",
             "set -e", 'ip link set "$1" up',
             f'ip addr add {plan.GATEWAY_V4}/32 dev "$1"',
             f'ip addr add {plan.GATEWAY_V6}/64 dev "$1" nodad']
    for addr in spec.addresses:
        bits = 128 if ":" in addr else 32
        lines.append(f'ip route replace {addr}/{bits} dev "$1"')
    spec.ifup_script.write_text("\n".join(lines) + "\n")
    spec.ifup_script.chmod(0o755)
    return spec.ifup_script


def qemu_argv(spec: GuestSpec, image: GuestImage, accel: str) -> list[str]:
    dns = f"{plan.DNS_SERVER_V4},{plan.DNS_SERVER_V6}"
    cmdline = (f"{KERNEL_ARGS} skyguard.name={spec.name} skyguard.addr={','.join(spec.addresses)} "
               f"skyguard.gw4={plan.GATEWAY_V4} skyguard.gw6={plan.GATEWAY_V6} skyguard.dns={dns}")
    if spec.kernel_args:
        cmdline += " " + spec.kernel_args
    return [
        QEMU, "-name", f"skyguard-lab-{spec.name}", "-machine", f"q35,accel={accel}",
        "-m", str(MEMORY_MB), "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot",  # a panicking guest exits instead of looping through the BIOS
        "-kernel", str(spec.extra.get("kernel", image.kernel)),
        "-initrd", str(spec.extra.get("initrd", image.initrd)),
        "-append", cmdline,
        "-serial", f"file:{spec.console_log}",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={spec.agent_socket},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=skyguard.agent",
        "-netdev", f"tap,id=net0,ifname={spec.interface},script={spec.ifup_script},downscript=no",
        # romfile= : no iPXE option ROM (direct kernel boot never uses it; Debian ships it apart).
        "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac},romfile=",
    ]


def start(spec: GuestSpec, image: GuestImage, accel: str, host_netns: Path) -> int:
    """Start QEMU in the host namespace (so the tap is created there); returns its pid. The guest
    boots in the background: wait_booted() says when its agent answers."""
    if len(str(spec.agent_socket)) > 100:
        raise LabError(f"guest folder {spec.dir} is too deep for a unix socket path; "
                       f"use a shorter SKYGUARD_LAB_DIR")
    spec.dir.mkdir(parents=True, exist_ok=True)
    for leftover in (spec.console_log, spec.agent_socket):
        leftover.unlink(missing_ok=True)
    write_ifup(spec)
    with open(spec.dir / "qemu.log", "wb") as log:
        # nsenter execs QEMU, so the pid is QEMU's; its own session outlives `lab up`.
        proc = subprocess.Popen(["nsenter", f"--net={host_netns}", "--"] + qemu_argv(spec, image, accel),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd="/")
    return proc.pid


def wait_booted(spec: GuestSpec, pid: int, timeout: float = BOOT_TIMEOUT) -> float:
    """Seconds until the guest's agent answered. A guest whose QEMU exits or that does not answer
    within `timeout` is stopped, and LabError carries its console log."""
    began = time.monotonic()
    agent = Agent(spec.agent_socket)
    while True:
        if not procs.alive(pid):
            raise LabError(f"guest {spec.name} did not boot: QEMU exited"
                           f"{_qemu_error(spec)}\n{console_tail(spec)}")
        if time.monotonic() - began > timeout:
            procs.stop([pid])
            raise LabError(f"guest {spec.name} did not boot within {timeout:.0f}s and was "
                           f"stopped\n{console_tail(spec)}")
        if spec.agent_socket.exists():
            try:
                if agent.run("echo ready", timeout=2.0).stdout == b"ready\n":
                    return time.monotonic() - began
            except (LabError, OSError, subprocess.TimeoutExpired):
                pass
        time.sleep(0.2)


def console_tail(spec: GuestSpec) -> str:
    try:
        text = spec.console_log.read_text(errors="replace")
    except OSError:
        text = ""
    return f"console log {spec.console_log}:\n{text[-CONSOLE_TAIL:] or '(empty)'}"


def _qemu_error(spec: GuestSpec) -> str:
    try:
        text = (spec.dir / "qemu.log").read_text(errors="replace").strip()
    except OSError:
        return ""
    return f" ({text.splitlines()[-1][:300]})" if text else ""


# ---- processes --------------------------------------------------------------------------------

def is_lab_qemu(pid: int, lab_dir: Path) -> bool:
    """QEMU running a guest of the lab in lab_dir (found by its command line)."""
    cmd = procs.cmdline(pid)
    return bool(cmd) and cmd[0].endswith(QEMU) and any(str(lab_dir) + "/" in a for a in cmd)


def lab_qemus(lab_dir: Path) -> list[int]:
    """Every QEMU of this lab, whatever its state file says (a killed `lab up` may have lost it)."""
    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and is_lab_qemu(int(e.name), lab_dir) and procs.alive(int(e.name))]


# ---- the command channel ----------------------------------------------------------------------

class Agent:
    """Client of one guest's agent. One client at a time per guest (a lock file beside the
    socket); requests carry a random id so an answer left over from an abandoned request is
    never taken for another's."""

    def __init__(self, sock_path: Path):
        self.sock_path = Path(sock_path)

    def run(self, command: str | list[str], input: bytes | str | None = None,
            timeout: float | None = AGENT_TIMEOUT) -> subprocess.CompletedProcess:
        """Run `command` (a shell line, or an argv that is quoted for sh) in the guest."""
        line = command if isinstance(command, str) else shlex.join(command)
        if isinstance(input, str):
            input = input.encode()
        rid = secrets.token_hex(8)
        request = f"{rid} {_b64(line.encode())} {_b64(input or b'')}\n".encode()
        deadline = None if timeout is None else time.monotonic() + timeout
        with open(self.sock_path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    sock.settimeout(_left(deadline))
                    sock.connect(str(self.sock_path))
                    self._handshake(sock, deadline)
                    sock.sendall(request)
                    return self._answer(sock, rid, command, deadline)
                except TimeoutError:
                    raise subprocess.TimeoutExpired(command, timeout) from None
                except OSError as exc:
                    raise LabError(f"the guest agent at {self.sock_path} is not reachable: {exc}") from None

    def _handshake(self, sock: socket.socket, deadline: float | None) -> None:
        """Ping until the guest answers, so a request is sent only once the path is known to work
        both ways (a request is never sent twice: a command may not be idempotent)."""
        while True:
            ping = secrets.token_hex(8)
            sock.sendall(f"{ping}\n".encode())
            try:
                self._answer(sock, ping, "ping", min(time.monotonic() + PING_WAIT, deadline or 1e18))
                return
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    @staticmethod
    def _answer(sock: socket.socket, rid: str, command, deadline) -> subprocess.CompletedProcess:
        buf = b""
        while True:
            sock.settimeout(_left(deadline))
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise LabError("the guest closed its agent channel (did it stop?)")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                fields = raw.strip().split(b" ")
                # Exactly: id, status, bOUT, bERR. Anything else is line noise or an echo.
                if (len(fields) == 4 and fields[0].decode(errors="replace") == rid
                        and fields[1].isdigit() and fields[2][:1] == b"b" and fields[3][:1] == b"b"):
                    return subprocess.CompletedProcess(command, int(fields[1]),
                                                       base64.b64decode(fields[2][1:]),
                                                       base64.b64decode(fields[3][1:]))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _left(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError()
    return left
