import pytest

from geko_data.world import World


def test_defaults_and_derived():
    w = World(rank=1, world_size=3, worker=1, num_workers=2)
    assert w.global_worker == 3 and w.total_workers == 6 and not w.is_main
    assert World().is_main and World().total_workers == 1


@pytest.mark.parametrize("kw,name", [({"rank": 2, "world_size": 2}, "rank"), ({"world_size": 0}, "world_size"),
                                     ({"worker": 1, "num_workers": 1}, "worker"), ({"num_workers": 0}, "num_workers"),
                                     ({"rank": 1.0}, "rank")])
def test_invalid(kw, name):
    with pytest.raises(ValueError, match=name):
        World(**kw)


def _set_env(monkeypatch, rank, world_size):
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("rank,world_size", [("0", "2"), ("1", "2"), ("2", None), (None, "4")])
def test_environment_ranks_without_a_process_group_are_an_error(monkeypatch, rank, world_size):
    # torchrun sets RANK / WORLD_SIZE; without init_process_group the sampler used to yield a 1/world_size
    # share of the data per process while nothing was all-gathered: half the data, silently.
    from geko_data.sampler import GEKOSampler

    _set_env(monkeypatch, rank, world_size)
    message = rf"RANK={rank} and WORLD_SIZE={world_size} .*init_process_group\(\).* pass the ranks"
    with pytest.raises(RuntimeError, match=message):
        World.detect()
    with pytest.raises(RuntimeError, match=message):
        GEKOSampler(100, total_epochs=2)
    # Explicit ranks need neither: the environment is not consulted.
    assert len(list(GEKOSampler(100, total_epochs=2, num_replicas=1, rank=0))) == 100


@pytest.mark.parametrize("rank,world_size", [("0", "1"), (None, None), ("", "")])
def test_single_process_environment_is_fine(monkeypatch, rank, world_size):
    from geko_data.sampler import GEKOSampler

    _set_env(monkeypatch, rank, world_size)
    w = World.detect()
    assert (w.rank, w.world_size, w.worker, w.num_workers) == (0, 1, 0, 1)
    assert len(list(GEKOSampler(100, total_epochs=2))) == 100


@pytest.mark.timeout(60)
def test_detect_reads_an_initialised_process_group(free_port):
    # A real gloo group of one process, whose environment claims another world: the group wins.
    import subprocess
    import sys

    code = (
        "import os, torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port}', rank=0, world_size=1)\n"
        "os.environ.update(RANK='3', WORLD_SIZE='8')\n"
        "from geko_data.world import World\n"
        "w = World.detect(); print(w.rank, w.world_size)\n"
        "dist.destroy_process_group()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1"]


def test_detect_inside_dataloader_worker():
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    class Probe(IterableDataset):
        def __iter__(self):
            w = World.detect()
            yield torch.tensor([w.worker, w.num_workers])

    got = sorted(tuple(t[0].tolist()) for t in DataLoader(Probe(), num_workers=2, multiprocessing_context="fork"))
    assert got == [(0, 2), (1, 2)]
