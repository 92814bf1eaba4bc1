"""Signing out of an app at /.skyguard/logout (skyguard/apps/gate.py) on loopback: a real TLS
listener of AppsService, a real HTTP app, a TLS client holding a session cookie. Signing out is
a state change: only a POST from the app's own origin does it, so a link, an <img> or a form on
another site (another app of the same site included: SameSite=Lax does not stop those) cannot
sign anyone out."""

from __future__ import annotations

import asyncio

from skyguard.apps.oidc import SignIn
from skyguard.apps.service import AppsService
from skyguard.parts import MemoryLog
from tests.unit.test_apps_keepalive import HOST, TheApp, free_port, read_response, rig


def test_only_a_same_origin_post_signs_out(tmp_path):
    app_port, proxy_port = free_port(), free_port()
    store, app, policy, client_tls = rig(tmp_path, app_port, proxy_port)
    origin = f"https://{HOST}:{proxy_port}"

    async def run():
        server = await asyncio.get_running_loop().create_server(TheApp, "127.0.0.1", app_port)
        log = MemoryLog()
        service = AppsService(policy, store, decision_log=log)
        await service.start()
        session = service.sessions.create(app, SignIn("bob", "bob", "Bob", (), "t"), 600)
        cookie = service.sealer.seal(session.sid, HOST, session.expires)
        seen = {}
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port, ssl=client_tls, server_hostname=HOST)

            async def send(method: str, path: str, *headers: str) -> tuple[int, bytes]:
                writer.write((f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{proxy_port}\r\n"
                              f"Cookie: __Host-skyguard-session={cookie}\r\nContent-Length: 0\r\n"
                              + "".join(h + "\r\n" for h in headers) + "\r\n").encode())
                return await asyncio.wait_for(read_response(reader), 10)

            # What another site can make a browser send, with the (SameSite=Lax) cookie or not.
            seen["link"] = await send("GET", "/.skyguard/logout", "Sec-Fetch-Site: cross-site")
            seen["other site"] = await send("POST", "/.skyguard/logout", "Origin: https://evil.test",
                                            "Sec-Fetch-Site: cross-site")
            seen["same site"] = await send("POST", "/.skyguard/logout", "Origin: https://wiki.apps.test",
                                           "Sec-Fetch-Site: same-site")
            seen["no origin"] = await send("POST", "/.skyguard/logout")
            seen["null origin"] = await send("POST", "/.skyguard/logout", "Origin: null")
            seen["still in"] = await send("GET", "/page")
            # The button on the app's own sign-out page.
            seen["own page"] = await send("POST", "/.skyguard/logout", f"Origin: {origin}",
                                          "Sec-Fetch-Site: same-origin")
            seen["after"] = service.identify(HOST, [(b"cookie", f"__Host-skyguard-session={cookie}".encode())])
            writer.close()
            return seen, [e["reason"] for e in log.of_kind("apps_refused")]
        finally:
            await service.stop()
            server.close()

    seen, refused = asyncio.run(run())
    status, page = seen["link"]
    assert status == 200 and b'method="post"' in page and b'action="/.skyguard/logout"' in page
    for what in ("other site", "same site", "no origin", "null origin"):
        assert seen[what][0] == 403, what
    assert refused.count("logout_not_same_origin") == 4
    assert seen["still in"] == (200, b"/page signed")
    assert seen["own page"][0] == 200 and b"signed out" in seen["own page"][1]
    assert seen["after"] is None
