"""Data sets: scikit-learn's bundled sets, a user's ``.npz`` or ``.csv`` file, synthetic sets.

Every loader gives a :class:`Dataset` with a deterministic train/test split (stratified by
class for classification) and inputs standardised with the training split's mean and standard
deviation, per feature; regression targets are standardised the same way, so losses and mean
squared errors are in units of the training targets' standard deviation (R^2 is unchanged).
``digits`` is standardised with one mean and deviation for all 64 pixels, which share one scale
(0..16): scaled per pixel, the border pixels that are almost always blank would turn their rare
ink into large, noisy inputs (test accuracy drops by about a point).

- ``digits`` (10 classes, 64 features), ``breast_cancer`` (2 classes, 30 features) and
  ``diabetes`` (regression, 10 features) come from the files scikit-learn ships: no download,
  but scikit-learn must be installed (``pip install 'handbackprop[train]'``).
- ``xor`` (400 points) and ``spirals`` (two interleaved spirals, 600 points) are generated
  from the seed and need nothing else; both are binary classification in the plane.
- A path ending in ``.npz`` (arrays ``X`` of shape (n, d) and ``y`` of shape (n,) or (n, k)) or
  ``.csv`` (numbers, an optional header row, the last column being ``y``).
"""

import pathlib
import zipfile
from typing import NamedTuple

import numpy as np

SKLEARN_SETS = {"breast_cancer": "load_breast_cancer", "diabetes": "load_diabetes",
                "digits": "load_digits"}
SYNTHETIC_SETS = ("spirals", "xor")
DATASETS = tuple(sorted((*SKLEARN_SETS, *SYNTHETIC_SETS)))
TASKS = ("classification", "regression")
MAX_INFERRED_CLASSES = 100  # integral file labels with more distinct values need a task


class Dataset(NamedTuple):
    """A standardised data set, split into training and test examples.

    Attributes:
      name: the set's name or file path.
      x_train: (n_train, d) float64 inputs.
      y_train: classification: (n_train,) int classes in [0, C); regression: (n_train, k) float64.
      x_test: (n_test, d).
      y_test: as ``y_train``, (n_test,) or (n_test, k).
      classes: the original label of each class 0..C-1; ``()`` for regression.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return "classification" if self.classes else "regression"

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def default_loss(self) -> str:
        """Binary cross-entropy for two classes, softmax cross-entropy for more, squared error
        for regression."""
        if not self.classes:
            return "squared_error"
        return "binary_cross_entropy" if len(self.classes) == 2 else "softmax_cross_entropy"

    def num_outputs(self, loss: str) -> int:
        """The output width dL that ``loss`` needs: 1 for binary cross-entropy on two classes,
        the number of classes for softmax cross-entropy, the target width for regression."""
        if not self.classes:
            return self.y_train.shape[1]
        return 1 if loss == "binary_cross_entropy" and len(self.classes) == 2 else len(self.classes)


def load(name, *, test_size: float = 0.2, seed: int = 0, task: str | None = None) -> Dataset:
    """Load a data set by name or file path, split and standardised.

    Args:
      name: one of :data:`DATASETS`, or a path to a ``.npz`` or ``.csv`` file.
      test_size: the fraction of examples held out for testing, in (0, 1).
      seed: seeds the split (and the synthetic sets' points).
      task: ``"classification"`` or ``"regression"`` for a file; ``None`` infers it
        (:func:`infer_task`): up to :data:`MAX_INFERRED_CLASSES` integer labels (in a
        ``.npz``) or integral ones (in a ``.csv``) are classes; more must be told.

    Returns:
      A :class:`Dataset`.

    Raises:
      ValueError: for an unknown name (the valid ones are listed), an unreadable file, a file
        without ``X`` or ``y``, mismatched, complex or non-finite arrays, a single class,
        too many integral labels to infer the task, or a split that leaves a side empty.
      FileNotFoundError: for a missing file.
      ImportError: for a scikit-learn set without scikit-learn.

    Example:
      >>> ds = load("xor")
      >>> ds.x_train.shape, ds.y_test.shape, ds.classes
      ((320, 2), (80,), (0, 1))
    """
    if not (isinstance(test_size, float) and 0 < test_size < 1):
        raise ValueError(f"test_size: expected a float in (0, 1), got {test_size!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS} or None, got {task!r}")
    rng = np.random.default_rng(seed)
    path = pathlib.Path(str(name))
    if name in SKLEARN_SETS:
        x, y = _sklearn(name)
        task = "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
    elif name in SYNTHETIC_SETS:
        x, y = (_xor if name == "xor" else _spirals)(rng)
        task = "classification"
    elif path.suffix in (".npz", ".csv"):
        x, y = _read_npz(path) if path.suffix == ".npz" else _read_csv(path)
        if task is None:
            task = infer_task(path, y)
    else:
        raise ValueError(f"name: unknown data set {name!r}; valid names are {list(DATASETS)}, "
                         "or a path to a .npz or .csv file")
    return _prepare(str(name), x, y, task, test_size, rng)


def infer_task(path, y) -> str:
    """A file's task when none is given: classification for a few integral labels, regression
    for non-integral targets.

    Integral labels with more than :data:`MAX_INFERRED_CLASSES` distinct values are ambiguous
    (ages, counts, prices in cents: a regression target read as hundreds of classes), so the
    task must then be given.

    Raises:
      ValueError: for integral labels with too many distinct values.
    """
    y = np.asarray(y)
    integral = np.issubdtype(y.dtype, np.integer) or (
        path.suffix == ".csv" and y.ndim == 1 and np.issubdtype(y.dtype, np.number)
        and np.all(y == np.round(y)))
    if not integral:
        return "regression"
    distinct = len(np.unique(y))
    if distinct > MAX_INFERRED_CLASSES:
        raise ValueError(f"task: {path}: y holds {distinct} distinct integer values, more than "
                         f"the {MAX_INFERRED_CLASSES} classes inferred without a task; say what "
                         "it is with task='classification' or task='regression' (--task)")
    return "classification"


def _sklearn(name):
    try:
        from sklearn import datasets
    except ImportError as e:
        raise ImportError(f"the {name!r} data set comes with scikit-learn: "
                          "pip install 'handbackprop[train]'") from e
    return getattr(datasets, SKLEARN_SETS[name])(return_X_y=True)


def _xor(rng, n=400):
    """Uniform points in [-1, 1]^2, class 1 where the coordinates' signs differ."""
    x = rng.uniform(-1, 1, (n, 2))
    return x, ((x[:, 0] > 0) != (x[:, 1] > 0)).astype(np.int64)


def _spirals(rng, n=600, noise=0.1):
    """Two interleaved spirals of 1.5 turns; the second is the first turned by pi."""
    t = 3 * np.pi * np.sqrt(rng.uniform(size=n // 2))  # sqrt: even density along the arc
    arm = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / (3 * np.pi)
    x = np.concatenate([arm, -arm]) + noise * rng.standard_normal((2 * (n // 2), 2))
    return x, np.repeat(np.array([0, 1]), n // 2)


def _read_npz(path):
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):  # a .npy's one array
            raise ValueError("it holds one array, not arrays 'X' and 'y'")
        with f:
            missing = [k for k in ("X", "y") if k not in f.files]
            if missing:
                raise ValueError(f"expected arrays 'X' and 'y', missing {missing}; "
                                 f"found {f.files}")
            return f["X"], f["y"]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"data file {path}: not a readable .npz of arrays X and y "
                         f"({type(e).__name__}: {e})") from None


def _read_csv(path):
    try:  # utf-8-sig: a byte-order mark would make the first row look like a header
        with open(path, encoding="utf-8-sig") as f:
            first = f.readline()
        try:  # a header row is any first row that is not all numbers
            [float(v) for v in first.split(",")]
            skip = 0
        except ValueError:
            skip = 1
        table = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, encoding="utf-8-sig")
    except FileNotFoundError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"data file {path}: not a readable CSV of numbers "
                         f"({type(e).__name__}: {e})") from None
    if table.shape[1] < 2:
        raise ValueError(f"data file {path}: expected columns X..., y (at least 2), "
                         f"got {table.shape[1]}")
    return table[:, :-1], table[:, -1]


def _prepare(name, x, y, task, test_size, rng):
    x, y = np.asarray(x), np.asarray(y)
    real = lambda a: np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)  # noqa: E731
    if x.ndim != 2 or not (real(x) and np.all(np.isfinite(x))):  # complex too: not real inputs
        raise ValueError(f"{name}: X: expected finite real numbers of shape (n, d), "
                         f"got shape {x.shape} dtype {x.dtype}")
    if y.shape[:1] != x.shape[:1] or y.ndim not in (1, 2):
        raise ValueError(f"{name}: y: expected shape ({len(x)},) or ({len(x)}, k) to match X "
                         f"{x.shape}, got {y.shape}")
    if task == "classification":
        if y.ndim != 1:
            raise ValueError(f"{name}: y: class labels must have shape ({len(x)},), got {y.shape}")
        labels, y = np.unique(y, return_inverse=True)  # labels -> 0..C-1
        if len(labels) < 2:  # nothing to learn, and every accuracy would be 1.0
            raise ValueError(f"{name}: y: classification needs at least 2 classes, got one "
                             f"(every label is {labels[0].item()!r})")
        classes, strata = tuple(labels.tolist()), y
    else:
        if not (real(y) and np.all(np.isfinite(y))):
            raise ValueError(f"{name}: y: regression targets must be finite real numbers, "
                             f"got dtype {y.dtype}")
        y, classes, strata = y.reshape(len(y), -1).astype(np.float64), (), np.zeros(len(y), int)
    # Stratified: each class (one stratum for regression) gives test_size of its examples.
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    test = np.concatenate([rng.permutation(g)[: round(test_size * len(g))] for g in groups])
    is_test = np.zeros(len(y), bool)
    is_test[test] = True
    if is_test.all() or not is_test.any():
        raise ValueError(f"test_size: {test_size} of {len(y)} examples leaves an empty "
                         f"{'training' if is_test.all() else 'test'} split")
    x = x.astype(np.float64)
    x_train, x_test, y_train, y_test = x[~is_test], x[is_test], y[~is_test], y[is_test]
    x_train, x_test = _standardise(x_train, x_test, per_column=name != "digits")
    if task == "regression":
        y_train, y_test = _standardise(y_train, y_test)
    return Dataset(name, x_train, y_train, x_test, y_test, classes)


def _standardise(train, test, per_column=True):
    """Both splits centred and scaled by the training split's mean and std, per column or
    over all columns at once.

    Computed on the columns divided by a power of two near their largest magnitude: the
    squares in the variance of entries above about 1e154 would overflow to infinity, which
    would scale them to 0. Dividing by a power of two is exact, so the result is unchanged.
    """
    axis = 0 if per_column else None
    scale = np.ldexp(1.0, np.frexp(np.max(np.abs(train), axis=axis))[1])  # 2^e > max |x|
    train, test = train / scale, test / scale
    mean, std = train.mean(axis), train.std(axis)
    std = np.where(std == 0, 1, std)  # a constant column stays at zero
    return (train - mean) / std, (test - mean) / std
