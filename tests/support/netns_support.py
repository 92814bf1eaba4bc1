"""Running test code inside a network namespace the test made (`ip netns add`): an asyncio loop
in a thread that entered the namespace (setns is per thread, so the rest of the test process
stays where it is and reads the part's state directly), and a wait for a port to listen there.

Not a place for building namespaces or links: each test module lays out its own.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
import sys
import threading

from support.client_waits import ANSWER_WAIT_S

CLONE_NEWNET = 0x40000000


class NamespaceLoop:
    """An asyncio loop in a thread that lives in network namespace `ns` (a name under /run/netns).

    run(coro) runs a coroutine there and returns its result; `timeout` (seconds) is each run's
    default bound against hangs, not a timing. close() stops the loop and joins the thread."""

    def __init__(self, ns: str, timeout: float = 60):
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        def main():
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {ns}")
                finally:
                    os.close(fd)
            except BaseException as e:  # raised in the constructor below
                errors.append(e)
                ready.set()
                return
            asyncio.set_event_loop(self.loop)  # code that asks for "the current loop" finds this one
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, name=f"netns-{ns}", daemon=True)
        self.thread.start()
        ready.wait(10)
        if errors:
            self.loop.close()
            raise errors[0]

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout if timeout is None else timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


# Runs inside the namespace: exit 0 once something accepts on (address, port), 1 after argv[3] s.
_PROBE = """import socket, sys, time
address, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        socket.create_connection((address, port), 0.2).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
"""


def wait_for_port(ns: str, address: str, port: int) -> None:
    """Wait until something in namespace `ns` accepts TCP connections on address:port (up to
    ANSWER_WAIT_S; a bound against hangs); raise CalledProcessError when nothing does."""
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _PROBE, address, str(port), str(ANSWER_WAIT_S)],
                   check=True, capture_output=True, timeout=ANSWER_WAIT_S + 60)
