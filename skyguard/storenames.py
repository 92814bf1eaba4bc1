"""Which names in the sealed store the policy in force uses, for `skyguard status`: the rest are
listed as unused (an operator may `skyguard secret rm` them), the ones not stored as missing.

One place that knows every part's store names, so a part added later is counted here or shows
its secrets as unused (and then invites their removal)."""

from __future__ import annotations

from pathlib import Path


def secrets_status(policy, store_dir: Path) -> dict:
    """{stored: count, unused: [names], missing: [names]} for the store at `store_dir`. Secrets
    no policy names are kept (a later policy may name them again) and only listed. A store that
    cannot be listed (a file that is not a sealed secret: a FIFO, a damaged file) is
    {problem: why, naming the file}: status still answers, and says it."""
    from skyguard.custody.store import SecretStore
    from skyguard.errors import CredentialError

    try:
        stored = {entry["name"] for entry in SecretStore(store_dir).list()}
    except CredentialError as e:
        return {"problem": str(e)}
    named = used_names(policy, stored)
    return {"stored": len(stored), "unused": sorted(stored - named), "missing": sorted(named - stored)}


def used_names(policy, stored: set[str]) -> set[str]:
    from skyguard.admin.keys import HOST_KEY_NAME, VM_KEY_NAME
    from skyguard.keys.backends import with_key_names

    named = {c.secret for c in policy.credentials} | {t.certificate for t in policy.tls_termination}
    if policy.admin_ssh is not None:
        named |= {HOST_KEY_NAME, VM_KEY_NAME}
    console = policy.admin_console
    if console is not None:  # each target's VM-side credential; the web console's certificate
        named |= {t.credential for t in console.targets}
        named |= {a.certificate for a in policy.apps if a.name == console.web_app}
    if policy.apps:  # each app's certificate, the issuer's client secret, the proxy's own keys
        from skyguard.apps import assertion
        from skyguard.apps.service import COOKIE_KEY

        named |= {a.certificate for a in policy.apps}
        named |= {COOKIE_KEY, assertion.KEY_NAME} & stored  # made on first use: never missing
        if policy.identity is not None:
            named.add(policy.identity.client_secret)
    return with_key_names(policy, stored, named)  # the token PIN, keys and their certificates
