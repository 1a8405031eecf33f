"""The model zoo and `build_model`: zoo names, knobs, user factories, and the errors they give."""

import importlib
import sys

import pytest
import torch
from torch import nn

from distil.errors import DistilError, ModelError
from distil.models import MODELS, build_model, count_params, resolve_factory

IMAGE = (3, 16, 16)
# per zoo entry: an input shape it takes and the smallest knobs it offers (presets take none)
SPECS = {
    "mlp": ((7,), {"width": 8}),
    "cnn": (IMAGE, {"width": 4, "depth": 2}),
    "cnn1d": ((1, 40), {"width": 4, "depth": 2}),
    "resnet": (IMAGE, {"depth": 8, "width": 1}),
    "mobilenetv2": (IMAGE, {"width": 0.25, "expand": 2}),
}


def spec(name: str) -> tuple[tuple[int, ...], dict]:
    return SPECS.get(name, (IMAGE, {}))  # resnet8x4, resnet20, ...: fixed presets on images


def test_the_zoo_has_the_documented_entries():
    expected = {"mlp", "cnn", "cnn1d", "resnet", "mobilenetv2", "resnet8x4", "resnet14x4", "resnet20x4",
                "resnet32x4", "resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet110", "gpt"}
    assert set(MODELS) == expected


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"gpt"}))  # gpt (token logits): tests/test_lm.py
def test_every_zoo_model_builds_and_gives_batch_by_class_logits(name):
    torch.manual_seed(0)
    shape, knobs = spec(name)
    model = build_model(name, shape, 5, **knobs)
    assert isinstance(model, nn.Module)
    x = torch.randn(2, *shape)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    # submodules are named layer1.. and fc, so feature taps read the same across the zoo
    names = dict(model.named_modules())
    assert "layer1" in names and isinstance(names["fc"], nn.Linear) and names["fc"].out_features == 5


@pytest.mark.parametrize("shape", [(1, 40), (40,)])
def test_cnn1d_takes_channels_by_length_and_a_flat_signal(shape):
    model = build_model("cnn1d", shape, 10, width=8)
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    assert model.layer1[0].in_channels == 1


def test_cnn1d_on_several_channels():
    model = build_model("cnn1d", (4, 33), 3, width=4, depth=3)
    assert model.layer1[0].in_channels == 4
    assert model(torch.randn(2, 4, 33)).shape == (2, 3)


def test_mlp_flattens_any_input_shape():
    model = build_model("mlp", (2, 3, 4), 6, width=5)
    assert model.layer1[0].in_features == 24
    assert model(torch.randn(3, 2, 3, 4)).shape == (3, 6)


def test_mlp_knobs_change_the_parameter_count_by_hand():
    small, wide, deep = (build_model("mlp", (10,), 3, width=w, depth=d) for w, d in ((8, 1), (16, 1), (8, 3)))
    assert count_params(small) == (10 * 8 + 8) + (8 * 3 + 3)
    assert count_params(wide) == (10 * 16 + 16) + (16 * 3 + 3)
    assert count_params(deep) == count_params(small) + 2 * (8 * 8 + 8)
    assert [n for n, _ in deep.named_children()] == ["flatten", "layer1", "layer2", "layer3", "fc"]


def test_cnn_width_doubles_and_resolution_halves_per_block():
    model = build_model("cnn", (1, 8, 8), 10, width=4, depth=3)
    assert [model.get_submodule(f"layer{i}.0").out_channels for i in (1, 2, 3)] == [4, 8, 16]
    assert [model.get_submodule(f"layer{i}.0").stride for i in (1, 2, 3)] == [(1, 1), (2, 2), (2, 2)]
    assert model.fc.in_features == 16


def test_resnet8x4_has_the_literature_widths():
    model = build_model("resnet8x4", (3, 32, 32), 100)
    assert model.get_submodule("layer1.0.conv1").out_channels == 64
    assert model.get_submodule("layer3.0.conv1").out_channels == 256 and model.fc.in_features == 256
    assert len(model.layer1) == 1  # depth 8 = 6 * 1 + 2: one block per stage
    assert len(build_model("resnet20", IMAGE, 10).layer2) == 3  # 20 = 6 * 3 + 2


def test_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(ModelError, match=r"6n\+2.*got 9"):
        build_model("resnet", IMAGE, 10, depth=9)


# --- errors ---------------------------------------------------------------------------------


def test_an_unknown_knob_is_a_model_error_naming_the_allowed_knobs():
    with pytest.raises(ModelError, match=r"model 'cnn1d' has no option 'widht'; allowed: "
                                         r"\['width', 'depth', 'kernel_size'\]\. Did you mean 'width'"):
        build_model("cnn1d", (1, 40), 10, widht=3)
    with pytest.raises(ModelError, match=r"model 'mlp' has no option 'layers'; allowed: \['width', 'depth'\]"):
        build_model("mlp", (7,), 3, layers=2)


def test_a_preset_takes_no_knobs():
    with pytest.raises(ModelError, match=r"model 'resnet8' has no option 'width'; allowed: \[\]\. It takes none"):
        build_model("resnet8", IMAGE, 10, width=2)


def test_an_unknown_model_name_suggests_the_closest():
    with pytest.raises(ModelError, match=r"unknown model 'cnn1'\. Did you mean 'cnn1d'"):
        build_model("cnn1", (1, 40), 10)
    with pytest.raises(ModelError, match=r"unknown model 'resnet8x5'.*'resnet8x4'.*package\.module:factory"):
        resolve_factory("resnet8x5")


def test_model_errors_are_distil_errors():
    assert issubclass(ModelError, DistilError)


@pytest.mark.parametrize("name,reported", [
    ("cnn", "cnn"), ("resnet", "resnet"), ("resnet8x4", "resnet"), ("mobilenetv2", "mobilenetv2")])
def test_image_models_on_a_1d_input_shape_name_the_shape(name, reported):
    with pytest.raises(ModelError, match=rf"model '{reported}' needs inputs of rank 3 .*shape \[40\]"):
        build_model(name, (40,), 10)


def test_cnn_on_a_1d_input_suggests_cnn1d():
    with pytest.raises(ModelError, match=r"model 'cnn' needs inputs of rank 3 .*shape \[40\]\. Use 'cnn1d'"):
        build_model("cnn", (40,), 10)


def test_cnn1d_on_an_image_shape_names_the_shape():
    with pytest.raises(ModelError, match=r"model 'cnn1d' needs inputs of rank 1 or 2.*shape \[3, 16, 16\]"):
        build_model("cnn1d", IMAGE, 10)


# --- user factories -------------------------------------------------------------------------

USER_MODULE = '''
from torch import nn


def tiny(num_classes, hidden=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def shaped(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1], num_classes))


def anything(**knobs):
    model = nn.Linear(6, 2)
    model.knobs = knobs
    return model


def not_a_module(num_classes):
    return "a string"


def broken(num_classes):
    raise KeyError("oops")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `distil_userzoo` on sys.path, written under tmp_path; forgotten afterwards."""
    name = "distil_userzoo"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    sys.modules.pop(name, None)
    yield name
    sys.modules.pop(name, None)


def test_a_user_factory_by_module_path(user_module):
    model = build_model(f"{user_module}:tiny", (6,), 3, hidden=5)
    assert model[1].out_features == 5 and model[3].out_features == 3
    assert model(torch.randn(2, 6)).shape == (2, 3)


def test_a_user_factory_gets_the_input_shape_when_it_names_it(user_module):
    model = build_model(f"{user_module}:shaped", (2, 5), 7)
    assert model[1].in_features == 10
    assert model(torch.randn(4, 2, 5)).shape == (4, 7)


def test_a_user_factory_with_var_keywords_takes_any_knob_but_not_the_shape(user_module):
    model = build_model(f"{user_module}:anything", (6,), 2, depth=3, color="red")
    assert model.knobs == {"depth": 3, "color": "red"}


def test_user_factory_errors(user_module):
    with pytest.raises(ModelError, match=rf"module '{user_module}' has no 'tinny'\. Did you mean 'tiny'"):
        build_model(f"{user_module}:tinny", (6,), 3)
    with pytest.raises(ModelError, match=rf"model '{user_module}:tiny' has no option 'width'; allowed: \['hidden'\]"):
        build_model(f"{user_module}:tiny", (6,), 3, width=3)
    with pytest.raises(ModelError, match=r"returned str, not a torch nn\.Module"):
        build_model(f"{user_module}:not_a_module", (6,), 3)
    with pytest.raises(ModelError, match=r"cannot build model '.*:broken' with \{\}: KeyError: 'oops'"):
        build_model(f"{user_module}:broken", (6,), 3)


def test_an_unimportable_user_module_is_a_model_error():
    with pytest.raises(ModelError, match=r"model 'distil_no_such_zoo:f': cannot import module "
                                         r"'distil_no_such_zoo'.*PYTHONPATH"):
        build_model("distil_no_such_zoo:f", (6,), 3)
