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
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from skyguard.errors import SkyguardError
from skyguard.tpm.device import Tpm, TpmConfig, TpmError, TpmUnavailable, find_tcti
from skyguard.tpm.eventlog import EventLogError
from skyguard.tpm.measure import Measurements, mark_stopped
from skyguard.tpm.sealing import key_in_use

if TYPE_CHECKING:
    from skyguard.tpm.monitor import AttestationMonitor

log = logging.getLogger("skyguard.tpm")


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
            measurements = Measurements(self.tpm, self.state_dir, self.config.pcr, self.record)
            started = measurements.open()
            self.measurements = measurements
            log.info("TPM at %s: PCR %d, event log %s", self.tpm.tcti, self.config.pcr, started)
        except (SkyguardError, OSError) as e:
            self._failed("the TPM failed at start", e)

    @property
    def available(self) -> bool:
        return self.measurements is not None

    def _failed(self, what: str, error: Exception) -> None:
        self.problem = f"{what}: {error}; quotes fail closed until the daemon restarts with a working TPM"
        self.measurements = None
        mark_stopped(self.state_dir, self.problem)  # so `attest --quote` fails closed too (measure.py)
        log.error("%s", self.problem)
        self.record("tpm_error", error=self.problem[:400])

    def _measure(self, fn, *args) -> None:
        with self._lock:
            if self.measurements is None:
                return
            try:
                fn(*args)
            except (TpmError, OSError, EventLogError) as e:
                # The PCR and the log may now differ by one line: quotes will show it, and no
                # further extend is tried (a TPM that fails once is not trusted to be consistent).
                # A log that no longer reads as skyguard wrote it stops measuring the same way:
                # raised, it would fail the daemon's policy load after the datapath swap.
                self._failed("a TPM extend failed", e)
        if self._monitor is not None:
            self._monitor.changed()

    # ---- what the daemon calls ------------------------------------------------------------

    def measure_launch(self, verifier_key: str) -> None:
        self._measure(lambda: self.measurements.measure_launch(verifier_key))

    def measure_programs(self, infos: dict) -> None:
        self._measure(lambda: self.measurements.measure_programs(infos))

    def measure_policy(self, name: str, sha256: str) -> None:
        self._measure(lambda: self.measurements.measure_policy(name, sha256))

    def measure_attach(self, interface: str, info: dict) -> None:
        programs = {hook: str(p.get("tag")) for hook, p in info.items() if isinstance(p, dict)}
        self._measure(lambda: self.measurements.measure_attach(interface, programs))

    def wants_monitor(self, policy=None) -> bool:
        """The daemon's PartSlot.wanted: a TPM is configured and has an attestation key. A TPM that
        failed still gets its monitor, so the failure shows in metrics and alerts."""
        return self.configured and bool(self.config.ak_public)

    def monitor(self, registry=None, period_s: float | None = None):
        from skyguard.tpm.monitor import DEFAULT_PERIOD_S, AttestationMonitor

        if self.tpm is None:
            raise TpmUnavailable(self.problem)
        self._monitor = AttestationMonitor(self.tpm, self.state_dir, self.record, registry,
                                           period_s or DEFAULT_PERIOD_S, failed=self.failure)
        return self._monitor

    def failure(self) -> str:
        """Why measurement stopped ("" while it works): the measured state is then stale, so the
        monitor reports every quote as failed (fail closed) even when the quote itself verifies."""
        return self.problem if self.configured and self.measurements is None else ""

    def status(self) -> dict:
        out = {"available": self.available, "configured": self.configured,
               "store_key": key_in_use(self.state_dir / "secrets")}
        if self.problem:
            out["problem"] = self.problem
        if self.tpm is not None:
            out.update(tcti=self.tpm.tcti, pcr=self.config.pcr, attestation_key=bool(self.config.ak_public))
        if self.measurements is not None:
            out.update(event_log=self.measurements.started, event_log_lines=self.measurements.count,
                       pcr_value=self.measurements.value.hex(), extends=self.measurements.extends)
        if self._monitor is not None and self._monitor.last:
            last = {k: v for k, v in self._monitor.last.items() if k != "failures"}
            last["failures"] = len(self._monitor.last.get("failures", []))
            out["last_quote"] = last
        return out
