"""Checkpoints: safetensors round trips, atomic writes, weights-only .pt files, and clear errors."""

import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import TinyBN
from distil.checkpoint import atomic_write, load_tensors, load_weights, save_model, save_tensors
from distil.errors import DistilError, ModelError


class Tied(nn.Module):
    """Two layers sharing one weight tensor (shared storage in the state dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def trained_tiny_bn(seed: int = 0) -> TinyBN:
    """A TinyBN (conv + BatchNorm + linear) whose weights and BatchNorm statistics differ from a fresh one's."""
    torch.manual_seed(seed)
    model = TinyBN()
    model.train()
    model(torch.randn(8, 1, 4, 4) * 2 + 1)  # moves the running stats
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.eval()


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    model = trained_tiny_bn()
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    torch.manual_seed(123)
    fresh = TinyBN().eval()
    x = torch.randn(5, 1, 4, 4)
    assert not torch.equal(fresh(x), model(x))  # the load below has something to do
    loaded = load_weights(fresh, path)
    assert loaded is fresh
    assert torch.equal(loaded(x), model(x))
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    assert loaded.layer1[1].num_batches_tracked.item() == 1


def test_metadata_round_trips_through_load_tensors(tmp_path):
    model = trained_tiny_bn()
    save_model(model, tmp_path / "m.safetensors", meta={"model": "small", "classes": 3, "acc": 0.5})
    tensors, meta = load_tensors(tmp_path / "m.safetensors")
    assert meta == {"model": "small", "classes": 3, "acc": 0.5}
    assert set(tensors) == set(model.state_dict())
    save_tensors(tmp_path / "plain.safetensors", {"w": torch.arange(6.0).reshape(2, 3)})
    tensors, empty = load_tensors(tmp_path / "plain.safetensors")
    assert empty == {} and torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))


def test_save_tensors_splits_shared_storage_and_non_contiguous_tensors(tmp_path):
    model = Tied()
    save_model(model, tmp_path / "tied.safetensors")
    other = Tied()
    load_weights(other, tmp_path / "tied.safetensors")
    x = torch.randn(2, 4)
    assert torch.equal(other(x), model(x))
    t = torch.arange(12.0).reshape(3, 4).T  # a non-contiguous view
    save_tensors(tmp_path / "t.safetensors", {"t": t})
    assert torch.equal(load_file(tmp_path / "t.safetensors")["t"], t)


def test_loading_into_a_differently_shaped_model_lists_the_mismatch(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(TinyBN(width=4), path)
    with pytest.raises(ModelError, match=r"does not fit the model.*shape mismatches "
                                         r"\['layer1\.0\.weight: file \[4, 1, 3, 3\] vs model \[8, 1, 3, 3\]"):
        load_weights(TinyBN(width=8), path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), path)
    with pytest.raises(ModelError, match=r"missing \['2\.bias', '2\.weight'\], unexpected \[\]"):
        load_weights(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1), nn.Linear(1, 1)), path)
    with pytest.raises(ModelError, match=r"missing \[\], unexpected \['1\.bias', '1\.weight'\]"):
        load_weights(nn.Sequential(nn.Linear(2, 3)), path)


def test_a_failed_load_leaves_the_model_untouched(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(TinyBN(width=4), path)
    target = TinyBN(width=8)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ModelError):
        load_weights(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@pytest.mark.parametrize("name", ["nope.safetensors", "nope.pt"])
def test_a_missing_file_is_a_distil_error_naming_the_path(tmp_path, name):
    path = tmp_path / "sub" / name
    with pytest.raises(DistilError, match=rf"checkpoint file not found: {re.escape(str(path))}"):
        load_weights(TinyBN(), path)


def test_a_file_that_is_not_safetensors_is_a_distil_error(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(DistilError, match=r"cannot read checkpoint .*junk\.safetensors.*Is it a safetensors file"):
        load_weights(TinyBN(), path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_a_torch_saved_state_dict_loads_through_the_weights_only_path(tmp_path, suffix):
    model = trained_tiny_bn()
    path = tmp_path / f"m{suffix}"
    torch.save(model.state_dict(), path)
    loaded = load_weights(TinyBN().eval(), path)
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(loaded(x), model(x))


def test_a_pt_file_wrapping_the_state_dict_loads(tmp_path):
    model = trained_tiny_bn()
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    loaded = load_weights(TinyBN().eval(), tmp_path / "ckpt.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_pt_file_holding_a_pickled_object_is_refused(tmp_path):
    model = TinyBN()
    torch.save({"weights": model, "note": "a pickled module"}, tmp_path / "pickled.pt")
    with pytest.raises(ModelError, match=r"holds more than tensors.*weights_only=True.*state_dict"):
        load_weights(model, tmp_path / "pickled.pt")


def test_a_pt_state_dict_of_the_wrong_model_lists_the_mismatch(tmp_path):
    torch.save(TinyBN(width=4).state_dict(), tmp_path / "m.pt")
    with pytest.raises(ModelError, match=r"m\.pt does not fit the model.*layer1\.0\.weight: file \[4, 1, 3, 3\]"):
        load_weights(TinyBN(width=2), tmp_path / "m.pt")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    folder = tmp_path / "new" / "dir"  # created on demand
    save_model(TinyBN(), folder / "m.safetensors")
    save_model(TinyBN(), folder / "m.safetensors")  # overwrite
    save_tensors(folder / "c.safetensors", {"x": torch.ones(2)}, meta={"a": 1})
    assert sorted(p.name for p in folder.iterdir()) == ["c.safetensors", "m.safetensors"]


def test_an_overwrite_replaces_the_old_content(tmp_path):
    path = tmp_path / "m.safetensors"
    save_tensors(path, {"x": torch.zeros(3)})
    save_tensors(path, {"y": torch.ones(2)})
    assert set(load_file(path)) == {"y"}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_tensors(path, {"x": torch.arange(3.0)})

    def half_write(tmp):
        tmp.write_bytes(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_write)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert torch.equal(load_file(path)["x"], torch.arange(3.0))
