"""vagrant/run-suite's orchestration, where no VM can boot: stand-ins for the `vagrant`, `scp` and
`VBoxManage` commands record what run-suite asks of them, so the sequence a user relies on is
checked (up, doctor, every tier with --junitxml as root with CI=true, bench when asked, results
copied back, destroy unless --keep, a failed tier fails the run but not the clean-up). The real
VM run is the vm tier (tests/vm); the Vagrantfile itself is checked by `vagrant validate`."""

import os
import subprocess
from pathlib import Path

import pytest

RUN_SUITE = Path(__file__).resolve().parents[2] / "vagrant" / "run-suite"

FAKE_VAGRANT = r'''#!/bin/bash
# Stand-in for vagrant: logs each call; `ssh -c` fails when the command mentions $FAIL_WHEN.
printf '%s\n' "$*" >> "$CALL_LOG"
case $1 in
  status) echo "1,$2,state,${FAKE_STATE:-not_created}" ;;
  ssh-config) echo "Host $2" ;;
  ssh)
    cmd=${@: -1}
    if [[ -n ${FAIL_WHEN:-} && $cmd == *"$FAIL_WHEN"* ]]; then exit 1; fi ;;
esac
exit 0
'''
FAKE_SCP = r'''#!/bin/bash
printf 'scp %s\n' "$*" >> "$CALL_LOG"
dest=${@: -1}
touch "$dest/junit-unit.xml" "$dest/doctor.json"
'''
FAKE_VBOXMANAGE = "#!/bin/bash\necho 7.0.0\n"


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("vagrant", FAKE_VAGRANT), ("scp", FAKE_SCP), ("VBoxManage", FAKE_VBOXMANAGE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def run_suite(fakes: Path, *args: str, **env_extra):
    log = fakes / "calls.log"
    log.unlink(missing_ok=True)
    env = {"PATH": f"{fakes / 'bin'}:/usr/bin:/bin", "CALL_LOG": str(log), "HOME": str(fakes),
           **env_extra}
    result = subprocess.run([str(RUN_SUITE), *args], capture_output=True, text=True, env=env,
                            timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, [c for c in calls if c != "plugin list"]  # the provider preflight's probe


def ssh_commands(calls):
    return [c.split(" -c ", 1)[1] for c in calls if c.startswith("ssh ") and " -c " in c]


def test_default_run_goes_up_tests_every_tier_copies_results_and_destroys(fakes):
    result, calls = run_suite(fakes)
    assert result.returncode == 0, result.stderr
    assert calls[0] == "status stable --machine-readable"
    assert calls[1] == "up stable --provider virtualbox"
    assert not any(c.startswith("provision") for c in calls), "a new VM is provisioned by up"
    commands = ssh_commands(calls)
    assert any("skyguard.cli.main doctor --json" in c for c in commands)
    for tier in ("unit", "bpf", "integration"):
        assert any(f"CI=true scripts/test -m {tier} --junitxml=" in c and c.count("sudo") == 1
                   for c in commands), tier
    assert not any("bench/run" in c for c in commands)
    assert any(c.startswith("scp ") and c.endswith("/results/stable/") for c in calls)
    assert calls[-1] == "destroy -f stable"


def test_keep_leaves_the_vm_and_a_kept_vm_is_set_up_again(fakes):
    result, calls = run_suite(fakes, "--keep", FAKE_STATE="running")
    assert result.returncode == 0, result.stderr
    assert "provision stable --provision-with setup" in calls
    assert not any(c.startswith("destroy") for c in calls)
    assert "keeping the VM" in result.stderr


def test_a_failed_tier_fails_the_run_but_later_tiers_run_and_the_vm_is_destroyed(fakes):
    result, calls = run_suite(fakes, FAIL_WHEN="-m bpf")
    assert result.returncode == 1
    assert "tier bpf FAILED" in result.stderr
    assert any("-m integration" in c for c in ssh_commands(calls))
    assert calls[-1] == "destroy -f stable"


def test_bench_and_both_machines(fakes):
    result, calls = run_suite(fakes, "--machine", "all", "--bench")
    assert result.returncode == 0, result.stderr
    assert [c.split()[1] for c in calls if c.startswith("up ")] == ["stable", "backports"]
    assert sum("bench/run all" in c for c in ssh_commands(calls)) == 2
    assert [c for c in calls if c.startswith("destroy")] == ["destroy -f stable",
                                                             "destroy -f backports"]


def test_no_provider_is_exit_3_naming_vagrant_and_touching_nothing(fakes):
    os.remove(fakes / "bin" / "VBoxManage")
    result, calls = run_suite(fakes)
    assert result.returncode == 3
    assert "Vagrant provider" in result.stderr or "no Vagrant provider" in result.stderr
    assert not any(c.startswith(("up", "destroy")) for c in calls)
