"""Peer loaders for bench_stream.py --peers: litdata and mosaicml-streaming (MDS), each fed by its own writer.

Installed by ``make bench-peers`` (never by ``make test`` / ``make demo``). ``import streaming`` runs
``streaming/__init__.py``, which imports its vision datasets and so torchvision; the torchvision wheels on
PyPI are CUDA builds whose operators do not load beside torch's CPU build ("operator torchvision::nms does
not exist"), and installing torchvision unconstrained replaces torch. The MDS reader and writer
(``streaming.base``) never use torchvision, so ``load_mds`` imports ``streaming.base`` without running the
package's ``__init__`` and torchvision is not installed at all.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Iterator

import numpy as np
from torch.utils.data import IterableDataset


def load_mds() -> tuple[type, type]:
    """(MDSWriter, StreamingDataset) of mosaicml-streaming, imported without its torchvision-only parts."""
    if "streaming" not in sys.modules:
        spec = importlib.util.find_spec("streaming")
        if spec is None:
            raise ImportError("mosaicml-streaming is not installed: run `make bench-peers`")
        package = types.ModuleType("streaming")  # the package, without running its __init__
        package.__path__ = list(spec.submodule_search_locations or [])
        package.__spec__ = spec
        sys.modules["streaming"] = package
    from streaming.base import MDSWriter, StreamingDataset

    return MDSWriter, StreamingDataset


def _litdata_item(i: int) -> dict:
    # Module-level (not a closure): litdata's optimize() pickles it to its worker.
    return {"id": i, "bin": _PAYLOAD[0], "cls": str(i % 10).encode()}


_PAYLOAD: list[bytes] = []


def write_litdata(folder: str, payload: bytes, n: int) -> None:
    """``n`` samples written by litdata's own writer (``litdata.optimize``), chunks of 64 MB, uncompressed."""
    import litdata

    _PAYLOAD[:] = [payload]
    litdata.optimize(fn=_litdata_item, inputs=list(range(n)), output_dir=folder, chunk_bytes="64MB",
                     num_workers=1, verbose=False, start_method="fork")


def write_mds(folder: str, payload: bytes, n: int) -> None:
    """``n`` samples written by mosaicml-streaming's ``MDSWriter``, shards of 64 MB, uncompressed."""
    writer_cls, _ = load_mds()
    with writer_cls(out=folder, columns={"id": "int", "bin": "bytes", "cls": "bytes"}, size_limit=64 << 20) as w:
        for i in range(n):
            w.write({"id": i, "bin": payload, "cls": str(i % 10).encode()})


def litdata_dataset(folder: str) -> IterableDataset:
    import litdata

    return litdata.StreamingDataset(folder, shuffle=False)


def mds_dataset(folder: str, batch: int) -> IterableDataset:
    _, dataset_cls = load_mds()
    return dataset_cls(local=folder, shuffle=False, batch_size=batch)


class Dropping(IterableDataset):
    """A peer's samples with the frozen ones dropped in the worker after reading them: peers have no index
    to skip by, so this is how they train on a GEKO plan (each sample's ``id`` says which it is)."""

    def __init__(self, dataset: IterableDataset, keep: np.ndarray, id_of) -> None:
        self.dataset, self.keep, self.id_of = dataset, keep, id_of

    def __iter__(self) -> Iterator:
        keep, id_of = self.keep, self.id_of
        return (s for s in self.dataset if keep[id_of(s)])


def wds_id(sample: dict) -> int:
    return int(sample["__key__"][1:])


def peer_id(sample: dict) -> int:
    return int(sample["id"])
