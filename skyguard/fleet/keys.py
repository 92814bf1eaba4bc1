"""Where the fleet keeps what in its store: one place for every key.

    /skyguard/fleet/members/<name>               status and keys, under the member's lease
    /skyguard/fleet/policy                       the pushed policy: {note, text} (signing.py)
    /skyguard/fleet/checkpoints/<name>           the member's latest checkpoint note and proofs
    /skyguard/fleet/cosignatures/<log>/<witness> a witness's cosigned checkpoint of a member's log
    /skyguard/fleet/alerts/<log>/<witness>       a witness's refusal to cosign (a tamper event)
"""

ROOT = "/skyguard/fleet/"
MEMBERS = ROOT + "members/"
POLICY = ROOT + "policy"
CHECKPOINTS = ROOT + "checkpoints/"
COSIGNATURES = ROOT + "cosignatures/"
ALERTS = ROOT + "alerts/"


def member(name: str) -> str:
    return MEMBERS + name


def checkpoint(name: str) -> str:
    return CHECKPOINTS + name


def cosignatures_of(name: str) -> str:
    return f"{COSIGNATURES}{name}/"


def cosignature(log_name: str, witness: str) -> str:
    return f"{COSIGNATURES}{log_name}/{witness}"


def alert(log_name: str, witness: str) -> str:
    return f"{ALERTS}{log_name}/{witness}"
