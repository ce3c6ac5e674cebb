"""ShardDataset: shards as a map-style dataset for GEKOSampler and the integrations, local and over S3."""

import json
import pickle
import uuid

import numpy as np
import pytest
from torch.utils.data import DataLoader

from conftest import SHARD_SIZES, sample_for, write_uneven_shards
from geko_data import GEKOConfig, GEKOSampler
from geko_data.dataset import ShardDataset
from geko_data.remote_index import index_remote
from geko_data.shards import ShardError, read_index
from geko_data.stream import GEKOStream
from geko_data.train.collate import decode_json
from servers import s3_server  # noqa: F401 - fixture

N = sum(SHARD_SIZES)
QUIET = GEKOConfig(log_bucket_stats=False)
HALF = GEKOConfig(mode="random_subset", subset_fraction=0.5, log_bucket_stats=False)


def as_list(batch):
    return batch


def expected(i):
    """What sample ``i`` of the uneven shards was written as (shard, position)."""
    shard = int(np.searchsorted(np.cumsum(SHARD_SIZES), i, side="right"))
    return sample_for(shard, i - int(sum(SHARD_SIZES[:shard])))


@pytest.mark.timeout(60)
def test_items_are_the_samples_written_in_the_order_asked(shards):
    ds = ShardDataset(str(shards))
    assert len(ds) == N and ds.fingerprint == read_index(shards).fingerprint
    for i in (0, 4, 5, N - 1):
        item = ds[i]
        want = expected(i)
        assert {k: item[k] for k in want} == want
        assert item["__url__"] == str(shards / f"shard-{int(item['__key__'][1]):03d}.tar")
    got = ds.__getitems__([30, 2, 30, 41])  # a batch: any order, repeats
    assert [g["__key__"] for g in got] == [expected(i)["__key__"] for i in (30, 2, 30, 41)]
    assert got[0] is not got[2] and got[0] == got[2]  # a repeated draw is its own dict
    assert ds.__getitems__([]) == []


@pytest.mark.timeout(60)
def test_bad_indices_are_refused_naming_the_value_and_the_range(shards):
    ds = ShardDataset(str(shards))
    with pytest.raises(IndexError, match=rf"sample index {N} is out of range: the shards hold {N} samples \(0 to "
                                         rf"{N - 1}\)"):
        ds[N]
    with pytest.raises(IndexError, match="sample index -1 is out of range"):
        ds.__getitems__([3, -1])
    with pytest.raises(TypeError, match="sample indices must be integers, got"):
        ds.__getitems__([1.5])
    with pytest.raises(ValueError, match="`storage_options` were given, but `source`"):
        ShardDataset(str(shards), storage_options={"anon": True})
    with pytest.raises(TypeError, match="`verify` must be a bool"):
        ShardDataset(str(shards), verify="yes")
    with pytest.raises(TypeError, match=r"a sample index must be an int, got 1.5"):
        ds[1.5]
    # a list of tars was "expected str, bytes or os.PathLike object, not list", naming no argument
    with pytest.raises(TypeError, match=r"`source` must be a folder holding index.arrow, .* got list: index a list"):
        ShardDataset(sorted(str(p) for p in shards.glob("*.tar")))
    # a decoder returning something else failed later, in a collator or a Trainer, far from the cause
    with pytest.raises(TypeError, match=r"`decode` must return the sample as a dict, got bytes for sample 's0_000'"):
        ShardDataset(str(shards), decode=lambda s: s["json"])[0]
    with pytest.raises(TypeError, match=r"`decode` must return the sample as a dict, got bytes for sample"):
        next(iter(GEKOStream(str(shards), total_epochs=1, decode=lambda s: s["json"], shuffle=False)))


@pytest.mark.timeout(60)
def test_only_the_drawn_samples_are_read(shards):
    ds = ShardDataset(str(shards))
    sampler = GEKOSampler(ds, total_epochs=2, config=HALF, seed=3)
    sampler.set_epoch(0)
    drawn = sorted(set(sampler))
    assert 0 < len(drawn) < N
    loader = DataLoader(sampler.wrap(ds), sampler=sampler, batch_size=4, collate_fn=as_list)
    items = [x for b in loader for x in b]
    assert [x["__key__"] for x in items] == [expected(x["__index__"])["__key__"] for x in items]
    assert ds.stats["samples_read"] == len(drawn)  # a sample the plan does not draw is never read
    index = read_index(shards)
    assert ds.stats["bytes_read"] <= int(index.length[drawn].sum()) + 1024 * len(drawn)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_every_draw(shards, context):
    ds = ShardDataset(str(shards), decode=decode_json)
    assert len(pickle.dumps(ds)) < 20_000  # a spawned worker gets the index's file name, not the samples
    sampler = GEKOSampler(ds, total_epochs=2, config=QUIET, seed=1)
    sampler.set_epoch(0)
    loader = DataLoader(sampler.wrap(ds), sampler=sampler, batch_size=5, num_workers=2, collate_fn=as_list,
                        multiprocessing_context=context)
    items = [x for b in loader for x in b]
    assert sorted(x["__index__"] for x in items) == list(range(N))
    assert ds.stats["samples_read"] == N  # the workers' reads, counted where the loop can see them (were 0)
    for x in items:
        want = expected(x["__index__"])
        assert x["__key__"] == want["__key__"] and [x["shard"], x["i"]] == x["x"]  # decoded from its json member


@pytest.mark.timeout(60)
def test_verify_names_a_changed_sample(shards):
    path = shards / "shard-002.tar"
    raw = bytearray(path.read_bytes())
    at = raw.find(b"sample 2/3")
    raw[at + len("sample 2/")] = ord("9")  # same size, same layout: only the content hash can tell
    path.write_bytes(bytes(raw))
    assert ShardDataset(str(shards))[5 + 17 + 3]["txt"] == b"sample 2/9"
    with pytest.raises(ShardError, match="s2_003"):
        ShardDataset(str(shards), verify=True)[5 + 17 + 3]


def _upload(s3_server, folder):
    prefix = f"geko/{uuid.uuid4().hex[:8]}"
    fs = s3_server.filesystem()
    for p in sorted(folder.glob("*.tar")):
        fs.put_file(str(p), f"{prefix}/{p.name}")
    url = f"s3://{prefix}/"
    index_remote([url], output=url + "index.arrow", storage_options=s3_server.storage_options, progress=False)
    return url


@pytest.mark.timeout(180)
def test_shards_in_s3_read_only_what_is_drawn_with_workers(s3_server, tmp_path):
    folder = write_uneven_shards(tmp_path / "shards")
    url = _upload(s3_server, folder)
    so = s3_server.storage_options
    ds = ShardDataset(url, storage_options=so)
    assert ds.fingerprint == read_index(folder).fingerprint
    sampler = GEKOSampler(ds, total_epochs=2, config=HALF, seed=3)
    sampler.set_epoch(0)
    drawn = sorted(set(sampler))
    loader = DataLoader(sampler.wrap(ds), sampler=sampler, batch_size=4, collate_fn=as_list)
    items = [x for b in loader for x in b]
    local = ShardDataset(str(folder))
    assert [(x["__key__"], x["json"], x["txt"]) for x in items] == [
        (y["__key__"], y["json"], y["txt"]) for y in local.__getitems__([x["__index__"] for x in items])]
    assert ds.stats["samples_read"] == len(drawn) and ds.stats["requests"] > 0
    sampler.state.save(str(tmp_path / "state.arrow"))  # the credentials never reach a file
    assert so["secret"].encode() not in (tmp_path / "state.arrow").read_bytes()
    assert so["secret"] not in json.dumps(sampler.state_dict())
    # A batch's ranges are coalesced, gaps up to RemoteConfig.gap read through: at most the drawn samples' bytes
    # and the gaps between them, never the whole shards
    assert ds.stats["bytes_read"] < int(read_index(folder).length.sum())
    workers = DataLoader(sampler.wrap(ds), sampler=sampler, batch_size=4, num_workers=2, collate_fn=as_list,
                         multiprocessing_context="spawn")
    assert [(x["__index__"], x["json"]) for b in workers for x in b] == [(x["__index__"], x["json"]) for x in items]


@pytest.mark.timeout(60)
def test_a_shard_replaced_between_reads_is_noticed(shards, tmp_path):
    # A reader keeps shards open across batches (and epochs, in one process): a shard replaced since must
    # not be read through the old file's descriptor.
    ds = ShardDataset(str(shards))
    assert ds[1]["__key__"] == "s0_001"
    other = tmp_path / "other"
    write_uneven_shards(other, sizes=(60, 1, 1, 1))  # more than a tar record more: another size
    (other / "shard-000.tar").replace(shards / "shard-000.tar")
    with pytest.raises(ShardError, match="shard-000.tar' changed since indexing"):
        ds[2]


@pytest.mark.timeout(60)
def test_a_sampler_over_shards_knows_them_by_their_index(shards, tmp_path):
    # Without fingerprint= a sampler checked only the length: a state of other shards with as many samples
    # was taken over silently.
    from geko_data.state import FingerprintError

    ds = ShardDataset(str(shards))
    sampler = GEKOSampler(ds, total_epochs=1, config=QUIET)
    assert sampler.state.fingerprint == ds.fingerprint
    other = write_uneven_shards(tmp_path / "other", sizes=(43,))  # as many samples, other keys
    theirs = GEKOSampler(ShardDataset(str(other)), total_epochs=1, config=QUIET).state
    with pytest.raises(FingerprintError):
        sampler.use_state(theirs)


@pytest.mark.timeout(60)
def test_a_sampler_over_a_stream_is_refused_naming_shard_dataset(shards):
    # A GEKOStream has a length, so it was taken as a dataset and failed at the first batch with torch's
    # "Subclasses of Dataset should implement __getitem__".
    with pytest.raises(TypeError, match=r"`data_source` must be a map-style dataset .* got the iterable GEKOStream.*"
                                        r"geko_data.ShardDataset"):
        GEKOSampler(GEKOStream(str(shards), total_epochs=1), total_epochs=1)


@pytest.mark.timeout(60)
def test_a_shard_rewritten_in_place_with_another_size_is_noticed(shards, tmp_path):
    # The same file (inode) cut and written again: a shard kept open was read on, its new bytes taken for the
    # indexed samples (a review found it); a fresh open refuses it by its size.
    ds = ShardDataset(str(shards))
    assert ds[1]["__key__"] == "s0_001"
    other = write_uneven_shards(tmp_path / "other", sizes=(60, 1, 1, 1))
    with open(shards / "shard-000.tar", "r+b") as f:  # in place: same inode
        f.truncate(0)
        f.write((other / "shard-000.tar").read_bytes())
    with pytest.raises(ShardError, match="shard-000.tar' changed since indexing"):
        ds[2]


@pytest.mark.timeout(60)
def test_open_shards_are_a_budget_of_the_process_not_of_each_reader(tmp_path):
    # 64 open shards a reader: 17 datasets of 64 shards each ran out of file descriptors (a review found it)
    import os

    from geko_data import readers

    many = write_uneven_shards(tmp_path / "many", sizes=(1,) * 80)
    before = len(os.listdir("/proc/self/fd"))
    datasets = [ShardDataset(str(many)) for _ in range(3)]
    for ds in datasets:
        assert [x["__key__"] for x in ds.__getitems__(list(range(80)))] == [f"s{s}_000" for s in range(80)]
    shared = len(datasets)  # each dataset's read counters: one shared-memory segment
    assert len(os.listdir("/proc/self/fd")) - before <= readers._IDLE.limit + shared
    for ds in datasets:
        ds.close()
    assert len(os.listdir("/proc/self/fd")) <= before + shared
