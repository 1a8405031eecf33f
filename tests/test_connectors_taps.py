"""Connectors (student feature -> teacher feature shape) and feature taps (forward hooks by module name)."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from distil.connectors import Connector, build_connector
from distil.errors import DistilError, ShapeError, TapError
from distil.taps import FeatureTaps, get_module, module_names

# --- connectors -----------------------------------------------------------------------------


@pytest.mark.parametrize("student,teacher", [
    ((2, 8, 4, 4), (2, 8, 4, 4)), ((2, 8, 4, 4), (5, 8, 4, 4)), ((3, 16), (3, 16)), ((2, 4, 20), (2, 4, 20))])
def test_equal_feature_shapes_get_an_identity(student, teacher):
    connector = build_connector(student, teacher, "pair")
    assert isinstance(connector, nn.Identity)
    x = torch.randn(*student)
    assert connector(x) is x


def test_channel_mapping_is_a_1x1_convolution():
    torch.manual_seed(0)
    connector = build_connector((2, 8, 4, 4), (2, 16, 4, 4), "pair")
    assert isinstance(connector, Connector) and isinstance(connector.proj, nn.Conv2d)
    assert connector.proj.kernel_size == (1, 1)
    x = torch.randn(2, 8, 4, 4)
    y = connector(x)
    assert y.shape == (2, 16, 4, 4)
    # by hand: y[b, o, h, w] = sum_c W[o, c] x[b, c, h, w] + bias[o]
    w, b = connector.proj.weight[:, :, 0, 0], connector.proj.bias
    expected = torch.einsum("oc,bchw->bohw", w, x) + b[None, :, None, None]
    assert torch.allclose(y, expected, atol=1e-5)


def test_larger_student_maps_are_average_pooled_to_the_teacher_size():
    torch.manual_seed(0)
    connector = build_connector((2, 8, 8, 8), (2, 16, 4, 4), "pair")
    assert connector.pool_to == (4, 4) and isinstance(connector.proj, nn.Conv2d)
    x = torch.randn(2, 8, 8, 8)
    y = connector(x)
    assert y.shape == (2, 16, 4, 4)
    # by hand: the mean of each 2x2 block, then the 1x1 projection
    pooled = x.reshape(2, 8, 4, 2, 4, 2).mean(dim=(3, 5))
    w, b = connector.proj.weight[:, :, 0, 0], connector.proj.bias
    expected = torch.einsum("oc,bchw->bohw", w, pooled) + b[None, :, None, None]
    assert torch.allclose(y, expected, atol=1e-5)


def test_same_channels_but_larger_maps_are_pooled_too():
    connector = build_connector((2, 8, 8, 8), (2, 8, 4, 4), "pair")
    assert connector(torch.randn(2, 8, 8, 8)).shape == (2, 8, 4, 4)


def test_a_conv_feature_is_flattened_onto_a_fully_connected_teacher_feature():
    torch.manual_seed(0)
    connector = build_connector((2, 8, 4, 4), (2, 10), "pair")
    assert connector.flatten and isinstance(connector.proj, nn.Linear)
    assert (connector.proj.in_features, connector.proj.out_features) == (8 * 4 * 4, 10)
    x = torch.randn(2, 8, 4, 4)
    y = connector(x)
    assert y.shape == (2, 10)
    expected = x.reshape(2, 128) @ connector.proj.weight.T + connector.proj.bias
    assert torch.allclose(y, expected, atol=1e-5)


def test_sequence_features_use_a_1x1_conv1d():
    torch.manual_seed(0)
    connector = build_connector((2, 8, 20), (2, 16, 20), "pair")
    assert isinstance(connector.proj, nn.Conv1d) and connector.proj.kernel_size == (1,)
    x = torch.randn(2, 8, 20)
    y = connector(x)
    assert y.shape == (2, 16, 20)
    expected = torch.einsum("oc,bcl->bol", connector.proj.weight[:, :, 0], x) + connector.proj.bias[None, :, None]
    assert torch.allclose(y, expected, atol=1e-5)


def test_longer_sequences_are_pooled_in_1d():
    torch.manual_seed(0)
    connector = build_connector((2, 8, 20), (2, 16, 10), "pair")
    x = torch.randn(2, 8, 20)
    y = connector(x)
    assert y.shape == (2, 16, 10)
    pooled = x.reshape(2, 8, 10, 2).mean(dim=3)
    expected = torch.einsum("oc,bcl->bol", connector.proj.weight[:, :, 0], pooled) + connector.proj.bias[None, :, None]
    assert torch.allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("student,teacher,kind", [((2, 5), (2, 9), nn.Linear), ((2, 8, 20), (2, 10), nn.Linear)])
def test_vector_teacher_features_use_a_linear_map(student, teacher, kind):
    connector = build_connector(student, teacher, "pair")
    assert isinstance(connector.proj, kind)
    assert connector(torch.randn(*student)).shape == teacher


def test_a_connector_is_trainable():
    connector = build_connector((2, 8, 4, 4), (2, 16, 4, 4), "pair")
    params = list(connector.parameters())
    assert params and all(p.requires_grad for p in params)
    connector(torch.randn(2, 8, 4, 4)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_a_rank_mismatch_is_a_shape_error_naming_both_shapes():
    with pytest.raises(ShapeError, match=r"cannot connect student 'a' -> teacher 'b': student feature "
                                         r"\[2, 8, 4, 4\] and teacher feature \[2, 8, 4\] have different ranks"):
        build_connector((2, 8, 4, 4), (2, 8, 4), "student 'a' -> teacher 'b'")
    # a vector student feature cannot grow into a map either
    with pytest.raises(ShapeError, match=r"\[2, 10\].*\[2, 8, 4, 4\]"):
        build_connector((2, 10), (2, 8, 4, 4), "s -> t")


@pytest.mark.parametrize("student,teacher,sizes", [
    ((2, 8, 2, 2), (2, 8, 4, 4), r"\[2, 2\] is smaller than the teacher's \[4, 4\]"),
    ((2, 8, 8, 2), (2, 16, 4, 4), r"\[8, 2\] is smaller than the teacher's \[4, 4\]"),
    ((2, 8, 5), (2, 8, 10), r"\[5\] is smaller than the teacher's \[10\]"),
])
def test_a_student_map_smaller_than_the_teacher_is_a_shape_error(student, teacher, sizes):
    with pytest.raises(ShapeError, match=r"cannot connect s -> t: the student feature's spatial size " + sizes):
        build_connector(student, teacher, "s -> t")


def test_shape_errors_are_distil_errors():
    assert issubclass(ShapeError, DistilError)


# --- taps -----------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.layer2 = nn.Linear(6, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.layer2(self.layer1(x))))


class PairOut(nn.Module):
    """A module returning a tuple, like an RNN: the tap keeps the first element."""

    def forward(self, x):
        return x * 2, x * 3


def test_feature_taps_collect_the_outputs_of_named_modules():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 4)
    with FeatureTaps(model, ["layer1", "layer2", "layer1.0"]) as taps:
        logits = model(x)
    assert set(taps.outputs) == {"layer1", "layer2", "layer1.0"}
    h1 = torch.relu(x @ model.layer1[0].weight.T + model.layer1[0].bias)
    h2 = h1 @ model.layer2.weight.T + model.layer2.bias  # before the tanh in forward
    assert torch.allclose(taps.outputs["layer1.0"], x @ model.layer1[0].weight.T + model.layer1[0].bias, atol=1e-6)
    assert torch.allclose(taps.outputs["layer1"], h1, atol=1e-6)
    assert torch.allclose(taps.outputs["layer2"], h2, atol=1e-6)
    assert torch.allclose(logits, torch.tanh(h2) @ model.fc.weight.T + model.fc.bias, atol=1e-6)


def test_feature_taps_remove_their_hooks_on_exit():
    model = Net()
    taps = FeatureTaps(model, ["layer1", "layer2"])
    assert not model.layer1._forward_hooks
    with taps:
        assert len(model.layer1._forward_hooks) == 1 and len(model.layer2._forward_hooks) == 1
        model(torch.randn(2, 4))
    assert all(not m._forward_hooks for m in model.modules())
    # outside the block nothing is recorded any more
    taps.outputs.clear()
    model(torch.randn(2, 4))
    assert taps.outputs == {}


def test_feature_taps_remove_their_hooks_when_the_forward_pass_fails():
    model = Net()
    with pytest.raises(RuntimeError):
        with FeatureTaps(model, ["layer1"]):
            model(torch.randn(2, 7))  # wrong input width
    assert all(not m._forward_hooks for m in model.modules())


def test_feature_taps_start_fresh_on_each_pass_and_can_be_reused():
    model = Net()
    taps = FeatureTaps(model, ["layer2"])
    with taps:
        model(torch.randn(2, 4))
    first = taps.outputs["layer2"]
    with taps:
        model(torch.randn(5, 4))
    assert taps.outputs["layer2"].shape == (5, 5) and first.shape == (2, 5)
    assert all(not m._forward_hooks for m in model.modules())



def test_held_taps_keep_their_hooks_and_record_only_between_start_and_stop():
    model = Net()
    taps = FeatureTaps(model, ["layer1", "layer2"])
    taps.hold()
    assert len(model.layer1._forward_hooks) == 1 and len(model.layer2._forward_hooks) == 1
    with taps:
        model(torch.randn(2, 4))
    assert set(taps.outputs) == {"layer1", "layer2"}
    assert len(model.layer1._forward_hooks) == 1  # still there after the pass
    recorded = dict(taps.outputs)
    model(torch.randn(7, 4))  # outside a pass: nothing recorded
    assert taps.outputs.keys() == recorded.keys() and all(taps.outputs[k] is v for k, v in recorded.items())
    taps.start()
    model(torch.randn(3, 4))
    taps.stop()
    assert taps.outputs["layer2"].shape == (3, 5)
    taps.hold()  # twice: still one hook per layer
    assert len(model.layer1._forward_hooks) == 1
    taps.release()
    assert all(not m._forward_hooks for m in model.modules())

def test_a_tuple_output_is_tapped_by_its_first_element():
    model = nn.Sequential(OrderedDict(pair=PairOut()))
    x = torch.randn(2, 3)
    with FeatureTaps(model, ["pair"]) as taps:
        model(x)
    assert torch.equal(taps.outputs["pair"], x * 2)


def test_a_wrong_tap_name_is_a_tap_error_naming_the_closest_valid_name():
    model = Net()
    with pytest.raises(TapError, match=r"the teacher has no module named 'layr1'\. Closest valid names: layer1"):
        FeatureTaps(model, ["layr1"], "teacher")
    with pytest.raises(TapError, match=r"the model has no module named 'layer3'.*layer1"):
        get_module(model, "layer3")
    assert all(not m._forward_hooks for m in model.modules())


def test_a_hopeless_tap_name_still_lists_some_valid_names():
    with pytest.raises(TapError, match=r"no module named 'zzzzzzzz'.*layer1"):
        FeatureTaps(Net(), ["zzzzzzzz"])


def test_module_names_lists_every_named_submodule():
    assert module_names(Net()) == ["layer1", "layer1.0", "layer1.1", "layer2", "fc"]
    assert get_module(Net(), "layer1.0").out_features == 6
