"""The test servers themselves: they never outlive the process that started them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

STARTER = """
import sys, time
sys.path.insert(0, {here!r})
from servers import HttpServer, S3Server
server = {kind}({root!r})
server.start()
print(server.proc.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie waiting for its reaper counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["HttpServer", "S3Server"])
def test_a_server_dies_with_a_test_process_killed_from_outside(tmp_path, kind):
    # S3Server: SeaweedFS ignores SIGTERM for minutes once it serves (its graceful shutdown waits), so a
    # parent-death SIGTERM left it running; the parent-death signal must be one it cannot catch.
    code = STARTER.format(here=str(HERE), root=str(tmp_path), kind=kind)
    starter = subprocess.Popen([sys.executable, "-c", code],
                               stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(starter.stdout.readline())
        assert _alive(server_pid)
    finally:
        starter.send_signal(signal.SIGKILL)  # as a CI timeout or kill -9: no stop(), no atexit
        starter.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(server_pid)
    if alive:
        os.kill(server_pid, signal.SIGKILL)
    assert not alive, f"server {server_pid} outlived the killed test process"
