"""Batches from a Split, a map-style Dataset or a DataLoader: same order, same training, indices that point at
their samples, clear errors for data of the wrong form, and the training progress as tasks and terms see it."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from conftest import blobs, mlp
from distil import CE, KD, Batch, ClassificationTask, Distiller, EpochSampler, Progress, TrainConfig, fit
from distil.batches import Batches
from distil.data import Split
from distil.errors import ConfigError, DataError
from distil.losses import Reads

pytestmark = pytest.mark.usefixtures("one_thread")


class Pairs(Dataset):
    """A plain map-style Dataset over tensors: item i -> (x[i], y[i])."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def numbered(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples that say who they are: x[i] = (i, -i), y[i] = i % 3."""
    i = torch.arange(n, dtype=torch.float32)
    return torch.stack([i, -i], 1), torch.arange(n) % 3


def indices(batches: Batches, epoch: int) -> list[list[int]]:
    return [b.index.tolist() for b in batches.epoch(epoch)]


# --- the same training from every kind of data ------------------------------------------------


def _three_ways(n: int = 96, batch: int = 16, seed: int = 3):
    x, y = blobs(n)
    loader = DataLoader(Pairs(x, y), batch_size=batch, sampler=EpochSampler(n, seed=seed), drop_last=True,
                        num_workers=2)
    return {"split": Split(x, y), "dataset": Pairs(x, y), "loader": loader}


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_classification_trains_the_same_from_a_split_a_dataset_and_a_dataloader():
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.02)
    models = {}
    for kind, data in _three_ways().items():
        models[kind] = mlp(0)
        fit(ClassificationTask(models[kind]), data, None, cfg, seed=3)
    assert _max_diff(models["split"], mlp(0)) > 1e-2  # it trained
    for kind in ("dataset", "loader"):
        for (name, a), b in zip(models["split"].state_dict().items(), models[kind].state_dict().values()):
            assert torch.allclose(a, b, atol=1e-6), (kind, name)


def test_distillation_trains_the_same_from_a_split_a_dataset_and_a_dataloader():
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.02)
    teacher = mlp(7)
    students = {}
    for kind, data in _three_ways().items():
        students[kind] = mlp(0)
        fit(Distiller(students[kind], teacher, [KD(T=2, weight=0.7), CE(weight=0.3)]), data, None, cfg, seed=3)
    assert _max_diff(students["split"], mlp(0)) > 1e-2
    for kind in ("dataset", "loader"):
        for (name, a), b in zip(students["split"].state_dict().items(), students[kind].state_dict().values()):
            assert torch.allclose(a, b, atol=1e-6), (kind, name)


def test_dropout_draws_the_same_masks_from_a_split_and_a_dataset():
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.02)
    x, y = blobs(96)
    a, b = mlp(0, dropout=0.3), mlp(0, dropout=0.3)
    fit(ClassificationTask(a), Split(x, y), None, cfg, seed=3)
    fit(ClassificationTask(b), Pairs(x, y), None, cfg, seed=3)
    assert _max_diff(a, b) < 1e-6


def test_dropout_draws_the_same_masks_from_a_split_and_a_users_dataloader():
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.02)
    x, y = blobs(96)
    loader = DataLoader(Pairs(x, y), batch_size=16, sampler=EpochSampler(len(x), seed=3), drop_last=True)
    a, b = mlp(0, dropout=0.3), mlp(0, dropout=0.3)
    fit(ClassificationTask(a), Split(x, y), None, cfg, seed=3)
    fit(ClassificationTask(b), loader, None, cfg, seed=3)
    assert _max_diff(a, b) < 1e-6


# --- order and indices ------------------------------------------------------------------------


def test_unshuffled_batches_follow_the_data_in_order_with_and_without_drop_last():
    x, y = numbered(10)
    assert indices(Batches(Split(x, y), 4, shuffle=False, drop_last=True), 0) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert indices(Batches(Split(x, y), 4, shuffle=False, drop_last=False), 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert indices(Batches(Pairs(x, y), 4, shuffle=False, drop_last=False), 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(Batches(Split(x, y), 4, drop_last=True)) == 2 and len(Batches(Split(x, y), 4, drop_last=False)) == 3


def test_shuffled_split_batches_are_a_permutation_per_epoch_with_the_last_ragged_batch_dropped():
    x, y = numbered(10)
    batches = Batches(Split(x, y), 3, seed=5)
    assert len(batches) == 3  # 10 // 3
    for epoch in range(3):
        seen = [i for b in indices(batches, epoch) for i in b]
        assert [len(b) for b in indices(batches, epoch)] == [3, 3, 3]
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))  # one sample dropped, none twice
    everything = Batches(Split(x, y), 3, seed=5, drop_last=False)
    for epoch in range(3):
        order = [i for b in indices(everything, epoch) for i in b]
        assert sorted(order) == list(range(10))
        assert order[:9] == [i for b in indices(batches, epoch) for i in b]  # drop_last drops the tail only


@pytest.mark.parametrize("kind", ["split", "dataset"])
def test_each_index_points_at_its_sample(kind):
    x, y = numbered(11)
    data = Split(x, y) if kind == "split" else Pairs(x, y)
    for epoch in (0, 1):
        for batch in Batches(data, 4, seed=1).epoch(epoch):
            assert torch.equal(batch.inputs[:, 0], batch.index.float())  # x[i] = (i, -i)
            assert torch.equal(batch.inputs, x[batch.index]) and torch.equal(batch.targets, y[batch.index])


def test_a_dataset_and_a_dataloader_with_epoch_sampler_draw_the_split_order():
    x, y = numbered(20)
    split, dataset = Batches(Split(x, y), 6, seed=2), Batches(Pairs(x, y), 6, seed=2)
    loader = Batches(DataLoader(Pairs(x, y), batch_size=6, sampler=EpochSampler(20, seed=2), drop_last=True), 6)
    for epoch in (0, 1, 2):
        expected = indices(split, epoch)
        assert indices(dataset, epoch) == expected
        # the user's DataLoader yields (x, y): no indices, but x[i] = (i, -i) says which samples came
        assert [b.inputs[:, 0].long().tolist() for b in loader.epoch(epoch)] == expected


def test_the_order_changes_between_epochs_and_is_reproducible():
    x, y = numbered(32)
    a, b, other = (Batches(Split(x, y), 8, seed=s) for s in (4, 4, 5))
    assert indices(a, 0) != indices(a, 1) != indices(a, 2)
    assert indices(a, 1) == indices(b, 1) == indices(a, 1)  # another object, same seed: same order
    assert indices(other, 1) != indices(a, 1)


# --- data of the wrong form -------------------------------------------------------------------


class Singles(Dataset):
    """Yields the input alone: no target."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.zeros(4)


class OneBad(Dataset):
    """Pairs, but item 5 is a list of one."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return [torch.zeros(4)] if i == 5 else (torch.zeros(4), 0)


class Dicts(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return {"x": torch.zeros(4), "y": 0}


def test_a_dataset_of_non_pairs_is_a_clear_error():
    with pytest.raises(DataError, match=r"must yield \(input, target\) pairs; item 0 is a Tensor\. Return `x, y`"):
        fit(ClassificationTask(mlp(0)), Singles(), None, TrainConfig(epochs=1, batch_size=4))
    with pytest.raises(DataError, match="item 5 is a list"):
        list(Batches(OneBad(), 4, shuffle=False).epoch(0))



def test_a_dataloader_yielding_dicts_is_a_clear_error():
    loader = DataLoader(Dicts(), batch_size=4)
    with pytest.raises(DataError, match=r"a DataLoader must yield \(inputs, targets\).*it yielded a dict\."):
        fit(ClassificationTask(mlp(0)), loader, None, TrainConfig(epochs=1, batch_size=4))


def test_data_that_is_no_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="must be a distil Split, a map-style torch Dataset.*got a list"):
        Batches([(torch.zeros(4), 0)] * 4, 2)


class Stream(IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(4), 0)] * 8)


def test_an_iterable_dataset_is_refused_by_batches():
    with pytest.raises(DataError, match="map-style torch Dataset .with __len__ and __getitem__.*got a Stream"):
        Batches(Stream(), 2)


def test_fit_on_an_iterable_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="map-style torch Dataset"):
        fit(ClassificationTask(mlp(0)), Stream(), None, TrainConfig(epochs=1, batch_size=2))


# --- progress, as tasks and terms see it ------------------------------------------------------


class Recording:
    """A ClassificationTask that records the `Progress` of each training step."""

    def __init__(self, model: nn.Module) -> None:
        self.inner, self.seen = ClassificationTask(model), []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch: Batch, progress: Progress):
        self.seen.append((progress.epoch, progress.step, progress.steps_per_epoch, progress.total_steps,
                          progress.fraction))
        return self.inner.forward(batch, progress)


def test_progress_counts_epochs_and_steps_for_the_task():
    x, y = blobs(40)
    task = Recording(mlp(0))
    fit(task, Split(x, y), None, TrainConfig(epochs=2, batch_size=8))  # 5 steps per epoch, 10 in all
    assert [s[0] for s in task.seen] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert [s[1] for s in task.seen] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert {s[2] for s in task.seen} == {5} and {s[3] for s in task.seen} == {10}
    assert [s[4] for s in task.seen] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


class Watch(nn.Module):
    """A loss term that records what it sees of each step (progress, sample indices, targets) and adds 0."""

    def __init__(self) -> None:
        super().__init__()
        self.name, self.weight, self.seen = "watch", 1.0, []

    def reads(self) -> Reads:
        return Reads()

    def build(self, views) -> None:
        pass

    def forward(self, views) -> torch.Tensor:
        self.seen.append((views.progress, None if views.index is None else views.index.clone(),
                          views.targets.clone()))
        return views.student.logits.sum() * 0.0


@pytest.mark.parametrize("kind", ["split", "dataset"])
def test_a_term_sees_progress_and_sample_indices_through_the_distiller(kind):
    # 12 samples, 12 classes, y[i] = i: a target names its sample, so index == target is checked by hand
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(12)
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 12), nn.Linear(4, 12)
    watch = Watch()
    data = Split(x, y) if kind == "split" else Pairs(x, y)
    fit(Distiller(student, teacher, [KD(), CE(), watch]), data, None, TrainConfig(epochs=2, batch_size=4))
    assert [(p.epoch, p.step, p.steps_per_epoch, p.epochs) for p, _, _ in watch.seen] == [
        (0, 0, 3, 2), (0, 1, 3, 2), (0, 2, 3, 2), (1, 3, 3, 2), (1, 4, 3, 2), (1, 5, 3, 2)]
    for _, index, targets in watch.seen:
        assert torch.equal(index, targets)
    for epoch in (0, 1):
        seen = torch.cat([index for p, index, _ in watch.seen if p.epoch == epoch])
        assert sorted(seen.tolist()) == list(range(12))  # 12 = 3 x 4: every sample once per epoch


class PlainTerm:
    """The Term protocol without nn.Module: name, weight, reads(), build(views), __call__(views)."""

    name, weight = "plain", 1.0

    def reads(self) -> Reads:
        return Reads()

    def build(self, views) -> None:
        pass

    def __call__(self, views) -> torch.Tensor:
        return views.student.logits.sum() * 0.0


def test_a_term_that_is_no_module_works_or_is_a_clear_error():
    try:
        distiller = Distiller(mlp(0), mlp(1), [KD(), PlainTerm()])
    except ConfigError as err:
        assert "nn.Module" in str(err)
    else:
        x, y = blobs(8)
        assert set(distiller(Batch(x, y)).parts) == {"kd", "plain"}


def test_cached_teacher_logits_with_random_augmentation_are_refused():
    x, y = blobs(96)
    distiller = Distiller(mlp(0), mlp(1), [KD(), CE()])
    cached = distiller.with_teacher_logits(Split(x, y))
    with pytest.raises(ConfigError, match="cached teacher logits cannot be used with random augmentation"):
        fit(distiller, cached, None, TrainConfig(epochs=1, batch_size=16), augment=lambda inputs, gen: inputs)


class Broken(Dataset):
    """A Dataset whose item 5 cannot be read, as a corrupt image file."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int):
        if i == 5:
            raise DataError("cannot read image /data/cat/5.png: truncated file")
        return torch.zeros(4), 0


def test_an_error_in_a_loader_worker_keeps_its_own_message():
    with pytest.raises(DataError) as caught:
        fit(ClassificationTask(mlp(0)), Broken(), None, TrainConfig(epochs=1, batch_size=8, workers=2))
    assert str(caught.value) == "cannot read image /data/cat/5.png: truncated file"


def test_an_index_error_inside_a_model_is_not_taken_for_a_label_error():
    class Indexing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)[:, [0, 1, 7]] if self.training else self.fc(x)  # a bug in the user's model

    with pytest.raises(IndexError, match="out of bounds"):
        fit(ClassificationTask(Indexing()), Split(*blobs(96)), None, TrainConfig(epochs=1, batch_size=16))


def test_a_users_shuffling_loader_leaves_the_global_rng_alone():
    x, y = blobs(96)
    loader = DataLoader(Pairs(x, y), batch_size=16, shuffle=True)  # RandomSampler seeds itself from the global RNG
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    batches = list(Batches(loader, 16).epoch(0))
    assert len(batches) == 6 and torch.equal(torch.rand(3), expected)
