"""CIFAR binary reader and writer: round trips, a CIFAR-10 set written by hand from the spec, and errors."""

import numpy as np
import pytest

from distil.cifar import cifar, write_cifar
from distil.errors import DataError


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _as_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / np.float32(255)


@pytest.fixture
def cifar100(tmp_path):
    rng = np.random.default_rng(0)
    x, x_test = _images(rng, 20), _images(rng, 10)
    y, y_test = rng.integers(0, 100, 20), rng.integers(0, 100, 10)
    names = [f"class_{i}" for i in range(100)]
    folder = write_cifar(tmp_path, x, y, x_test, y_test, num_classes=100, class_names=names)
    return folder, x, y, x_test, y_test, names


def test_cifar100_round_trip_fine_labels(cifar100, tmp_path):
    folder, x, y, x_test, y_test, names = cifar100
    assert folder == tmp_path / "cifar-100-binary"
    for where in (tmp_path, folder):  # the parent or the folder itself
        raw = cifar(str(where))
        assert raw.x.dtype == np.float32 and raw.x.shape == (20, 3, 32, 32)
        assert np.array_equal(raw.x, _as_float(x)) and np.array_equal(raw.x_test, _as_float(x_test))
        assert raw.y.dtype == np.int64
        assert raw.y.tolist() == y.tolist() and raw.y_test.tolist() == y_test.tolist()
        assert raw.class_names == names


def test_cifar100_coarse_labels_and_bytes_on_disk(cifar100):
    folder, x, y, _, y_test, _ = cifar100
    raw = cifar(str(folder), labels="coarse")
    assert raw.y.tolist() == [v // 5 for v in y.tolist()]
    assert raw.y_test.tolist() == [v // 5 for v in y_test.tolist()]
    assert raw.class_names is None  # no coarse_label_names.txt written
    data = (folder / "train.bin").read_bytes()
    assert len(data) == 20 * 3074
    second = data[3074:2 * 3074]  # the second record: coarse, fine, then R, G, B planes
    assert second[0] == y[1] // 5 and second[1] == y[1]
    assert second[2:2 + 1024] == x[1, 0].tobytes() and second[2 + 2048:] == x[1, 2].tobytes()


def test_cifar10_written_by_hand_from_the_spec(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _images(rng, 3), rng.integers(0, 10, 3).astype(np.uint8)
        with open(folder / f"data_batch_{i}.bin", "wb") as f:
            for img, label in zip(x, y):
                f.write(bytes([label]) + img[0].tobytes() + img[1].tobytes() + img[2].tobytes())
        xs.append(x)
        ys.append(y)
    x_test, y_test = _images(rng, 4), rng.integers(0, 10, 4).astype(np.uint8)
    with open(folder / "test_batch.bin", "wb") as f:
        for img, label in zip(x_test, y_test):
            f.write(bytes([label]) + img.tobytes())  # C-order (3, 32, 32) is R, G, B planes, row-major
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n\n")

    raw = cifar(str(tmp_path), labels="coarse")  # ignored for CIFAR-10
    assert raw.x.shape == (15, 3, 32, 32)
    assert np.array_equal(raw.x, _as_float(np.concatenate(xs)))
    assert raw.y.tolist() == np.concatenate(ys).tolist()
    assert np.array_equal(raw.x_test, _as_float(x_test)) and raw.y_test.tolist() == y_test.tolist()
    assert raw.class_names == names
    assert raw.x[0, 1, 2, 3] == np.float32(xs[0][0, 1, 2, 3]) / np.float32(255)


def test_write_cifar10_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    x, y, x_test, y_test = _images(rng, 7), rng.integers(0, 10, 7), _images(rng, 2), rng.integers(0, 10, 2)
    folder = write_cifar(tmp_path, x, y, x_test, y_test, num_classes=10)
    assert folder.name == "cifar-10-batches-bin"
    assert sorted(p.name for p in folder.glob("data_batch_*.bin")) == [f"data_batch_{i}.bin" for i in range(1, 6)]
    raw = cifar(str(folder))
    assert np.array_equal(raw.x, _as_float(x)) and raw.y.tolist() == y.tolist()
    assert raw.y_test.tolist() == y_test.tolist() and raw.class_names is None


def test_truncated_file_names_the_file_and_record_size(cifar100):
    folder = cifar100[0]
    data = (folder / "test.bin").read_bytes()
    (folder / "test.bin").write_bytes(data[:-100])
    with pytest.raises(DataError, match=r"test\.bin' holds 30640 bytes, not a multiple of the 3074-byte record"):
        cifar(str(folder))


def test_missing_folder_points_to_download_page(tmp_path):
    with pytest.raises(DataError, match=r"train\.bin.*data_batch_1\.bin.*https://www\.cs\.toronto\.edu/~kriz/"
                                        r"cifar\.html, the binary version"):
        cifar(str(tmp_path / "nowhere"))


def test_missing_batch_is_named(tmp_path):
    rng = np.random.default_rng(3)
    folder = write_cifar(tmp_path, _images(rng, 5), rng.integers(0, 10, 5), _images(rng, 1), np.array([0]),
                         num_classes=10)
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match=r"missing '.*data_batch_3\.bin'"):
        cifar(str(folder))


def test_bad_labels_argument(cifar100):
    with pytest.raises(DataError, match=r"labels must be 'fine' or 'coarse', got 'medium'"):
        cifar(str(cifar100[0]), labels="medium")


def test_label_out_of_range_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    record = bytes([12]) + bytes(3072)
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(record)
    (folder / "test_batch.bin").write_bytes(bytes([0]) + bytes(3072))
    with pytest.raises(DataError, match=r"data_batch_1\.bin' has label 12 .* 10 classes"):
        cifar(str(tmp_path))


def test_write_cifar_checks_its_inputs(tmp_path):
    x = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    with pytest.raises(DataError, match=r"x must be uint8 of shape \(N, 3, 32, 32\)"):
        write_cifar(tmp_path, x.astype(np.float32), np.zeros(2, int), x, np.zeros(2, int))
    with pytest.raises(DataError, match=r"labels of x_test must be in \[0, 10\)"):
        write_cifar(tmp_path, x, np.zeros(2, int), x, np.array([0, 10]), num_classes=10)
    with pytest.raises(DataError, match="num_classes must be 10"):
        write_cifar(tmp_path, x, np.zeros(2, int), x, np.zeros(2, int), num_classes=20)
