"""The credential proxy, TLS termination and their steering as one unit the daemon starts and
stops: the only wiring of this package (the daemon passes in the store, the decision log, the
metrics registry and the DNS-learning lookup).

Order matters and is fixed here: listeners first, then steering (so nothing is redirected to a
port that does not listen yet); on stop, steering first, then the listeners. Not here: policy
parsing, DNS, the signed log itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from prometheus_client import CollectorRegistry

from skyguard.credproxy.ca import CertificateAuthority
from skyguard.credproxy.interfaces import CredentialMetrics, DecisionLog, SecretSource
from skyguard.credproxy.proxy import ClientCertificate, CredentialProxy, ProxyLimits
from skyguard.credproxy.steering import CredentialSteering, TerminationSteer
from skyguard.custody.termination import TlsTerminator
from skyguard.policy.model import Policy

CA_SUBDIR = "ca"


class CredentialService:
    """Everything credential-related for one policy. Use from the daemon's event loop:

        service = CredentialService(policy, store, state_dir=..., decision_log=log, registry=registry,
                                    address_matches=lambda name, ip: learned_dns.answered(name, ip, time.time()))
        await service.start()
        service.learned("api.github.com", "140.82.112.6")  # only with steer_all_destinations=False
        await service.stop()
    """

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
        client_certificates: dict[str, ClientCertificate] | None = None,
        content_patterns: Sequence[str] = (),
        listen: Sequence[str] = ("0.0.0.0", "::"),
        http_port: int = 0,
        https_port: int = 0,
        steer_all_destinations: bool = True,
        nft: Sequence[str] = ("nft",),
        limits: ProxyLimits = ProxyLimits(),
    ):
        self.policy = policy
        self.metrics = CredentialMetrics(registry)
        self.ca = CertificateAuthority(Path(state_dir) / CA_SUBDIR)
        self.proxy = CredentialProxy(
            policy, secrets, self.ca, address_matches=address_matches, decision_log=decision_log,
            metrics=self.metrics, upstream_ca_file=upstream_ca_file, client_certificates=client_certificates,
            content_patterns=content_patterns, limits=limits,
        )
        self.terminator = TlsTerminator(policy, secrets, decision_log=decision_log, metrics=self.metrics)
        self.listen = list(listen)
        self.ports = (http_port, https_port)
        self.steer_all_destinations = steer_all_destinations
        self.nft = tuple(nft)
        self.steering: CredentialSteering | None = None
        zones = {zone for credential in policy.credentials for zone in credential.zones}
        self.interfaces = sorted(w.interface for w in policy.workloads() if w.zone in zones)
        self.destinations = {name for credential in policy.credentials for name in credential.destinations}

    def __repr__(self) -> str:
        return f"CredentialService({self.policy.name!r})"

    async def start(self) -> None:
        http_port, https_port = await self.proxy.start(self.listen, *self.ports)
        try:
            listeners = await self.terminator.start(self.listen)
            self.steering = CredentialSteering(
                self.interfaces, http_port, https_port,
                [TerminationSteer(t.vm_addresses, t.termination.port, t.listen_port) for t in listeners],
                nft=self.nft, all_destinations=self.steer_all_destinations,
            )
            self.steering.install()
        except BaseException:
            await self.terminator.stop()
            await self.proxy.stop()
            raise

    def learned(self, name: str, address: str) -> None:
        """DNS learned `address` for `name`: steer it if it is a credential destination."""
        if self.steering is not None and name.lower().rstrip(".") in self.destinations:
            self.steering.add_address(address)

    async def stop(self) -> None:
        if self.steering is not None:
            self.steering.remove()
            self.steering = None
        await self.terminator.stop()
        await self.proxy.stop()
