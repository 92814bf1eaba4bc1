"""The one object the daemon holds for the TPM: measured launch, continuous attestation, status.

    tpm = DaemonTpm(state_dir, record=daemon.record)      # never raises; .problem says why not
    tpm.measure_launch(verifier_key)                       # package files, BPF object, log key
    tpm.measure_programs(datapath.program_infos())        # each loaded program's tag
    tpm.measure_policy(policy.name, policy.sha256)         # at start and at every policy load
    tpm.measure_attach(ifname, attach_info)                # at every attach
    part = tpm.monitor(registry)                           # a part: start / set_policy / stop
    tpm.status()                                           # for `skyguard status`

No TPM (none configured, no /dev/tpmrm0): every call is a no-op and status says so; skyguard runs.
A TPM that fails at start or later: skyguard keeps running, the failure is logged and recorded in
the signed log, and what needs the TPM fails closed: no quote verifies (the monitor reports
`failed`), and a store whose key is sealed stays shut. Never raises into the daemon.

A measurement that waited config.LOCK_WAIT_S for the TPM lock in vain (another process held it:
`skyguard attest --quote`, `tpm seal-store`; nothing was sent to the TPM) is not a failure: it is
pending, and retried in order with whatever is measured after it, LOCK_RETRIES times (each again
waiting for the lock) before measurement stops as for a failed extend. While one is pending the
PCR lacks what is enforced, so quotes fail closed (the marker of measure.py, the monitor), status
says why, skyguard_tpm_measurements_pending counts it, and the signed log has a
tpm_measure_deferred entry, then tpm_measure_resumed once it is in.

The same at the daemon's start: the event log is opened (brought in line with the PCR, measure.py)
without waiting for a lock another process holds; when held, the opening is pending
(tpm_measure_deferred of `event_log`, status `event_log: pending`), retried first, and the
launch's measurements are queued behind it in the daemon's order, so the PCR holds them in the
order a verifier replays, as after an unhindered start. A TPM that fails once the lock is free
stops measuring as at any start.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from skyguard.errors import SkyguardError
from skyguard.tpm import measure
from skyguard.tpm.device import Tpm, TpmConfig, TpmError, TpmLockBusy, TpmUnavailable, find_tcti
from skyguard.tpm.eventlog import EventLogError
from skyguard.tpm.measure import Measurements, mark_stopped
from skyguard.tpm.sealing import key_in_use

if TYPE_CHECKING:
    from skyguard.tpm.monitor import AttestationMonitor

log = logging.getLogger("skyguard.tpm")

LOCK_RETRIES = 10  # tries of a pending measurement, each waiting config.LOCK_WAIT_S for the lock
RETRY_PAUSE_S = 1.0  # between two tries


class DaemonTpm:
    def __init__(self, state_dir: Path, record=None, tcti: str | None = None):
        self.state_dir = Path(state_dir)
        self.record = record or (lambda kind, **fields: None)
        self.problem = ""
        self.tpm: Tpm | None = None
        self.config = TpmConfig()
        self.measurements: Measurements | None = None
        self._monitor: AttestationMonitor | None = None
        self._lock = threading.Lock()
        self._pending: list[measure.Item] = []  # waiting for the TPM lock, in order (see the module text)
        self._opened = False  # the event log in line with the PCR: until then every measurement waits
        try:
            self.configured = find_tcti(self.state_dir, tcti) is not None
        except (SkyguardError, OSError) as e:  # a damaged tpm.json: configured, and failing
            self.configured = True
            self._failed("the TPM configuration cannot be read", e)
            return
        if not self.configured:
            self.problem = "no TPM (none configured, no /dev/tpmrm0): nothing is measured, quotes are unavailable"
            return
        try:
            self.config = TpmConfig.load(self.state_dir)
            self.tpm = Tpm.for_state_dir(self.state_dir, tcti)
            self.measurements = Measurements(self.tpm, self.state_dir, self.config.pcr, self.record)
            try:
                started = self.measurements.open(lock_wait_s=0)  # the start waits on no other process
            except TpmLockBusy as e:
                with self._lock:
                    self._defer([], e)  # opened by the retries, before what is measured meanwhile
                return
            self._opened = True
            log.info("TPM at %s: PCR %d, event log %s", self.tpm.tcti, self.config.pcr, started)
        except (SkyguardError, OSError) as e:
            self._failed("the TPM failed at start", e)

    @property
    def available(self) -> bool:
        return self.measurements is not None

    def _failed(self, what: str, error: Exception) -> None:
        self.problem = f"{what}: {error}; quotes fail closed until the daemon restarts with a working TPM"
        self.measurements = None
        self._pending.clear()
        mark_stopped(self.state_dir, self.problem)  # so `attest --quote` fails closed too (measure.py)
        log.error("%s", self.problem)
        self.record("tpm_error", error=self.problem[:400])

    def _measure(self, items) -> None:
        """items(): the measurements, as Measurements.extend's arguments (measure.py)."""
        with self._lock:
            if self.measurements is None:
                return
            try:
                todo = items()
                if self._pending or not self._opened:  # after those waiting: the log keeps the daemon's order
                    self._pending.extend(todo)
                    todo = []
                for i, item in enumerate(todo):
                    try:
                        self.measurements.extend(*item)
                    except TpmLockBusy as e:
                        self._defer(todo[i:], e)
                        break
            except (TpmError, OSError, EventLogError) as e:
                # The PCR and the log may now differ by one line: quotes will show it, and no
                # further extend is tried (a TPM that fails once is not trusted to be consistent).
                # A log that no longer reads as skyguard wrote it stops measuring the same way:
                # raised, it would fail the daemon's policy load after the datapath swap.
                self._failed("a TPM extend failed", e)
        if self._monitor is not None:
            self._monitor.changed()

    def _defer(self, items: list, error: TpmLockBusy) -> None:
        """Under self._lock: `items` (none: the event log's opening) wait for the TPM lock; a thread
        retries them (module text)."""
        self._pending.extend(items)
        what = f"the {items[0][0]} measurement" if items else "opening the event log (the launch's measurements)"
        self.problem = (f"{measure.PENDING}{what} waits for the TPM lock ({error}); "
                        f"the daemon tries again {LOCK_RETRIES} times, quotes fail closed until it is in")
        mark_stopped(self.state_dir, self.problem)  # so `attest --quote` fails closed meanwhile
        log.warning("%s", self.problem)
        self.record("tpm_measure_deferred", measured=items[0][0] if items else "event_log", error=str(error)[:400])
        threading.Thread(target=self._retry, name="sg-tpm-retry", daemon=True).start()

    def _retry(self) -> None:
        """Extend the pending measurements in order; stop measuring after LOCK_RETRIES tries in a
        row find the lock held, or at any other failure (as _measure)."""
        tries = 0
        while True:
            time.sleep(RETRY_PAUSE_S)
            with self._lock:
                if self.measurements is None or (self._opened and not self._pending):
                    return
                measurements, item = self.measurements, self._pending[0] if self._opened else None
                still_pending = self.problem if self._pending else ""
            # Waits for the TPM lock without self._lock: loads queue meanwhile.
            what = item[0] if item else "event_log"
            try:
                if item is None:
                    started = measurements.open(still_pending=still_pending)
                    log.info("TPM at %s: PCR %d, event log %s", measurements.tpm.tcti, measurements.pcr, started)
                else:
                    measurements.extend(*item)
            except TpmLockBusy as e:
                tries += 1
                log.warning("the pending %s measurement still waits for the TPM lock (try %d of %d): %s",
                            what, tries, LOCK_RETRIES, e)
                if tries < LOCK_RETRIES:
                    continue
                with self._lock:
                    self._failed(f"a measurement waited for the TPM lock {LOCK_RETRIES + 1} times", e)
            except (TpmError, OSError, EventLogError) as e:
                with self._lock:
                    self._failed("a TPM extend failed" if item else "the TPM failed at start", e)
            else:
                tries = 0
                with self._lock:
                    if item is None:
                        self._opened = True
                    else:
                        self._pending.pop(0)
                    if self._pending:
                        continue
                    self.problem = ""
                    measure.clear_stopped(self.state_dir)
                    log.info("the pending TPM measurements are in: quotes show the enforced state again")
                    self.record("tpm_measure_resumed", pcr=measurements.pcr, extends=measurements.extends)
            if self._monitor is not None:
                self._monitor.changed()
            return

    # ---- what the daemon calls ------------------------------------------------------------

    def measure_launch(self, verifier_key: str) -> None:
        self._measure(lambda: measure.launch_items(verifier_key))

    def measure_programs(self, infos: dict) -> None:
        self._measure(lambda: measure.program_items(infos))

    def measure_policy(self, name: str, sha256: str) -> None:
        self._measure(lambda: [measure.policy_item(name, sha256)])

    def measure_attach(self, interface: str, info: dict) -> None:
        programs = {hook: str(p.get("tag")) for hook, p in info.items() if isinstance(p, dict)}
        self._measure(lambda: [measure.attach_item(interface, programs)])

    def pending(self) -> int:
        """Measurements waiting for the TPM lock (skyguard_tpm_measurements_pending)."""
        return len(self._pending)

    def wants_monitor(self, policy=None) -> bool:
        """The daemon's PartSlot.wanted: a TPM is configured and has an attestation key. A TPM that
        failed still gets its monitor, so the failure shows in metrics and alerts."""
        return self.configured and bool(self.config.ak_public)

    def monitor(self, registry=None, period_s: float | None = None):
        from skyguard.tpm.monitor import DEFAULT_PERIOD_S, AttestationMonitor

        if self.tpm is None:
            raise TpmUnavailable(self.problem)
        self._monitor = AttestationMonitor(self.tpm, self.state_dir, self.record, registry,
                                           period_s or DEFAULT_PERIOD_S, failed=self.failure, pending=self.pending)
        return self._monitor

    def failure(self) -> str:
        """Why measurement stopped or waits ("" while it works): the measured state is then stale, so
        the monitor reports every quote as failed (fail closed) even when the quote itself verifies."""
        return self.problem if self.configured and (self.measurements is None or self._pending or not self._opened) else ""

    def status(self) -> dict:
        out = {"available": self.available, "configured": self.configured,
               "store_key": key_in_use(self.state_dir / "secrets")}
        if self.problem:
            out["problem"] = self.problem
        if self.tpm is not None:
            out.update(tcti=self.tpm.tcti, pcr=self.config.pcr, attestation_key=bool(self.config.ak_public))
        if self.measurements is not None and not self._opened:
            out.update(event_log="pending", measurements_pending=len(self._pending))
        elif self.measurements is not None:
            out.update(event_log=self.measurements.started, event_log_lines=self.measurements.count,
                       pcr_value=self.measurements.value.hex(), extends=self.measurements.extends,
                       measurements_pending=len(self._pending))
        if self._monitor is not None and self._monitor.last:
            last = {k: v for k, v in self._monitor.last.items() if k != "failures"}
            last["failures"] = len(self._monitor.last.get("failures", []))
            out["last_quote"] = last
        return out
