"""The identity-aware proxy for web apps in VMs (policy sections `identity:` and `apps:`): people
reach an app only through skyguard, which signs them in at the policy's OpenID provider, decides
per request whether they may use the app, and hands the app who they are in a short-lived signed
JWT. The datapath keeps each app's port in its VM for the proxy (skyguard/datapath/compile.py).

    oidc.py       discovery, authorization code + PKCE (Authlib), ID token checks (joserfc), userinfo
    sessions.py   the encrypted host-bound cookie, the session table, the access rule (no I/O)
    assertion.py  the identity header's JWT and the JWKS apps verify it with
    proxy.py      one client connection: sign-in, callback, logout, forward, WebSockets
    service.py    the daemon part: listeners, keys, decision log, metrics, `skyguard apps` answers

For other parts that put a web page behind the same sign-in (the web console): on the daemon's
loop, `daemon._part("apps").identify(host, headers)` returns `SignedIn(user, name, groups, app)`
for a request to an app's host name that carries a valid session cookie of that host, else None
(skyguard.apps.service.AppsService.identify). It decides nothing itself: the caller applies its
rule to the user and groups.
"""
