"""One-time console tickets: what admits an operator to one console target, once.

A ticket names an operator (and their groups), a target, an expiry, and a password of 8
characters: 8 is all VNC authentication carries, so a native VNC client types the ticket as its
VNC password, and skyguard finds the ticket whose DES response matches (there are few
outstanding). The web console hands its ticket to the browser's WebSocket the same way. Tickets
are files in a root-only folder (0700, each file 0600), so `skyguard admin console-ticket` (run by
an administrator on the host) and the daemon share them without a socket; redeeming one deletes
its file, and of two racing redeemers only the one whose unlink succeeds gets it.

Every method touches the disk (it may stall: a hung or frozen filesystem), so the proxy calls
them through its own bounded threads (skyguard/diskwork.py), never on its event loop: `load` and
`consume` off the loop, and `match_vnc`/`match_token` (no I/O) on it, so that its guess limiter
judges each VNC guess at once (console/session.py). `issue`, `redeem_vnc` and `redeem_token` do all
of it in one call, for the CLI and other callers off any loop.

Issuing a ticket does not grant access: the proxy checks the policy in force when it is used.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from skyguard import fsutil
from skyguard.console.rfb import vnc_auth_response
from skyguard.errors import BadInput

ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"  # no 0/O, 1/l/I
PASSWORD_LENGTH = 8  # VNC authentication uses 8 bytes of the password, no more
TICKET_TTL = 120.0  # seconds a ticket may wait to be used
WEB_TOKEN_BYTES = 24  # the web console's tickets: 192 random bits
MAX_OUTSTANDING = 64  # unused tickets at once: bounds the DES trials per login
# Unused tickets of one operator: another one drops their oldest, so one operator asking in a loop
# (or the web console's page, clicked again and again) cannot use up MAX_OUTSTANDING for everyone.
MAX_PER_OPERATOR = 8


@dataclass(frozen=True)
class Ticket:
    id: str
    operator: str
    groups: tuple[str, ...]
    target: str
    expires: float
    password: str

    def __repr__(self) -> str:  # never the password
        return f"Ticket({self.id}, {self.operator} -> {self.target})"


class TicketBook:
    def __init__(self, directory: Path | str, ttl: float = TICKET_TTL):
        self.directory = Path(directory)
        self.ttl = ttl

    def issue(self, operator: str, target: str, groups: tuple[str, ...] = (), web: bool = False) -> Ticket:
        """A new ticket. `web`: for the web console's WebSocket, a long token instead of a VNC
        password (a URL carries any length; VNC authentication never accepts a web ticket)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        live = self.load()
        mine = sorted((t for t in live if t.operator == operator), key=lambda t: t.expires)
        for old in mine[:max(0, len(mine) - MAX_PER_OPERATOR + 1)]:
            (self.directory / f"{old.id}.json").unlink(missing_ok=True)
            live.remove(old)
        if len(live) >= MAX_OUTSTANDING:
            raise BadInput(f"{len(live)} console tickets are waiting to be used (at most {MAX_OUTSTANDING}); "
                           f"wait for some to expire ({self.ttl:.0f} s)")
        password = secrets.token_urlsafe(WEB_TOKEN_BYTES) if web else \
            "".join(secrets.choice(ALPHABET) for _ in range(PASSWORD_LENGTH))
        ticket = Ticket(secrets.token_hex(8), operator, tuple(groups), target, time.time() + self.ttl, password)
        value = {"operator": operator, "groups": list(groups), "target": target, "expires": ticket.expires,
                 "password": ticket.password}
        fsutil.write_private(self.directory / f"{ticket.id}.json", json.dumps(value).encode())
        return ticket

    def redeem_vnc(self, challenge: bytes, response: bytes) -> Ticket | None:
        """The ticket whose password answers `challenge` with `response`, consumed; else None."""
        ticket = match_vnc(self.load(), challenge, response)
        return ticket if ticket is not None and self.consume(ticket) else None

    def redeem_token(self, token: str) -> Ticket | None:
        """The web ticket `token`, consumed; else None (unknown, used, expired, or a VNC password)."""
        ticket = match_token(self.load(), token)
        return ticket if ticket is not None and self.consume(ticket) else None

    def consume(self, ticket: Ticket) -> bool:
        """Use `ticket` up: True for the one caller whose delete succeeds, False for any other
        (another connection redeemed it first), whatever threads or processes race for it."""
        try:
            os.unlink(self.directory / f"{ticket.id}.json")
            return True
        except FileNotFoundError:
            return False

    def load(self) -> list[Ticket]:
        """The tickets not yet used nor expired (expired ones are deleted on the way)."""
        now, live = time.time(), []
        for path in self.directory.glob("*.json") if self.directory.is_dir() else ():
            try:
                v = json.loads(fsutil.read_regular_file(path))  # a FIFO is refused (skipped), never waited on
                ticket = Ticket(path.stem, v["operator"], tuple(v["groups"]), v["target"], float(v["expires"]),
                                v["password"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half-written or damaged: never admits anyone
            if ticket.expires < now:
                path.unlink(missing_ok=True)
            else:
                live.append(ticket)
        return live


def match_vnc(tickets: list[Ticket], challenge: bytes, response: bytes) -> Ticket | None:
    """The VNC ticket of `tickets` whose password answers `challenge` with `response` (no I/O)."""
    for ticket in tickets:
        if len(ticket.password) != PASSWORD_LENGTH:
            continue  # a web ticket: DES would use only its first 8 characters
        if hmac.compare_digest(vnc_auth_response(ticket.password.encode(), challenge), response):
            return ticket
    return None


def match_token(tickets: list[Ticket], token: str) -> Ticket | None:
    """The web ticket of `tickets` that is `token` (no I/O)."""
    for ticket in tickets:
        if len(ticket.password) > PASSWORD_LENGTH and hmac.compare_digest(ticket.password.encode(), token.encode()):
            return ticket
    return None
