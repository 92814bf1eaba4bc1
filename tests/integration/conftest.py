"""Integration-tier fixtures: a session-scoped `lab` built once for policies/keysystems.yaml.

The lab gets a prefix unique to this test run (so parallel runs and a developer's own lab never
collide) and a state folder under pytest's temporary directory. Other parts' integration tests
reuse it: `def test_x(lab): lab.exec("radius1", [...])`; `lab_env` is the environment for running
the CLI against it. It is torn down at the end of the session.
"""

import os

import pytest

from skyguard import config
from skyguard.lab import Lab


def lab_prefix(tag: str = "") -> str:
    """A namespace prefix unique to this process: 't<pid><tag>-' (at most 16 characters)."""
    return f"t{os.getpid() % 1000000}{tag}-"


@pytest.fixture(scope="session")
def labs_dir(tmp_path_factory):
    """Parent folder of every lab's state in this session (what SKYGUARD_LAB_DIR would name)."""
    return tmp_path_factory.mktemp("labs")


@pytest.fixture(scope="session")
def lab_env(lab):
    """Environment for running `skyguard ...` as a subprocess against the session lab."""
    return dict(os.environ, SKYGUARD_LAB_PREFIX=lab.prefix, SKYGUARD_LAB_DIR=str(lab.lab_dir.parent),
                PYTHONPATH=str(config.REPO_ROOT))


@pytest.fixture(scope="session")
def lab(root, labs_dir):
    prefix = lab_prefix()
    the_lab = Lab(policy_path=config.DEFAULT_POLICY, prefix=prefix, lab_dir=labs_dir / prefix,
                  progress=lambda message: None)
    the_lab.up()
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """A software TPM (swtpm, Debian's) for one test module: started fresh, stopped at its end."""
    from support.swtpm_support import Swtpm

    emu = Swtpm(tmp_path_factory.mktemp("swtpm"))
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory):
    """A real 3-member etcd cluster on loopback (Debian's etcd) for one test module, ready when
    given; every member stopped by pid at the end (SIGKILL after 5 s)."""
    from support.etcd_support import LocalEtcdCluster

    cluster = LocalEtcdCluster(tmp_path_factory.mktemp("etcd"))
    try:
        with cluster:
            yield cluster
    finally:
        cluster.stop_all()  # members a test stopped and started again included
