"""The experiments: their tables and helpers, with values worked out by hand, and each experiment's `--quick` run
writing its page (table, command, plot)."""

import math
import re

import pytest
import torch
from torch import nn


def test_the_methods_table_averages_seeds_against_the_baseline():
    from distil.experiments.methods import Setting, _table
    from distil.recipe import TrainConfig

    setting = Setting("toy", "digits", {}, {"model": "cnn"}, {"model": "mlp"}, TrainConfig(), TrainConfig(), False)
    runs = [{"baseline": (0.60, 1.0), "kd": (0.70, 2.0)}, {"baseline": (0.62, 1.0), "kd": (0.74, 2.0)}]
    table = _table(setting, runs)
    assert "| baseline | 0.610 +- 0.014 | +0.0 pt | 0.5x |" in table  # stdev of 0.60, 0.62 is 0.01414
    assert "| kd | 0.720 +- 0.028 | +11.0 pt | 1.0x |" in table


# --- helpers ----------------------------------------------------------------------------------------


def test_cell_shows_mean_and_sample_std():
    from distil.experiments.common import cell, errors

    assert cell([0.60, 0.62]) == "0.610 +- 0.014"
    assert cell([0.5]) == "0.500 +- 0.000"
    assert errors([0.9, 0.8], 1000) == "150 of 1000"


def test_mean_entropy_of_uniform_and_of_two_classes():
    from distil.experiments.common import mean_entropy

    assert mean_entropy(torch.zeros(3, 10), T=1) == pytest.approx(math.log(10))
    # logits (ln 3, 0) at T=1 -> p = (3/4, 1/4); at T -> infinity the targets become uniform
    two = torch.tensor([[math.log(3), 0.0]])
    assert mean_entropy(two, T=1) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert mean_entropy(two, T=1e6) == pytest.approx(math.log(2))


def test_raise_bias_moves_one_logit_by_delta_and_leaves_the_model_alone():
    from distil.experiments.omitted_class import raise_bias

    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(5, 2)
    raised = raise_bias(model, label=1, delta=2.5)
    before, after = model(x), raised(x)
    assert torch.allclose(after[:, 1], before[:, 1] + 2.5)
    assert torch.equal(after[:, [0, 2]], before[:, [0, 2]])
    assert torch.equal(model(x), before)  # a copy was changed, not the model


def test_raise_bias_needs_a_final_linear_with_a_bias():
    from distil.errors import ModelError
    from distil.experiments.omitted_class import raise_bias

    with pytest.raises(ModelError, match="ending in an nn.Linear with a bias"):
        raise_bias(nn.Sequential(nn.Linear(2, 3, bias=False)), label=0, delta=1.0)


def test_choose_bias_takes_the_smallest_raise_that_maximises_accuracy():
    from distil.experiments.omitted_class import choose_bias

    logits = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 1.5]])
    targets = torch.tensor([2, 2])
    # +0.5 ties class 2 with the leader in both rows (argmax takes the first): still wrong; +0.75 wins both
    delta, accs = choose_bias(logits, targets, label=2, deltas=[0.0, 0.5, 0.75, 1.0])
    assert accs == [0.0, 0.0, 1.0, 1.0]
    assert delta == 0.75


def test_without_class_and_subset():
    from distil.data import Split
    from distil.experiments.few_data import subset
    from distil.experiments.omitted_class import without_class

    split = Split(torch.arange(10.0)[:, None], torch.tensor([0, 1, 2, 3, 3, 0, 1, 2, 3, 0]))
    rest = without_class(split, 3)
    assert rest.y.tolist() == [0, 1, 2, 0, 1, 2, 0] and rest.x[:, 0].tolist() == [0, 1, 2, 5, 6, 7, 9]
    few = subset(Split(torch.zeros(200, 1), torch.zeros(200, dtype=torch.long)), 0.03, seed=0)
    assert len(few) == 6


def test_smoothing_for_entropy_inverts_the_smoothed_entropy():
    from distil.experiments.soft_vs_smoothing import smoothed_entropy, smoothing_for_entropy

    # K = 2, eps = 0.1: targets (0.95, 0.05)
    by_hand = -(0.95 * math.log(0.95) + 0.05 * math.log(0.05))
    assert smoothed_entropy(0.1, 2) == pytest.approx(by_hand)
    assert smoothing_for_entropy(by_hand, 2) == pytest.approx(0.1, abs=1e-5)
    assert smoothing_for_entropy(0.0, 10) == pytest.approx(0.0, abs=1e-5)


def test_smoothing_cannot_reach_the_uniform_entropy():
    from distil.errors import ConfigError
    from distil.experiments.soft_vs_smoothing import smoothing_for_entropy

    with pytest.raises(ConfigError, match=r"cannot be reached by label smoothing over 10 classes"):
        smoothing_for_entropy(math.log(10), 10)


def test_shuffled_soft_targets_keep_the_top_class_and_the_entropy():
    from distil.experiments.common import mean_entropy
    from distil.experiments.soft_vs_smoothing import shuffle_wrong_classes

    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    shuffled = shuffle_wrong_classes(logits, torch.Generator().manual_seed(1))
    assert torch.equal(shuffled.argmax(1), logits.argmax(1))
    assert torch.equal(shuffled.sort(1).values, logits.sort(1).values)  # each row's values, moved
    assert mean_entropy(shuffled, 4) == pytest.approx(mean_entropy(logits, 4))
    assert (shuffled != logits).any(1).float().mean() > 0.9  # nearly every row changed


def test_the_experiment_help_lists_every_experiment(monkeypatch):
    from typer.testing import CliRunner

    from distil.cli import app
    from distil.experiments import EXPERIMENTS

    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["experiment", "--help"])
    assert result.exit_code == 0
    for name in EXPERIMENTS:
        assert name in result.output


# --- each experiment's --quick run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def quick(data_cache, monkeypatch, tmp_path):
    """Run an experiment with --quick and 1 seed into tmp_path; the generated MNIST-1D is shared by these tests.
    Returns the page's text and the rows of its first table, as lists of cells."""
    from distil.experiments import EXPERIMENTS

    monkeypatch.setenv("DISTIL_CACHE", str(data_cache))

    def run(name: str) -> tuple[str, list[list[str]]]:
        out = EXPERIMENTS[name](seeds=1, quick=True, out=tmp_path / f"{name}.md", log=lambda line: None)
        page = out.read_text()
        assert f"`distil experiment {name} --seeds 1 --quick`" in page
        plot = tmp_path / f"{name}.png"
        assert f"]({name}.png)" in page and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for mean, std in re.findall(r"(\d+\.\d+) \+- (\d+\.\d+)", page):
            assert 0 <= float(mean) <= 1 and float(std) == 0  # accuracies; one seed has no spread
        return page, first_table(page)

    return run


def first_table(page: str) -> list[list[str]]:
    lines = page.split("\n| ", 1)[1].split("\n\n", 1)[0].splitlines()[2:]  # after the header and the |---| line
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


@pytest.mark.slow
def test_temperature_quick(quick):
    page, rows = quick("temperature")
    assert [r[0] for r in rows] == ["1", "4", "16", "baseline (alpha 0)"]
    entropies = [float(r[4]) for r in rows[:3]]
    assert entropies == sorted(entropies) and entropies[-1] <= math.log(10) + 0.005  # softer as T grows
    assert "146 errors" in page and "74 errors" in page


@pytest.mark.slow
def test_omitted_class_quick(quick):
    page, rows = quick("omitted-class")
    by_name = {r[0]: r for r in rows}
    assert by_name["hard labels"][2] == "0.000 +- 0.000"  # never trained toward class 3: never answers it
    assert float(by_name["distilled, 3s kept"][2].split()[0]) > 0
    assert "206 (133)" in page and "109 (14)" in page


@pytest.mark.slow
def test_few_data_quick(quick):
    page, rows = quick("few-data")
    assert [r[0] for r in rows] == ["hard, 3%", "soft, 3%", "hard, all data"]
    assert "44.5%" in page and "57.0%" in page and "58.9%" in page
    assert "The 3% subset holds 32 signals" in page  # 3% of the 1,080 quick training signals


@pytest.mark.slow
def test_soft_vs_smoothing_quick(quick):
    from distil.experiments.soft_vs_smoothing import smoothed_entropy

    page, rows = quick("soft-vs-smoothing")
    T, entropy, epsilon = rows[0][:3]
    assert T == "4" and smoothed_entropy(float(epsilon), 10) == pytest.approx(float(entropy), abs=0.01)
    assert rows[-1][0] == "hard labels"


@pytest.mark.slow
def test_transfer_size_quick(quick):
    page, rows = quick("transfer-size")
    assert [r[0] for r in rows] == ["0", "1,000", "2,000"]
    epochs = [int(r[1]) for r in rows]
    assert epochs == sorted(epochs, reverse=True) and epochs[0] > epochs[-1]  # same steps over more signals


@pytest.mark.slow
def test_capacity_gap_quick(quick):
    page, rows = quick("capacity-gap")
    assert [r[0] for r in rows] == ["4", "16"]
    assert rows[0][4] == "" and rows[1][4] != ""  # the width-8 assistant sits only under wider teachers
