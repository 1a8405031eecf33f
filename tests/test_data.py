import numpy as np
import pytest
import torch

from distil.data import SOURCES, load_splits
from distil.errors import DataError
from distil.losses import UNLABELED


def test_digits_splits_are_deterministic_stratified_and_disjoint():
    a = load_splits("digits", {}, seed=0, val_fraction=0.1, test_fraction=0.2)
    b = load_splits("digits", {}, seed=0, val_fraction=0.1, test_fraction=0.2)
    c = load_splits("digits", {}, seed=1, val_fraction=0.1, test_fraction=0.2)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert abs(len(a.test) - 0.2 * 1797) < 10
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.test.y, c.test.y)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    counts = torch.bincount(a.test.y, minlength=10)
    assert counts.min() >= 33 and counts.max() <= 38  # ~20% of each class of ~180


def test_normalisation_uses_training_statistics_only():
    s = load_splits("digits", {}, seed=0)
    assert abs(float(s.train.x.mean())) < 1e-5
    assert abs(float(s.train.x.std()) - 1) < 1e-2
    assert abs(float(s.test.x.mean())) > 1e-4  # test is normalised with train stats, not its own


def test_mnist1d_keeps_the_published_test_split_and_labels_transfer_unlabeled():
    s = load_splits("mnist1d", {"num_samples": 500, "transfer_size": 120}, seed=0, val_fraction=0.1)
    assert len(s.test) == 100  # the last 20% of the generated set
    assert len(s.train) + len(s.val) == 400
    assert s.input_shape == (1, 40)
    assert s.transfer.shape == (120, 1, 40)
    merged = s.with_transfer()
    assert len(merged) == len(s.train) + 120
    assert (merged.y[len(s.train):] == UNLABELED).all() and (merged.y[: len(s.train)] >= 0).all()


def test_mnist1d_is_cached_and_the_cache_is_used(tmp_path, monkeypatch):
    first = load_splits("mnist1d", {"num_samples": 300}, seed=0)
    files = list((tmp_path / "cache").glob("mnist1d-*.npz"))
    assert len(files) == 1
    import distil.data

    monkeypatch.setattr(distil.data, "_mnist1d_chunk", lambda spec: pytest.fail("regenerated despite cache"))
    second = load_splits("mnist1d", {"num_samples": 300}, seed=0)
    assert torch.equal(first.test.x, second.test.x)


def test_npz_source_uses_its_test_split_and_transfer(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(60, 5)), y=np.arange(60) % 3,
             x_test=rng.normal(size=(9, 5)), y_test=np.arange(9) % 3)
    np.savez(tmp_path / "t.npz", x=rng.normal(size=(7, 5)))
    s = load_splits("npz", {"path": str(tmp_path / "d.npz"), "transfer_path": str(tmp_path / "t.npz")}, seed=0)
    assert len(s.test) == 9 and s.num_classes == 3 and s.input_shape == (5,)
    assert s.transfer.shape == (7, 5)


def test_npz_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*missing.npz"):
        load_splits("npz", {"path": str(tmp_path / "missing.npz")})
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(DataError, match=r"has no array 'x' \(it has \['inputs', 'y'\]\)"):
        load_splits("npz", {"path": str(tmp_path / "d.npz")})


def test_empty_data_set_is_an_error(tmp_path):
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 3)), y=np.zeros(0))
    with pytest.raises(DataError, match="empty"):
        load_splits("npz", {"path": str(tmp_path / "e.npz")})
    (tmp_path / "e.csv").write_text("a,b,label\n")
    with pytest.raises(DataError, match="no data rows"):
        load_splits("csv", {"path": str(tmp_path / "e.csv")})


def test_csv_source_reads_a_named_label_column(tmp_path):
    rows = ["f1,kind,f2"] + [f"{i},{'cat' if i % 2 else 'dog'},{i * 2}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    s = load_splits("csv", {"path": str(tmp_path / "t.csv"), "label": "kind"}, seed=0)
    assert s.class_names == ["cat", "dog"] and s.input_shape == (2,)
    with pytest.raises(DataError, match=r"no column 'label' \(columns: \['f1', 'kind', 'f2'\]\)"):
        load_splits("csv", {"path": str(tmp_path / "t.csv")})


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image

    for label in ("circle", "square"):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 10), color=(i * 20, 0, 0)).save(tmp_path / "img" / label / f"{i}.png")
    s = load_splits("imagefolder", {"path": str(tmp_path / "img"), "image_size": 8}, seed=0)
    assert s.class_names == ["circle", "square"] and s.input_shape == (3, 8, 8)
    with pytest.raises(DataError, match="image folder not found"):
        load_splits("imagefolder", {"path": str(tmp_path / "nope")})


def test_every_source_is_listed():
    assert set(SOURCES) == {"mnist1d", "digits", "npz", "imagefolder", "csv", "cifar", "pycorpus", "textfolder"}


def test_labels_of_any_values_become_classes_and_never_collide_with_unlabeled(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([-1, 0, 1] * 20)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(60, 3)), y=y)
    s = load_splits("npz", {"path": str(tmp_path / "d.npz")}, seed=0)
    assert s.num_classes == 3 and s.class_names == ["-1", "0", "1"]
    assert set(s.train.y.tolist()) == {0, 1, 2}


def test_one_hot_labels_are_refused_with_a_hint(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 3)), y=np.eye(3)[[0, 1, 2, 0, 1, 2]])
    with pytest.raises(DataError, match=r"one class label per sample.*y.argmax\(1\)"):
        load_splits("npz", {"path": str(tmp_path / "d.npz")})


def test_a_split_with_more_samples_than_labels_is_refused():
    from distil.data import Split
    from distil.errors import DataError

    with pytest.raises(DataError, match="x has 100 samples but y has 90 labels"):
        Split(torch.zeros(100, 4), torch.zeros(90, dtype=torch.long))


@pytest.mark.parametrize("cell", ["", "nan", "inf", "n/a"])
def test_a_csv_cell_that_is_not_a_finite_number_is_named_at_load_time(tmp_path, cell):
    from distil.errors import DataError

    (tmp_path / "t.csv").write_text(f"a,label,b\n1,x,2\n3,y,4\n5,x,{cell}\n")
    with pytest.raises(DataError, match=rf"t.csv, line 4, column 'b': the value '{cell}' is not a finite number"):
        load_splits("csv", {"path": str(tmp_path / "t.csv")}, seed=0)


@pytest.mark.parametrize("text,match", [
    ("a,b,label\n1,2,x\n3,4,y,5\n", r"line 3: 4 cells where the header has 3"),
    ("a,b,label\n1,2,x\n3,4,\n", r"line 3: the label column 'label' is empty"),
])
def test_malformed_csv_rows_are_named_by_line(tmp_path, text, match):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        load_splits("csv", {"path": str(tmp_path / "t.csv")}, seed=0)


def test_blank_lines_in_a_csv_are_skipped(tmp_path):
    rows = "".join(f"{i},{i % 3},{'xyz'[i % 3]}\n" for i in range(30))
    (tmp_path / "t.csv").write_text("a,b,label\n" + rows + "\n\n")
    assert load_splits("csv", {"path": str(tmp_path / "t.csv")}, seed=0).num_classes == 3


def test_an_image_size_below_one_is_refused(tmp_path):
    (tmp_path / "img" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="image_size must be at least 1"):
        load_splits("imagefolder", {"path": str(tmp_path / "img"), "image_size": 0}, seed=0)
