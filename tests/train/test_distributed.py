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
