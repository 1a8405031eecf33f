"""Batches: what the training loop feeds a task, from in-memory tensors, a map-style Dataset or a DataLoader.

    Split / Dataset / DataLoader --batches(epoch)--> Batch(inputs, targets, index, mask?, teacher_logits)
                                 --batch.to(device, non_blocking)--> task(batch, progress)

In-memory tensors (`Split`) take a fast path: a batch is one indexing operation, no per-sample
collate. A `Dataset` yielding `(input, target)` is read by a `DataLoader` (workers optional) whose
sampler draws the same order as the fast path, so both give the same batches for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Sampler

from distil.errors import DataError


@dataclass(frozen=True)
class Batch:
    """One batch: inputs (B, ...), targets (B,) or (B, T) (-1 = unlabeled), the samples' indices in their data
    set (B,) when known, a mask (B, T) of the positions that count (language models), and teacher logits
    precomputed per teacher name (the teacher cache)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    teacher_logits: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.inputs)

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`; copies are asynchronous from pinned memory (`non_blocking`)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.inputs), move(self.targets), move(self.index), move(self.mask),
                     {k: move(v) for k, v in self.teacher_logits.items()})

    def with_inputs(self, inputs: torch.Tensor) -> Batch:
        return replace(self, inputs=inputs)


@dataclass(frozen=True)
class Progress:
    """Where training stands, for terms that change over it (DKD's warm-up, schedules of weights)."""

    epoch: int = 0  # 0-based
    step: int = 0  # global optimiser step, 0-based
    steps_per_epoch: int = 1
    epochs: int = 1

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def fraction(self) -> float:
        """Share of training done, in [0, 1)."""
        return self.step / max(1, self.total_steps)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch: the same for every kind of data, resumed or not."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


class EpochSampler(Sampler[int]):
    """A sampler drawing `epoch_order(n, seed, epoch)`; the loop calls `set_epoch` (as for DistributedSampler).

    Give it to your own DataLoader to get exactly the batches of the in-memory path:
        DataLoader(ds, batch_size=64, sampler=EpochSampler(len(ds), seed=0), drop_last=True, num_workers=2)
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch).tolist())

    def __len__(self) -> int:
        return self.n


class _Indexed(Dataset):
    """Adds the sample index to what a map-style dataset yields: (input, target) -> (input, target, index)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"a training Dataset must yield (input, target) pairs; item {i} is a "
                            f"{type(item).__name__}. Return `x, y` from __getitem__.")
        return item[0], torch.as_tensor(item[1]), i


def to_batch(item) -> Batch:
    """What a DataLoader yields -> Batch: a Batch, (inputs, targets) or (inputs, targets, index)."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return Batch(item[0], torch.as_tensor(item[1]), item[2] if len(item) == 3 else None)
    raise DataError(f"a DataLoader must yield (inputs, targets), (inputs, targets, index) or distil.Batch; "
                    f"it yielded a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list))
                                                             else "") + ".")


class _Shard:
    """A batch sampler's global batches cut to this process's share: every world-th index from `rank` on."""

    def __init__(self, batches: BatchSampler, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    @property
    def sampler(self):  # so that `set_epoch` reaches the EpochSampler
        return self.batches.sampler

    def __iter__(self):
        for batch in self.batches:
            if share := batch[self.rank::self.world]:  # a short last validation batch may leave some none
                yield share

    def __len__(self) -> int:
        return len(self.batches)


def _next(iterator):
    """The next item of a DataLoader, or None at the end; an error raised in a worker process keeps its own
    message, without the worker's traceback that torch wraps around it."""
    from distil.errors import DistilError

    try:
        return next(iterator)
    except StopIteration:
        return None
    except DistilError as err:
        message = str(err)
        if "Original Traceback" not in message:
            raise
        last = message.strip().splitlines()[-1]
        raise type(err)(last.split(": ", 1)[1] if ": " in last else last) from None


class Batches:
    """The batches of `data` epoch by epoch: a `Split` (fast path), a map-style `Dataset` or a `DataLoader`.

    `shuffle` draws `epoch_order(len, seed, epoch)`; `drop_last` drops the ragged last batch (training).
    A user's DataLoader is taken as it is (its sampler's `set_epoch` is called when it has one).
    """

    def __init__(self, data, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 workers: int = 0, pin_memory: bool = False, rank: int = 0, world: int = 1) -> None:
        from distil.data import Split

        self.data, self.batch_size, self.shuffle, self.seed, self.drop_last = data, batch_size, shuffle, seed, drop_last
        self.rank, self.world = rank, world  # several processes: each takes every world-th sample of a global batch
        self.loader: DataLoader | None = None
        if isinstance(data, DataLoader):
            self.loader = data
        elif not isinstance(data, Split):
            if not isinstance(data, Dataset) or isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
                raise DataError(f"training data must be a distil Split, a map-style torch Dataset (with __len__ and "
                                f"__getitem__) or a DataLoader, got a {type(data).__name__}. Wrap an IterableDataset "
                                "in your own DataLoader.")
            sampler = EpochSampler(len(data), seed) if shuffle else None
            batches = BatchSampler(sampler or range(len(data)), batch_size, drop_last)
            self.loader = DataLoader(_Indexed(data), batch_sampler=_Shard(batches, rank, world), num_workers=workers,
                pin_memory=pin_memory, persistent_workers=workers > 0,
                # the loader's seed for its workers comes from here, not from the global RNG, so dropout
                # draws the same masks as on the in-memory path
                generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.loader is not None:
            return len(self.loader)
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self.loader is None:
            yield from self._split_epoch(epoch)
            return
        for sampler in (getattr(self.loader, "sampler", None), getattr(self.loader.batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):  # a loader draws its seeds (workers, RandomSampler) from the
            iterator = iter(self.loader)  # global RNG on creation and first fetch: keep that stream for dropout,
            first = _next(iterator)  # as on the in-memory path
        if first is None:
            return
        yield to_batch(first)
        while (item := _next(iterator)) is not None:
            yield to_batch(item)

    def _split_epoch(self, epoch: int) -> Iterator[Batch]:
        split, size = self.data, self.batch_size
        n = len(split)
        order = epoch_order(n, self.seed, epoch).to(split.x.device) if self.shuffle else None  # one copy per epoch
        for start in range(0, n - size + 1 if self.drop_last else n, size):
            idx = order[start:start + size] if order is not None else torch.arange(
                start, min(n, start + size), device=split.x.device)  # index_select: faster than t[idx] on the CPU
            idx = idx[self.rank::self.world]  # this process's share of the global batch
            if len(idx) == 0:
                continue
            cached = {name: logits.index_select(0, idx) for name, logits in (split.teacher_logits or {}).items()}
            yield Batch(split.x.index_select(0, idx), split.y.index_select(0, idx), idx, None, cached)

    def first(self, n: int) -> Batch:
        """Up to `n` samples from the start of the data, unshuffled (for a dry run)."""
        from torch.utils.data import default_collate

        if self.loader is None:
            cached = {name: values[:n] for name, values in (self.data.teacher_logits or {}).items()}
            return Batch(self.data.x[:n], self.data.y[:n], torch.arange(min(n, len(self.data))), teacher_logits=cached)
        if isinstance(self.data, DataLoader):
            return to_batch(next(iter(self.data)))
        return to_batch(default_collate([_Indexed(self.data)[i] for i in range(min(n, len(self.data)))]))
