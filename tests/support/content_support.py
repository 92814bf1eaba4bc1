"""A real clamd for tests and benchmarks, with signatures written here: no freshclam, no download
(these machines cannot reach ClamAV's mirrors). Not used by the daemon. Also zip and gzip bombs,
and an SFTP relay that runs the admin proxy's upload filter between a real sftp client and
sftp-server (`python -m support.content_support sftp-relay`, with tests/ on PYTHONPATH).

    with LocalClamd(tmp_path) as clamd:      # starts /usr/sbin/clamd, waits for its socket
        clamd.socket                         # the Unix socket to give ClamdStream / the policy
        clamd.kill()                         # SIGKILL, for fail-closed tests

Signatures: the EICAR test string as a body signature (.ndb, any file type, any offset), and
MARKER_FILE by its MD5 (.hdb). ScanArchive is on, so both are found inside zip, tar and gzip;
archive expansion is bounded (MaxScanSize, MaxFileSize, MaxRecursion, MaxFiles) and
AlertExceedsMax turns a file past those bounds into a detection (a zip bomb is refused, not passed
unscanned), as the README asks of a production clamd; skyguard refuses to use one without it
(`alert_exceeds_max=False` starts such a clamd, for the tests that show it).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import signal
import socket
import stat
import subprocess
import time
import zipfile
import zlib
from pathlib import Path

from skyguard.policy.content import DEFAULT_CLAMD_MAX_FILE

# Split so that this file itself is not an EICAR file to a scanner of the repository.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SIGNATURE = "Skyguard.Test.EICAR"
MARKER_FILE = b"skyguard blocked-by-hash test file\n"
MARKER_SIGNATURE = "Skyguard.Test.Hash"
CLAMD = "/usr/sbin/clamd"
# Bounds on archive expansion (clamd.conf). Small, so a test bomb trips them quickly. MaxFileSize
# is Debian's, which the policy's content.clamd.max_file_bytes defaults to (a clamd under it would
# skip, and with AlertExceedsMax refuse, files the policy lets through to it).
MAX_SCAN_SIZE_MB = 64
MAX_FILE_SIZE_MB = DEFAULT_CLAMD_MAX_FILE >> 20
MAX_RECURSION = 8


def write_database(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "skyguard-test.ndb").write_text(f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n")
    (directory / "skyguard-test.hdb").write_text(
        f"{hashlib.md5(MARKER_FILE).hexdigest()}:{len(MARKER_FILE)}:{MARKER_SIGNATURE}\n")


def write_config(work: Path, socket: Path, database: Path, max_file_mb: int = MAX_FILE_SIZE_MB,
                 alert_exceeds_max: bool = True) -> Path:
    config = work / "clamd.conf"
    config.write_text("\n".join([
        "Foreground yes",
        f"LocalSocket {socket}",
        f"DatabaseDirectory {database}",
        f"LogFile {work / 'clamd.log'}",
        "ScanArchive yes",
        f"MaxScanSize {max(MAX_SCAN_SIZE_MB, max_file_mb)}M",
        f"MaxFileSize {max_file_mb}M",
        f"MaxRecursion {MAX_RECURSION}",
        "MaxFiles 1000",
        f"StreamMaxLength {max(MAX_SCAN_SIZE_MB, max_file_mb)}M",
        f"AlertExceedsMax {'yes' if alert_exceeds_max else 'no'}",
        "AlertEncrypted yes",
        "SelfCheck 0",
    ]) + "\n")
    return config


class LocalClamd:
    def __init__(self, work: Path, max_file_mb: int = MAX_FILE_SIZE_MB, alert_exceeds_max: bool = True):
        self.work = Path(work)
        self.max_file_mb = max_file_mb  # larger files are an alert (AlertExceedsMax): benchmarks raise it
        self.alert_exceeds_max = alert_exceeds_max  # off, as clamd ships: a larger file is reported clean
        self.socket = str(self.work / "clamd.sock")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> LocalClamd:
        self.work.mkdir(parents=True, exist_ok=True)
        database = self.work / "db"
        write_database(database)
        config = write_config(self.work, Path(self.socket), database, self.max_file_mb, self.alert_exceeds_max)
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.proc = subprocess.Popen([CLAMD, "-c", str(config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.work / "clamd.err", "ab"))
        deadline = time.monotonic() + timeout
        while not self.ping():  # the socket file exists a moment before clamd listens on it
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"clamd did not start: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        """clamd answers PING with PONG."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(self.socket)
                sock.sendall(b"zPING\0")
                return sock.recv(16).startswith(b"PONG")
        except OSError:
            return False

    def log_tail(self) -> str:
        text = ""
        for name in ("clamd.err", "clamd.log"):
            path = self.work / name
            if path.exists():
                text += path.read_text(errors="replace")[-2000:]
        return text

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def __enter__(self) -> LocalClamd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# Random bytes no rule refuses: 0x1f ('\x1f\x8b' opens gzip), 'P' ('PK\x03\x04' a zip entry) and
# '%' (an escape in a form piece that could decode to either) never occur. os.urandom alone opened
# a form piece with gzip's magic about once in a thousand runs, and the archive engine refused it.
_NOT_ARCHIVE = bytes.maketrans(b"\x1fP%", b"\x20Q&")


def harmless_bytes(size: int) -> bytes:
    return os.urandom(size).translate(_NOT_ARCHIVE)


@functools.cache
def gzip_bomb(megabytes: int = 20) -> bytes:
    """`megabytes` MiB of zeros, gzip-compressed (about 1000:1), built without holding them."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    return b"".join(compressor.compress(zeros) for _ in range(megabytes)) + compressor.flush()


@functools.cache
def zip_bomb(megabytes: int = 20, nested: int = 1) -> bytes:
    """A zip holding `megabytes` MiB of zeros, inside `nested` - 1 further zips."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("zeros.bin", "w") as member:
            for _ in range(megabytes):
                member.write(bytes(1 << 20))
    data = out.getvalue()
    for _ in range(nested - 1):
        data = zipped("inner.zip", data)
    return data


def zipped(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


# ---- an SFTP relay for tests: the admin proxy's SFTP filter between a real client and server ----
# `sftp -D PROGRAM` speaks SFTP to PROGRAM's stdin/stdout; this relay is that program: it runs a
# real sftp-server and puts skyguard.admin.sftp.SftpUploadFilter between the two, as the SSH
# access proxy's session does between the operator's channel and the VM's.

async def sftp_relay(policy_path: str, zone: str, log_path: str, server: list[str]) -> int:
    import asyncio
    import sys

    from skyguard.admin.decisionlog import JsonLinesDecisionLog
    from skyguard.admin.sftp import SftpUploadFilter
    from skyguard.content.inspector import ContentEngine
    from skyguard.policy.parse import load_policy

    policy = load_policy(policy_path)
    # the proxy's own fallback log: one {"type": kind, **fields} per line, as the signed log decodes
    upload_filter = SftpUploadFilter(ContentEngine(policy.content), zone, JsonLinesDecisionLog(log_path), workload="vm1")
    loop = asyncio.get_running_loop()
    proc = await asyncio.create_subprocess_exec(*server, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    if stat.S_ISSOCK(os.fstat(0).st_mode):  # sftp hands its end of a socketpair as stdin and stdout
        reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=os.dup(0)))
    else:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)

    async def operator_to_vm():
        while data := await reader.read(1 << 16):
            to_vm, to_operator = await upload_filter.from_operator(data)
            proc.stdin.write(to_vm)
            writer.write(to_operator)
            await proc.stdin.drain()
            await writer.drain()
        proc.stdin.close()

    async def vm_to_operator():
        while data := await proc.stdout.read(1 << 16):
            writer.write(upload_filter.from_vm(data))
            await writer.drain()

    await asyncio.gather(operator_to_vm(), vm_to_operator())
    return await proc.wait()


if __name__ == "__main__":
    import argparse
    import asyncio
    import sys

    parser = argparse.ArgumentParser(prog="python -m support.content_support")
    parser.add_argument("mode", choices=["sftp-relay"])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("server", nargs="+", help="the sftp-server command, after --")
    args = parser.parse_args()
    sys.exit(asyncio.run(sftp_relay(args.policy, args.zone, args.log, args.server)))
