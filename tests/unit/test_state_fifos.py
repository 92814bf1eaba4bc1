"""A FIFO where the daemon reads a file of its state dir (at start, or on each request) is refused
with an error that names the file, never waited on: a plain open() of a FIFO blocks until a writer
comes, and the daemon (or the part, or the request) would hang. Whoever can write the state dir, or
a mistake (`mkfifo` in the wrong place, a restore tool), can put one there.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import asyncssh
import pytest

from skyguard.admin.connection import VmHostKeys
from skyguard.admin.recording import SessionArchive
from skyguard.console.tickets import TicketBook
from skyguard.credproxy.ca import CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority
from skyguard.dns.learned import LearnedStore
from skyguard.errors import AdminError, BadInput, CredentialError, DnsError, LogError
from skyguard.fleet import alerts, peers
from skyguard.fleet.daemon_hook import kept_fleet_policy
from skyguard.tlog import hostkey
from skyguard.tlog.cosign import PEERS_FILE, Cosigner, Witness
from skyguard.tlog.reader import CHECKPOINTS_FILE, META_FILE, LogReader, segment_name
from skyguard.tlog.store import LogWriter
from skyguard.tpm import measure, quote
from skyguard.tpm.device import TpmConfig, TpmError
from skyguard.tpm.eventlog import FILE_NAME, EventLog, EventLogError


def outcome(fifo: Path, call):
    """call()'s value, or the exception it raised. Fails the test if call waits on the FIFO (a
    bound against a hang, not a timing: the FIFO's other end is then opened to release it)."""
    done: dict = {}

    def run():
        try:
            done["value"] = call()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            done["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the waiting reader gets EOF
        thread.join(20)
        pytest.fail(f"{fifo.name}: the read waited on the FIFO")
    return done.get("error", done.get("value"))


def fifo_at(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)
    return path


def a_log(state: Path) -> Path:
    with LogWriter(state / "log", hostkey.host_signer(state)) as writer:
        writer.append(b'{"kind": "test"}')
    return state / "log"


def beside(path: Path) -> Path:
    """An empty file at `path`; its directory."""
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_bytes(b"")
    return path.parent


def witness(state: Path) -> Witness:
    return Witness(state / "witness", Cosigner("w", hostkey.load_or_create_host_key(state / "w")))


CASES = {  # what: (the file made a FIFO, what reads it, the error expected)
    "tpm.json": (lambda s: s / "tpm" / "tpm.json", lambda s: TpmConfig.load(s), TpmError),
    "TPM event log": (lambda s: s / "tpm" / FILE_NAME, lambda s: EventLog(s / "tpm").lines(), EventLogError),
    "TPM reference": (lambda s: s / "tpm" / "reference.json",
                      lambda s: quote.load_json(s / "tpm" / "reference.json", "reference", regular=True), BadInput),
    "host id": (lambda s: s / hostkey.HOST_ID_FILE, lambda s: hostkey.host_id(s), LogError),
    "log origin": (lambda s: s / hostkey.ORIGIN_FILE, lambda s: hostkey.default_key_name(s), LogError),
    "host key": (lambda s: hostkey.key_path(s), lambda s: hostkey.load_or_create_host_key(s), LogError),
    "log meta": (lambda s: a_log(s) / META_FILE, lambda s: LogReader(s / "log"), LogError),
    "log checkpoints": (lambda s: a_log(s) / CHECKPOINTS_FILE,
                        lambda s: LogWriter(s / "log", hostkey.host_signer(s)), LogError),
    "log segment": (lambda s: a_log(s) / segment_name(0), lambda s: LogWriter(s / "log", hostkey.host_signer(s)),
                    LogError),
    "witness state": (lambda s: s / "witness" / (hashlib.sha256(b"o").hexdigest()[:32] + ".json"),
                      lambda s: witness(s).state("o"), LogError),
    "credential proxy CA": (lambda s: beside(s / "ca" / CA_CERT_FILE) / CA_KEY_FILE,
                            lambda s: CertificateAuthority(s / "ca"), CredentialError),
    "VM host key pins": (lambda s: s / "admin" / "vm_host_keys.json",
                         lambda s: VmHostKeys(s / "admin" / "vm_host_keys.json").check(
                             "dc1", asyncssh.generate_private_key("ssh-ed25519")), AdminError),
    "DNS learned state": (lambda s: s / "dns-learned.json", lambda s: LearnedStore(s / "dns-learned.json").load(),
                          DnsError),
}


@pytest.mark.parametrize("what", CASES)
def test_a_fifo_in_the_state_dir_is_refused_with_an_error_naming_it(what, tmp_path, monkeypatch):
    monkeypatch.delenv(hostkey.ORIGIN_ENV, raising=False)
    place, read, error = CASES[what]
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    fifo = fifo_at(place(state))
    got = outcome(fifo, lambda: read(state))
    assert isinstance(got, error), got
    assert str(fifo) in str(got) or str(fifo.parent) in str(got), got
    assert "not a regular file" in str(got), got


def test_a_fifo_among_tickets_recordings_or_the_measurement_marker_is_skipped_not_waited_on(tmp_path):
    tickets = TicketBook(tmp_path / "tickets")
    fifo = fifo_at(tmp_path / "tickets" / "forged.json")
    assert outcome(fifo, lambda: tickets.redeem_token("x" * 40)) is None
    fifo = fifo_at(tmp_path / "sessions" / "20260101T000000Z-0123abcd.json")
    listed = outcome(fifo, SessionArchive(tmp_path / "sessions").list)
    assert listed == [{"id": "20260101T000000Z-0123abcd", "result": "unreadable"}]
    fifo = fifo_at(tmp_path / "tpm" / measure.STOPPED_FILE)
    stopped = outcome(fifo, lambda: measure.stopped(tmp_path))  # still says measurement stopped: fail closed
    assert "cannot be read" in stopped and "not a regular file" in stopped


FLEET_CASES = {  # what: (the file made a FIFO, what reads it, what it gives instead of waiting)
    "fleet alerts": (lambda s: s / alerts.ALERTS_FILE, lambda s: alerts.load_alerts(s), {}),
    "fleet clearings": (lambda s: s / alerts.CLEARED_FILE, lambda s: alerts.load_cleared(s), {}),
    "fleet policy kept": (lambda s: s / "fleet" / "policy.json", lambda s: kept_fleet_policy(s, []), None),
    "fleet peers (fleet untrust)": (lambda s: s / PEERS_FILE, lambda s: peers.untrust(s, "bravo"), BadInput),
}


@pytest.mark.parametrize("what", FLEET_CASES)
def test_a_fifo_in_the_fleet_state_is_unreadable_not_waited_on(what, tmp_path):
    place, read, expected = FLEET_CASES[what]
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    got = outcome(fifo_at(place(state)), lambda: read(state))
    assert isinstance(got, expected) if isinstance(expected, type) else got == expected, got
