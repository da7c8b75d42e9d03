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
    with pytest.raises(ValueError, match="X: expected finite real numbers"):
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


def test_many_integral_labels_need_a_task(tmp_path):
    """383 distinct integer targets are a regression target, not 383 classes: say which."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 2))
    np.savetxt(tmp_path / "ages.csv", np.column_stack([x, np.arange(1000) % 383]),
               delimiter=",", fmt="%d")
    with pytest.raises(ValueError, match=r"task: .*ages.csv: y holds 383 distinct integer "
                                         r"values.*task='regression' \(--task\)"):
        data.load(tmp_path / "ages.csv")
    ds = data.load(tmp_path / "ages.csv", task="regression")
    assert ds.task == "regression" and ds.y_train.shape == (800, 1)
    np.savetxt(tmp_path / "few.csv", np.column_stack([x, np.arange(1000) % 100]), delimiter=",")
    assert len(data.load(tmp_path / "few.csv").classes) == data.MAX_INFERRED_CLASSES


def test_huge_features_standardise_without_overflow(tmp_path):
    """Entries of 1e200 square to infinity: the statistics are taken on exactly rescaled
    columns, so the standardised column is the same as for the same data at scale 1."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 2))
    y = np.repeat([0, 1], 25)
    np.savez(tmp_path / "big.npz", X=x * [1e200, 1.0], y=y)
    np.savez(tmp_path / "unit.npz", X=x, y=y)
    big, unit = data.load(tmp_path / "big.npz"), data.load(tmp_path / "unit.npz")
    assert np.all(np.isfinite(big.x_train)) and np.std(big.x_train[:, 0]) == pytest.approx(1, rel=1e-12)
    # x * 1e200 is x rounded once: standardised, that is a few ulps of 1 from the unit data.
    np.testing.assert_allclose(big.x_train, unit.x_train, rtol=1e-13, atol=1e-13)


def test_a_byte_order_mark_does_not_drop_the_first_row(tmp_path):
    table = np.column_stack([np.arange(10.0), np.arange(10) % 2])
    text = "\n".join(f"{a},{int(b)}" for a, b in table)
    (tmp_path / "bom.csv").write_text("\ufeff" + text, encoding="utf-8")
    ds = data.load(tmp_path / "bom.csv")
    assert len(ds.x_train) + len(ds.x_test) == 10


@pytest.mark.parametrize("arrays, match", [
    (dict(X=np.ones((10, 2)), y=np.zeros(10, int)), r"y: classification needs at least 2 classes, got one \(every label is 0\)"),
    (dict(X=np.ones((10, 2)) * (1 + 1j), y=np.arange(10) % 2), r"X: expected finite real numbers .*complex128"),
    (dict(X=np.ones((10, 2)), y=np.ones((10, 1)) * 1j), r"y: regression targets must be finite real numbers"),
])
def test_refused_arrays(tmp_path, arrays, match):
    np.savez(tmp_path / "a.npz", **arrays)
    task = "regression" if arrays["y"].ndim == 2 else None
    with pytest.raises(ValueError, match=match):
        data.load(tmp_path / "a.npz", task=task)


def test_unreadable_files_are_one_line_value_errors(tmp_path):
    (tmp_path / "dir.csv").mkdir()
    np.savez(tmp_path / "ok.npz", X=np.ones((10, 2)), y=np.arange(10) % 2)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:300])
    np.save(tmp_path / "one.npy", np.ones(3))
    (tmp_path / "one.npy").rename(tmp_path / "npy.npz")
    (tmp_path / "text.csv").write_text("1,2\n3,x\n")
    for name, match in [("dir.csv", "not a readable CSV"), ("cut.npz", "not a readable .npz"),
                        ("npy.npz", "not a readable .npz .*one array, not arrays 'X' and 'y'"),
                        ("text.csv", "not a readable CSV")]:
        with pytest.raises(ValueError, match=f"data file .*{name}: {match}") as e:
            data.load(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        data.load(tmp_path / "missing.csv")
