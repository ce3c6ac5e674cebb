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


def test_detect_reads_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    w = World.detect()
    assert (w.rank, w.world_size, w.worker, w.num_workers) == (2, 4, 0, 1)


def test_detect_inside_dataloader_worker():
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    class Probe(IterableDataset):
        def __iter__(self):
            w = World.detect()
            yield torch.tensor([w.worker, w.num_workers])

    got = sorted(tuple(t[0].tolist()) for t in DataLoader(Probe(), num_workers=2, multiprocessing_context="fork"))
    assert got == [(0, 2), (1, 2)]
