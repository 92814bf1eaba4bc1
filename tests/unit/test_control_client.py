"""The CLI's side of the control socket (skyguard/control.py request): what an operator sees when
the daemon is slow or silent. A real Unix socket that accepts and never answers."""

from __future__ import annotations

import socket

import pytest

from skyguard import control
from skyguard.errors import DaemonError


def test_a_daemon_that_does_not_answer_in_time_is_a_clear_error_not_a_traceback(tmp_path):
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        with pytest.raises(DaemonError, match=r"did not answer policy.load within 1s; it may still be working"):
            control.request("policy.load", timeout=1, socket_file=path, text="x")
