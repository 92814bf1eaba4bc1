"""The README's "Trying it" block, run line by line exactly as a new user would paste it (in a lab
of its own: prefix, state, run and pin dirs come from the environment, the lines are not edited),
credential swap included. A README that stops working fails here."""

from __future__ import annotations

import os
import re
import subprocess

from skyguard import config

README = config.REPO_ROOT / "README.md"
REAL_TOKEN = "ghp-real-token-only-skyguard-holds"
PLACEHOLDER = "sg-placeholder-github-7f3a"


def trying_it_lines() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Trying it"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_trying_it_block_works_as_written(root, tmp_path):
    lines = trying_it_lines()
    prefix = f"r{os.getpid() % 1000000}-"
    env = dict(os.environ, SKYGUARD_LAB_PREFIX=prefix, SKYGUARD_LAB_DIR=str(tmp_path / "labs"),
               SKYGUARD_STATE_DIR=str(tmp_path / "state"), SKYGUARD_RUN_DIR=str(tmp_path / "run"),
               SKYGUARD_PIN_DIR=f"/sys/fs/bpf/{prefix}skyguard", PYTHONPATH=str(config.REPO_ROOT))
    results = []
    daemon = None
    try:
        for line in lines:
            if line.rstrip().split("#")[0].rstrip().endswith("&"):  # the daemon, in the background
                daemon = subprocess.Popen(["bash", "-c", line], cwd=config.REPO_ROOT, env=env,
                                          stdout=open(tmp_path / "daemon.log", "w"), stderr=subprocess.STDOUT,
                                          start_new_session=True)
                results.append((line, None))
                continue
            done = subprocess.run(["bash", "-c", line], cwd=config.REPO_ROOT, env=env, capture_output=True,
                                  text=True, timeout=300)
            results.append((line, done))
    finally:
        if daemon is not None and daemon.poll() is None:
            subprocess.run(["bash", "-c", ".venv/bin/skyguard down"], cwd=config.REPO_ROOT, env=env,
                           capture_output=True, timeout=120)
            os.killpg(daemon.pid, 9)
        subprocess.run(["bash", "-c", ".venv/bin/skyguard lab down"], cwd=config.REPO_ROOT, env=env,
                       capture_output=True, timeout=300)
    log = (tmp_path / "daemon.log").read_text(errors="replace") if (tmp_path / "daemon.log").exists() else ""

    def outcome(fragment: str) -> subprocess.CompletedProcess:
        return next(done for line, done in results if fragment in line and done is not None)

    report = "\n".join(f"$ {line}\n  -> {done.returncode if done else 'background'} "
                       f"{(done.stdout + done.stderr)[-600:] if done else ''}" for line, done in results)
    report += f"\n--- daemon log ---\n{log[-3000:]}"
    for line, done in results:
        if done is None or "ping" in line:
            continue
        assert done.returncode == 0, f"{line!r} failed\n{report}"
    assert outcome("ping").returncode != 0, report  # sandbox-never-corp: the ping is dropped
    swapped = outcome("curl")
    assert REAL_TOKEN not in swapped.stdout + swapped.stderr, "the real token reached the VM"
    assert int(outcome("grep -c").stdout.strip()) >= 1, report  # the upstream saw the real token
    assert "sandbox-never-corp" in outcome("flows --verdict deny").stdout or "agent1" in \
        outcome("flows --verdict deny").stdout, report
