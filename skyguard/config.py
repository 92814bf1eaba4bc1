"""Where skyguard keeps its state on the host: one place for every default path.

Each can be overridden by an environment variable so tests and parallel labs do not collide.
"""

import os
from pathlib import Path

# Daemon state: host key, sealed store, signed log, learned DNS state. Mode 0700.
STATE_DIR = Path(os.environ.get("SKYGUARD_STATE_DIR", "/var/lib/skyguard"))
# Runtime files: the control socket (root only) and the pid file.
RUN_DIR = Path(os.environ.get("SKYGUARD_RUN_DIR", "/run/skyguard"))
# Pinned maps and programs in bpffs, so enforcement survives a daemon crash and is re-adopted.
PIN_DIR = Path(os.environ.get("SKYGUARD_PIN_DIR", "/sys/fs/bpf/skyguard"))
# Lab namespaces get this prefix (empty by default, so they are named after the workloads).
LAB_PREFIX = os.environ.get("SKYGUARD_LAB_PREFIX", "")
# Lab state (server pids, lab CA, requests log), one subfolder per lab prefix ("default" for none).
LAB_DIR = Path(os.environ.get("SKYGUARD_LAB_DIR", "/run/skyguard-lab"))

REPO_ROOT = Path(__file__).resolve().parent.parent
# bpf/ and policies/: the checkout's, or the copies an installed wheel carries (setup.py).
_PACKAGED = Path(__file__).resolve().parent / "data"
_DATA_ROOT = _PACKAGED if (_PACKAGED / "bpf").is_dir() else REPO_ROOT
BPF_DIR = _DATA_ROOT / "bpf"
POLICIES_DIR = _DATA_ROOT / "policies"
DEFAULT_POLICY = POLICIES_DIR / "keysystems.yaml"
DEFAULT_METRICS_ADDR = "127.0.0.1:9464"
# How long a policy load waits for the parts (DNS proxy, credential proxy, ...) to take a policy
# the datapath already enforces, before answering with the busy part "pending" (daemon_apply.py).
PARTS_WAIT_S = float(os.environ.get("SKYGUARD_PARTS_WAIT_S", "120"))
# How long a skyguard process waits for a lock file another one holds (the sealed store's .lock,
# the TPM's lock) before it gives up with an error naming the file and its holder: a holder stuck
# on a hung TPM must not hang the waiter (a part taking a policy, a policy load). Well under
# PARTS_WAIT_S, so a part waiting for a lock fails (and is tried again at the next load) before
# the load stops waiting for it.
LOCK_WAIT_S = float(os.environ.get("SKYGUARD_LOCK_WAIT_S", "30"))
# `skyguard doctor` names its throwaway namespace this prefix + its pid (tests use their own).
DOCTOR_NETNS_PREFIX = os.environ.get("SKYGUARD_DOCTOR_NETNS_PREFIX", "sgdoctor-")
