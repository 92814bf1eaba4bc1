"""Unit tests of doctor's capability parsing: the part of the privilege check that needs no root."""

import pytest

from skyguard import doctor

STATUS_TEMPLATE = """Name:\tpython3
Umask:\t0022
State:\tR (running)
CapInh:\t0000000000000000
CapPrm:\t{prm}
CapEff:\t{eff}
CapBnd:\t000001ffffffffff
CapAmb:\t0000000000000000
"""


def status(eff: str, prm: str = "000001ffffffffff") -> str:
    return STATUS_TEMPLATE.format(eff=eff, prm=prm)


@pytest.mark.parametrize("eff, missing", [
    ("000001ffffffffff", []),                                        # full root
    ("000001fffeffffff", []),                                        # root minus CAP_SYS_RESOURCE
    ("0000000000000000", ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]),  # ordinary user
    (f"{(1 << 39) | (1 << 12):016x}", ["CAP_SYS_ADMIN"]),           # CAP_BPF + CAP_NET_ADMIN only
    (f"{(1 << 21) | (1 << 12):016x}", ["CAP_BPF"]),                 # old-style: SYS_ADMIN, no CAP_BPF
    ("00000000a80425fb", ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]),  # docker's default set
])
def test_missing_capabilities_from_effective_set(eff, missing):
    mask = doctor.parse_capabilities(status(eff))
    assert doctor.missing_capabilities(mask) == missing


def test_effective_set_is_read_not_permitted_set():
    text = status(eff="0000000000000000", prm="000001ffffffffff")
    assert doctor.parse_capabilities(text) == 0
    assert doctor.parse_capabilities(text, field="CapPrm") == 0x1FFFFFFFFFF


@pytest.mark.parametrize("text", ["", "Name:\tx\n", "CapEff:\tnot-hex\n"])
def test_unparseable_status_is_an_error_not_full_privileges(text):
    with pytest.raises(ValueError, match="CapEff"):
        doctor.parse_capabilities(text)


def test_check_result_serialises_every_field():
    check = doctor.Check("bpffs", False, "bpffs is not mounted", "mount -t bpf bpf /sys/fs/bpf")
    assert check.as_dict() == {"name": "bpffs", "ok": False, "detail": "bpffs is not mounted",
                               "fix": "mount -t bpf bpf /sys/fs/bpf"}
