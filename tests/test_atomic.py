"""Atomic writes leave files and folders with the permissions plain `open` and `mkdir` would give
(the umask's), not tempfile's private 0600 / 0700: an export must be readable by the other users
of a shared machine."""
from __future__ import annotations

import os
import stat

import pytest

from evomerge._atomic import atomic_directory, atomic_file, write_json_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_folders_follow_the_umask(tmp_path, umask_022):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    with atomic_file(tmp_path / "b.bin", "wb") as handle:
        handle.write(b"\x00")
    with atomic_directory(tmp_path / "model") as folder:
        (folder / "config.json").write_text("{}")
    plain = tmp_path / "plain"
    plain.mkdir()
    (tmp_path / "plain.txt").write_text("")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.bin") == _mode(tmp_path / "plain.txt") == 0o644
    assert _mode(tmp_path / "model") == _mode(plain) == 0o755


def test_a_stricter_umask_is_kept(tmp_path):
    old = os.umask(0o077)
    try:
        write_json_atomic(tmp_path / "a.json", {})
        with atomic_directory(tmp_path / "model"):
            pass
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o600 and _mode(tmp_path / "model") == 0o700
