"""The zoo, user factories, feature taps, connectors and checkpoints."""

import sys

import pytest
import torch
from torch import nn

from distil.checkpoint import load_weights, save_model
from distil.connectors import build_connector
from distil.errors import DistilError, ModelError, ShapeError, TapError
from distil.models import MODELS, build_model, count_params
from distil.taps import FeatureTaps

SHAPES = {"mlp": (7,), "cnn": (3, 16, 16), "cnn1d": (1, 40), "mobilenetv2": (3, 16, 16)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_adapts_to_the_input_and_class_count(name):
    shape = SHAPES.get(name, (3, 16, 16))
    model = build_model(name, shape, 6).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 6)


def test_cnn1d_reads_a_flat_signal_as_one_channel():
    model = build_model("cnn1d", (40,), 10, width=8)
    assert model(torch.randn(3, 40)).shape == (3, 10)


def test_width_and_depth_knobs_change_the_size():
    small, wide, deep = (build_model("mlp", (10,), 3, width=w, depth=d) for w, d in ((8, 1), (16, 1), (8, 3)))
    assert count_params(small) == 10 * 8 + 8 + 8 * 3 + 3  # by hand: one hidden layer
    assert count_params(wide) > count_params(small) and count_params(deep) == count_params(small) + 2 * (8 * 8 + 8)


def test_resnet8x4_has_the_literature_widths():
    model = build_model("resnet8x4", (3, 32, 32), 100)
    assert model.get_submodule("layer3.0.conv1").out_channels == 256 and model.fc.in_features == 256


def test_unknown_model_and_knob_errors():
    with pytest.raises(ModelError, match=r"unknown model 'cnn1'.*Did you mean 'cnn1d'"):
        build_model("cnn1", (1, 40), 10)
    with pytest.raises(ModelError, match=r"no option 'widht'; allowed: \['width', 'depth', 'kernel_size'\]"):
        build_model("cnn1d", (1, 40), 10, widht=3)
    with pytest.raises(ModelError, match=r"model 'cnn' needs inputs of rank 3.*shape \[40\]"):
        build_model("cnn", (40,), 10)


def test_a_user_factory_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "userzoo.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes, hidden=4):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("userzoo:tiny", (6,), 3, hidden=5)
    assert model(torch.randn(2, 6)).shape == (2, 3)
    with pytest.raises(ModelError, match=r"module 'userzoo' has no 'tinny'.*'tiny'"):
        build_model("userzoo:tinny", (6,), 3)
    with pytest.raises(ModelError, match=r"cannot import module 'nozoo'"):
        build_model("nozoo:f", (6,), 3)
    sys.modules.pop("userzoo", None)


def test_feature_taps_collect_outputs_and_remove_their_hooks():
    model = build_model("cnn", (1, 8, 8), 10, width=4, depth=2)
    with FeatureTaps(model, ["layer1", "layer2"]) as taps:
        model(torch.randn(2, 1, 8, 8))
    assert taps.outputs["layer1"].shape == (2, 4, 8, 8) and taps.outputs["layer2"].shape == (2, 8, 4, 4)
    assert all(not m._forward_hooks for m in model.modules())


def test_a_wrong_tap_name_lists_the_closest():
    model = build_model("cnn", (1, 8, 8), 10, width=4, depth=2)
    with pytest.raises(TapError, match=r"the teacher has no module named 'layr1'. Closest valid names: layer1"):
        FeatureTaps(model, ["layr1"], "teacher")


@pytest.mark.parametrize("student,teacher,kind", [
    ((2, 8, 4, 4), (2, 16, 4, 4), nn.Conv2d), ((2, 8, 8, 8), (2, 16, 4, 4), nn.Conv2d),
    ((2, 8, 4, 4), (2, 10), nn.Linear), ((2, 8, 20), (2, 16, 20), nn.Conv1d), ((2, 5), (2, 9), nn.Linear)])
def test_connectors_map_the_student_feature_onto_the_teacher_shape(student, teacher, kind):
    connector = build_connector(student, teacher, "pair")
    assert isinstance(connector.proj, kind)
    assert connector(torch.randn(*student)).shape == teacher


def test_equal_shapes_need_no_connector_and_impossible_pairs_are_named():
    assert isinstance(build_connector((2, 8, 4, 4), (2, 8, 4, 4), "pair"), nn.Identity)
    with pytest.raises(ShapeError, match=r"cannot connect s -> t: student feature \[2, 8, 4, 4\] and teacher feature "
                                         r"\[2, 8, 4\] have different ranks"):
        build_connector((2, 8, 4, 4), (2, 8, 4), "s -> t")
    with pytest.raises(ShapeError, match=r"spatial size \[2, 2\] is smaller than the teacher's \[4, 4\]"):
        build_connector((2, 8, 2, 2), (2, 8, 4, 4), "s -> t")


def test_checkpoints_round_trip_and_refuse_a_mismatched_model(tmp_path):
    model = build_model("cnn", (1, 8, 8), 10, width=4).eval()
    save_model(model, tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # atomic: no temp file left
    other = load_weights(build_model("cnn", (1, 8, 8), 10, width=4), tmp_path / "m.safetensors").eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x), other(x))
    with pytest.raises(ModelError, match=r"does not fit the model.*shape mismatches \['layer1.0.weight: file \[4, 1, 3, 3\] vs model \[8, 1, 3, 3\]"):
        load_weights(build_model("cnn", (1, 8, 8), 10, width=8), tmp_path / "m.safetensors")
    with pytest.raises(DistilError, match=r"checkpoint file not found: .*nope.safetensors"):
        load_weights(model, tmp_path / "nope.safetensors")


def test_a_pt_state_dict_loads_with_weights_only(tmp_path):
    model = build_model("mlp", (4,), 2, width=3)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = load_weights(build_model("mlp", (4,), 2, width=3), tmp_path / "m.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    torch.save({"weights": model, "note": "a pickled module"}, tmp_path / "pickled.pt")
    with pytest.raises(ModelError, match=r"holds more than tensors.*weights_only=True.*state_dict"):
        load_weights(model, tmp_path / "pickled.pt")
