"""skyguard.fsutil: private files are never visible half-written or with a wider mode."""

from __future__ import annotations

import os
import stat

import pytest

from skyguard import fsutil


def test_write_private_replaces_whole_with_mode_0600_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "key"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    fsutil.write_private(target, b"new" * 100_000)
    assert target.read_bytes() == b"new" * 100_000
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "key"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        fsutil.write_private(target, "not bytes")  # fails while writing the temporary file
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_create_private_never_overwrites(tmp_path):
    target = tmp_path / "ca.pem"
    fsutil.create_private(target, b"first")
    with pytest.raises(FileExistsError):
        fsutil.create_private(target, b"second")
    assert target.read_bytes() == b"first" and stat.S_IMODE(target.stat().st_mode) == 0o600
