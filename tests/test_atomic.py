import os

import pytest

from geko_data.atomic import atomic_dir, atomic_path, atomic_write_bytes


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two" and os.listdir(tmp_path) == ["f.bin"]


def test_atomic_path_failure_leaves_old_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        open(tmp, "wb").write(b"half")
        raise RuntimeError("crash")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_atomic_dir(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        open(os.path.join(tmp, "a"), "w").write("x")
        raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []
    with atomic_dir(target) as tmp:
        open(os.path.join(tmp, "a"), "w").write("x")
    assert (target / "a").read_text() == "x"
    with pytest.raises(FileExistsError), atomic_dir(target):
        pass


def test_atomic_dir_interrupted_leaves_nothing_and_names_temps_hidden(tmp_path):
    # KeyboardInterrupt cleans up like any error; the temp name is hidden and ends in .tmp, which is what
    # checkpoint readers skip and what the next checkpoint save clears after a SIGKILL.
    target = tmp_path / "checkpoint-5"
    names = []
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        names.append(os.path.basename(tmp))
        assert os.path.dirname(tmp) == str(tmp_path)
        raise KeyboardInterrupt
    assert names[0].startswith(".checkpoint-5.") and names[0].endswith(".tmp")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "f.bin", b"x")
