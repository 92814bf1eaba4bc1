"""The one error root of skyguard, with a subclass per part.

Messages say what is wrong and what to do about it. A secret never enters a message. Only the
CLI edge (skyguard/cli/main.py) and the daemon catch these broadly.
"""


class SkyguardError(Exception):
    """A failure the user can act on. exit_code follows the CLI contract: 1 runtime, 2 bad input."""

    exit_code = 1


class BadInput(SkyguardError):
    """The user gave something invalid (a file, an argument); nothing was changed."""

    exit_code = 2


class PolicyError(BadInput):
    """A policy file is invalid. Carries every problem found, each naming file, line and key."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PrivilegeError(SkyguardError):
    """Root (or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN) is needed and missing."""


class DatapathError(SkyguardError):
    """Loading, attaching or programming the eBPF datapath failed. `errno` is the kernel's, where
    one call failed with one."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class LabError(SkyguardError):
    """Building, using or tearing down the lab failed."""


class DaemonError(SkyguardError):
    """The daemon is not running, not reachable, or refused a request."""


class LogError(SkyguardError):
    """The signed log is unreadable, inconsistent or fails verification."""


class DnsError(SkyguardError):
    """The DNS proxy failed."""


class CredentialError(SkyguardError):
    """The secret store or credential proxy failed. Never carries a secret value."""


class AdminError(SkyguardError):
    """The SSH access proxy failed."""
