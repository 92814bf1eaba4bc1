"""The secret store with its key sealed by a real TPM (swtpm): after `skyguard tpm seal-store` the
store (and `skyguard secret`) opens with the TPM alone; a copy on another emulator instance, or a
host without its TPM, keeps the secrets shut and never makes a new file key (fail closed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from skyguard import config
from skyguard.custody.store import SecretStore
from skyguard.errors import CredentialError
from support.swtpm_support import Swtpm


def cli(*args, env, stdin=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "skyguard.cli.main", *args], capture_output=True, text=True,
                          input=stdin, env={**os.environ, "PYTHONPATH": str(config.REPO_ROOT), **env}, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_the_store_opens_with_its_sealed_key_and_stays_shut_elsewhere(tmp_path):
    with Swtpm(tmp_path / "a") as emulator:
        state = tmp_path / "state"
        env = {"SKYGUARD_STATE_DIR": str(state)}
        cli("secret", "set", "github", env=env, stdin="ghp_before_sealing")
        cli("tpm", "init", "--tcti", emulator.tcti, env=env)
        cli("tpm", "seal-store", env=env)
        assert not (state / "secrets" / "sealing.key").exists()
        store = SecretStore(state / "secrets")
        assert store.get("github").reveal() == b"ghp_before_sealing"
        cli("secret", "set", "web1", env=env, stdin="after sealing")
        assert SecretStore(state / "secrets").get("web1").reveal() == b"after sealing"
        copy = tmp_path / "copy"
        shutil.copytree(state, copy)
        with Swtpm(tmp_path / "b") as other:  # another host's TPM, where the copy lands
            os.environ["SKYGUARD_TPM_TCTI"] = other.tcti
            try:
                with pytest.raises(CredentialError, match="sealed by another TPM"):
                    SecretStore(copy / "secrets").get("github")
                with pytest.raises(CredentialError, match="sealed by another TPM"):
                    SecretStore(copy / "secrets").set("x", b"y")
            finally:
                del os.environ["SKYGUARD_TPM_TCTI"]
        refused = cli("secret", "set", "x", env={"SKYGUARD_STATE_DIR": str(copy),
                                                 "SKYGUARD_TPM_TCTI": "swtpm:host=127.0.0.1,port=9"},
                      stdin="y", check=False)
        assert refused.returncode == 1 and "the secrets stay closed" in refused.stderr
        assert not (copy / "secrets" / "sealing.key").exists() and not (copy / "secrets" / "x.sealed").exists()
