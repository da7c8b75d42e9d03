"""Data sets: shapes, standardisation, deterministic stratified splits, user files, errors."""

import numpy as np
import pytest

from handbackprop import data


@pytest.mark.parametrize("name, d, classes, n", [
    ("digits", 64, 10, 1797), ("breast_cancer", 30, 2, 569), ("diabetes", 10, 0, 442),
    ("xor", 2, 2, 400), ("spirals", 2, 2, 600),
])
def test_builtin_sets(name, d, classes, n):
    ds = data.load(name)
    assert ds.num_features == d and len(ds.classes) == classes
    assert len(ds.x_train) + len(ds.x_test) == n and len(ds.x_test) == pytest.approx(0.2 * n, abs=6)
    assert ds.x_train.dtype == np.float64 and np.all(np.isfinite(ds.x_train))
    axis = None if name == "digits" else 0  # digits: one scale for all pixels
    np.testing.assert_allclose(ds.x_train.mean(axis), 0, atol=1e-12)
    std = ds.x_train.std(axis)
    np.testing.assert_allclose(std[std > 0] if axis == 0 else std, 1, rtol=1e-12)
    if classes:
        assert ds.y_train.dtype.kind == "i" and set(np.unique(ds.y_test)) == set(range(classes))
        # stratified: each class's share of the test split matches its share of the whole
        whole = np.bincount(np.concatenate([ds.y_train, ds.y_test])) / n
        np.testing.assert_allclose(np.bincount(ds.y_test) / len(ds.y_test), whole, atol=0.02)
        assert ds.default_loss == ("softmax_cross_entropy" if classes > 2 else "binary_cross_entropy")
    else:
        assert ds.y_train.shape == (len(ds.x_train), 1) and ds.default_loss == "squared_error"
        np.testing.assert_allclose(ds.y_train.mean(), 0, atol=1e-12)
        assert ds.num_outputs("squared_error") == 1


def test_split_is_deterministic_and_seeded():
    a, b, c = data.load("breast_cancer"), data.load("breast_cancer"), data.load("breast_cancer", seed=1)
    assert all(np.array_equal(u, v) for u, v in zip(a[1:5], b[1:5]))
    assert not np.array_equal(a.x_test, c.x_test)
    assert data.load("digits", test_size=0.5).x_test.shape[0] == pytest.approx(898, abs=6)


def test_num_outputs_follow_the_loss():
    ds = data.load("xor")
    assert ds.num_outputs("binary_cross_entropy") == 1
    assert ds.num_outputs("softmax_cross_entropy") == 2


def test_npz_and_csv_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    labels = np.repeat(np.array([3, 7]), 20)
    np.savez(tmp_path / "c.npz", X=x, y=labels)
    ds = data.load(str(tmp_path / "c.npz"))
    assert ds.classes == (3, 7) and set(ds.y_train.tolist()) == {0, 1}  # labels -> 0..C-1
    np.savez(tmp_path / "r.npz", X=x, y=x @ np.ones((3, 2)))
    assert data.load(tmp_path / "r.npz").y_train.shape == (32, 2)
    table = np.column_stack([x, labels])
    np.savetxt(tmp_path / "h.csv", table, delimiter=",", header="a,b,c,label", comments="")
    np.savetxt(tmp_path / "n.csv", table, delimiter=",")
    for f in ("h.csv", "n.csv"):
        ds = data.load(tmp_path / f)
        assert ds.task == "classification" and ds.num_features == 3 and len(ds.x_train) == 32
    assert data.load(tmp_path / "n.csv", task="regression").task == "regression"


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data set 'mnist'; valid names are "
                                         r"\['breast_cancer', 'diabetes', 'digits', 'spirals', 'xor'\]"):
        data.load("mnist")
    np.savez(tmp_path / "no_y.npz", X=np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"expected arrays 'X' and 'y', missing \['y'\]"):
        data.load(tmp_path / "no_y.npz")
    np.savez(tmp_path / "short.npz", X=np.ones((4, 2)), y=np.ones(3))
    with pytest.raises(ValueError, match=r"y: expected shape \(4,\) or \(4, k\)"):
        data.load(tmp_path / "short.npz")
    np.savez(tmp_path / "nan.npz", X=np.full((4, 2), np.nan), y=np.ones(4))
    with pytest.raises(ValueError, match="X: expected finite numbers"):
        data.load(tmp_path / "nan.npz")
    np.savetxt(tmp_path / "one.csv", np.ones((4, 1)), delimiter=",")
    with pytest.raises(ValueError, match="at least 2"):
        data.load(tmp_path / "one.csv")
    with pytest.raises(ValueError, match=r"test_size: expected a float in \(0, 1\), got 1.0"):
        data.load("xor", test_size=1.0)
    with pytest.raises(ValueError, match="empty test split"):
        data.load("xor", test_size=0.001)
    with pytest.raises(ValueError, match="task"):
        data.load("xor", task="ranking")
