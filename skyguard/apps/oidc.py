"""The identity-aware proxy's side of OpenID Connect: discovery, the authorization-code flow with
PKCE (Authlib's OAuth 2 client), the ID token's checks (joserfc: signature against the issuer's
JWKS, iss, aud, exp/nbf/iat, nonce; `alg: none` and HMAC never accepted), and userinfo for the
periodic re-check of a signed-in user. Every token check is the libraries'; this module only
says which claims must hold which values.

Fails closed: an issuer that cannot be reached or answers nonsense is an IssuerUnavailable (the
proxy shows a clear page and lets nobody in); a token that fails a check is a TokenRejected
with the reason the decision log records. Not here: cookies and sessions (sessions.py), HTTP
serving (proxy.py).
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from skyguard.errors import SkyguardError
from skyguard.policy.apps import Identity

SCOPE = "openid profile email groups"
HTTP_TIMEOUT = 10.0  # seconds for any one call to the issuer
# Seconds the discovery document and JWKS are kept: at most the policy's session_check too, so a
# sign-in begun while the issuer is down gets skyguard's page saying so, not a redirect to nowhere.
DISCOVERY_TTL = 300.0
# Asymmetric algorithms only: an HMAC-signed ID token would be keyed with the client secret,
# which is not how this proxy's issuers sign; `none` is never in the list.
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
CLOCK_LEEWAY = 30  # seconds of clock difference tolerated on exp/nbf/iat
# What the proxy uses of the discovery document: each an https URL, or the issuer is unusable.
ENDPOINTS = ("jwks_uri", "authorization_endpoint", "token_endpoint", "userinfo_endpoint")


class AppsError(SkyguardError):
    """The identity-aware proxy cannot do what was asked."""


class IssuerUnavailable(AppsError):
    """The OpenID provider could not be reached or gave an unusable answer: fail closed."""


class TokenRejected(AppsError):
    """A token or callback failed a check; `reason` is the decision log's reason word."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class SignIn:
    """What the proxy keeps of a sign-in: never the ID token itself."""

    user: str  # preferred_username, else sub
    subject: str
    name: str
    groups: tuple[str, ...]
    access_token: str

    def __repr__(self) -> str:  # the access token never reaches a log line
        return f"SignIn(user={self.user!r}, groups={self.groups!r})"


def groups_of(claims: dict, claim: str) -> tuple[str, ...]:
    value = claims.get(claim, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    return tuple(sorted({g for g in value if isinstance(g, str)}))


def user_of(claims: dict) -> str:
    name = claims.get("preferred_username")
    return name if isinstance(name, str) and name else str(claims["sub"])


def check_id_token(id_token: str, keys: KeySet, *, issuer: str, client_id: str, nonce: str,
                   now: float | None = None) -> dict:
    """The ID token's claims, or TokenRejected: signature by a key of the issuer's JWKS with an
    asymmetric algorithm, iss, aud (and azp when several audiences), exp/nbf/iat, nonce."""
    try:
        token = jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
    except JoseError as e:
        raise TokenRejected("id_token_signature", type(e).__name__) from None
    except ValueError as e:  # joserfc raises ValueError for some malformed compact forms
        raise TokenRejected("id_token_malformed", type(e).__name__) from None
    registry = jwt.JWTClaimsRegistry(
        now=int(now if now is not None else time.time()), leeway=CLOCK_LEEWAY,
        iss={"essential": True, "value": issuer}, sub={"essential": True},
        aud={"essential": True, "value": client_id}, exp={"essential": True}, iat={"essential": True},
        nonce={"essential": True, "value": nonce})
    try:
        registry.validate(token.claims)
    except JoseError as e:
        claim = getattr(e, "claim", "") or getattr(e, "error", "") or type(e).__name__
        raise TokenRejected(f"id_token_{claim}", type(e).__name__) from None
    audiences = token.claims["aud"] if isinstance(token.claims["aud"], list) else [token.claims["aud"]]
    if len(audiences) > 1 and token.claims.get("azp") != client_id:
        raise TokenRejected("id_token_azp", "several audiences and azp is not this client")
    return token.claims


class IssuerClient:
    """One issuer, one client. Use on the event loop."""

    def __init__(self, identity: Identity, client_secret: bytes, ca_file: str | None = None):
        self.identity = identity
        self._secret = client_secret.decode("utf-8")
        self._tls = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self._discovery: dict | None = None
        self._keys: KeySet | None = None
        self._fetched_at = 0.0

    def __repr__(self) -> str:
        return f"IssuerClient({self.identity.issuer!r}, client_id={self.identity.client_id!r})"

    def _client(self, redirect_uri: str | None = None) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(self.identity.client_id, self._secret, scope=SCOPE, redirect_uri=redirect_uri,
                                 code_challenge_method="S256", verify=self._tls, timeout=HTTP_TIMEOUT,
                                 token_endpoint_auth_method="client_secret_basic")

    async def discover(self, refresh: bool = False) -> dict:
        """The discovery document (checked to name this issuer) and the JWKS, cached."""
        fresh = min(DISCOVERY_TTL, self.identity.session_check)
        if self._discovery is not None and not refresh and time.monotonic() - self._fetched_at < fresh:
            return self._discovery
        url = self.identity.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            async with httpx.AsyncClient(verify=self._tls, timeout=HTTP_TIMEOUT) as http:
                document = (await http.get(url)).raise_for_status().json()
                if not isinstance(document, dict):
                    raise IssuerUnavailable(f"the discovery document at {url} is not a JSON object")
                if document.get("issuer") != self.identity.issuer:
                    raise IssuerUnavailable(f"the discovery document at {url} names issuer "
                                            f"{str(document.get('issuer'))[:200]!r}, not {self.identity.issuer!r}")
                unusable = [k for k in ENDPOINTS if not isinstance(document.get(k), str)
                            or urlsplit(document[k]).scheme != "https" or not urlsplit(document[k]).hostname]
                if unusable:
                    raise IssuerUnavailable(f"the discovery document at {url} has no https URL for "
                                            f"{', '.join(unusable)}")
                keys = KeySet.import_key_set((await http.get(document["jwks_uri"])).raise_for_status().json())
        except IssuerUnavailable:
            raise
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, KeyError, TypeError, JoseError) as e:
            raise IssuerUnavailable(f"identity provider {self.identity.issuer} unavailable: {type(e).__name__}") from None
        self._discovery, self._keys, self._fetched_at = document, keys, time.monotonic()
        return document

    async def authorization_url(self, redirect_uri: str) -> tuple[str, str, str, str]:
        """(URL to send the browser to, state, nonce, PKCE code verifier)."""
        document = await self.discover()
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        async with self._client(redirect_uri) as client:
            url, _ = client.create_authorization_url(document["authorization_endpoint"], state=state,
                                                     nonce=nonce, code_verifier=verifier)
        return url, state, nonce, verifier

    async def finish(self, code: str, redirect_uri: str, nonce: str, verifier: str) -> SignIn:
        """Exchange the code (with the PKCE verifier) and check the ID token."""
        document = await self.discover()
        try:
            async with self._client(redirect_uri) as client:
                token = await client.fetch_token(document["token_endpoint"], code=code, code_verifier=verifier,
                                                 grant_type="authorization_code")
        except httpx.HTTPError as e:
            raise IssuerUnavailable(f"identity provider {self.identity.issuer} unavailable: {type(e).__name__}") from None
        except Exception as e:  # Authlib's OAuth errors (invalid_grant: a used or forged code)
            raise TokenRejected("code_exchange_refused", getattr(e, "error", type(e).__name__)) from None
        if "id_token" not in token:
            raise TokenRejected("no_id_token")
        try:
            claims = check_id_token(token["id_token"], self._keys, issuer=self.identity.issuer,
                                    client_id=self.identity.client_id, nonce=nonce)
        except TokenRejected as first:
            if first.reason != "id_token_signature":
                raise
            await self.discover(refresh=True)  # the issuer may have rotated its keys
            claims = check_id_token(token["id_token"], self._keys, issuer=self.identity.issuer,
                                    client_id=self.identity.client_id, nonce=nonce)
        return SignIn(user_of(claims), str(claims["sub"]), str(claims.get("name") or user_of(claims)),
                      groups_of(claims, self.identity.groups_claim), str(token.get("access_token", "")))

    async def userinfo(self, access_token: str, subject: str) -> tuple[str, ...] | None:
        """The user's groups now, or None when the issuer no longer accepts the session's token
        (signed out there, or removed). IssuerUnavailable when it cannot be asked."""
        document = await self.discover()
        try:
            async with httpx.AsyncClient(verify=self._tls, timeout=HTTP_TIMEOUT) as http:
                answer = await http.get(document["userinfo_endpoint"],
                                        headers={"Authorization": f"Bearer {access_token}"})
        except (httpx.HTTPError, httpx.InvalidURL, KeyError) as e:
            raise IssuerUnavailable(f"identity provider {self.identity.issuer} unavailable: {type(e).__name__}") from None
        if answer.status_code in (401, 403):
            return None
        try:
            claims = answer.raise_for_status().json()
        except (httpx.HTTPError, ValueError) as e:
            raise IssuerUnavailable(f"identity provider {self.identity.issuer} gave no userinfo: {type(e).__name__}") from None
        if not isinstance(claims, dict) or claims.get("sub") != subject:  # OIDC Core 5.3.2
            return None
        return groups_of(claims, self.identity.groups_claim)
