"""atomic_write: the destination is replaced whole on success and untouched on any failure."""

from __future__ import annotations

import os
import stat

import pytest

from mqa_gen.atomic_file import TEMP_SUFFIX, atomic_write, temp_prefix


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_success_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with atomic_write(path) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)  # same folder: the rename cannot cross file systems
        name = os.path.basename(tmp)
        assert name.startswith(".out.bin.") and name.endswith(".tmp")
        assert name.startswith(temp_prefix(path)) and name.endswith(TEMP_SUFFIX)
        assert path.read_bytes() == b"old"  # nothing visible until the block ends
        with open(tmp, "wb") as f:
            f.write(b"new content")
    assert path.read_bytes() == b"new content"
    assert names(tmp_path) == ["out.bin"]


def test_a_new_file_is_created(tmp_path):
    path = tmp_path / "fresh"
    with atomic_write(str(path)) as tmp, open(tmp, "wb") as f:
        f.write(b"x" * 10_000)
    assert path.read_bytes() == b"x" * 10_000 and names(tmp_path) == ["fresh"]


@pytest.mark.parametrize("error", [ValueError("bad"), KeyboardInterrupt()])
def test_an_exception_inside_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of the new")
            raise error
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_a_failure_after_the_block_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, where):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"new")
            monkeypatch.setattr(os, where, full_disk)
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["out.bin"]


def test_a_missing_folder_raises_oserror_before_the_block(tmp_path):
    entered = False
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "no" / "such" / "file"):
            entered = True
    assert not entered and names(tmp_path) == []


def test_mode_sets_the_permission_bits(tmp_path):
    path = tmp_path / "shared.bin"
    with atomic_write(path, mode=0o644) as tmp, open(tmp, "wb") as f:
        f.write(b"x")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
