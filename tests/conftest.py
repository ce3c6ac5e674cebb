"""Shared fixtures: tiny uneven WebDataset shards made in tmp_path, and a free TCP port for gloo."""

from __future__ import annotations

import io
import json
import socket
import tarfile

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


def write_tar_with_links(path):
    """A tar of one sample with a file, a hard link to it, a symlink out of the folder and a folder entry."""
    with tarfile.open(path, "w") as tf:
        data = b"1"
        info = tarfile.TarInfo("h0.cls")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        for name, kind in (("h1.cls", tarfile.LNKTYPE), ("h2.txt", tarfile.SYMTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "h0.cls" if kind == tarfile.LNKTYPE else "/etc/passwd"
            tf.addfile(link)
        folder = tarfile.TarInfo("sub")  # a folder entry, as `tar -cf x.tar dir/` writes: not worth a word
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
