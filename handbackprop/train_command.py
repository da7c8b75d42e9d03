"""``handbackprop train``: mini-batch SGD on a data set, with the hand-written gradients.

    python -m handbackprop train                          # digits, 64-128-128-10, 150 epochs
    python -m handbackprop train --dataset breast_cancer --plot curves.png
    python -m handbackprop train --epochs 20 --save run.npz
    python -m handbackprop train --epochs 50 --resume run.npz --save run.npz

Before training, the hand gradient is checked against ``jax.grad`` on one batch. A run
resumed from the checkpoint of epoch k continues with the saved settings (data set,
network, optimiser, batch size, seed, dtype) and gives bit for bit the uninterrupted run;
``--epochs`` is the total to reach.

Exit status: 0 on success; 2 for bad input (one line on stderr, before any training, output
paths included); 1 if the gradient check fails or the run diverges (its ``--json`` results
then hold ``null`` for the NaN or infinite numbers, and ``"diverged": true``).

DP-SGD (each example's gradient clipped to norm C, Gaussian noise of standard deviation
SIGMA * C added to each mini-batch's clipped sum, then divided by the batch size):

    python -m handbackprop train --dp-clip 1.0 --dp-noise 1.1    # epsilon with .[dp] installed
    python -m handbackprop train --dp-clip 1.0 --dp-noise 1.1 --dp-sampling poisson

Data parallelism (each mini-batch split over the devices, parameters replicated):

    python -m handbackprop train --devices 4              # 4 GPUs; on a CPU, 4 CPU devices
    python -m handbackprop train --devices 2 --coordinator 10.0.0.1:1234 \
        --num-processes 2 --process-id 0                  # and --process-id 1 on the other host

``--devices`` is set before JAX starts (on a CPU it makes that many host-platform devices).
With several processes every one runs the same command but its ``--process-id``; process 0
prints, saves and plots.
"""

import argparse
import contextlib
import importlib
import json
import math
import os
import pathlib
import sys
import tempfile
import time

# Settings a checkpoint fixes (a resumed run takes them from it), and their defaults.
DEFAULTS = {"dataset": "digits", "task": None, "sizes": None, "activation": "relu", "loss": None,
            "batch_size": 32, "lr": 0.1, "momentum": 0.0, "nesterov": False, "l2": 0.0,
            "seed": 0, "dtype": "float32", "dp_clip": None, "dp_noise": None,
            "dp_sampling": "shuffle"}
HIDDEN = (128, 128)  # the default hidden layers between the data's inputs and outputs
EPOCHS = 50  # for a data file
# Each built-in set's own defaults over DEFAULTS (and EPOCHS), chosen on validation splits
# carved from its training data, never the test split: benchmarks/defaults_search.py, whose
# table docs/training.md shows.
DATASET_DEFAULTS = {
    "digits": {"lr": 0.3, "l2": 1e-3, "epochs": 150},
    "breast_cancer": {"lr": 0.2, "l2": 1e-2, "epochs": 100},
    "spirals": {"lr": 0.2, "epochs": 200},
    "diabetes": {"lr": 0.003, "momentum": 0.9, "l2": 0.1, "epochs": 50},
}


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
        return value
    return parse


def _seed(text):
    value = int(text)
    if not -2**63 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an int64 seed, got {text}")
    return value


def _sizes(text):
    try:
        return [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` command's options (a resumed run takes unset ones from its checkpoint)."""
    from handbackprop.activations import ACTIVATIONS
    from handbackprop.data import DATASETS
    from handbackprop.losses import LOSSES

    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}, or a .npz (arrays X, y) or "
                   ".csv (last column y) file (default digits)")
    p.add_argument("--task", choices=["classification", "regression"],
                   help="for a data file: what y holds (default: integer labels are classes)")
    p.add_argument("--sizes", type=_sizes, help="layer sizes d0,...,dL, e.g. 64,128,128,10 "
                   "(default: the data's inputs, 128, 128, the loss's outputs)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS),
                   help=f"hidden layers' activation (default: {_per_set('activation')})")
    p.add_argument("--loss", choices=sorted(LOSSES), help="default: softmax_cross_entropy for "
                   "several classes, binary_cross_entropy for two, squared_error for regression")
    p.add_argument("--epochs", type=_positive(int),
                   help="epochs to train, in all (with --resume: the total to reach) "
                   f"(default: {_per_set('epochs', EPOCHS)})")
    p.add_argument("--batch-size", type=_positive(int),
                   help=f"mini-batch size (default: {_per_set('batch_size')})")
    p.add_argument("--lr", type=_positive(float),
                   help=f"SGD learning rate (default: {_per_set('lr')})")
    p.add_argument("--momentum", type=float,
                   help=f"SGD momentum in [0, 1) (default: {_per_set('momentum')})")
    p.add_argument("--nesterov", action="store_true", default=None,
                   help="Nesterov momentum (needs --momentum > 0)")
    p.add_argument("--l2", type=float, help="L2 penalty lambda: (lambda/2) sum ||W||^2 "
                   f"(default: {_per_set('l2')})")
    p.add_argument("--seed", type=_seed, help="seeds the initialisation and the shuffles (default 0)")
    p.add_argument("--dtype", choices=["float32", "float64"],
                   help="parameters' dtype (default float32)")
    p.add_argument("--plot", metavar="PATH", help="save loss and metric curves to this PNG")
    p.add_argument("--save", metavar="PATH", help="write a checkpoint here after every epoch")
    p.add_argument("--resume", metavar="PATH", help="continue from this checkpoint")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON on stdout (messages go to stderr)")
    p.add_argument("--dp-clip", type=_positive(float), metavar="C",
                   help="DP-SGD: clip each example's gradient to norm C (needs --dp-noise)")
    p.add_argument("--dp-noise", type=float, metavar="SIGMA",
                   help="DP-SGD: add Gaussian noise of standard deviation SIGMA * C to the clipped "
                   "sum of each mini-batch, then divide by the batch size (needs --dp-clip)")
    p.add_argument("--dp-sampling", choices=["shuffle", "poisson"],
                   help="DP-SGD: how each step's batch is drawn: the next B examples of a shuffle, "
                   "or Poisson sampling (each example with probability B / n), the sampling the "
                   "reported epsilon accounts for; one device only (default shuffle)")
    p.add_argument("--dp-delta", type=_positive(float), default=1e-5,
                   help="DP-SGD: report the epsilon spent for this delta, with the optional "
                   "dp-accounting package (default 1e-5)")
    p.add_argument("--devices", type=_positive(int), help="devices per process to split each "
                   "mini-batch over (GPUs; on a CPU, that many CPU devices) (default 1)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address, for a multi-process run (jax.distributed)")
    p.add_argument("--num-processes", type=_positive(int), help="processes in the run")
    p.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes - 1")


def _per_set(key, default=None):
    """A help text's default: the general one, then each data set's own."""
    general = DEFAULTS.get(key, default)
    own = ", ".join(f"{name} {d[key]}" for name, d in DATASET_DEFAULTS.items() if key in d)
    return f"{general}; {own}" if own else f"{general}"


def defaults(dataset) -> dict:
    """The settings a run on ``dataset`` starts from, ``"epochs"`` included."""
    return {**DEFAULTS, "epochs": EPOCHS, **DATASET_DEFAULTS.get(dataset, {}), "dataset": dataset}


def _settings(args, saved):
    """Explicit options, else the checkpoint's, else the data set's defaults; a resumed run's
    settings cannot change, or it would not continue the same run. ``args.epochs`` is filled
    in too (it is not a setting: a resumed run may go on for longer)."""
    base = defaults(args.dataset or saved.get("dataset") or DEFAULTS["dataset"])
    if args.epochs is None:
        args.epochs = base["epochs"]
    settings = {**{k: base[k] for k in DEFAULTS}, **saved}
    for k in DEFAULTS:
        value = getattr(args, k)
        if value is None:
            continue
        if k in saved and value != saved[k]:
            raise ValueError(f"--{k.replace('_', '-')}: the checkpoint was trained with "
                             f"{saved[k]!r}, got {value!r}; a resumed run keeps its settings")
        settings[k] = value
    return settings


def _gradient_check(net, params, x, y):
    """Hand backprop against ``jax.grad`` on one batch: (max relative difference, tolerance)."""
    import jax
    import jax.numpy as jnp

    from handbackprop.backprop import backprop, loss

    hand = jax.jit(backprop, static_argnums=0)(net, params, x, y)
    auto = jax.jit(jax.grad(lambda p: loss(net, p, x, y)))(params)
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree.leaves(hand), jax.tree.leaves(auto)))
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(auto))
    eps = float(jnp.finfo(x.dtype).eps)
    # Both sum the same products in other orders: their difference is round-off, well under
    # sqrt(eps) relative; a wrong formula is off by O(1).
    return diff / max(scale, eps), math.sqrt(eps)


def _privacy(dp, batch_size, n, epochs, delta, out):
    """The epsilon spent, if dp-accounting is installed; printed and returned as a dict."""
    from handbackprop.dp import dp_epsilon

    steps, rate = epochs * (n // batch_size), batch_size / n
    privacy = {"clip_norm": dp.clip_norm, "noise_multiplier": dp.noise_multiplier,
               "poisson": dp.poisson, "sampling_rate": rate, "steps": steps, "delta": delta, "epsilon": None}
    sampling = ("Poisson sampling" if dp.poisson else
                "Poisson sampling assumed; batches are shuffled, so this is an approximation")
    try:
        privacy["epsilon"] = dp_epsilon(dp.noise_multiplier, rate, steps, delta)
        print(f"DP-SGD: ({privacy['epsilon']:.3g}, {delta:g})-DP after {steps} steps of sampling "
              f"rate {rate:.3g} (RDP accountant, {sampling})", file=out)
    except ImportError as e:
        print(f"DP-SGD: no epsilon reported: {e}", file=out)
    return privacy


def _title(s, epochs, privacy) -> str:
    """The plot's title: the data set and network, the settings, and DP-SGD's privacy."""
    sgd = f"SGD lr {s['lr']:g}" + (f", {'Nesterov ' * s['nesterov']}momentum {s['momentum']:g}"
                                   if s["momentum"] else "")
    lines = [f"{s['dataset']}: {'-'.join(map(str, s['sizes']))} {s['activation']}, {s['loss']}",
             f"{sgd}, L2 {s['l2']:g}, batch {s['batch_size']}, {epochs} epochs, {s['dtype']}"]
    if privacy is not None:
        eps = privacy["epsilon"]
        lines.append(f"DP-SGD clip {privacy['clip_norm']:g}, noise {privacy['noise_multiplier']:g}"
                     f" ({'Poisson' if privacy['poisson'] else 'shuffled'} batches): "
                     + (f"epsilon {eps:.3g} at delta {privacy['delta']:g}" if eps is not None
                        else "epsilon not computed (dp-accounting not installed)"))
    return "\n".join(lines)


def _plot(path, history, metric, title, l2=0.0):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.6))
    ax1.plot(history["epoch"], history["train_loss"], label="train (mean over mini-batches)")
    ax1.plot(history["epoch"], history["test_loss"], label="test")
    ax1.set(xlabel="epoch", ylabel="loss", yscale="log",
            title="loss, with the L2 penalty" if l2 else "loss")
    ax2.plot(history["epoch"], history[f"test_{metric}"], label="test")
    ax2.set(xlabel="epoch", ylabel=metric, title=f"test {metric}")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    """Run the ``train`` command; returns the exit status (2 for bad input)."""
    from handbackprop import checkpoint, parallel

    try:
        _require_extra(args)
        _check_outputs(args)
        with _native_stdout_to_stderr(args.json and args.coordinator is not None) as json_out:
            # Devices and processes first: JAX fixes them when it starts, at its first computation.
            parallel.initialize(args.devices, args.coordinator, args.num_processes, args.process_id)
            header = checkpoint.read_metadata(args.resume) if args.resume else None
            saved = _saved_settings(args.resume, header) if header else {}
            settings = _settings(args, saved)
            return _run(args, settings, header, json_out)
    except (ValueError, FileNotFoundError, ImportError) as e:  # ImportError: a missing extra
        print(f"handbackprop train: error: {e}", file=sys.stderr)
        return 2


def _require_extra(args):
    """The packages the command needs beyond the core ones, before any work: one line naming
    the extra that brings them, not a ``ModuleNotFoundError`` at the first epoch."""
    for module in ["tqdm"] + (["matplotlib"] if args.plot else []):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ValueError(f"the train command needs {module!r}, which comes with the train "
                             f"extra: pip install \"handbackprop[train]\"") from None


def _check_outputs(args):
    """Each output file can be written, checked before any training time is spent: its folder
    exists and takes a new file, and the path is not a folder."""
    for option, path in (("--save", args.save), ("--plot", args.plot)):
        if not path:
            continue
        path = pathlib.Path(path)
        if path.is_dir():
            raise ValueError(f"{option}: {path} is a folder, expected a file path")
        if not path.resolve().parent.is_dir():
            raise ValueError(f"{option}: folder {path.parent} does not exist")
        try:  # the real test: permissions, read-only mounts, quotas, names the system refuses
            with tempfile.TemporaryFile(dir=path.resolve().parent):
                pass
            if path.exists() and not os.access(path, os.W_OK):
                raise PermissionError(f"{path} is read-only")
        except OSError as e:
            raise ValueError(f"{option}: cannot write to {path}: {e.strerror or e}") from None


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What each saved setting must be, for a resumed run to trust its checkpoint's settings.
_SETTING_CHECKS = {
    "dataset": (lambda v: isinstance(v, str), "a data set name or path"),
    "task": (lambda v: v in (None, "classification", "regression"), "None or a task"),
    "sizes": (lambda v: v is None or isinstance(v, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v), "a list of ints > 0"),
    "activation": (lambda v: isinstance(v, str), "an activation name"),
    "loss": (lambda v: v is None or isinstance(v, str), "a loss name"),
    "batch_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an int > 0"),
    "lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "momentum": (lambda v: _is_number(v), "a number"),
    "nesterov": (lambda v: isinstance(v, bool), "true or false"),
    "l2": (lambda v: _is_number(v), "a number"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63,
             "an int64"),
    "dtype": (lambda v: v in ("float32", "float64"), "float32 or float64"),
    "dp_clip": (lambda v: v is None or _is_number(v) and v > 0, "None or a number > 0"),
    "dp_noise": (lambda v: v is None or _is_number(v), "None or a number"),
    "dp_sampling": (lambda v: v in ("shuffle", "poisson"), "shuffle or poisson"),
}


def _saved_settings(path, header) -> dict:
    """A checkpoint's saved settings, each checked: a tampered or foreign file is refused in
    one line rather than failing somewhere in training."""
    from handbackprop.checkpoint import CheckpointError

    saved = header["metadata"].get("settings", {})
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: settings: expected a dict, got {type(saved).__name__}")
    for k, v in saved.items():
        check, want = _SETTING_CHECKS.get(k, (None, None))
        if check is None:
            raise CheckpointError(f"{path}: settings: unknown setting {k!r}")
        if not check(v):
            raise CheckpointError(f"{path}: settings: {k}: expected {want}, got {v!r}")
    return saved


def _finite_or_none(tree):
    """The results with NaN and infinities as ``None``: JSON has no token for them."""
    if isinstance(tree, dict):
        return {k: _finite_or_none(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_finite_or_none(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


@contextlib.contextmanager
def _native_stdout_to_stderr(active: bool):
    """While ``active``, whatever is written to file descriptor 1, by Python or by native code
    (gloo prints its connections there in multi-process runs), goes to stderr; yields a stream
    to the real stdout, which then carries the ``--json`` document alone."""
    if not active:
        yield sys.stdout
        return
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(real), "w") as stream:
            yield stream
    finally:
        sys.stdout.flush()
        os.dup2(real, 1)
        os.close(real)


def _run(args, settings, header, json_out) -> int:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from handbackprop import checkpoint, data, parallel, train
    from handbackprop.dp import DPSGD
    from handbackprop.mlp import MLP

    s = settings
    mesh = None
    if (args.devices or 1) > 1 or jax.process_count() > 1:
        devices = args.devices or jax.local_device_count()
        if devices > jax.local_device_count():
            raise ValueError(f"--devices: asked for {devices}, this process has "
                             f"{jax.local_device_count()} {jax.default_backend()} devices")
        mesh = parallel.data_parallel_mesh(devices * jax.process_count())
    if jax.process_index() != 0:  # process 0 reports and writes files; the others only train
        args.save = args.plot = None
    if s["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)
    out = sys.stderr if args.json else sys.stdout
    optimizer = train.sgd(s["lr"], s["momentum"], s["nesterov"])  # checks them first
    if (s["dp_clip"] is None) != (s["dp_noise"] is None):
        raise ValueError("--dp-clip, --dp-noise: DP-SGD needs both, got "
                         f"--dp-clip {s['dp_clip']} and --dp-noise {s['dp_noise']}")
    if s["dp_clip"] is None and args.dp_sampling is not None:
        raise ValueError("--dp-sampling: DP-SGD needs --dp-clip and --dp-noise too")
    dp = None if s["dp_clip"] is None else DPSGD(
        s["dp_clip"], s["dp_noise"], s["dp_sampling"] == "poisson").check()
    if dp is not None and dp.poisson and mesh is not None:
        raise ValueError("--dp-sampling: poisson is not implemented across several devices or "
                         "processes; use --dp-sampling shuffle")
    ds = data.load(s["dataset"], task=s["task"])
    if s["task"] is None and pathlib.Path(s["dataset"]).suffix in (".npz", ".csv"):
        kind = f"classification, {len(ds.classes)} classes" if ds.classes else "regression"
        print(f"{s['dataset']}: {kind}, inferred from y (--task to choose)", file=out)
    loss = s["loss"] or ds.default_loss
    sizes = s["sizes"] or [ds.num_features, *HIDDEN, ds.num_outputs(loss)]
    net = MLP(tuple(sizes), activation=s["activation"], loss=loss, l2=s["l2"])
    s = {**s, "sizes": list(net.sizes), "loss": loss}  # saved resolved, so a resume compares them
    train_data = train.check_data(net, ds.x_train, ds.y_train, "train_data")
    test_data = train.check_data(net, ds.x_test, ds.y_test, "test_data")
    if not s["batch_size"] <= len(ds.x_train):
        raise ValueError(f"--batch-size: expected at most the {len(ds.x_train)} training "
                         f"examples of {s['dataset']}, got {s['batch_size']}")
    if mesh is not None and s["batch_size"] % mesh.size:
        raise ValueError(f"--batch-size: {s['batch_size']} is not divisible by the {mesh.size} "
                         "devices of the data-parallel mesh")
    if header:
        restored = checkpoint.load(args.resume, optimizer, net)
        state, done, history = restored.state, restored.epoch, restored.metadata.get("history", {})
        if done > args.epochs:
            raise ValueError(f"--epochs: the checkpoint has done {done} epochs, got {args.epochs}")
    else:
        dtype = jnp.dtype(s["dtype"])
        state = jax.jit(train.init_state, static_argnums=(1, 2, 3))(
            jax.random.key(s["seed"]), net, optimizer, dtype)
        done, history = 0, {}
    dtype = jax.tree.leaves(state.params)[0].dtype
    batch = slice(0, s["batch_size"])
    rel, tol = _gradient_check(net, state.params, jnp.asarray(train_data[0][batch], dtype),
                               jnp.asarray(train_data[1][batch]))
    verdict = "ok" if rel <= tol else "FAILED"
    print(f"gradient check, one batch of {s['batch_size']}: hand backprop vs jax.grad, max relative "
          f"difference {rel:.1e} (tolerance {tol:.1e}): {verdict}", file=out)
    if verdict != "ok":
        print("handbackprop train: the hand-written gradient disagrees with jax.grad; not training",
              file=sys.stderr)
        return 1

    metric = train.metric_name(net)
    bar = tqdm(total=args.epochs, initial=done, unit="epoch", desc=f"train {s['dataset']}",
               file=sys.stderr, dynamic_ncols=True)

    def on_epoch(epoch, state, record):
        for k, v in record.items():
            history.setdefault(k, []).append(v)
        bar.set_postfix({"loss": f"{record['train_loss']:.4f}",
                         metric: f"{record[f'test_{metric}']:.4f}"})
        bar.update()
        if args.save:
            checkpoint.save(args.save, net, state, epoch, {"settings": s, "history": history})

    start = time.perf_counter()
    state, _ = train.fit(net, optimizer, train_data, epochs=args.epochs, batch_size=s["batch_size"],
                         state=state, initial_epoch=done, test_data=test_data, callback=on_epoch,
                         mesh=mesh, dp=dp)
    seconds = time.perf_counter() - start
    bar.close()
    if args.save and done == args.epochs:  # nothing left to run: still write the checkpoint
        checkpoint.save(args.save, net, state, done, {"settings": s, "history": history})
    evaluate = jax.jit(train.evaluate, static_argnums=0)
    if mesh is not None:  # next to the replicated parameters, in every process
        train_data, test_data = parallel.replicate((train_data, test_data), mesh)
    results = {split: {k: float(v) for k, v in evaluate(net, state.params, *d).items()}
               for split, d in (("train", train_data), ("test", test_data))}
    for split, m in results.items():
        print(f"{split:5s} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()), file=out)
    if dp is not None:
        results["privacy"] = _privacy(dp, s["batch_size"], len(train_data[0]), args.epochs,
                                      args.dp_delta, out)
    plot_error = None
    if args.plot:
        try:  # checked writable at the start; whatever still fails must not lose the results
            _plot(args.plot, history, metric, _title(s, args.epochs, results.get("privacy")),
                  s["l2"])
            print(f"curves saved to {args.plot}", file=out)
        except (OSError, ValueError, RuntimeError) as e:
            plot_error = f"--plot: could not write {args.plot}: {e}"
    diverged = not all(math.isfinite(v) for v in results["train"].values())
    if args.json:
        check = {"max_relative_difference": rel, "tolerance": tol, "ok": True}
        trained_on = jax.tree.leaves(state.params)[0].sharding.device_set  # the mesh's, or one
        devices = {"devices": len(trained_on), "processes": jax.process_count()}
        print(json.dumps(_finite_or_none({
            "settings": s, "epochs": args.epochs, "gradient_check": check, **devices,
            "train_seconds": seconds, "diverged": diverged, **results, "history": history}),
            allow_nan=False), file=json_out)
    if plot_error:
        print(f"handbackprop train: error: {plot_error}", file=sys.stderr)
        return 2
    if diverged:
        print(f"handbackprop train: the run diverged (train loss {results['train']['loss']}); "
              "try a smaller --lr", file=sys.stderr)
        return 1
    return 0
