"""Tests for ftcourse.atomic: a file or folder is replaced whole or not at all."""

from __future__ import annotations

import pytest

from ftcourse.atomic import OutputError, atomic_folder, atomic_output, check_output_file


def test_atomic_output_renames_only_on_success(tmp_path):
    out = tmp_path / "sub" / "result.txt"
    with atomic_output(out) as tmp:
        tmp.write_text("new")
        assert not out.exists()  # nothing under the final name while the block runs
    assert out.read_text() == "new"

    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert out.read_text() == "new" and [p.name for p in out.parent.iterdir()] == ["result.txt"]


def test_atomic_folder_replaces_the_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "export"
    with atomic_folder(out) as stage:
        (stage / "a").write_text("1")
        (stage / "b").write_text("1")
    with pytest.raises(KeyboardInterrupt), atomic_folder(out) as stage:
        (stage / "a").write_text("2")
        raise KeyboardInterrupt
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "1", "b": "1"}

    with atomic_folder(out) as stage:
        (stage / "c").write_text("3")
    assert [p.name for p in out.iterdir()] == ["c"]  # no stale a and b beside the new c
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_paths_that_cannot_be_written_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_file(tmp_path / "file" / "out.txt")
    with pytest.raises(OutputError, match="it is a folder"):
        check_output_file(tmp_path)
    with (
        pytest.raises(OutputError, match="a file of that name is in the way"),
        atomic_folder(tmp_path / "file"),
    ):
        pass
    with pytest.raises(OutputError, match="/proc is not writable"):
        check_output_file("/proc/out.txt")
