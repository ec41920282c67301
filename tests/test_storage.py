"""Atomic writes: the user's umask decides the mode, and a failed write is the project's clear error."""

import errno
import os

import numpy as np
import pytest

from influence_core import InfluenceLensError
from influence_core.storage import atomic_write_bytes, atomic_write_json, check_output_dir


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_files_get_the_same_mode_as_numpy_outputs(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        np.save(tmp_path / "c.npy", np.zeros(2))
    finally:
        os.umask(previous)
    assert {(p.name, p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {
        ("a.bin", mode),
        ("b.json", mode),
        ("c.npy", mode),
    }


def test_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("influence_core.storage.os.replace", full)
    with pytest.raises(InfluenceLensError, match="cannot write .*x.json: No space left on device") as e:
        atomic_write_json(tmp_path / "x.json", [])
    assert e.value.fix == "free some disk space" and list(tmp_path.iterdir()) == []


def test_output_folder_must_not_be_or_lie_under_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    check_output_dir(tmp_path / "new" / "run")
    with pytest.raises(InfluenceLensError, match="is a file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(InfluenceLensError, match="lies under the file"):
        check_output_dir(tmp_path / "f" / "a" / "b")
