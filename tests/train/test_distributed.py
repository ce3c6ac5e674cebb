"""setup_distributed: the World the reference loop runs in."""

import pytest

from geko_data import World
from geko_data.train import setup_distributed


def test_a_plain_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup_distributed() == World()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1: no process group needed
    assert setup_distributed() == World()


@pytest.mark.timeout(60)
def test_an_initialised_group_gives_its_rank_and_size(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        world = setup_distributed()
        assert (world.rank, world.world_size, world.is_main) == (0, 1, True)
    finally:
        dist.destroy_process_group()


ROUNDS = 40


def _rounds_of_ddp_then_leave(rank, port, out):
    """Each round: a gloo group, a DDP step on it, an all_gather of tensors Python then drops, the group left."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from geko_data.train import leave_process_group

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for _ in range(ROUNDS):
        group = dist.new_group(backend="gloo")
        model = DistributedDataParallel(torch.nn.Linear(4, 2), process_group=group)
        model(torch.randn(3, 4)).sum().backward()
        local = torch.full((4, 5), float(rank))
        gathered = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(gathered, local, group=group)
        del local, gathered  # what a report does: its tensors die in Python, gloo still holds them
        leave_process_group(group)
        del group, model  # the DDP model's reducer holds the group: freeing it joins gloo's threads
    leave_process_group()
    (out / f"rank{rank}").write_text("done")


@pytest.mark.timeout(120)
def test_leaving_the_group_after_collectives_never_hangs(tmp_path, free_port):
    # A barrier then destroy_process_group with nothing between hung within 5-25 of these rounds (gloo's
    # thread waiting for the GIL that the main thread, joining it, held); the end of a torchrun job does the same.
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rounds_of_ddp_then_leave, args=(free_port, tmp_path), nprocs=2,
                             start_method="spawn", join=False)
    deadline = time.monotonic() + 60
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "a rank hung leaving its process group"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]
