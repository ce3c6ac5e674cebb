"""Shared fixtures: tiny uneven WebDataset shards made in tmp_path, and a free TCP port for gloo."""

from __future__ import annotations

import json
import socket

import pytest

#: Samples per shard: uneven on purpose, so no split lines up with a shard boundary by luck.
SHARD_SIZES = (5, 17, 9, 12)


def sample_for(shard: int, i: int) -> dict:
    # The key encodes shard and position so order checks are trivial.
    return {"__key__": f"s{shard}_{i:03d}", "json": json.dumps({"shard": shard, "i": i, "x": [shard, i]}).encode(),
            "txt": f"sample {shard}/{i}".encode()}


def write_uneven_shards(folder, sizes=SHARD_SIZES):
    from geko_data.shards import index_shards
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, n in enumerate(sizes):
        path = folder / f"shard-{s:03d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(n):
                w.write(sample_for(s, i))
        paths.append(str(path))
    index_shards(paths, output=str(folder / "index.arrow"))
    return folder


@pytest.fixture
def shards(tmp_path):
    """A folder with 4 uneven shards (43 samples) and its index.arrow."""
    return write_uneven_shards(tmp_path / "shards")


@pytest.fixture
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
