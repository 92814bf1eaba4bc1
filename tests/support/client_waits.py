"""How long a test's real client (dig, curl, ping, ssh, a Python socket) waits for an answer,
in one place.

An answer that must come is waited for ANSWER_WAIT_S: a bound against a hang, never a timing.
On a loaded machine an answer may wait seconds (2 shared cores, vCPUs stolen by the hypervisor,
a daemon's thread not scheduled, an fsync queued behind other writers): a dig that waited 5 s
failed twice at load ~9, and a 6 s stall of the DNS proxy's loop reproduces it exactly. The
long wait only costs time when something is broken: the client returns with the answer.

An answer that must NOT come (a drop) is listened for SILENCE_WAIT_S: the test waits that long
every time, so it stays short; a stall there fails no good run (at worst a wrong answer arrives
after the test stopped listening, once).

Each client asks once: a retry is a second query (tests count the learner's calls, log entries
and cache hits), and a lost question should fail, not be hidden by a second one.
"""

from __future__ import annotations

ANSWER_WAIT_S = 20
SILENCE_WAIT_S = 1


def wait_s(answer: bool = True) -> int:
    """Seconds a client waits: ANSWER_WAIT_S for an answer that must come, SILENCE_WAIT_S when
    the test expects none (answer=False)."""
    return ANSWER_WAIT_S if answer else SILENCE_WAIT_S


def dig_argv(*args: str, answer: bool = True) -> list[str]:
    """dig asking each question once and waiting wait_s(answer) for its answer; args are dig's
    (server, options, names)."""
    return ["dig", "+tries=1", f"+time={wait_s(answer)}", *args]


def curl_argv(*args: str, answer: bool = True) -> list[str]:
    """curl (silent, errors shown) giving up after wait_s(answer) for the whole transfer; for
    big transfers pass --max-time yourself."""
    return ["curl", "-sS", "--max-time", str(wait_s(answer)), *args]


def ping_argv(*args: str, answer: bool = True) -> list[str]:
    """ping waiting wait_s(answer) for a reply (-W); args give the count (-c), target and the rest."""
    return ["ping", "-n", "-W", str(wait_s(answer)), *args]


def ssh_wait_options(answer: bool = True) -> list[str]:
    """ssh options bounding the connection's setup by wait_s(answer)."""
    return ["-o", f"ConnectTimeout={wait_s(answer)}"]
