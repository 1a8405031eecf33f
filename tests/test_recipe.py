from pathlib import Path

import pytest
import torch
import yaml

from distil.build import build_terms, load_recipe
from distil.errors import DistilError, RecipeError
from distil.losses import CE, KD, FitNet
from distil.recipe import Recipe, dump_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_shipped_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert {"mnist1d.yaml", "digits.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    terms = build_terms(recipe.distill.terms)
    assert len(terms) == len(recipe.distill.terms)


def test_defaults_are_written_out_and_round_trip(tmp_path):
    recipe = load_recipe({"name": "x"})
    text = dump_recipe(recipe)
    assert "batch_size" in text and "latency_runs" in text  # every default is written out
    (tmp_path / "r.yaml").write_text(text)
    assert load_recipe(tmp_path / "r.yaml") == recipe


def test_terms_bind_to_constructor_signatures():
    kd, ce, fit = build_terms([{"kind": "kd", "T": 2, "weight": 0.7}, {"kind": "ce", "weight": 0.3},
                               {"kind": "fitnet", "student": "a", "teacher": "b"}])
    assert isinstance(kd, KD) and kd.T == 2.0 and kd.weight == 0.7
    assert isinstance(ce, CE) and ce.weight == 0.3
    assert isinstance(fit, FitNet) and fit.student_layer == "a" and fit.teacher_layer == "b"


def test_unknown_top_level_key_suggests_the_right_one():
    with pytest.raises(RecipeError, match=r"unknown key 'distil'.*Did you mean 'distill'"):
        load_recipe({"distil": {}})


def test_unknown_nested_key_names_its_path():
    with pytest.raises(RecipeError, match=r"unknown key 'data.sorce'.*Did you mean 'source'"):
        load_recipe({"data": {"sorce": "digits"}})
    with pytest.raises(RecipeError, match=r"'teacher.train.epoch'.*Did you mean 'epochs'"):
        load_recipe({"teacher": {"model": "cnn1d", "train": {"epoch": 3}}})


def test_unknown_model_knob_is_an_error_with_allowed_names():
    with pytest.raises(RecipeError, match=r"teacher.*'widht'.*allowed.*width.*Did you mean 'width'"):
        load_recipe({"teacher": {"model": "cnn1d", "widht": 32}})


def test_wrong_type_names_the_field():
    with pytest.raises(RecipeError, match=r"'student.train.epochs'.*integer.*'ten'"):
        load_recipe({"student": {"train": {"epochs": "ten"}}})


def test_out_of_range_value_names_the_field():
    with pytest.raises(RecipeError, match=r"'teacher.train.lr'.*greater than 0"):
        load_recipe({"teacher": {"model": "cnn1d", "train": {"lr": -1}}})


@pytest.mark.parametrize("value,read", [(True, True), (False, False), ("default", "default"),
                                        ("reduce-overhead", "reduce-overhead"), ("true", True), ("False", False),
                                        ("yes", True), (1, True), (0, False)])
def test_compile_takes_a_switch_or_a_torch_compile_mode(value, read):
    assert load_recipe({"compile": value}).compile == read


def test_an_unknown_compile_mode_names_the_field_and_the_modes():
    with pytest.raises(RecipeError, match=r"^recipe: 'compile': compile must be true, false, 'default' or "
                                          r"'reduce-overhead' .*\(got 'fast'\)$"):
        load_recipe({"compile": "fast"})


def test_unknown_loss_kind_and_option():
    with pytest.raises(RecipeError, match=r"distill.terms\[0\].kind: unknown loss 'kdd'.*'kd'"):
        load_recipe({"distill": {"terms": [{"kind": "kdd"}]}})
    with pytest.raises(RecipeError, match=r"distill.terms\[0\].*'temperature'.*allowed.*'T'"):
        load_recipe({"distill": {"terms": [{"kind": "kd", "temperature": 4}]}})
    with pytest.raises(RecipeError, match=r"distill.terms\[0\].*'T'.*number"):
        load_recipe({"distill": {"terms": [{"kind": "kd", "T": "hot"}]}})


def test_unknown_source_and_source_option():
    with pytest.raises(RecipeError, match=r"data.source.*'digit'.*'digits'"):
        load_recipe({"data": {"source": "digit"}})
    with pytest.raises(RecipeError, match=r"data.args.*'transfer_sise'.*Did you mean 'transfer_size'"):
        load_recipe({"data": {"source": "mnist1d", "args": {"transfer_sise": 10}}})


def test_missing_recipe_file_names_the_path(tmp_path):
    with pytest.raises(DistilError, match=r"recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_invalid_yaml_is_a_recipe_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_recipe_model_defaults():
    recipe = Recipe()
    assert recipe.teacher.model == "cnn1d" and recipe.student.model == "mlp"
    assert recipe.distill.terms[0] == {"kind": "kd", "weight": 0.9, "T": 4.0}


def test_an_empty_term_list_says_to_give_one():
    with pytest.raises(RecipeError, match=r"distill.terms.*at least 1 item.*\{kind: kd, T: 4, weight: 0.9\}"):
        load_recipe({"distill": {"terms": []}})


@pytest.mark.parametrize("weight", [-1, -0.1])
def test_a_negative_term_weight_is_refused(weight):
    with pytest.raises(RecipeError, match=r"distill.terms\[1\] \(ce\): ce: weight must be a finite number >= 0"):
        load_recipe({"distill": {"terms": [{"kind": "kd"}, {"kind": "ce", "weight": weight}]}})


@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("lr", float("nan")), ("weight_decay", float("inf"))])
def test_non_finite_numbers_are_refused_where_they_are_written(field, value):
    with pytest.raises(RecipeError, match=rf"'teacher.train.{field}': Input should be a finite number"):
        load_recipe({"teacher": {"model": "cnn1d", "train": {field: value}}})
    with pytest.raises(RecipeError, match=r"'T': Input should be a finite number"):
        load_recipe({"distill": {"terms": [{"kind": "kd", "T": float("inf")}]}})


def test_multistep_schedule_needs_milestones():
    from distil.errors import ConfigError
    from distil.recipe import TrainConfig
    from distil.train import make_optimizer, make_scheduler

    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(schedule="multistep", epochs=4, lr=1.0, optimizer="sgd", milestones=[1, 3], gamma=0.5)
    scheduler = make_scheduler(optimizer := make_optimizer(model, cfg), cfg, steps_per_epoch=2)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]  # x0.5 after epochs 1 and 3 (2 steps each)
    with pytest.raises(ConfigError, match="needs milestones"):
        make_scheduler(optimizer, cfg.model_copy(update={"milestones": []}), 2)


def test_a_multistep_schedule_without_milestones_is_refused_at_load_time():
    with pytest.raises(RecipeError, match=r"'student.train'.*multistep' needs milestones"):
        load_recipe({"student": {"train": {"schedule": "multistep"}}})
    with pytest.raises(RecipeError, match="each must be at least 1"):
        load_recipe({"student": {"train": {"schedule": "multistep", "milestones": [0, 3]}}})


USER_CODE = '''
import numpy as np
import torch
from torch import nn

from distil.data import RawData
from distil.losses import Reads


class Centred(nn.Module):
    """The student's logits pulled toward zero mean: a user's own term."""

    def __init__(self, weight: float = 1.0, scale: float = 2.0) -> None:
        super().__init__()
        self.weight, self.scale, self.name = weight, scale, "centred"

    def reads(self):
        return Reads()

    def build(self, views):
        pass

    def forward(self, views):
        return self.scale * views.student.logits.mean().pow(2)


def blobs(n: int = 90, dims: int = 4):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    return RawData(np.eye(dims)[y] * 3 + rng.normal(size=(n, dims)), y)
'''


def test_a_users_own_term_and_source_bind_to_their_signatures(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = load_recipe({"data": {"source": "mine:blobs", "args": {"n": 60}},
                          "distill": {"terms": [{"kind": "mine:Centred", "scale": 3}, {"kind": "kd"}]}})
    centred, _ = build_terms(recipe.distill.terms)
    assert (centred.name, centred.scale, centred.weight) == ("centred", 3.0, 1.0)
    with pytest.raises(RecipeError, match=r"distill.terms\[0\] \(mine:Centred\): unknown option 'scal'"):
        load_recipe({"distill": {"terms": [{"kind": "mine:Centred", "scal": 3}]}})
    with pytest.raises(RecipeError, match=r"data.args: unknown option 'm'"):
        load_recipe({"data": {"source": "mine:blobs", "args": {"m": 60}}})
    with pytest.raises(RecipeError, match=r"module 'mine' has no 'Centered'.*Did you mean 'Centred'"):
        load_recipe({"distill": {"terms": [{"kind": "mine:Centered"}]}})
    from distil.data import load_splits

    splits = load_splits("mine:blobs", {"n": 60})
    assert splits.num_classes == 3 and splits.input_shape == (4,)


@pytest.mark.parametrize("section,message", [
    ({"student": {"model": "mlp", "checkpoint": "s.safetensors"}},
     r"student.checkpoint: only a teacher loads weights instead of training"),
    ({"schemes": {"assistants": [{"model": "mlp", "checkpoint": "a.safetensors"}]}},
     r"schemes.assistants\[0\].checkpoint: only a teacher"),
    ({"schemes": {"mutual": [{"model": "mlp"}, {"model": "mlp", "train": {"lr": 0.5}}]}},
     r"schemes.mutual\[1\].train: the peers learn together with a fresh student, in one loop under student.train"),
])
def test_fields_a_run_would_ignore_are_refused_naming_them(section, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(section)


def test_a_written_out_recipe_with_mutual_peers_loads_again(tmp_path):
    recipe = load_recipe({"schemes": {"mutual": [{"model": "mlp", "width": 8}]},
                          "teacher": {"model": "cnn1d", "checkpoint": "t.safetensors"}})
    text = dump_recipe(recipe)  # every default written out, but a peer's train, which no stage reads
    assert "train" not in yaml.safe_load(text)["schemes"]["mutual"][0]
    (tmp_path / "r.yaml").write_text(text)
    assert load_recipe(tmp_path / "r.yaml") == recipe
