"""The daemon's control channel: one JSON request and one JSON reply per connection over a Unix
socket that only root can use (socket mode 0600 in a 0700 directory, and the peer's uid checked
with SO_PEERCRED). Nothing here listens on a network address.

Not the place for what the requests do: the daemon registers a handler per operation.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from skyguard import config, fsutil
from skyguard.errors import BadInput, DaemonError, SkyguardError

if TYPE_CHECKING:
    from skyguard.policy.model import Policy

log = logging.getLogger("skyguard.control")

MAX_REQUEST = 4 * 1024 * 1024  # a policy file travels inside a request
Handler = Callable[[dict], dict]


def socket_path() -> Path:
    return config.RUN_DIR / "control.sock"


def claim_run_dir(path: Path | None = None) -> int:
    """Hold the run dir for this daemon (an exclusive lock on `daemon.lock` in it, released with
    the process, even on SIGKILL); returns the descriptor. Taken before the daemon touches
    anything: a second `skyguard up` (another state dir, another policy) would otherwise load its
    policy into the pinned maps the running daemon enforces, and only then find its socket taken."""
    import fcntl

    directory = fsutil.private_dir((path or socket_path()).parent)
    fd = os.open(directory / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonError(f"a skyguard daemon already runs with run dir {directory}; stop it with "
                          "`skyguard down` first") from None
    return fd


PIN_LOCK_DIR = Path("/run/skyguard-pins")  # fixed on purpose: every daemon must see the same locks


def pin_dir_lock_path(pin_dir: Path) -> Path:
    """Where the lock of a pin dir lives: a file under PIN_LOCK_DIR named after the pin dir's
    real path (symlinks resolved, so two spellings of one directory share a lock)."""
    import hashlib

    return PIN_LOCK_DIR / (hashlib.sha256(os.path.realpath(pin_dir).encode()).hexdigest()[:32] + ".lock")


def claim_pin_dir(pin_dir: Path) -> int:
    """Hold the bpffs pin dir for this process, as claim_run_dir holds the run dir (a separate
    lock: two daemons with different run dirs must not both load policies into the same pinned
    maps, nor a `down` of one remove the other's). bpffs refuses regular files (EPERM), and a
    flock on the directory itself could be taken by any user who can open it (bpffs is often
    1777 and older pin dirs 0755), keeping every `up` out; so the lock is a file in a root-only
    directory under /run (tmpfs: no stale lock after a reboot, and flocks die with the process).
    Returns the descriptor."""
    import fcntl

    fsutil.private_dir(PIN_LOCK_DIR)
    path = pin_dir_lock_path(pin_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonError(f"a skyguard daemon already enforces with the pin dir {pin_dir} (lock {path}), from "
                          "another run dir; stop it with `skyguard down` in its environment (SKYGUARD_RUN_DIR) "
                          "first, or give this one a pin dir of its own (SKYGUARD_PIN_DIR)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.path.realpath(pin_dir)}\n".encode())  # for whoever lists the lock dir
    return fd


def let_go(claims) -> None:
    """Let go of the run and pin dirs (claim_run_dir, claim_pin_dir's descriptors) at the end of a
    daemon's shutdown, not at the process's exit: a thread the kernel holds in a write to a disk
    that does not answer (a session record whose closing the proxies stopped waiting for:
    admin/transcript.py report_left_open) keeps the process from ending until that write returns.
    Everything else is let go by then (programs detached, sockets and log closed), so `down`
    returns and the next `up` may start: its recovery waits for that process's hold on the records
    it left (admin/recording.py recover_interrupted)."""
    for fd in claims:
        os.close(fd)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _read_message(sock: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise BadInput("control request too large")
    if not data:
        raise DaemonError("empty message on the control socket")
    try:
        message = json.loads(data)
    except RecursionError:
        raise BadInput("control message nested too deeply") from None
    if not isinstance(message, dict):
        raise BadInput(f"a control message is a JSON object, not {type(message).__name__}")
    return message


class _RequestHandler(socketserver.BaseRequestHandler):
    def handle(self):
        server: ControlServer = self.server
        try:
            if _peer_uid(self.request) != 0:
                reply = {"ok": False, "error": "only root may use the skyguard control socket", "code": 1}
            else:
                reply = server.dispatch(_read_message(self.request))
        except (ValueError, SkyguardError) as e:
            reply = {"ok": False, "error": str(e), "code": getattr(e, "exit_code", 2)}
        try:
            self.request.sendall(json.dumps(reply, default=str).encode() + b"\n")
        except OSError:
            pass  # the client went away; nothing to tell it


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, handlers: dict[str, Handler], path: Path | None = None):
        self.handlers = handlers
        self.path = path or socket_path()
        fsutil.private_dir(self.path.parent)
        if self.path.exists():
            if _is_alive(self.path):
                raise DaemonError(f"a skyguard daemon already answers on {self.path}; stop it with `skyguard down`")
            self.path.unlink()  # left by a daemon that was killed
        old_umask = os.umask(0o177)
        try:
            super().__init__(str(self.path), _RequestHandler)
        finally:
            os.umask(old_umask)
        self._thread: threading.Thread | None = None

    def dispatch(self, message: dict) -> dict:
        op, args = message.get("op"), message.get("args") or {}
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown operation {op!r}"[:200], "code": 2}
        if not isinstance(args, dict):
            return {"ok": False, "error": f"{op}: args must be a JSON object", "code": 2}
        try:
            return {"ok": True, **handler(args)}
        except SkyguardError as e:
            return {"ok": False, "error": str(e), "code": e.exit_code}
        except Exception as e:  # the daemon must survive a bad request; say what broke
            log.exception("control operation %s failed", op)
            return {"ok": False, "error": f"{op} failed inside the daemon: {type(e).__name__}: {e}", "code": 1}

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="sg-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _is_alive(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(path))
        return True
    except OSError:
        return False


def daemon_running() -> bool:
    return socket_path().exists() and _is_alive(socket_path())


def request(op: str, timeout: float = 30.0, state_dir=None, socket_file: Path | None = None, **args) -> dict:
    """Send one request to the running daemon; raise DaemonError (or BadInput) on failure. With
    state_dir, the daemon answers only if that is where it keeps its state. socket_file: another
    daemon's control socket than this environment's (tests running several)."""
    path = socket_file or socket_path()
    if state_dir is not None:
        args["state_dir"] = str(state_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            try:
                s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon answered before reading it all (a refusal); its reply says why
            reply = _read_message(s)
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonError(f"no skyguard daemon is running (no socket at {path}); "
                          "start one with `skyguard up --policy FILE`") from None
    except PermissionError:
        raise DaemonError(f"permission denied on {path}: the control socket is root-only; run as root") from None
    except ConnectionError as e:
        raise DaemonError(f"the daemon closed the control connection without an answer ({e}); check its log") from None
    except TimeoutError:
        raise DaemonError(f"the daemon did not answer {op} within {timeout:.0f}s; it may still be working on it: "
                          "see `skyguard status` and the daemon's log") from None
    if not reply.get("ok"):
        cls = BadInput if reply.get("code") == 2 else DaemonError
        raise cls(reply.get("error", "the daemon refused the request"))
    return reply


def running_policy(state_dir=None, timeout: float = 30.0) -> Policy:
    """The policy the running daemon enforces, parsed from the exact text it loaded. Raises as
    request() does; state_dir as there."""
    from skyguard.policy.parse import parse_policy  # the control channel itself knows no policy

    reply = request("policy.get", timeout=timeout, state_dir=state_dir)
    return parse_policy(reply["text"], source=reply.get("source", "<daemon>"))


def run_dir_held() -> bool:
    """Whether a daemon holds the run dir (claim_run_dir): one that runs, or one still starting
    (its control socket comes up only after the datapath and the policy are in place)."""
    import fcntl

    try:
        fd = os.open(socket_path().parent / "daemon.lock", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if this took it


def wait_started(timeout: float) -> bool:
    """Wait for a daemon that holds the run dir to answer: True once it does, False if it let go
    of the run dir first (it failed to start)."""
    import time

    deadline = time.monotonic() + timeout
    while not daemon_running():
        if not run_dir_held():
            return False
        if time.monotonic() > deadline:
            raise DaemonError(f"a skyguard daemon holds the run dir {socket_path().parent} but has not answered "
                              f"for {timeout:.0f}s; see its log (stop it with SIGTERM)")
        time.sleep(0.2)
    return True


def wait_gone(timeout: float = 30.0) -> None:
    """Wait until the daemon has shut down: its socket no longer answers and it has let go of the
    run dir (it still holds it while it detaches and closes after the socket: `down && up` would
    find it held)."""
    import time

    deadline = time.monotonic() + timeout
    while daemon_running() or run_dir_held():
        if time.monotonic() > deadline:
            raise DaemonError(f"the daemon did not stop within {timeout:.0f}s; check its log")
        time.sleep(0.1)
