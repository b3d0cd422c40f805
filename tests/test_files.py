"""tokensteer.files.atomic_write: whole files or none, one UserError on failure."""

import errno
import os
import stat

import pytest

from tokensteer.errors import UserError
from tokensteer.files import atomic_write


def test_text_bytes_and_writer(tmp_path):
    atomic_write(tmp_path / "a" / "t.txt", "héllo\n")
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "c.txt", lambda tmp: open(tmp, "w").write("via writer"))
    assert (tmp_path / "c.txt").read_text() == "via writer"
    assert stat.S_IMODE(os.stat(tmp_path / "c.txt").st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "c.txt"]  # no temporaries left


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="cannot write .*No space left"):
        atomic_write(path, broken)
    with pytest.raises(OSError):
        atomic_write(path, broken, user_error=False)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_suffix_for_writers_that_add_their_own(tmp_path):
    np = pytest.importorskip("numpy")
    atomic_write(tmp_path / "v.npz", lambda tmp: np.savez(tmp, x=np.arange(3)), suffix=".npz")
    assert np.load(tmp_path / "v.npz")["x"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["v.npz"]
