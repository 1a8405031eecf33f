"""The experiments' tables: statistics over seeds, written as the page shows them."""


def test_the_methods_table_averages_seeds_against_the_baseline():
    from distil.experiments.methods import Setting, _table
    from distil.recipe import TrainConfig

    setting = Setting("toy", "digits", {}, {"model": "cnn"}, {"model": "mlp"}, TrainConfig(), TrainConfig(), False)
    runs = [{"baseline": (0.60, 1.0), "kd": (0.70, 2.0)}, {"baseline": (0.62, 1.0), "kd": (0.74, 2.0)}]
    table = _table(setting, runs)
    assert "| baseline | 0.610 +- 0.014 | +0.0 pt | 0.5x |" in table  # stdev of 0.60, 0.62 is 0.01414
    assert "| kd | 0.720 +- 0.028 | +11.0 pt | 1.0x |" in table
