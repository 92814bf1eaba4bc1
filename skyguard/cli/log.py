"""`skyguard log ...`: thin click commands over skyguard.tlog (verify, show, tail, prove,
consistency, checkpoint). Reads the log directory directly; writes nothing to it. Every command
takes --state-dir (or SKYGUARD_STATE_DIR): the log is <state-dir>/log and signatures are checked
with the host key of that same state dir, never with the key the log records about itself.

Exit status: 0 ok, 1 verification failed or the log is unreadable, 2 bad input.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path

import click

from skyguard import config
from skyguard.cli.common import emit_json, json_option, printable, warn
from skyguard.errors import LogError
from skyguard.tlog import entries as tlog_entries
from skyguard.tlog.checkpoint import Checkpoint, Signer, Verifier
from skyguard.tlog.errors import BadLogInput, VerificationError
from skyguard.tlog.hashing import hash_leaf
from skyguard.tlog.hostkey import default_key_name, key_path, load_or_create_host_key
from skyguard.tlog.store import LogReader
from skyguard.tlog.tree import consistency_proof, inclusion_proof, range_root, verify_consistency, verify_inclusion
from skyguard.tlog.verify import read_notes_file, verify_log

# Local until common.py has a shared one: the same option and meaning as `skyguard up --state-dir`.
state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="skyguard's state directory: the log is <state-dir>/log and its key is the host key "
         "there (default: $SKYGUARD_STATE_DIR or /var/lib/skyguard).")
log_dir_option = click.option(
    "--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Log directory, overriding <state-dir>/log (a copy elsewhere). Its key is then read "
         "from the log directory's parent if a host key is there, else from the state dir.")
key_option = click.option(
    "--key", "key", default=None, metavar="VKEY|FILE",
    help="Verifier key (name+hash+base64, as `log checkpoint --public-key` prints) or a file "
         "holding it. Default: the host key in the state dir.")


def _log_dir(state_dir: Path | None, log_dir: Path | None) -> Path:
    return log_dir or ((state_dir or config.STATE_DIR) / "log")


def _key_dir(state_dir: Path | None, log_dir: Path | None) -> Path:
    """Where the host key is: the state dir named, else beside the log dir named, else the
    state dir from the environment (or the default)."""
    if state_dir is not None:
        return state_dir
    if log_dir is not None and key_path(log_dir.parent).exists():
        return log_dir.parent
    return config.STATE_DIR


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _verifier(reader: LogReader, key: str | None, key_dir: Path) -> tuple[Verifier, str]:
    """The key to check signatures with, and where it came from (for every error that follows).

    Given with --key, else the host key in key_dir. Never the key recorded inside the log: whoever
    can rewrite the log can rewrite that record too."""
    if key:
        path = Path(key)
        if path.is_file():
            return Verifier.from_vkey(path.read_text().strip()), f"the key in {path}"
        return Verifier.from_vkey(key.strip()), "the key given with --key"
    path = key_path(key_dir)
    if not path.exists():
        raise LogError(f"no host key at {path} to check the log's signatures with: pass "
                       f"--state-dir with the state directory the log belongs to, or --key with "
                       f"its verifier key (`skyguard log checkpoint --public-key` on the host); "
                       f"the key recorded inside the log is not trusted")
    private = load_or_create_host_key(key_dir, create=False)
    try:   # the key's name may differ from today's hostname: take it from the log
        name = Verifier.from_vkey(reader.verifier_key).name
    except BadLogInput:
        name = default_key_name()
    return Signer(name, private).verifier, f"the host key {path}"


@click.group("log")
def log():
    """The append-only signed log: verify it, read it, prove entries.

    \b
    Examples:
      skyguard log verify --checkpoint saved.note   detect any edit since that checkpoint
      skyguard log verify --state-dir /srv/sg       the log and host key of that state dir
      skyguard log show --type deny --since 10m     denies of the last ten minutes
      skyguard log tail -n 20 --follow              the last 20 entries, then new ones
      skyguard log prove 1234 --json > proof.json   then: tools/verify_inclusion.py proof.json
      skyguard log checkpoint > saved.note          keep this somewhere the host cannot write
    """


@log.command()
@state_dir_option
@log_dir_option
@key_option
@click.option("--checkpoint", "checkpoint_files", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="A signed checkpoint saved elsewhere (one or several notes per file; repeat "
                   "the option for more files). The log must be consistent with each.")
@click.option("--witnesses", type=click.IntRange(0), default=0, metavar="N",
              help="Require cosignatures (C2SP tlog-cosignature) of this log by at least N "
                   "distinct witnesses, each on a checkpoint the log is consistent with: those "
                   "the fleet agent kept in <state-dir>/fleet/cosigned.")
@click.option("--witness-key", "witness_keys", multiple=True, metavar="VKEY|FILE",
              help="A witness key to trust (repeatable); default: the fleet peers' keys pinned "
                   "with `skyguard fleet trust` (<state-dir>/fleet/peers.json).")
@json_option
def verify(state_dir, log_dir, key, checkpoint_files, witnesses, witness_keys, as_json):
    """Recompute every leaf and the tree; check every checkpoint; name the first bad index.

    \b
    Examples:
      skyguard log verify
      skyguard log verify --checkpoint /mnt/witness/skyguard.note --json
    """
    reader = LogReader(_log_dir(state_dir, log_dir))
    verifier, key_source = _verifier(reader, key, _key_dir(state_dir, log_dir))
    notes = [n for f in checkpoint_files for n in read_notes_file(f)]
    witnessed: dict[str, int] = {}
    if witnesses:
        from skyguard.tlog.cosign import witness_material, witnessed_by

        cosigned, trusted = witness_material(_key_dir(state_dir, log_dir), witness_keys)
        witnessed = witnessed_by(notes + cosigned, reader.origin, verifier, trusted)
        notes += cosigned   # and the log must be consistent with every one of them
    show_progress = not as_json and sys.stderr.isatty()
    if show_progress:
        from rich.progress import Progress
        with Progress(transient=True) as bar:
            task = bar.add_task("verifying", total=None)
            report = verify_log(reader.directory, verifier, notes,
                                progress=lambda done, total: bar.update(task, completed=done,
                                                                        total=total))
    else:
        report = verify_log(reader.directory, verifier, notes)
    if witnesses and report.ok and len(witnessed) < witnesses:
        names = ", ".join(f"{w} (size {s})" for w, s in sorted(witnessed.items())) or "none"
        report.fail(f"{witnesses} witnesses required; cosignatures by trusted witnesses on "
                    f"checkpoints of this log: {names}")
    if as_json:
        emit_json(dict(report.as_dict(), key=key_source, witnessed_by=witnessed))
        if not report.ok:
            raise click.exceptions.Exit(1)
        return
    for note in report.notes:
        warn(f"note: {note}")
    if not report.ok:
        where = "" if report.first_bad_index is None else f"first bad index {report.first_bad_index}: "
        for other in report.problems:
            warn(f"also: {other}")
        raise VerificationError(f"log verification FAILED: {where}{report.problem} "
                                f"(checked with {key_source})")
    unproven = report.size - report.covered
    click.echo(f"ok: {report.covered} entries proven, root {_b64(report.root)}, "
               f"{report.checkpoints_checked} stored, {report.head_checked} head and "
               f"{report.external_checked} external checkpoints consistent "
               f"(checked with {key_source})"
               + (f"; {unproven} unacknowledged entries after them are not" if unproven else "")
               + (f"; cosigned by {len(witnessed)} witnesses: "
                  + ", ".join(f"{w} (size {s})" for w, s in sorted(witnessed.items()))
                  if witnesses else ""))


_DURATION = re.compile(r"^(\d+)([smhd])$")


def _parse_since(text: str) -> int:
    """--since as integer ns: '10m' ago, an RFC 3339 time, or integer nanoseconds."""
    if text.isdigit():
        return int(text)
    m = _DURATION.match(text)
    if m:
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return time.time_ns() - seconds * 1_000_000_000
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadLogInput(f"--since {text!r}: use a duration (30s, 10m, 2h, 1d), an RFC 3339 "
                          f"time (2026-01-31T12:00:00Z) or integer nanoseconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def _format_time(value) -> str:
    if isinstance(value, int):
        return dt.datetime.fromtimestamp(value / 1e9, dt.UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")
    return str(value)


def _field_text(value) -> str:
    """A field as its JSON would say it (null, true, {"k": ...}), a string as it is."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _print_entry(index: int, payload: bytes, as_json: bool) -> None:
    try:
        record = tlog_entries.decode(payload)
    except ValueError:
        record = {"type": "?", "raw": payload.decode("utf-8", "replace")}
    if as_json:
        click.echo(tlog_entries.canonical({"index": index, "entry": record}).decode())
        return
    fields = " ".join(f"{k}={_field_text(v)}" for k, v in record.items() if k not in ("type", "time"))
    click.echo(printable(f"{index:>8}  {_format_time(record.get('time'))}  {record.get('type', '?'):<15} "
                          f"{fields}"))


def _matches(payload: bytes, types, since) -> bool:
    if not types and since is None:
        return True
    try:
        record = tlog_entries.decode(payload)
    except ValueError:
        return False
    if types and record.get("type") not in types:
        return False
    t = record.get("time")
    return since is None or (isinstance(t, int) and t >= since)


@log.command()
@state_dir_option
@log_dir_option
@click.option("--type", "types", multiple=True, help="Only entries of this type (repeatable).")
@click.option("--since", help="Only entries at or after: 10m, 2h, an RFC 3339 time, or ns.")
@click.option("--limit", type=click.IntRange(min=1), help="Stop after this many entries.")
@json_option
def show(state_dir, log_dir, types, since, limit, as_json):
    """Print entries, oldest first (one JSON object per line with --json).

    \b
    Examples:
      skyguard log show --type deny --type tamper --since 1h
      skyguard log show --since 2026-01-31T12:00:00Z --limit 100 --json
    """
    reader = LogReader(_log_dir(state_dir, log_dir))
    since_ns = _parse_since(since) if since else None
    shown = 0
    for index, payload in reader.entries():
        if _matches(payload, set(types), since_ns):
            _print_entry(index, payload, as_json)
            shown += 1
            if limit and shown >= limit:
                break


@log.command()
@state_dir_option
@log_dir_option
@click.option("-n", "count", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many of the last entries to print.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing entries as they are appended.")
@json_option
def tail(state_dir, log_dir, count, follow, as_json):
    """Print the last entries, and with --follow new ones as they become durable.

    \b
    Examples:
      skyguard log tail -n 50
      skyguard log tail --follow --json | jq .entry.type
    """
    directory = _log_dir(state_dir, log_dir)
    reader = LogReader(directory)
    size = reader.size
    for index, payload in reader.entries(max(0, size - count)):
        _print_entry(index, payload, as_json)
    while follow:
        time.sleep(0.5)
        reader = LogReader(directory)
        for index, payload in reader.entries(size):
            _print_entry(index, payload, as_json)
            size = index + 1


def _latest_checkpoint(reader: LogReader, verifier: Verifier,
                       key_source: str) -> tuple[str, Checkpoint]:
    note = reader.latest_checkpoint_note()
    try:
        checkpoint = Checkpoint.parse_body(verifier.verify(note))
    except VerificationError as e:
        raise VerificationError(f"the log's latest checkpoint: {e} (checked with {key_source})") \
            from None
    return note, checkpoint


@log.command()
@click.argument("index", type=int)
@state_dir_option
@log_dir_option
@key_option
@json_option
def prove(index, state_dir, log_dir, key, as_json):
    """Inclusion proof of entry INDEX in the latest signed checkpoint.

    The JSON is checkable without skyguard: tools/verify_inclusion.py proof.json [--key VKEY].

    \b
    Examples:
      skyguard log prove 1234 --json > proof.json
    """
    reader = LogReader(_log_dir(state_dir, log_dir))
    note, checkpoint = _latest_checkpoint(reader, *_verifier(reader, key,
                                                             _key_dir(state_dir, log_dir)))
    if not 0 <= index < checkpoint.size:
        raise BadLogInput(f"index {index} is not covered by the latest checkpoint (size "
                          f"{checkpoint.size}): choose 0..{checkpoint.size - 1}, or wait for "
                          f"the next checkpoint")
    payload = reader.entry(index)
    leaf = hash_leaf(payload)
    hashes = inclusion_proof(reader.source(), index, checkpoint.size)
    verify_inclusion(index, checkpoint.size, leaf, hashes, checkpoint.hash)
    proof = {"format": "skyguard-inclusion-proof/v1", "origin": checkpoint.origin,
             "index": index, "size": checkpoint.size, "entry": payload.decode("utf-8"),
             "leaf_hash": _b64(leaf), "hashes": [_b64(h) for h in hashes],
             "root": _b64(checkpoint.hash), "checkpoint": note}
    if as_json:
        emit_json(proof)
        return
    click.echo(f"entry {index} is in the log {checkpoint.origin} of size {checkpoint.size} "
               f"(root {_b64(checkpoint.hash)}), proof of {len(hashes)} hashes:")
    for h in hashes:
        click.echo(f"  {_b64(h)}")
    click.echo(f"entry: {payload.decode('utf-8')}")


@log.command()
@click.argument("old", type=int)
@click.argument("new", type=int)
@state_dir_option
@log_dir_option
@json_option
def consistency(old, new, state_dir, log_dir, as_json):
    """Consistency proof that the tree of size OLD is a prefix of the tree of size NEW.

    \b
    Examples:
      skyguard log consistency 1000 5000 --json
    """
    reader = LogReader(_log_dir(state_dir, log_dir))
    size = reader.size
    if not 0 < old <= new <= size:
        raise BadLogInput(f"need 0 < OLD <= NEW <= {size} (the log's size; a proof from the "
                          f"empty tree is meaningless); got {old} {new}")
    source = reader.source()
    old_root, new_root = range_root(source, 0, old), range_root(source, 0, new)
    hashes = consistency_proof(source, old, new)
    verify_consistency(old, new, old_root, new_root, hashes)
    result = {"origin": reader.origin, "old_size": old, "new_size": new,
              "old_root": _b64(old_root), "new_root": _b64(new_root),
              "hashes": [_b64(h) for h in hashes]}
    if as_json:
        emit_json(result)
        return
    click.echo(f"tree {old} ({result['old_root']}) is a prefix of tree {new} "
               f"({result['new_root']}); proof of {len(hashes)} hashes:")
    for h in result["hashes"]:
        click.echo(f"  {h}")


@log.command()
@state_dir_option
@log_dir_option
@key_option
@click.option("--public-key", is_flag=True,
              help="Print the verifier key (name+hash+base64) instead of the checkpoint.")
@json_option
def checkpoint(state_dir, log_dir, key, public_key, as_json):
    """Print the latest signed checkpoint (C2SP signed note), for a witness to keep.

    \b
    Examples:
      skyguard log checkpoint > /mnt/witness/skyguard-$(date +%s).note
      skyguard log checkpoint --public-key > skyguard.vkey
    """
    reader = LogReader(_log_dir(state_dir, log_dir))
    verifier, key_source = _verifier(reader, key, _key_dir(state_dir, log_dir))
    if public_key:
        if as_json:
            emit_json({"verifier_key": verifier.vkey(), "name": verifier.name})
        else:
            click.echo(verifier.vkey())
        return
    note, cp = _latest_checkpoint(reader, verifier, key_source)
    if as_json:
        emit_json({"origin": cp.origin, "size": cp.size, "root": _b64(cp.hash), "note": note})
    else:
        click.echo(note, nl=False)
