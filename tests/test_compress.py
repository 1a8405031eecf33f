"""Pruning: unstructured magnitude (fractions by hand), structured channels (really shrinks), save/load."""

import pytest
import torch
from torch import nn

from distil.build import load_recipe
from distil.compress.prune import channel_prune, check_ratio, magnitude_prune, make_permanent, structure_of
from distil.errors import DistilError, ModelError, RecipeError
from distil.evaluate import count_macs
from distil.modelfile import load_model_file, save_model_file
from distil.models import build_model, count_params


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


def test_global_magnitude_pruning_zeroes_the_stated_fraction_of_smallest_weights():
    model = small_mlp()
    weights = torch.cat([model[0].weight.flatten(), model[2].weight.flatten()]).abs()
    k = round(0.6 * weights.numel())  # 0.6 * 300 = 180 weights
    threshold = weights.sort().values[k - 1]
    info = magnitude_prune(model, 0.6, scope="global")
    zeros = int((model[0].weight == 0).sum() + (model[2].weight == 0).sum())
    assert zeros == k and info["sparsity"] == pytest.approx(0.6)
    assert float(model[0].weight.detach().abs().max()) > threshold  # the largest survive
    assert all((m.weight.abs() > threshold).sum() == (m.weight != 0).sum() for m in (model[0], model[2]))
    assert "0.weight_orig" not in model.state_dict()  # permanent


def test_per_layer_magnitude_pruning_prunes_each_layer_to_the_fraction():
    model = small_mlp()
    magnitude_prune(model, 0.25, scope="layer")
    assert int((model[0].weight == 0).sum()) == 50  # 25% of 200
    assert int((model[2].weight == 0).sum()) == 25  # 25% of 100


def test_masks_survive_fine_tuning_until_made_permanent():
    model = small_mlp()
    magnitude_prune(model, 0.5, permanent=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(8, 10)).pow(2).mean().backward()
    optimizer.step()
    make_permanent(model)
    assert int((model[0].weight == 0).sum() + (model[2].weight == 0).sum()) == 150
    assert not any(k.endswith("_orig") or k.endswith("_mask") for k in model.state_dict())


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.1])
def test_ratios_outside_zero_one_are_refused(bad):
    with pytest.raises(DistilError, match="between 0 and 1"):
        check_ratio(bad, "compress.ratio")
    with pytest.raises(RecipeError, match=r"'compress.ratio'"):
        load_recipe({"compress": {"enabled": True, "ratio": bad}})


def test_channel_pruning_really_shrinks_and_keeps_the_forward_pass():
    model = build_model("cnn1d", (1, 40), 10, width=16, depth=3)
    x = torch.randn(4, 1, 40)
    macs, params = count_macs(model, x[:1]), count_params(model)
    info = channel_prune(model, x[:1], 0.5, importance="l2")
    assert [model.get_submodule(f"layer{i}.0").out_channels for i in (1, 2, 3)] == [8, 8, 8]
    assert model.get_submodule("fc").out_features == 10  # the classifier keeps its classes
    assert model(x).shape == (4, 10)
    assert count_macs(model, x[:1]) < 0.3 * macs  # conv MACs scale with in*out channels: ~1/4
    assert count_params(model) < 0.35 * params
    assert info["history"][0]["macs"] > info["history"][-1]["macs"]


def test_channel_pruning_to_a_macs_target():
    model = build_model("cnn", (1, 8, 8), 10, width=16, depth=2)
    x = torch.randn(1, 1, 8, 8)
    before = count_macs(model, x)
    channel_prune(model, x, 0.5, target="macs")
    assert count_macs(model, x) <= 0.5 * before


def test_taylor_importance_uses_gradients():
    model = build_model("cnn1d", (1, 40), 3, width=8, depth=2)
    x, y = torch.randn(16, 1, 40), torch.randint(0, 3, (16,))
    channel_prune(model, x[:1], 0.5, importance="taylor",
                  taylor_loss=lambda m: nn.functional.cross_entropy(m(x), y))
    assert model.get_submodule("layer1.0").out_channels == 4


def test_a_pruned_model_saved_and_loaded_gives_the_same_outputs(tmp_path):
    model = build_model("cnn1d", (1, 40), 10, width=16, depth=3)
    x = torch.randn(5, 1, 40)
    channel_prune(model, x[:1], 0.5)
    model.eval()
    spec = {"model": "cnn1d", "knobs": {"width": 16, "depth": 3}, "input_shape": [1, 40], "num_classes": 10}
    save_model_file(model, tmp_path / "p.safetensors", spec, pruned=True)
    loaded, meta = load_model_file(tmp_path / "p.safetensors")
    assert meta["structure"] == structure_of(model)
    assert torch.equal(loaded(x), model(x))


class Scaled(nn.Module):
    """A layer with its own per-channel parameter that torch-pruning does not know."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):
        return x * self.scale


def test_a_layer_structured_pruning_cannot_handle_is_named():
    model = nn.Sequential(nn.Conv1d(1, 8, 3), Scaled(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 38, 3))
    with pytest.raises(ModelError, match=r"cannot handle module '1' \(Scaled\).*compress.exclude: \['1'\]"):
        channel_prune(model, torch.randn(1, 1, 40), 0.5)
    assert model[0].out_channels == 8  # nothing was changed


def test_pruning_in_steps_fine_tunes_between_steps_only():
    model = build_model("cnn1d", (1, 40), 10, width=16, depth=2)
    calls = []
    info = channel_prune(model, torch.randn(1, 1, 40), 0.5, steps=3, between_steps=calls.append)
    assert calls == [1, 2] and len(info["history"]) == 4
    assert model.get_submodule("layer1.0").out_channels == 8
