"""The identity the app receives: a short-lived JWT (ES256, joserfc) signed by a key of this host
kept in the sealed store, in the app's identity header, the way Pomerium's and Teleport's
assertion headers work. The app verifies it against `skyguard apps jwks` and trusts only the
header, which the proxy always overwrites (any copy a client sent is stripped before).

Claims: iss "skyguard", aud the app's origin (https://host[:port]), sub the user, name, groups,
iat, exp (ASSERTION_TTL later), jti. Not here: who may have one (sessions.allowed).
"""

from __future__ import annotations

import secrets
import time

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from skyguard.policy.apps import App

ISSUER = "skyguard"
ASSERTION_TTL = 60  # seconds: long enough for one request's processing, short enough to be useless stolen
REUSE_FOR = 15  # seconds one signed assertion serves the same user's requests to the same app
KEY_NAME = "apps-assertion-key"  # the signing key's name in the sealed store (PEM, made on first use)


def new_key_pem() -> bytes:
    return ECKey.generate_key("P-256").as_pem(private=True)


class AssertionSigner:
    def __init__(self, key_pem: bytes):
        self._key = ECKey.import_key(bytes(key_pem))
        self.kid = self._key.thumbprint()
        self._key.ensure_kid()
        self._recent: dict[tuple, tuple[int, str]] = {}  # (host, listen, user, name, groups) -> (iat, token)

    def __repr__(self) -> str:
        return f"AssertionSigner(kid={self.kid!r})"

    def jwks(self) -> dict:
        public = self._key.as_dict(private=False)
        public.update(kid=self.kid, use="sig", alg="ES256")
        return {"keys": [public]}

    def sign(self, app: App, user: str, name: str, groups: tuple[str, ...], now: float | None = None) -> str:
        """A fresh assertion, or the one made for the same app, user and groups less than
        REUSE_FOR seconds ago (signing on every request was a third of the proxy's time per
        request): an app always receives one with at least ASSERTION_TTL - REUSE_FOR to live."""
        now = int(time.time() if now is None else now)
        key = (app.host, app.listen, user, name, groups)  # host and listen make the audience (app.origin)
        cached = self._recent.get(key)
        if cached is not None and now - cached[0] < REUSE_FOR:
            return cached[1]
        claims = {"iss": ISSUER, "aud": app.origin, "sub": user, "name": name, "groups": list(groups),
                  "iat": now, "nbf": now, "exp": now + ASSERTION_TTL, "jti": secrets.token_urlsafe(12)}
        token = jwt.encode({"alg": "ES256", "typ": "JWT", "kid": self.kid}, claims, self._key)
        if len(self._recent) >= 10_000:
            self._recent.clear()
        self._recent[key] = (now, token)
        return token


def verify(token: str, jwks: dict, audience: str, now: float | None = None) -> dict:
    """What an app does with the header (and what the tests do): the claims, or joserfc's error."""
    decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"])  # type: ignore[arg-type]
    registry = jwt.JWTClaimsRegistry(now=int(time.time() if now is None else now),
                                     iss={"essential": True, "value": ISSUER},
                                     aud={"essential": True, "value": audience}, exp={"essential": True})
    registry.validate(decoded.claims)
    return decoded.claims
