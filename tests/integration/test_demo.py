"""`skyguard demo` as a user runs it: it builds its own lab, decides every step as the policy
says, verifies the log, and leaves nothing behind."""

import os
import subprocess
import sys

from skyguard import config


def test_demo_runs_clean_and_leaves_nothing(root, tmp_path):
    prefix = f"d{os.getpid() % 100000}-"
    env = dict(os.environ, SKYGUARD_LAB_PREFIX=prefix, SKYGUARD_LAB_DIR=str(tmp_path / "labs"),
               PYTHONPATH=str(config.REPO_ROOT))
    done = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "demo"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo ok" in done.stdout
    words = " ".join(done.stdout.split())  # the console wraps long lines
    for word in ("policy_deny", "no_rule", "spoof_ip", "auth-to-directory", "syslog",
                 "DNS allowed", "DNS refused", "tunnel", "swapped", "blocked_exfiltration",
                 "api.github.test received the real token"):
        assert word in words  # the reasons come from the datapath, per step
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in namespaces


def test_demo_with_a_policy_lacking_its_roles_says_which_and_builds_nothing(root, tmp_path):
    prefix = f"e{os.getpid() % 100000}-"
    env = dict(os.environ, SKYGUARD_LAB_PREFIX=prefix, SKYGUARD_LAB_DIR=str(tmp_path / "labs"),
               PYTHONPATH=str(config.REPO_ROOT))
    policy = config.REPO_ROOT / "policies" / "examples" / "ai-sandbox.yaml"  # valid, but no dc1, agent1...
    for extra in ([], ["--attack"]):
        done = subprocess.run([sys.executable, "-m", "skyguard.cli.main", "demo", *extra, "--policy", str(policy)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "needs a workload" in done.stderr and str(policy.name) in done.stderr
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not (tmp_path / "labs").exists()
