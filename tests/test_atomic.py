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


# ---------------------------------------------------------------------- leftovers, modes, links
_HOLDER = """
import sys, time
from geko_data.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    open(tmp, "wb").write(b"half")
    print(tmp, flush=True)
    time.sleep(600)  # killed here, mid-write
"""


def _start_writer(path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


@pytest.mark.timeout(60)
def test_the_next_write_removes_temp_files_of_killed_writers_only(tmp_path):
    import signal
    import time

    target = tmp_path / "state.arrow"
    target.write_bytes(b"old")
    live, live_tmp = _start_writer(target)
    writers = [_start_writer(target) for _ in range(3)]  # all in flight at once: none removes another's
    for proc, _ in writers:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = [os.path.basename(tmp) for _, tmp in writers]
    try:
        other, other_tmp = _start_writer(tmp_path / "other.arrow")
        other.send_signal(signal.SIGKILL)
        other.wait()
        # Leftovers of a writer from before pids were in the names: removed once an hour old, kept before.
        old_style, recent_style = tmp_path / ".state.arrow.ab12cd_9.tmp", tmp_path / ".state.arrow.zz34yy_1.tmp"
        old_style.write_bytes(b"x")
        recent_style.write_bytes(b"x")
        os.utime(old_style, (time.time() - 7200, time.time() - 7200))
        assert all((tmp_path / k).exists() for k in killed)
        atomic_write_bytes(target, b"new")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert target.read_bytes() == b"new"
        assert not any(k in left for k in killed) and not old_style.exists()
        assert os.path.basename(live_tmp) in left  # a live writer's temp file is left alone
        assert os.path.basename(other_tmp) in left  # another target's leftovers are not this write's business
        assert recent_style.exists()
    finally:
        live.kill()
        live.wait()


def test_an_existing_file_keeps_its_mode(tmp_path):
    p = tmp_path / "secret.bin"
    p.write_bytes(b"one")
    os.chmod(p, 0o600)
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two" and (os.stat(p).st_mode & 0o777) == 0o600
    os.chmod(p, 0o640)
    atomic_write_bytes(p, b"three")
    assert os.stat(p).st_mode & 0o777 == 0o640
    fresh = tmp_path / "fresh.bin"
    atomic_write_bytes(fresh, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(fresh).st_mode & 0o777 == 0o666 & ~umask


def test_a_symlink_is_written_through(tmp_path):
    real = tmp_path / "data" / "state.arrow"
    real.parent.mkdir()
    real.write_bytes(b"old")
    os.chmod(real, 0o600)
    link = tmp_path / "latest.arrow"
    link.symlink_to(real)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and os.readlink(link) == str(real)  # the link stays a link
    assert real.read_bytes() == b"new" and os.stat(real).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in real.parent.iterdir()) == ["state.arrow"]
    dangling = tmp_path / "dangling.arrow"
    dangling.symlink_to(tmp_path / "data" / "new.arrow")
    atomic_write_bytes(dangling, b"created")
    assert (tmp_path / "data" / "new.arrow").read_bytes() == b"created" and dangling.is_symlink()


def test_without_through_links_the_link_itself_is_replaced(tmp_path):
    outside = tmp_path / "home" / "authorized_keys"
    outside.parent.mkdir()
    outside.write_bytes(b"ssh-ed25519 mine")
    link = tmp_path / "data" / "index.arrow"
    link.parent.mkdir()
    link.symlink_to(outside)
    with atomic_path(link, through_links=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"index")
    assert outside.read_bytes() == b"ssh-ed25519 mine" and not link.is_symlink() and link.read_bytes() == b"index"
