"""The credential proxy, TLS termination and their steering as one part the daemon hosts: the
only wiring of this package (the daemon passes in the store, the decision log, the metrics
registry and the DNS-learning lookup). It has the shape of every loop-hosted part:
`await start()`, `await set_policy(policy)`, `await stop()`, all on the event loop.

The service always exists; what runs follows the policy. Credentials → the proxy listens and
the credential zones' HTTP(S) is steered to it; tls_termination entries → one listener each
and their steering; neither → nothing listens and the steering table is gone. set_policy moves
between any two of these, in either direction.

Order matters and is fixed here: listeners first, then steering (so nothing is redirected to a
port that does not listen yet); listeners that are no longer needed close after the steering
stopped pointing at them. Not here: policy parsing, DNS, the signed log itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from skyguard.credproxy.ca import CertificateAuthority
from skyguard.credproxy.interfaces import CredentialMetrics, DecisionLog, SecretSource
from skyguard.credproxy.proxy import CredentialProxy, ProxyLimits
from skyguard.credproxy.steering import CredentialSteering, TerminationSteer
from skyguard.credproxy.termination import TlsTerminator
from skyguard.errors import CredentialError
from skyguard.keys.tlskey import ClientCertificate, client_certificates_of
from skyguard.parts import Degraded
from skyguard.policy.model import Policy

CA_SUBDIR = "ca"
MAX_LEARNED_PER_NAME = 256  # steered addresses remembered per destination name (re-installs)


class CredentialService:
    """Everything credential-related, for whatever policy is in force. On the event loop:

        service = CredentialService(policy, store, state_dir=..., decision_log=log, registry=registry,
                                    address_matches=lambda name, ip: learned_dns.answered(name, ip, time.time()))
        await service.start()              # fine for a policy with nothing to do
        await service.set_policy(other)    # hot swap: every later request is decided under `other`
        service.learned("api.github.com", "140.82.112.6")  # only with steer_all_destinations=False
        await service.stop()

    start and set_policy put in place all they can, then raise parts.Degraded naming what they
    could not (a certificate missing from the store, nft refusing the rules)."""

    def __init__(
        self,
        policy: Policy,
        secrets: SecretSource,
        *,
        state_dir: Path,
        decision_log: DecisionLog,
        registry: CollectorRegistry | None,
        address_matches: Callable[[str, str], bool],
        upstream_ca_file: str | None = None,
        upstream_cas: Sequence[str] = (),
        client_certificates: dict[str, ClientCertificate] | None = None,
        content_patterns: Sequence[str] = (),
        listen: Sequence[str] = ("0.0.0.0", "::"),
        http_port: int = 0,
        https_port: int = 0,
        steer_all_destinations: bool = True,
        nft: Sequence[str] = ("nft",),
        limits: ProxyLimits = ProxyLimits(),
    ):
        """upstream_ca_file, upstream_cas: CA bundles trusted for upstream TLS in addition to
        the system store (the lab's CA, for example). client_certificates: {destination:
        ClientCertificate} presented besides those each policy names itself
        (credentials[].client_certificate, which win)."""
        self.policy = policy
        self.secrets = secrets
        self.state_dir = Path(state_dir)
        self.decision_log = decision_log
        self.address_matches = address_matches
        self.upstream_cas = tuple(p for p in (upstream_ca_file, *upstream_cas) if p)
        self.client_certificates = dict(client_certificates or {})
        self.content_patterns = tuple(content_patterns)
        self.limits = limits
        self.metrics = CredentialMetrics(registry)
        self.listen = list(listen)
        self.terminator = TlsTerminator(policy, secrets, decision_log=decision_log, metrics=self.metrics,
                                        listen=self.listen)
        self.ports = (http_port, https_port)
        self.steer_all_destinations = steer_all_destinations
        self.nft = tuple(nft)
        self.proxy: CredentialProxy | None = None  # created when a policy first has credentials
        self.proxy_ports: tuple[int, int] | None = None  # while the proxy listens
        self.steering: CredentialSteering | None = None  # while the table is installed
        self._ca: CertificateAuthority | None = None
        self._learned: dict[str, set[str]] = {}
        self._started = False
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"CredentialService({self.policy.name!r})"

    @property
    def ca(self) -> CertificateAuthority:
        """The interception CA (created under the state directory on first use)."""
        if self._ca is None:
            self._ca = CertificateAuthority(self.state_dir / CA_SUBDIR)
        return self._ca

    @property
    def destinations(self) -> set[str]:
        return {name for credential in self.policy.credentials for name in credential.destinations}

    # ---- the part's shape -------------------------------------------------------------------

    async def start(self) -> None:
        async with self._lock:
            self._started = True
            await self._apply(self.policy)

    async def set_policy(self, policy: Policy, *, content_patterns: Sequence[str] | None = None) -> None:
        """Swap to `policy`, with the client certificates it names (None keeps the content
        patterns). Before start(), it only records the policy."""
        async with self._lock:
            if content_patterns is not None:
                self.content_patterns = tuple(content_patterns)
            if not self._started:
                self.policy = policy
                self.terminator.policy = policy
                return
            await self._apply(policy)

    async def stop(self) -> None:
        async with self._lock:
            self._started = False
            if self.steering is not None:
                steering, self.steering = self.steering, None
                await asyncio.to_thread(steering.remove)
            await self.terminator.stop()
            if self.proxy_ports is not None:
                self.proxy_ports = None
                await self.proxy.stop()

    def learned(self, name: str, address: str) -> None:
        """DNS learned `address` for `name`: steer it if it is a credential destination."""
        name = name.lower().rstrip(".")
        if name not in self.destinations:
            return
        known = self._learned.setdefault(name, set())
        if address not in known and len(known) < MAX_LEARNED_PER_NAME:
            known.add(address)
        if self.steering is not None:
            self.steering.add_address(address)

    # ---- moving from what runs to what the policy needs ---------------------------------------

    async def _apply(self, policy: Policy) -> None:
        problems: list[str] = []
        self.policy = policy
        # A credential whose secret is not in the store cannot be swapped: it is left out, so its
        # zone's traffic is not steered for it (the placeholder goes out as it is, useless to
        # anyone) and nothing else of the zone is intercepted for a swap that cannot happen.
        missing = [c for c in policy.credentials if not await asyncio.to_thread(self._has_secret, c.secret)]
        if missing:
            problems += [f"credential {c.name!r}: secret {c.secret!r} is not in the store, so its swap is "
                         f"off; add it with `skyguard secret set {c.secret}`" for c in missing]
            policy = dataclasses.replace(policy, credentials=tuple(c for c in policy.credentials if c not in missing))
        # 1. Listeners the policy needs, up (or their state swapped) before steering points at them.
        try:
            if (policy.credentials or _content_zones(policy)) and self.proxy is None:  # in a worker thread: it reads the store
                self.proxy = await asyncio.to_thread(
                    lambda: CredentialProxy(
                        policy, self.secrets, self.ca, address_matches=self.address_matches,
                        decision_log=self.decision_log, metrics=self.metrics, upstream_cas=self.upstream_cas,
                        client_certificates=self._client_certificates(policy),
                        content_patterns=self.content_patterns, limits=self.limits))
            elif self.proxy is not None:  # also with no credentials: the old ones must not outlive it
                await self.proxy.set_policy(policy, client_certificates=self._client_certificates(policy),
                                            content_patterns=self.content_patterns)
        except CredentialError as error:  # an unusable CA or trust bundle: no credential is served
            problems.append(str(error))
        if self._proxy_in_force(policy) and self.proxy_ports is None:
            try:
                self.proxy_ports = await self.proxy.start(self.listen, *self.ports)
            except OSError as error:  # nothing is steered to a proxy that does not listen
                problems.append(f"the credential proxy cannot listen on {', '.join(self.listen)} ports "
                                f"{self.ports[0] or 'any'}/{self.ports[1] or 'any'}: {error.strerror or error}")
        try:
            listeners = await self.terminator.set_policy(policy)
        except CredentialError as error:
            problems.append(str(error))
            listeners = self.terminator.listeners
        # 2. Steering exactly to what runs now.
        try:
            await self._steer(policy, listeners)
        except CredentialError as error:
            problems.append(str(error))
        # 3. The proxy, when it has nothing (or only an old policy) to serve, once nothing is
        #    steered to it any more.
        if not self._proxy_in_force(policy) and self.proxy_ports is not None:
            self.proxy_ports = None
            await self.proxy.stop()
        # 4. clamd vouched for now, so an unusable one shows in status at once (uploads under
        #    clamav rules are refused until it is fixed, whenever that is found).
        content = self.proxy.state.content if self.proxy_ports is not None else None
        clamd_problem = await content.clamd_problem() if content is not None else None
        if clamd_problem:
            problems.append(f"content rules: {clamd_problem}")
        if problems:  # the rest runs: what is missing stays off (not steered, so denied)
            raise Degraded("; ".join(problems))

    def _client_certificates(self, policy: Policy) -> dict[str, ClientCertificate]:
        """The certificates to present under `policy`: its credentials' client_certificate keys
        (in the key backend, skyguard/keys/tlskey.py), over those the service was built with."""
        return {**self.client_certificates, **client_certificates_of(policy)}

    def _has_secret(self, name: str) -> bool:
        exists = getattr(self.secrets, "exists", None)
        if exists is not None:
            return bool(exists(name))
        try:
            self.secrets.get(name)
        except CredentialError:
            return False
        return True

    def _proxy_in_force(self, policy: Policy) -> bool:
        """The proxy exists and decides under this policy's credentials (and content rules)."""
        return bool(policy.credentials or _content_zones(policy)) and self.proxy is not None and \
            self.proxy.state.engine.credentials == tuple(policy.credentials)

    async def _steer(self, policy: Policy, listeners) -> None:
        zones = {zone for credential in policy.credentials for zone in credential.zones}
        serving = self.proxy_ports is not None and self._proxy_in_force(policy)
        interfaces = sorted(w.interface for w in policy.workloads() if w.zone in zones) if serving else []
        # Zones under HTTP content rules: every HTTP(S) connection, whatever its destination.
        content_zones = _content_zones(policy)
        content_interfaces = sorted(w.interface for w in policy.workloads() if w.zone in content_zones) if serving else []
        terminations = [TerminationSteer(t.vm_addresses, t.termination.port, t.listen_port) for t in listeners]
        if not interfaces and not content_interfaces and not terminations:
            if self.steering is not None:
                steering, self.steering = self.steering, None
                await asyncio.to_thread(steering.remove)
            return
        http_port, https_port = self.proxy_ports or (0, 0)
        steering = CredentialSteering(interfaces, http_port, https_port, terminations, nft=self.nft,
                                      all_destinations=self.steer_all_destinations,
                                      content_interfaces=content_interfaces)
        destinations = self.destinations
        self._learned = {name: known for name, known in self._learned.items() if name in destinations}
        addresses = [address for known in self._learned.values() for address in known]
        await asyncio.to_thread(steering.install, addresses)  # replaces the table in one transaction
        self.steering = steering


def _content_zones(policy: Policy) -> set[str]:
    """Zones whose HTTP(S) the content rules inspect (skyguard/policy/content.py)."""
    return policy.content.zones_for("http")
