"""Checks, one by one, that this machine can run skyguard, and says how to fix what is missing.

Each check is its own function returning a Check(name, ok, detail, fix; skyguard/checks.py): the privileges
(root or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN), the bpf() syscall, bpffs at /sys/fs/bpf,
Debian's bcc, kernel headers (proven by really compiling a tiny XDP program), libbpf.so.1 (for
BPF_PROG_RUN), network namespaces, XDP (generic and native) and TC attach on a throwaway veth
pair inside a throwaway namespace, nftables, and the TPM (when one is configured or present:
that it answers, that skyguard's PCR replays from its event log, the attestation key, whether the
store key is sealed and opens), and PKCS#11 key custody (skyguard/keys/doctor.py).
`require_privileges(what)` is the helper other commands call before they touch the kernel, so
they fail with the fix instead of a traceback.

This is not a monitor of a running skyguard (that is `skyguard status`), and it changes nothing
on the machine except the throwaway namespace it creates and always removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from skyguard import config
from skyguard.checks import Check  # the result of every check (its own module: parts' checks return it too)
from skyguard.errors import PrivilegeError, SkyguardError
from skyguard.keys.doctor import check_key_custody

# Capability bit numbers from <linux/capability.h>.
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39
NEEDED_CAPABILITIES = {"CAP_BPF": CAP_BPF, "CAP_NET_ADMIN": CAP_NET_ADMIN,
                       "CAP_SYS_ADMIN": CAP_SYS_ADMIN}

BPF_FS_MAGIC = 0xCAFE4A11  # statfs(2) f_type of a bpffs mount
BPFFS_PATH = Path("/sys/fs/bpf")
SYS_BPF_X86_64 = 321
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2
CLONE_NEWNET = 0x40000000
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2

SETUP_HINT = "run the project's setup as root: ./scripts/setup"

# The smallest programs that prove the toolchain: C through bcc's clang, verified and loaded.
DOCTOR_BPF_TEXT = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
int sg_doctor_xdp(struct xdp_md *ctx) { return XDP_PASS; }
int sg_doctor_tc(struct __sk_buff *skb) { return TC_ACT_OK; }
"""


# ---------------------------------------------------------------- privileges

def parse_capabilities(proc_status_text: str, field: str = "CapEff") -> int:
    """The capability bitmask of `field` (CapEff by default) in a /proc/<pid>/status text."""
    for line in proc_status_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            try:
                return int(value.strip(), 16)
            except ValueError:
                break
    raise ValueError(f"no valid {field} line in the process status text")


def missing_capabilities(capability_mask: int) -> list[str]:
    """Names of the capabilities skyguard needs that the mask lacks, in a stable order."""
    return [name for name, bit in NEEDED_CAPABILITIES.items() if not capability_mask >> bit & 1]


def _own_missing_capabilities() -> list[str]:
    try:
        status = Path("/proc/self/status").read_text()
        return missing_capabilities(parse_capabilities(status))
    except (OSError, ValueError):
        return list(NEEDED_CAPABILITIES)


def require_privileges(what: str) -> None:
    """Raise PrivilegeError, naming `what` and the fix, unless this process may use BPF and netlink.

    Root passes only when its effective capabilities hold what is needed too (a root inside a
    restricted container may lack CAP_BPF).
    """
    missing = _own_missing_capabilities()
    if not missing:
        return
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    raise PrivilegeError(
        f"{what} needs root with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN; this process runs as "
        f"{who} without {', '.join(missing)}. Fix: run it as root (sudo), or grant those "
        f"capabilities; `skyguard doctor` checks every prerequisite.")


def check_privileges() -> Check:
    name = "privileges"
    missing = _own_missing_capabilities()
    if not missing:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} with capabilities"
        return Check(name, True, f"{who}: CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN effective")
    return Check(name, False,
                 f"uid {os.geteuid()} lacks {', '.join(missing)} (effective set in /proc/self/status)",
                 "run skyguard as root: sudo skyguard ... (or grant CAP_BPF, CAP_NET_ADMIN and "
                 "CAP_SYS_ADMIN)")


# ---------------------------------------------------------------- kernel interfaces

_libc = ctypes.CDLL(None, use_errno=True)


class _BpfMapCreateAttr(ctypes.Structure):
    # Leading fields of union bpf_attr for BPF_MAP_CREATE; the kernel zero-fills the rest.
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32)]


def check_bpf_syscall() -> Check:
    name = "bpf syscall"
    if platform.machine() != "x86_64":
        return Check(name, False, f"this check knows the bpf syscall number only on x86_64, "
                     f"not {platform.machine()}", "run skyguard on x86_64 (Debian 12 amd64)")
    attr = _BpfMapCreateAttr(BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0)
    fd = _libc.syscall(SYS_BPF_X86_64, BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return Check(name, True, "created and closed a 1-entry BPF array map")
    err = ctypes.get_errno()
    if err in (errno.EPERM, errno.EACCES):
        fix = ("run as root (sudo); if already root, the container's seccomp or capability "
               "profile blocks bpf(): allow it (e.g. docker --privileged)")
    elif err == errno.ENOSYS:
        fix = "boot a kernel built with CONFIG_BPF_SYSCALL=y (Debian 12's kernel has it)"
    else:
        fix = "check dmesg for why the kernel refused a BPF map"
    return Check(name, False, f"bpf(BPF_MAP_CREATE) failed: {os.strerror(err)} (errno {err})", fix)


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type first; the rest is only room for the kernel to write.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def filesystem_magic(path: Path) -> int:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(str(path)), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return buf.f_type & 0xFFFFFFFF


def check_bpffs(path: Path = BPFFS_PATH) -> Check:
    name = "bpffs"
    fix = f"mount -t bpf bpf {path}"
    try:
        magic = filesystem_magic(path)
    except OSError as e:
        return Check(name, False, f"bpffs is not mounted at {path} ({e.strerror})",
                     f"mkdir -p {path} && {fix}")
    if magic != BPF_FS_MAGIC:
        return Check(name, False, f"bpffs is not mounted at {path} (filesystem magic {magic:#x}, "
                     f"bpffs is {BPF_FS_MAGIC:#x}); pinned maps cannot survive a daemon restart",
                     fix)
    return Check(name, True, f"bpffs mounted at {path}")


# ---------------------------------------------------------------- toolchain

def check_bcc() -> Check:
    name = "bcc"
    fix = ("apt-get install python3-bpfcc libbpfcc, then " + SETUP_HINT +
           " (it exposes Debian's bcc to the venv); never `pip install bcc`, an unrelated package")
    try:
        bcc = importlib.import_module("bcc")
    except Exception as e:  # any failure to import is the finding; doctor must not crash on it
        return Check(name, False, f"import bcc failed: {type(e).__name__}: {e}", fix)
    location = getattr(bcc, "__file__", None) or "?"
    if not hasattr(bcc, "BPF"):
        return Check(name, False, f"`bcc` at {location} is not the BPF Compiler Collection (no "
                     "bcc.BPF): probably PyPI's unrelated 'bcc'", "pip uninstall -y bcc; " + fix)
    version = getattr(bcc, "__version__", "unknown version")
    return Check(name, True, f"Debian's bcc {version} from {location}")


def _kernel_headers_note() -> str:
    """Say which headers bcc will use, and whether they are scripts/setup's 6.1 fallback."""
    kver = platform.release()
    build = Path("/lib/modules") / kver / "build"
    if not build.exists():
        return (f"no headers at {build} for the running kernel {kver}; where Debian packages "
                "none for it, scripts/setup links Debian's 6.1 linux-headers-amd64 there (enough "
                "for the stable UAPI that skyguard's programs use), and that link is missing")
    target = build.resolve()
    if kver not in str(target):
        return (f"no headers packaged for kernel {kver}; using {target} through the link that "
                "scripts/setup makes (Debian's linux-headers-amd64: fine for the stable UAPI "
                "that skyguard's programs use)")
    return f"headers of the running kernel at {target}"


@contextlib.contextmanager
def _captured_c_output():
    """Capture what C code (bcc and its clang) writes to fds 1 and 2: a failure can then quote
    it, and it never corrupts doctor's own output (--json on stdout)."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        captured: list[str] = []
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            yield captured
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


HEADERS_FIX = ("apt-get install linux-headers-amd64 and link them for the running kernel: "
               "ln -sfn \"$(ls -d /lib/modules/6.1.*-amd64 | sort -V | tail -n1)\" "
               "/lib/modules/$(uname -r)  (or simply " + SETUP_HINT + ", which does exactly this "
               "when Debian has no headers for the running kernel)")


def compile_doctor_programs():
    """Compile and load the doctor's XDP and TC programs. Returns (bpf, xdp_fn, tc_fn)."""
    from bcc import BPF
    bpf = BPF(text=DOCTOR_BPF_TEXT)
    return bpf, bpf.load_func("sg_doctor_xdp", BPF.XDP), bpf.load_func("sg_doctor_tc", BPF.SCHED_CLS)


def check_kernel_headers(state: dict) -> Check:
    name = "kernel headers"
    note = _kernel_headers_note()
    if not state.get("privileged"):
        return Check(name, False, f"not tried: loading a program needs privileges ({note})",
                     "fix the privileges check above")
    if not state.get("bcc"):
        return Check(name, False, f"not tried: bcc is not usable ({note})",
                     "fix the bcc check above")
    with _captured_c_output() as clang_output:
        try:
            state["programs"] = compile_doctor_programs()
            failure = None
        except Exception as e:  # bcc raises bare Exception on compile/load failure
            failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if failure is None:
        return Check(name, True, f"bcc compiled and loaded a tiny XDP and TC program; {note}")
    tail = " | ".join(line for line in clang_output[0].strip().splitlines()[-3:])
    return Check(name, False, f"bcc could not compile a tiny XDP program ({failure}); {note}"
                 + (f"; clang said: {tail}" if tail else ""), HEADERS_FIX)


def check_libbpf() -> Check:
    name = "libbpf"
    try:
        lib = ctypes.CDLL("libbpf.so.1")
    except OSError as e:
        return Check(name, False, f"libbpf.so.1 not loadable ({e}); tests cannot run programs on "
                     "packets (BPF_PROG_RUN)", "apt-get install libbpf1")
    if not hasattr(lib, "bpf_prog_test_run_opts"):
        return Check(name, False, "libbpf.so.1 has no bpf_prog_test_run_opts (too old)",
                     "apt-get install libbpf1 (Debian 12 ships 1.1)")
    return Check(name, True, "libbpf.so.1 with bpf_prog_test_run_opts (BPF_PROG_RUN)")


# ---------------------------------------------------------------- namespaces and attach points

def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _first_error_line(result: subprocess.CompletedProcess) -> str:
    text = (result.stderr or result.stdout or "").strip()
    return text.splitlines()[0] if text else f"exit status {result.returncode}"


class ThrowawayNamespace:
    """A network namespace with one veth pair (sgd0 <-> sgd1, both up), removed on exit.

    Named config.DOCTOR_NETNS_PREFIX + pid, so parallel doctors never collide and a leftover from
    a killed run names the process that made it.
    """

    VETH = ("sgd0", "sgd1")

    def __init__(self):
        self.name = f"{config.DOCTOR_NETNS_PREFIX}{os.getpid()}"
        self.created = False

    def create(self) -> None:
        _remove_stale_doctor_namespaces()
        result = _run("ip", "netns", "add", self.name)
        if result.returncode != 0:
            raise OSError(f"ip netns add {self.name}: {_first_error_line(result)}")
        self.created = True
        a, b = self.VETH
        for argv in (("link", "add", a, "type", "veth", "peer", "name", b),
                     ("link", "set", a, "up"), ("link", "set", b, "up")):
            result = _run("ip", "-n", self.name, *argv)
            if result.returncode != 0:
                raise OSError(f"ip -n {self.name} {' '.join(argv)}: {_first_error_line(result)}")

    def remove(self) -> None:
        if self.created:
            _run("ip", "netns", "del", self.name)
            self.created = False

    @contextlib.contextmanager
    def entered(self):
        """Move this thread into the namespace (netlink sockets opened inside talk to it)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {self.name}: {os.strerror(err)}")
            try:
                yield
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    # Staying in the throwaway namespace would make every later step lie.
                    raise RuntimeError("could not return to the original network namespace")
        finally:
            os.close(target)
            os.close(home)

    def link(self, ifname: str) -> dict:
        result = _run("ip", "-n", self.name, "-j", "-d", "link", "show", "dev", ifname)
        if result.returncode != 0:
            raise OSError(_first_error_line(result))
        return json.loads(result.stdout)[0]


def _remove_stale_doctor_namespaces() -> None:
    """Remove namespaces left by doctors that were killed (their pid no longer exists)."""
    netns_dir = Path("/run/netns")
    if not netns_dir.is_dir():
        return
    for entry in netns_dir.iterdir():
        suffix = entry.name.removeprefix(config.DOCTOR_NETNS_PREFIX)
        if suffix != entry.name and suffix.isdigit() and not Path(f"/proc/{suffix}").exists():
            _run("ip", "netns", "del", entry.name)


def check_network_namespaces(state: dict) -> Check:
    name = "network namespaces"
    if shutil.which("ip") is None:
        return Check(name, False, "the `ip` command (iproute2) is missing", "apt-get install iproute2")
    netns = ThrowawayNamespace()
    try:
        netns.create()
    except (OSError, subprocess.SubprocessError) as e:
        netns.remove()
        return Check(name, False, f"could not create a namespace with a veth pair: {e}",
                     "run as root on a kernel with CONFIG_NET_NS and CONFIG_VETH (Debian's has both)")
    state["netns"] = netns
    return Check(name, True, f"created namespace {netns.name} with veth pair "
                 f"{netns.VETH[0]}<->{netns.VETH[1]}")


def _attach_prerequisites(state: dict) -> str | None:
    if "programs" not in state:
        return "no program to attach (the kernel headers check failed)"
    if "netns" not in state:
        return "no throwaway namespace (the network namespaces check failed)"
    return None


def check_xdp_attach(state: dict, mode: str) -> Check:
    """Attach the doctor's XDP program in `mode` ("generic" or "native") and confirm the kernel
    reports it on the interface, then detach."""
    name = f"XDP {mode}"
    blocked = _attach_prerequisites(state)
    if blocked:
        return Check(name, False, f"not tried: {blocked}", "fix that check first")
    from bcc import BPF

    from skyguard.datapath.hooks import XDP_ATTACHED_MODE_NAMES  # `ip -j` reports the same numbers
    netns: ThrowawayNamespace = state["netns"]
    _, xdp_fn, _ = state["programs"]
    ifname = netns.VETH[0] if mode == "generic" else netns.VETH[1]
    flags = XDP_FLAGS_SKB_MODE if mode == "generic" else XDP_FLAGS_DRV_MODE
    try:
        with netns.entered():
            BPF.attach_xdp(ifname, xdp_fn, flags)
        xdp = netns.link(ifname).get("xdp", {})
        reported = XDP_ATTACHED_MODE_NAMES.get(xdp.get("mode"), "none")
        with netns.entered():
            BPF.remove_xdp(ifname, flags)
    except Exception as e:  # bcc raises bare Exception when the kernel refuses an attach
        return Check(name, False, f"attaching XDP ({mode}) to veth {ifname} failed: {e}",
                     "use a kernel with XDP on veth (Linux >= 4.14 for native); check dmesg")
    if reported != mode:
        return Check(name, False, f"attached in {mode} mode but the kernel reports {reported}",
                     "check dmesg; skyguard needs XDP in this mode on veth")
    return Check(name, True, f"attached, seen by the kernel in {mode} mode on veth {ifname}, detached")


def check_tc_attach(state: dict) -> Check:
    """Add a clsact qdisc and a direct-action bpf filter (ingress and egress), confirm, remove."""
    name = "TC clsact+bpf"
    blocked = _attach_prerequisites(state)
    if blocked:
        return Check(name, False, f"not tried: {blocked}", "fix that check first")
    from pyroute2 import IPRoute
    netns: ThrowawayNamespace = state["netns"]
    _, _, tc_fn = state["programs"]
    ifname = netns.VETH[0]
    try:
        with netns.entered():
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.tc("add", "clsact", index)
                for parent in ("ffff:fff2", "ffff:fff3"):  # clsact ingress, egress
                    ipr.tc("add-filter", "bpf", index, ":1", fd=tc_fn.fd, name=tc_fn.name,
                           parent=parent, classid=1, direct_action=True)
        shown = {}
        for direction in ("ingress", "egress"):
            result = _run("tc", "-n", netns.name, "filter", "show", "dev", ifname, direction)
            shown[direction] = "sg_doctor_tc" in result.stdout and "direct-action" in result.stdout
        with netns.entered():
            with IPRoute() as ipr:
                ipr.tc("del", "clsact", ipr.link_lookup(ifname=ifname)[0])
    except Exception as e:  # pyroute2 raises NetlinkError and friends; report, never crash
        return Check(name, False, f"TC clsact + bpf filter on veth {ifname} failed: {e}",
                     "use a kernel with CONFIG_NET_CLS_BPF and CONFIG_NET_SCH_INGRESS (clsact)")
    missing = [d for d, ok in shown.items() if not ok]
    if missing:
        return Check(name, False, f"the kernel does not show the filter on {', '.join(missing)}",
                     "check `tc filter show dev <if> ingress`; needs cls_bpf direct-action")
    return Check(name, True, f"clsact with direct-action bpf filters on ingress and egress of "
                 f"veth {ifname}, seen by the kernel, removed")


def check_nftables(state: dict) -> Check:
    """Create and delete a table inside the throwaway namespace: proves nft and nf_tables work
    without touching the host's ruleset."""
    name = "nftables"
    if shutil.which("nft") is None:
        return Check(name, False, "the `nft` command is missing", "apt-get install nftables")
    netns = state.get("netns")
    if netns is None:
        return Check(name, False, "not tried: no throwaway namespace (the network namespaces "
                     "check failed)", "fix that check first")
    ruleset = ("add table inet sgdoctor\n"
               "add chain inet sgdoctor probe { type filter hook output priority 0; }\n"
               "add rule inet sgdoctor probe udp dport 53 counter accept\n"
               "delete table inet sgdoctor\n")
    result = subprocess.run(["nsenter", f"--net=/run/netns/{netns.name}", "nft", "-f", "-"],
                            input=ruleset, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return Check(name, False, f"nft could not create a table: {_first_error_line(result)}",
                     "use a kernel with CONFIG_NF_TABLES (Debian's has it); apt-get install nftables")
    return Check(name, True, "created and deleted an inet table with a chain and a rule")


# ---------------------------------------------------------------- TPM (issue 18)

def check_tpm(state_dir: Path | None = None) -> Check:
    """The TPM skyguard would use, and what depends on it. A host without a TPM passes (skyguard
    runs without measured launch or quotes, its store key stays a file) unless the store key is
    sealed: then the secrets stay shut, a failure. A TPM that is configured but does not answer,
    a PCR the event log does not replay to, or a sealed key that does not open are failures."""
    from skyguard.tpm.device import Tpm, TpmConfig, TpmError, find_tcti
    from skyguard.tpm.eventlog import EventLog, EventLogError, replay
    from skyguard.tpm.sealing import SealedKey, key_in_use

    name = "TPM"
    state = Path(state_dir or config.STATE_DIR)
    try:
        store_key = key_in_use(state / "secrets")
    except OSError as e:
        return Check(name, False, f"cannot read skyguard's state dir {state} ({e.strerror})",
                     "run skyguard doctor as root (or give --state-dir / SKYGUARD_STATE_DIR)")
    try:
        tcti = find_tcti(state)
    except OSError as e:
        return Check(name, False, f"cannot read skyguard's TPM state in {state} ({e.strerror})",
                     "run skyguard doctor as root")
    except TpmError as e:
        return Check(name, False, str(e), "run `skyguard tpm init` again")
    if tcti is None:
        if store_key == "tpm":
            return Check(name, False, "the secret store's key is sealed by a TPM, and no TPM is reachable: "
                         "the secrets stay shut", "give the TPM back (or set SKYGUARD_TPM_TCTI / run "
                         "`skyguard tpm init --tcti T`); restore sealing.key from backup otherwise")
        return Check(name, True, "no TPM (no /dev/tpmrm0, none configured): skyguard runs without measured "
                     "launch or quotes, and its store key stays a file; "
                     "with a TPM, run `skyguard tpm init` (swtpm can stand in for trials)")
    if shutil.which("tpm2_pcrread") is None:
        return Check(name, False, f"a TPM is configured ({tcti}) but tpm2-tools are missing",
                     "apt-get install tpm2-tools")
    try:
        cfg = TpmConfig.load(state)
        device = Tpm.for_state_dir(state)
        with device.locked():
            value = device.pcr_read([cfg.pcr])[cfg.pcr]
            lines = EventLog(state / "tpm").lines()
    except OSError as e:
        return Check(name, False, f"cannot read skyguard's TPM state in {state} ({e.strerror})",
                     "run skyguard doctor as root")
    except TpmError as e:
        return Check(name, False, f"the TPM at {tcti} does not answer: {e}", "check the TPM (or the swtpm "
                     "process) and the TCTI; until it answers, quotes fail and a sealed store stays shut")
    problems, fixes = [], []
    try:
        base, replayed, _ = replay(lines, cfg.pcr)
        if lines and replayed != value:
            problems.append(f"PCR {cfg.pcr} does not replay from skyguard's event log (extended by something else)")
        elif any(base):
            problems.append(f"PCR {cfg.pcr} was extended by something other than skyguard before it started")
    except EventLogError as e:
        problems.append(f"the event log is damaged: {e}")
    if problems:
        fixes.append("pick a PCR (8-15) nothing else on this host extends: `skyguard tpm init --pcr N`; "
                     "the log starts clean at the next boot")
    if not cfg.ak_public:
        problems.append("no attestation key (quotes unavailable)")
        fixes.append("run `skyguard tpm init`")
    if store_key == "tpm":
        try:
            SealedKey(state / "secrets").load()
        except SkyguardError as e:
            problems.append(str(e))
            fixes.append("boot the measured state the key was sealed to, or restore sealing.key from backup")
    detail = (f"TPM at {tcti}; skyguard's PCR {cfg.pcr} ({len(lines)} event log lines); store key: "
              f"{'sealed by the TPM' if store_key == 'tpm' else store_key}")
    if problems:
        return Check(name, False, detail + "; " + "; ".join(problems), "; ".join(fixes))
    return Check(name, True, detail + ("; the sealed key opens" if store_key == "tpm" else "") +
                 ("" if store_key == "tpm" else "; `skyguard tpm seal-store` seals the store key"))


# ---------------------------------------------------------------- the whole run

def run_checks() -> list[Check]:
    """Run every check in order; later checks say "not tried" when what they stand on failed."""
    state: dict = {}
    privileges = check_privileges()
    state["privileged"] = privileges.ok
    checks = [privileges, check_bpf_syscall(), check_bpffs()]
    bcc_check = check_bcc()
    state["bcc"] = bcc_check.ok
    checks += [bcc_check, check_kernel_headers(state), check_libbpf()]
    try:
        checks.append(check_network_namespaces(state))
        checks += [check_xdp_attach(state, "generic"), check_xdp_attach(state, "native"),
                   check_tc_attach(state), check_nftables(state)]
        checks.append(check_tpm())
        checks.append(check_key_custody())  # PKCS#11 pieces; strict when the running policy uses a token
    finally:
        if "netns" in state:
            state["netns"].remove()
        if "programs" in state:
            state["programs"][0].cleanup()
    return checks
