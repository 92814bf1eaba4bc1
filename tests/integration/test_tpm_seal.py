"""The secret store's key sealed by a real TPM (swtpm) to a PCR policy: `skyguard tpm seal-store`
moves the file key into the TPM and the secrets still open with it; a copy of the state dir on
another emulator instance cannot unseal it, nor this TPM in another measured state; a missing TPM
keeps the secrets shut (fail closed), and status and doctor say which key is in use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from skyguard import config
from skyguard.custody.store import SecretStore
from skyguard.doctor import check_tpm
from skyguard.errors import CredentialError
from skyguard.tpm.device import Tpm
from skyguard.tpm.sealing import SealedKey, SealedKeyError, key_in_use, migrate
from support.swtpm_support import Swtpm


def cli(*args, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "skyguard.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(config.REPO_ROOT), **(env or {})}, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def sealed_state(emulator, tmp_path):
    """A state dir whose store held two secrets under a file key, then `tpm seal-store`."""
    state = tmp_path / "state"
    store = SecretStore(state / "secrets")
    store.set("github", b"ghp_example_token_value")
    store.set("web1", b"-----BEGIN PRIVATE KEY-----\nMIIE...\n")
    file_key = (state / "secrets" / "sealing.key").read_bytes()
    cli("tpm", "init", "--tcti", emulator.tcti, "--state-dir", str(state))
    assert "a file (secrets/sealing.key)" in cli("tpm", "status", "--state-dir", str(state)).stdout
    out = cli("tpm", "seal-store", "--state-dir", str(state)).stdout
    assert "now sealed by the TPM to sha256 PCRs 0,1,2,3,4,5,6,7" in out
    return state, file_key


def open_with(key: bytes, state, tmp_path) -> SecretStore:
    """The store opened with `key` (the store takes its key from a file until it asks a provider)."""
    key_file = tmp_path / "unsealed.key"
    key_file.write_bytes(key)
    os.chmod(key_file, 0o600)
    return SecretStore(state / "secrets", key_file=key_file)


def test_migration_moves_the_key_into_the_tpm_and_the_secrets_still_open(emulator, sealed_state, tmp_path):
    state, file_key = sealed_state
    assert not (state / "secrets" / "sealing.key").exists()
    assert key_in_use(state / "secrets") == "tpm"
    sealed = (state / "secrets" / "sealing.key.tpm").read_bytes()
    assert file_key not in sealed and file_key.hex().encode() not in sealed
    key = SealedKey(state / "secrets").load()
    assert key == file_key
    store = open_with(key, state, tmp_path)
    assert store.get("github").reveal() == b"ghp_example_token_value"
    assert store.get("web1").reveal().startswith(b"-----BEGIN PRIVATE KEY-----")
    # status says which key; migration again changes nothing
    status = json.loads(cli("tpm", "status", "--state-dir", str(state), "--json").stdout)
    assert status["store_key"] == "tpm"
    assert "already sealed" in cli("tpm", "seal-store", "--state-dir", str(state)).stdout
    check = check_tpm(state)
    assert check.ok and "store key: sealed by the TPM" in check.detail and "the sealed key opens" in check.detail


def test_a_copied_state_dir_cannot_unseal_on_another_emulator_instance(sealed_state, tmp_path):
    state, _ = sealed_state
    copy = tmp_path / "copied-state"
    shutil.copytree(state, copy)
    with Swtpm(tmp_path / "swtpm-b") as other:
        with pytest.raises(SealedKeyError, match="sealed by another TPM"):
            SealedKey(copy / "secrets", tcti=other.tcti).load()
        # the same through the CLI's doctor, pointed at the other TPM
        os.environ["SKYGUARD_TPM_TCTI"] = other.tcti
        try:
            check = check_tpm(copy)
        finally:
            del os.environ["SKYGUARD_TPM_TCTI"]
        assert not check.ok and "sealed by another TPM" in check.detail


def test_another_measured_state_cannot_unseal_until_the_state_comes_back(emulator, sealed_state):
    state, file_key = sealed_state
    tpm = Tpm(emulator.tcti)
    tpm.pcr_extend(7, bytes(32))  # e.g. Secure Boot turned off: PCR 7 measures its state
    with pytest.raises(SealedKeyError, match="PCRs 0,1,2,3,4,5,6,7 differ from when it was sealed"):
        SealedKey(state / "secrets").load()
    assert tpm.run("tpm2_getcap", "handles-transient", flush=False).strip() == ""
    emulator.reboot()  # the boot into the sealed state
    assert SealedKey(state / "secrets").load() == file_key


def test_a_missing_tpm_keeps_the_secrets_shut(sealed_state, tmp_path):
    state, _ = sealed_state
    copy = tmp_path / "no-tpm-state"
    shutil.copytree(state, copy)
    (copy / "tpm" / "tpm.json").unlink()  # nothing configured, and this host has no /dev/tpmrm0
    with pytest.raises(SealedKeyError, match="no TPM is reachable here: the secrets stay closed"):
        SealedKey(copy / "secrets").load()
    assert isinstance(SealedKeyError("x"), CredentialError)  # the store's callers handle it as theirs
    check = check_tpm(copy)
    assert not check.ok and "sealed by a TPM, and no TPM is reachable" in check.detail
    with pytest.raises(SealedKeyError, match="unavailable"):
        SealedKey(copy / "secrets", tcti="swtpm:host=127.0.0.1,port=9").load()


def test_migration_refuses_what_it_must_not_seal(emulator, tmp_path):
    tpm = Tpm(emulator.tcti)
    state = tmp_path / "state"
    store = SecretStore(state / "secrets")
    store.set("a", b"value")
    os.chmod(state / "secrets" / "sealing.key", 0o644)
    with pytest.raises(CredentialError, match="readable by others"):
        migrate(state / "secrets", tpm)
    assert (state / "secrets" / "sealing.key").exists() and key_in_use(state / "secrets") == "file"
    # an empty store: its first key is born sealed
    empty = tmp_path / "empty" / "secrets"
    assert migrate(empty, tpm)["changed"] and key_in_use(empty) == "tpm"
    assert len(SealedKey(empty, tcti=emulator.tcti).load()) == 32
    bad = cli("tpm", "seal-store", "--tcti", emulator.tcti, "--state-dir", str(tmp_path / "x"), "--pcrs", "a,b",
              check=False)
    assert bad.returncode == 2 and "--pcrs takes PCR numbers" in bad.stderr
