"""GEKOSampler: a drop-in ``torch.utils.data.Sampler`` for map-style datasets.

Each epoch it re-buckets the samples from the feedback so far, draws the
epoch's plan (frozen and pruned samples skipped, hard ones repeated) and
yields this rank's share of it. ``wrap(dataset)`` adds ``__index__`` and
``__weight__`` to every item, the weight read from shared memory so that
DataLoader workers, forked or spawned, persistent or not, always see the
current epoch.

Typical loop::

    sampler = GEKOSampler(dataset, total_epochs=E)
    loader = DataLoader(sampler.wrap(dataset), batch_size=32, sampler=sampler, num_workers=2)
    for epoch in range(E):
        sampler.set_epoch(epoch)
        for batch in loader:
            losses = loss_fn(model(batch["x"]), batch["y"], reduction="none")
            (losses * batch["__weight__"]).mean().backward()
            sampler.report(batch["__index__"], losses)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info
from torch.utils.data._utils.collate import collate, default_collate_fn_map

from geko_data.config import GEKOConfig
from geko_data.epochs import EpochDriver
from geko_data.plan import EpochPlan, RankOrder
from geko_data.shared import SharedPlan
from geko_data.state import SampleState
from geko_data.validate import check_fingerprint_arg, check_int
from geko_data.world import World

__all__ = ["GEKOSampler", "WeightedDataset"]

#: Indices converted to Python ints at a time by ``__iter__``.
_ITER_CHUNK = 1 << 16


class WeightedDataset(Dataset):
    """A map-style dataset whose items carry ``__index__`` and the current epoch's ``__weight__``.

    Dict items get the two keys added; tuple items (``TensorDataset``, torchvision's ``(x, y)``) get the
    two values appended, so a tuple loop changes one line: ``for x, y, index, weight in loader``; any other
    item becomes ``{"sample": item, "__index__": i, "__weight__": w}``. ``default_collate`` (the
    DataLoader's default) makes them an int64 and a float32 tensor per batch. Built by ``GEKOSampler.wrap``.
    """

    def __init__(self, dataset: Any, shared: SharedPlan) -> None:
        self.dataset = dataset
        self.shared = shared
        self._weights: np.ndarray | None = None  # per-process numpy view of the shared weights

    def __getstate__(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "shared": self.shared, "_weights": None}

    def __len__(self) -> int:
        return len(self.dataset)

    def _view(self) -> np.ndarray:
        if self._weights is None:
            self._weights = self.shared.weights()  # zero-copy: later set_epoch writes show through
        return self._weights

    def __getitem__(self, index: int) -> Any:
        # A numpy float32 collates to a float32 tensor: `losses * batch["__weight__"]` keeps the losses' dtype.
        return _tag(self.dataset[index], int(index), np.float32(self._view()[index]))

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """Batched fetch (the DataLoader calls it when present): one vectorized weight lookup per batch."""
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        weights = self._view()[np.asarray(indices, dtype=np.int64)]
        # Dict items tagged inline: a function call per item costs a third of what the whole tagging does.
        return [_Item(item, __index__=i, __weight__=w) if type(item) is dict else _tag(item, i, w)
                for item, i, w in zip(items, map(int, indices), weights)]


def _carried_fingerprint(data_source: Any) -> str | None:
    """The name a dataset carries of its data (a ``ShardDataset``: its index's fingerprint), else None."""
    shards = sys.modules.get("geko_data.dataset")  # loaded when data_source is one: nothing imported here
    return data_source.fingerprint if shards is not None and isinstance(data_source, shards.ShardDataset) else None


def _tag(item: Any, index: int, weight: np.float32) -> Any:
    """``item`` with its index and weight added, as one of the two types ``default_collate`` hands to
    ``_collate_tagged``."""
    if isinstance(item, dict):
        return _Item(item, __index__=index, __weight__=weight)
    if isinstance(item, tuple):
        return _Row((*item, index, weight))
    return _Item(sample=item, __index__=index, __weight__=weight)


class _Item(dict):
    """A dict item of a wrapped dataset; to the loop (and pickled) a plain dict."""

    def __reduce__(self) -> tuple[Any, ...]:
        return dict, (dict(self),)


class _Row(tuple):
    """A tuple item of a wrapped dataset; to the loop (and pickled) a plain tuple."""

    def __reduce__(self) -> tuple[Any, ...]:
        return tuple, (tuple(self),)


def _collate_tagged(batch: list[Any], *, collate_fn_map: dict[Any, Any] | None = None) -> Any:
    """``default_collate`` of wrapped items: the batch default_collate makes, ``__index__`` and ``__weight__``
    built from one numpy array each instead of a list of scalars.

    In a DataLoader worker the batch is a ``_Sent``: every tensor a worker sends costs a shared-memory
    segment, a file descriptor and a socket connection to fetch it (measured here: about 0.8 ms of CPU a
    tensor and batch, worker and main process together, more than the rest of a batch of 32 items of 512
    tokens costs to send), so these two columns of a few hundred bytes travel inside the batch's pickle
    and the main process makes them tensors again.
    """
    collate_fn_map = default_collate_fn_map if collate_fn_map is None else collate_fn_map
    tuples = isinstance(batch[0], tuple)
    index = np.array([b[-2] for b in batch] if tuples else [b["__index__"] for b in batch], dtype=np.int64)
    weight = np.array([b[-1] for b in batch] if tuples else [b["__weight__"] for b in batch], dtype=np.float32)
    made = torch.from_numpy(index), torch.from_numpy(weight)
    if tuples:  # default_collate turns tuple items into a list of columns; plain tuples keep its size check
        out: Any = collate([tuple(b[:-2]) for b in batch], collate_fn_map=collate_fn_map) + list(made)
    else:
        out = {k: collate([b[k] for b in batch], collate_fn_map=collate_fn_map) for k in batch[0] if k not in _KEYS}
        out.update(zip(_KEYS, made))
    if get_worker_info() is None:
        return out
    sent = _SentList(out) if tuples else _SentDict(out)
    sent.made = made
    return sent


_KEYS = ("__index__", "__weight__")


class _Sent:
    """A collated batch in a DataLoader worker; pickled, a plain dict or list whose two tensors made by
    ``_collate_tagged`` (if the collate_fn still holds them) travel as lists of numbers, not shared memory."""

    made: tuple[torch.Tensor, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        plain = dict(self) if isinstance(self, dict) else list(self)
        sent = []
        for k, v in plain.items() if isinstance(plain, dict) else enumerate(plain):
            if any(v is t for t in self.made):
                sent.append((k, v.dtype))
                plain[k] = v.tolist()  # a float32's value is exact as a Python float, and back
        return _received, (plain, sent)


class _SentDict(_Sent, dict):
    pass


class _SentList(_Sent, list):
    pass


def _received(batch: Any, sent: list[tuple[Any, torch.dtype]]) -> Any:
    """A worker's batch in the main process: the columns ``_Sent`` pickled as lists become tensors again."""
    for k, dtype in sent:
        batch[k] = torch.tensor(batch[k], dtype=dtype)
    return batch


# default_collate (torch's documented extension point) collates these two types with _collate_tagged; every
# other type, and every collate_fn_map of a user's own, is unaffected.
default_collate_fn_map[_Item] = _collate_tagged
default_collate_fn_map[_Row] = _collate_tagged


def _num_samples(data_source: Any) -> int:
    if isinstance(data_source, bool):
        raise TypeError(f"`data_source` must be a sized dataset or an int, got {data_source!r}")
    if isinstance(data_source, torch.utils.data.IterableDataset):  # a GEKOStream has a length, but no indexing
        raise TypeError(f"`data_source` must be a map-style dataset (len and indexing) or an int, got the iterable "
                        f"{type(data_source).__name__}: a GEKOStream plans and reads its epochs itself (iterate "
                        f"it in your loop); for WebDataset shards under a sampler, use geko_data.ShardDataset")
    if isinstance(data_source, (int, np.integer)):
        num_samples = int(data_source)
    elif hasattr(data_source, "__len__"):
        num_samples = len(data_source)
    else:
        raise TypeError(f"`data_source` must be a sized dataset or an int, got {type(data_source).__name__}")
    if num_samples < 1:
        raise ValueError(f"`data_source` must hold at least 1 sample, got {num_samples}")
    return num_samples


def _sampler_world(world: World | None, num_replicas: Any, rank: Any) -> World:
    """The sampler's ranks: ``world``, or DistributedSampler's ``num_replicas`` / ``rank`` (each defaulting to
    torch.distributed's); never both."""
    if world is not None:
        if not isinstance(world, World):
            raise TypeError(f"`world` must be a World or None, got {type(world).__name__}")
        if num_replicas is not None or rank is not None:
            raise ValueError(f"pass either `world` ({world}) or `num_replicas`/`rank` ({num_replicas}/{rank}), "
                             f"not both")
        return World(rank=world.rank, world_size=world.world_size)  # the DataLoader splits among workers
    given = num_replicas is not None
    if num_replicas is None or rank is None:  # explicit ranks need no process group
        detected = World.detect()
        num_replicas = detected.world_size if num_replicas is None else num_replicas
        rank = detected.rank if rank is None else rank
    check_int("num_replicas", num_replicas, 1)
    try:
        check_int("rank", rank, 0, num_replicas - 1)
    except ValueError as exn:  # "in [0, 0]" alone does not say where the bound comes from
        source = "given" if given else "from torch.distributed, or 1 without a process group"
        raise ValueError(f"{exn}: ranks 0 to num_replicas - 1, with num_replicas={num_replicas} ({source}); "
                         f"pass num_replicas=N with rank") from None
    return World(rank=int(rank), world_size=int(num_replicas))


class GEKOSampler(EpochDriver, Sampler[int]):
    """Yields this rank's dataset indices of the current epoch's GEKO plan.

    Args:
        data_source: a sized dataset, or the number of samples.
        total_epochs: planned epochs (sets the curriculum's progress).
        config: the policy. Defaults to ``GEKOConfig()`` (or ``state.config`` when ``state`` is given).
        seed: seed of every random choice (with epoch and rank). Defaults to ``0``.
        num_replicas: number of ranks (DistributedSampler's name). Defaults to the torch.distributed world size
            (1 without it).
        rank: this rank. Defaults to the torch.distributed rank (0 without it).
        world: the ranks as a ``World`` (instead of ``num_replicas`` / ``rank``). Defaults to ``None``.
        state: an existing ``SampleState`` (e.g. loaded from a checkpoint). Defaults to a fresh one.
        epoch_length: draws per epoch over all ranks. Defaults to the number of active samples.
        shuffle: shuffle the epoch's order. Defaults to ``True``.
        fingerprint: a name of the data (e.g. ``geko_data.fingerprint_of(keys)`` of its sample keys in index
            order), kept in the state and its files: a state of other data with the same length is refused
            on ``use_state`` / ``state=`` / ``load_state_dict`` with FingerprintError. Defaults to ``None``: a
            ``ShardDataset``'s own (its index's fingerprint), else the state's, if any (only the length is
            checked).
    """

    def __init__(self, data_source: Sized | int, *, total_epochs: int, config: GEKOConfig | None = None,
                 seed: int = 0, num_replicas: int | None = None, rank: int | None = None,
                 world: World | None = None, state: SampleState | None = None, epoch_length: int | None = None,
                 shuffle: bool = True, fingerprint: str | None = None) -> None:
        num_samples = _num_samples(data_source)
        check_fingerprint_arg("fingerprint", fingerprint)
        if fingerprint is None:
            fingerprint = _carried_fingerprint(data_source)
        super().__init__(num_samples=num_samples, total_epochs=total_epochs, config=config, seed=seed, state=state,
                         world=_sampler_world(world, num_replicas, rank), epoch_length=epoch_length,
                         fingerprint=fingerprint, data_name="`data_source` has")
        self.num_samples = num_samples
        self.shuffle = bool(shuffle)
        self._shared = SharedPlan(num_samples)
        self._plan: EpochPlan | None = None
        self._order: RankOrder | None = None  # this rank's indices for the current epoch
        # The array the last order was written into, reused by the next epoch's (fresh pages cost kernel time)
        self._order_buffer: np.ndarray | None = None
        self._orders = 0  # orders made: an iterator of an order that was replaced stops with an error
        self._start = 0  # position to resume from at the next __iter__
        self._yielded = 0  # indices the current iterator handed out

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: repartition (every ``repartition_every`` epochs) and fix its plan."""
        resuming = self._start > 0 and epoch == self.epoch
        plan = self._advance(epoch, out=self._write_plan_in_place)
        # The same epoch's plan again (a resume's load_state_dict) keeps the order already made.
        if plan is not self._plan or self._order is None:
            # The plan's arrays become views of the shared memory the workers read, so the plan is held once.
            self._plan = self.state.plan = self._shared.publish(plan)
            # The sampler yields the rank's order; the DataLoader deals it to its workers. It is written over
            # the last epoch's, its blocks shuffled as __iter__ reaches them.
            self._order = None
            buffer, self._order_buffer = self._order_buffer, None
            total = self._plan.total
            if buffer is not None and buffer.shape[0] < total + self.world.world_size:
                buffer = None  # too small for this epoch: freed before the new one is made
            self._order = RankOrder(self._plan.counts, world=self.world, seed=self.seed, epoch=self.epoch,
                                    shuffle=self.shuffle, buffer=buffer, total=total)
            del buffer
            self._order_buffer = self._order.buffer
            self._orders += 1
        if not resuming:
            self._start = 0
        self._yielded = 0

    def _write_plan_in_place(self) -> tuple[np.ndarray, np.ndarray]:
        """The shared memory's arrays for set_epoch's new plan (no fresh 6 bytes a sample, no copy); the
        current plan and order, which they hold, are dropped first."""
        self._plan = self._order = None
        return self._shared.writable()

    @property
    def plan(self) -> EpochPlan:
        if self._plan is None:
            self.set_epoch(0)
        assert self._plan is not None
        return self._plan

    def __iter__(self) -> Iterator[int]:
        if self._order is None:
            self.set_epoch(max(self.epoch, 0))
        assert self._order is not None
        # The resume position holds until the next set_epoch, not just for one iterator: a DataLoader (or a
        # progress bar wrapping it) may create an iterator, prefetch from it and drop it.
        start = self._start
        self._yielded = start
        ranked, made = self._order, self._orders
        # A slice at a time: the whole order as a Python list costs 36 bytes an index (3.6 GB at 100M).
        for a in range(start, len(ranked), _ITER_CHUNK):
            if self._orders != made:  # set_epoch wrote the next order over this one
                raise RuntimeError(f"this iterator's epoch order was replaced by set_epoch({self.epoch}): start "
                                   f"a new iterator (iter(sampler), or iterate the DataLoader again)")
            for index in ranked.ready(a + _ITER_CHUNK)[a:a + _ITER_CHUNK].tolist():
                self._yielded += 1
                yield index

    def __len__(self) -> int:
        """This rank's draws in the current epoch (after a resume: what is left of it)."""
        if self._order is None:
            self.set_epoch(max(self.epoch, 0))
        assert self._order is not None
        return len(self._order) - self._start

    @property
    def position(self) -> int:
        """Where in this rank's epoch order the next iterator starts (0, or a resume's position)."""
        return self._start

    # ------------------------------------------------------------------ data and feedback
    def wrap(self, dataset: Any) -> WeightedDataset:
        """``dataset`` with ``__index__`` and this epoch's ``__weight__`` added to every item."""
        if len(dataset) != self.num_samples:
            raise ValueError(f"`dataset` has {len(dataset)} samples, the sampler {self.num_samples}")
        return WeightedDataset(dataset, self._shared)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *, consumed: int | None = None) -> dict[str, Any]:
        """Small JSON-serializable position; the per-sample state is saved apart with ``state.save``.

        ``consumed`` is how many of this rank's indices of the current epoch the loop has used, counted from
        the epoch's start (in a resumed epoch from ``position``); a DataLoader prefetches ahead of the loop,
        so pass it for an exact resume. Without it, what the iterator handed out is used.
        """
        self._check_consumed(consumed, "sampler")
        sd = self._base_state_dict("GEKOSampler", self._yielded if consumed is None else consumed)
        sd["shuffle"] = self.shuffle
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a position from ``state_dict()``.

        Load the matching ``SampleState`` file into ``state`` first: it keeps the epoch's plan, so a resume
        mid-epoch continues the very plan that was running even after reports changed the state.
        """
        epoch, position = self._check_state_dict(state_dict, {
            "num_samples": self.num_samples, "shuffle": self.shuffle}, "sampler")
        self.epoch = epoch
        self._start = position
        if epoch >= 0:
            self.set_epoch(epoch)  # recompute the plan; keeps _start since it is the same epoch
            assert self._order is not None
            if position > len(self._order):
                raise ValueError(f"state_dict position {position} is past this rank's epoch length "
                                 f"{len(self._order)} (state file from another run?)")
