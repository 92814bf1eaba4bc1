"""The Vagrant setup, checked where no VM can boot: `vagrant validate` accepts the Vagrantfile (and
rejects a broken one, so the check can fail), every machine is provisioned by the same
scripts/setup the README's commands run (read from what the Vagrantfile really declares, by
evaluating it in Ruby against a recorder of Vagrant's configuration calls), and run-suite refuses
bad usage and says plainly when no VM can boot."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
GUEST_PROJECT = "/skyguard"

# A stand-in for Vagrant's DSL: records every configuration call (name, args, options, nested).
RUBY_RECORDER = r'''
require "json"
class Recorder
  attr_reader :calls
  def initialize; @calls = []; end
  def method_missing(name, *args, **opts, &block)
    child = Recorder.new
    @calls << { "call" => name.to_s, "args" => args, "opts" => opts, "inner" => child.calls }
    block.call(child) if block
    child
  end
  def respond_to_missing?(*args); true; end
end
module Vagrant
  def self.configure(_version)
    config = Recorder.new
    yield config
    puts JSON.generate(config.calls)
  end
end
load ARGV[0]
'''


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"`{tool}` is not installed: run scripts/setup (it installs vagrant, which "
                    "brings ruby)")
    return path


def vagrant_validate(vagrantfile_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VAGRANT_CWD": str(vagrantfile_dir),
           "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotfile")}
    return subprocess.run([need("vagrant"), "validate"], capture_output=True, text=True, env=env,
                          timeout=120)


def declared(vagrantfile: Path) -> list[dict]:
    """Every configuration call, flattened, each tagged with the machine it belongs to (None =
    all machines)."""
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"dcx-vagrant-recorder-{os.getpid()}.rb"
    script.write_text(RUBY_RECORDER)
    try:
        out = subprocess.run([need("ruby"), str(script), str(vagrantfile)], capture_output=True,
                             text=True, timeout=60, check=True)
    finally:
        script.unlink()
    flat = []

    def walk(calls, machine):
        for c in calls:
            inner_machine = c["args"][0] if c["call"] == "define" else machine
            flat.append({**c, "machine": machine})
            walk(c["inner"], inner_machine)
    walk(json.loads(out.stdout), None)
    return flat


def provisioners(calls, machine):
    return [c for c in calls if c["call"] == "provision" and c["machine"] in (None, machine)]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"^\./(scripts/\w+)", text, flags=re.M)


def invokes_setup(script: Path) -> bool:
    return any(re.match(r"\s*(exec\s+)?(\./)?scripts/setup\b", line)
               for line in script.read_text().splitlines())


def test_vagrant_validate_accepts_the_vagrantfile(tmp_path):
    result = vagrant_validate(VAGRANT_DIR, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


@pytest.mark.parametrize("original, broken, complaint", [
    ("config.vm.box = BOX", "config.vm.box = BOX\n  config.vm.no_such_setting = 1", "no_such_setting"),
    ('machine.vm.provision "setup", **SETUP', 'machine.vm.provision "setup", type: "shell"',
     "`path` or `inline` must be set"),
])
def test_vagrant_validate_rejects_a_broken_vagrantfile(tmp_path, original, broken, complaint):
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert original in text
    (tmp_path / "Vagrantfile").write_text(text.replace(original, broken, 1))
    result = vagrant_validate(tmp_path, tmp_path)
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr


def test_two_debian_12_machines_with_the_project_synced():
    calls = declared(VAGRANT_DIR / "Vagrantfile")
    assert [c["args"][0] for c in calls if c["call"] == "box="] == ["debian/bookworm64"]
    assert sorted(c["args"][0] for c in calls if c["call"] == "define") == ["backports", "stable"]
    synced = {c["args"][1]: c for c in calls if c["call"] == "synced_folder"}
    assert Path(synced[GUEST_PROJECT]["args"][0]) == REPO
    assert synced["/vagrant"]["opts"] == {"disabled": True}
    assert sorted(c["args"][0] for c in calls if c["call"] == "provider") == ["libvirt", "virtualbox"]


@pytest.mark.parametrize("machine", ["stable", "backports"])
def test_every_machine_is_provisioned_by_the_readmes_scripts_setup(machine):
    # The README's commands both go through scripts/setup ...
    commands = readme_commands()
    assert "scripts/test" in commands and "scripts/demo" in commands, commands
    for command in commands:
        assert invokes_setup(REPO / command), f"README's ./{command} does not run scripts/setup"
    # ... and so does every machine, as its last provisioning step, from the synced project.
    steps = provisioners(declared(VAGRANT_DIR / "Vagrantfile"), machine)
    assert steps, f"machine {machine} has no provisioning"
    last = steps[-1]
    assert last["opts"]["type"] == "shell"
    assert last["opts"]["inline"].strip() == f"{GUEST_PROJECT}/scripts/setup"
    assert last["opts"].get("privileged", True) is True


def test_no_second_recipe_only_the_backports_kernel_is_extra():
    setup = (REPO / "scripts" / "setup").read_text()
    apt_block = re.search(r"APT_PACKAGES=\((.*?)\n\)", setup, flags=re.S).group(1)
    packages = {w for line in apt_block.splitlines() for w in line.split("#")[0].split()}
    assert "python3-bpfcc" in packages
    calls = declared(VAGRANT_DIR / "Vagrantfile")
    names = {m: [c["args"][0] for c in provisioners(calls, m)] for m in ("stable", "backports")}
    assert names == {"stable": ["setup"],
                     "backports": ["newest-kernel", "boot-newest-kernel", "setup"]}
    kernel_step = provisioners(calls, "backports")[0]["opts"]
    assert "bookworm-backports" in kernel_step["inline"]
    assert "linux-image-amd64" in kernel_step["inline"]
    duplicated = {p for p in packages - {"linux-headers-amd64"}
                  if re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", kernel_step["inline"])}
    assert duplicated == set(), "the Vagrantfile repeats scripts/setup's packages"
    for word in ("pip ", "venv", "mount -t bpf"):
        assert word not in kernel_step["inline"]
    assert provisioners(calls, "backports")[1]["opts"].get("reboot") is True


def test_run_suite_says_plainly_when_no_vm_can_boot_and_refuses_bad_usage():
    run_suite = VAGRANT_DIR / "run-suite"
    preflight = subprocess.run([str(run_suite), "--preflight"], capture_output=True, text=True,
                               timeout=60)
    if preflight.returncode == 0:
        assert "can boot a VM here" in preflight.stdout
    else:
        assert preflight.returncode == 3 and "Vagrant" in preflight.stdout
    for bad in (["--machine", "nope"], ["--tiers", "unit nope"], ["--no-such-flag"]):
        out = subprocess.run([str(run_suite), *bad], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (bad, out.stderr)
    unknown = subprocess.run([str(run_suite), "--provider", "no-such-hypervisor"],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 3 and "no-such-hypervisor" in unknown.stderr


def test_the_one_command_is_documented_where_users_look():
    assert "vagrant/run-suite" in (REPO / "README.md").read_text()
    vagrant_readme = (VAGRANT_DIR / "README.md").read_text()
    for word in ("run-suite", "--keep", "--machine", "backports", "vagrant/results", "libvirt",
                 "VirtualBox", "scripts/setup"):
        assert word in vagrant_readme, word
