"""The TPM-rooted chain of trust (issue 18): measured launch into one PCR, quotes a remote verifier
checks, and the sealed store's key sealed to the platform's measured state.

    device.py     find the TPM (tcti), run tpm2-tools with transient handles flushed, the lock
    structs.py    TPMS_ATTEST / TPMT_SIGNATURE parsing and quote signature checks (pure)
    eventlog.py   skyguard's own event log: one canonical JSON line per PCR extend, replay
    measure.py    what is measured (package files, BPF object, program tags, policy, log key)
    identity.py   `tpm init`: EK, AK bound by make/activate credential, EK certificate
    quote.py      make a quote with the event log; verify it against an AK, nonce and reference
    sealing.py    the store key sealed to a PCR policy; migration from the file key
    monitor.py    continuous attestation: the daemon part that quotes on a schedule and on change
    hook.py       the one object the daemon holds (measure, monitor, status)

Every TPM call goes through tpm2-tools (tpm2-pytss does not build here). Evidence, not defence:
an attacker who controls the host kernel can lie to this code (SPEC.md section 2), but not make
the TPM sign a PCR value it does not hold.
"""

from skyguard.tpm.device import Tpm, TpmConfig, TpmError, TpmUnavailable

__all__ = ["Tpm", "TpmConfig", "TpmError", "TpmUnavailable"]
