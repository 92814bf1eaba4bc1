"""`skyguard flows` shows the files the content filter blocked, read from the signed log beside the
daemon's flow records: filtered by zone and verdict, merged in time order, and printed with who,
where to, what and why. (The daemon end to end, with a real block: test_content_daemon.py.)"""

from __future__ import annotations

from skyguard.cli.flows import ContentBlocks, format_record, merged
from skyguard.content import record
from skyguard.tlog import LogWriter, entry, host_signer

BLOCK = {"zone": "web", "workload": "web1", "rule": "no-malware", "engine": "clamav", "protocol": "http",
         "direction": "upload", "destination": "files.example.test", "size": 68,
         "sha256": "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f", "mime": "text/plain",
         "reason": "ClamAV found Eicar-Signature (rule no-malware)"}


def write_log(state, records):
    with LogWriter(state / "log", host_signer(state)) as writer:
        for kind, fields in records:
            writer.append(entry(kind, **fields))


def test_blocks_are_read_from_the_log_and_only_new_ones_after(tmp_path):
    write_log(tmp_path, [("flow_start", {"time": 1}), (record.KIND, {**BLOCK, "time": 2}),
                         ("dns", {"note": "content_blocked", "time": 3}),  # the word, not the type
                         (record.KIND, {**BLOCK, "zone": "db", "workload": "db1", "time": 4})])
    found, after = record.blocks_in_log(tmp_path / "log")
    assert [(b["index"], b["zone"], b["sha256"]) for b in found] == [(1, "web", BLOCK["sha256"]), (3, "db", BLOCK["sha256"])]
    assert after == 4 and record.blocks_in_log(tmp_path / "log", after) == ([], 4)

    web_only = ContentBlocks(tmp_path, "web", None)
    assert [b["zone"] for b in web_only.read()] == ["web"] and web_only.read() == []  # then only new entries
    assert ContentBlocks(tmp_path, None, "allow").read() == []  # a block is not an allowed flow
    assert [b["verdict"] for b in ContentBlocks(tmp_path, None, "deny").read()] == ["deny", "deny"]


def test_blocks_and_flows_merge_in_time_order():
    flows = [{"type": "flow_start", "time": 10}, {"type": "deny", "time": 30}]
    blocks = [{"type": record.KIND, "time": 20}, {"type": record.KIND, "time": 40}]
    assert [r["time"] for r in merged(flows, blocks, 3)] == [20, 30, 40]


def test_a_block_is_printed_with_who_where_what_and_why():
    line = format_record({**BLOCK, "type": record.KIND, "verdict": "deny", "time": 1_700_000_000_000_000_000})
    assert " BLOCK  FILE  web/web1 -> files.example.test  http upload 68 bytes text/plain sha256 275a021bbfb6489e" in line
    assert line.endswith("rule=no-malware engine=clamav reason=ClamAV found Eicar-Signature (rule no-malware)")
    sftp = format_record({**BLOCK, "type": record.KIND, "protocol": "sftp", "destination": "dc1",
                          "path": "/srv/x.exe", "operator": "alice", "time": 1})
    assert "sftp upload 68 bytes" in sftp and "path /srv/x.exe by alice" in sftp


def test_an_unreadable_log_is_said_once_and_shows_no_blocks(tmp_path, capsys):
    blocks = ContentBlocks(tmp_path / "nowhere", None, None)
    assert blocks.read() == [] and blocks.read() == []
    assert capsys.readouterr().err.count("content blocks not shown") == 1
