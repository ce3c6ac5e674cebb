"""One training run per output dir: a second one is refused at its start, naming the dir and the holder."""

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from crash_job import CFG, rows
from crash_job import model as gru_model
from geko_data.train import TrainArgs, train
from geko_data.train.outdir import LOCK_NAME, PID_NAME, OutputDirBusyError, lock_output_dir
from test_crash_resume import finish, job, kill_group, leftovers

QUIET = lambda _msg: None  # noqa: E731


@pytest.mark.timeout(150)
def test_a_second_run_on_a_busy_output_dir_is_refused_and_the_first_survives(tmp_path):
    """Two real processes on one output dir. The first is held inside its save of checkpoint 6 (its temp
    dir half-written, checkpoint 3 complete); the second must stop at its start, naming the dir and the first's pid, and must not
    touch the first's files (it used to delete the temp dir, and the first died with FileNotFoundError)."""
    out = tmp_path / "run"
    first = job(out, "-", "map", "--workers", "0", "--hook", "write:6")
    try:
        deadline = time.time() + 100
        while not (out / "hook-fired.json").exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline, "the first job never reached its checkpoint"
            time.sleep(0.05)
        assert (out / PID_NAME).read_text().split()[0] == str(first.pid)
        temp = leftovers(out)
        assert len(temp) == 1  # the first job's checkpoint-6 being written
        second = job(out, "-", "map", "--workers", "0")
        try:
            _stdout, err = second.communicate(timeout=100)
        except BaseException:
            kill_group(second)
            raise
        assert second.returncode != 0
        last = err.strip().splitlines()[-1]
        assert last.startswith("geko_data.train.outdir.OutputDirBusyError: `output_dir`"), err[-2000:]
        assert repr(str(out)) in last and f"pid {first.pid} on host" in last
        assert leftovers(out) == temp and (out / "checkpoint-3").exists()  # nothing of the first's touched
        assert first.poll() is None  # still running
    finally:
        kill_group(first)
    # The kill released the lock with the process (an OS lock, nothing stale): a resume goes ahead.
    finish(job(out, "-", "map", "--workers", "0", "--resume"))
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] == 3
    assert not (out / PID_NAME).exists() and (out / LOCK_NAME).exists()


def test_the_lock_is_released_when_train_returns_or_raises(tmp_path):
    args = TrainArgs(output_dir=str(tmp_path / "out"), num_epochs=1, batch_size=4, learning_rate=1e-3,
                     warmup_steps=0, save_steps=0, eval_steps=0, progress=False, dataloader_num_workers=0)
    train(gru_model(), rows(8), args=args, config=CFG, log=QUIET)
    with lock_output_dir(args.output_dir):  # free again
        with pytest.raises(OutputDirBusyError, match=f"pid {os.getpid()} on host"):
            train(gru_model(), rows(8), args=args, config=CFG, log=QUIET)
    with pytest.raises(ValueError, match="`batch_size` is 2"):  # a run that fails after taking the lock
        train(gru_model(), rows(8), args=TrainArgs(**{**args.to_dict(), "batch_size": 2}), config=CFG,
              resume_from=args.output_dir, log=QUIET)
    with lock_output_dir(args.output_dir):
        pass


def _ddp_rank(rank, world, port, out, report):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    args = TrainArgs(output_dir=out, num_epochs=1, batch_size=4, learning_rate=1e-3, warmup_steps=0,
                     save_steps=0, eval_steps=0, progress=False, dataloader_num_workers=0)
    try:
        train(gru_model(), rows(16), args=args, config=CFG, log=QUIET)
        outcome = {"error": None}
    except Exception as e:  # noqa: BLE001 (recorded for the test to check)
        outcome = {"error": type(e).__name__, "message": str(e)}
    with open(f"{report}-{rank}.json", "w") as f:
        json.dump(outcome, f)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.timeout(150)
def test_ddp_ranks_all_stop_when_the_output_dir_is_busy(tmp_path, free_port):
    """Under torchrun only rank 0 takes the lock; when it cannot, every rank raises at once instead of the
    others waiting forever in their first collective call."""
    out = tmp_path / "out"
    out.mkdir()
    report = str(tmp_path / "outcome")
    started = time.time()
    with lock_output_dir(str(out)):  # this test process holds it: another process, for the ranks
        mp.start_processes(_ddp_rank, args=(2, free_port, str(out), report), nprocs=2, start_method="spawn")
    outcome = [json.load(open(f"{report}-{r}.json")) for r in range(2)]
    assert outcome[0]["error"] == "OutputDirBusyError" and f"pid {os.getpid()}" in outcome[0]["message"]
    assert outcome[1]["error"] == "RuntimeError" and "rank 0 could not claim `output_dir`" in outcome[1]["message"]
    assert time.time() - started < 120
    assert sorted(os.listdir(out)) == sorted([LOCK_NAME])  # the ranks wrote nothing (the holder's pid file went)
