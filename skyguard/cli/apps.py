"""`skyguard apps`: the identity-aware proxy for VM web apps, asked through the running daemon.

Thin commands over the daemon's `apps` control operation (skyguard/apps/service.py): the apps of
the policy, the signed-in sessions, ending a user's sessions, and the JWKS that apps verify the
identity header with. Running the proxy is the daemon's job (`skyguard up`), not this module's.
"""

from __future__ import annotations

import time

import click

from skyguard.cli.common import emit_json, json_option, printable, state_dir_option


def _ask(action: str, state_dir, **args) -> dict:
    from skyguard import control

    return control.request("apps", action=action, state_dir=state_dir, **args)


@click.group("apps")
def apps():
    """Web apps in VMs that people reach only through skyguard, signed in at the policy's OpenID
    provider (policy sections `identity:` and `apps:`).

    \b
    Examples:
      skyguard apps list
      skyguard apps sessions --json
      skyguard apps logout alice          end every session of alice (WebSockets cut)
      skyguard apps jwks > jwks.json      what apps verify the identity header against
    """


@apps.command("list")
@json_option
@state_dir_option
def list_command(as_json, state_dir):
    """The apps of the policy in force, who may use them, and their open sessions."""
    reply = _ask("list", state_dir)
    if as_json:
        emit_json(reply)
        return
    if not reply["apps"]:
        click.echo("no apps in the policy")
        return
    click.echo(f"issuer: {reply['issuer']}")
    for app in reply["apps"]:
        who = ", ".join([*app["users"], *(f"group:{g}" for g in app["groups"])])
        state = "listening" if app["listening"] else "NOT listening (see `skyguard status`)"
        click.echo(f"{app['name']:<16} {app['origin']:<36} -> {app['workload']}:{app['port']}  {state}; "
                   f"{app['sessions']} sessions; websockets {'on' if app['websockets'] else 'off'}; for {who}")


@apps.command("sessions")
@json_option
@state_dir_option
def sessions_command(as_json, state_dir):
    """Signed-in sessions: user, app, groups, time left."""
    reply = _ask("sessions", state_dir)
    if as_json:
        emit_json(reply)
        return
    if not reply["sessions"]:
        click.echo("no sessions")
        return
    for s in sorted(reply["sessions"], key=lambda s: (s["app"], s["user"])):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s["signed_in"]))
        # user and groups come from the identity provider: nothing in them may act on the terminal
        click.echo(printable(f"{s['user']:<16} {s['app']:<16} since {since}Z  ends in {s['expires_in']}s  "
                             f"groups {','.join(s['groups']) or '-'}  websockets {s['websockets']}"))


@apps.command("logout")
@click.argument("user")
@json_option
@state_dir_option
def logout_command(user, as_json, state_dir):
    """End every session of USER now (their next request signs in again; WebSockets are cut)."""
    reply = _ask("logout", state_dir, user=user)
    if as_json:
        emit_json(reply)
    else:
        click.echo(printable(f"ended {reply['ended']} session(s) of {reply['user']}"))


@apps.command("jwks")
@state_dir_option
def jwks_command(state_dir):
    """Print the JWKS (JSON) that verifies the identity header skyguard sends to apps."""
    emit_json(_ask("jwks", state_dir))
