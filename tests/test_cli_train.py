"""The ``train`` command: the default command, JSON output, plots, exact resumption through
checkpoints, and clear errors (exit status 2) before any training."""

import json

import numpy as np
import pytest

from handbackprop import checkpoint, cli

XOR = ["--dataset", "xor", "--sizes", "2,16,1", "--batch-size", "40"]


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k != "header"}


def test_train_is_the_default_command_and_json(capsys):
    rc, out, err = _run(capsys, *XOR, "--epochs", "2", "--json")
    assert rc == 0
    result = json.loads(out)  # stdout is JSON alone; messages and the bar go to stderr
    assert "gradient check" in err and ": ok" in err and "epoch" in err
    assert result["gradient_check"]["ok"] and result["history"]["epoch"] == [1, 2]
    assert set(result["test"]) == {"loss", "accuracy"} and 0 <= result["test"]["accuracy"] <= 1
    assert result["settings"]["sizes"] == [2, 16, 1] and result["settings"]["lr"] == 0.1


def test_dp_sgd_training_reports_its_privacy(capsys):
    rc, out, err = _run(capsys, *XOR, "--epochs", "2", "--dp-clip", "1", "--dp-noise", "1.1", "--json")
    assert rc == 0
    privacy = json.loads(out)["privacy"]
    # xor's 320 training examples in batches of 40: 8 steps an epoch at sampling rate 1/8.
    assert privacy["steps"] == 16 and privacy["sampling_rate"] == 40 / 320
    assert privacy["clip_norm"] == 1.0 and privacy["noise_multiplier"] == 1.1
    if privacy["epsilon"] is None:  # without the optional dp-accounting package
        assert "needs the optional dp-accounting package" in err
    else:
        assert 0 < privacy["epsilon"] < 100 and "-DP after 16 steps" in err


def test_dp_sgd_with_poisson_sampling(capsys):
    argv = (*XOR, "--epochs", "2", "--dp-clip", "1", "--dp-noise", "1.1", "--json")
    rc, out, err = _run(capsys, *argv, "--dp-sampling", "poisson")
    assert rc == 0
    result = json.loads(out)
    assert result["privacy"]["poisson"] is True and result["settings"]["dp_sampling"] == "poisson"
    assert result["privacy"]["steps"] == 16 and "approximation" not in err
    rc, _, err = _run(capsys, *XOR, "--epochs", "1", "--dp-sampling", "poisson")
    assert rc == 2 and "--dp-sampling: DP-SGD needs --dp-clip and --dp-noise too" in err


def test_resume_is_bit_identical_and_plot(capsys, tmp_path):
    full, part, png = tmp_path / "full.npz", tmp_path / "part.npz", tmp_path / "curves.png"
    assert _run(capsys, *XOR, "--momentum", "0.5", "--epochs", "4", "--save", str(full))[0] == 0
    assert _run(capsys, *XOR, "--momentum", "0.5", "--epochs", "2", "--save", str(part))[0] == 0
    rc, out, _ = _run(capsys, "--resume", str(part), "--epochs", "4", "--save", str(part),
                      "--plot", str(png))
    assert rc == 0 and "curves saved" in out
    a, b = _arrays(full), _arrays(part)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    meta_a, meta_b = checkpoint.read_metadata(full), checkpoint.read_metadata(part)
    assert meta_b["epoch"] == 4 and meta_a["metadata"] == meta_b["metadata"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A resumed run keeps its settings: another learning rate is refused.
    rc, _, err = _run(capsys, "--resume", str(part), "--epochs", "6", "--lr", "0.2")
    assert rc == 2 and "--lr: the checkpoint was trained with 0.1, got 0.2" in err


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "mnist"], "unknown data set 'mnist'; valid names are ['breast_cancer', "),
    (["--dataset", "xor", "--batch-size", "321"], "--batch-size: expected at most the 320"),
    (["--dataset", "digits", "--loss", "binary_cross_entropy"],
     "binary_cross_entropy with 10 outputs expects 0/1 targets of shape (1438, 10)"),
    (["--dataset", "diabetes", "--loss", "softmax_cross_entropy"], "softmax_cross_entropy"),
    (["--dataset", "xor", "--sizes", "3,4,1"], "x: expected floating inputs of shape (n, 3)"),
    (["--dataset", "xor", "--momentum", "1.5"], "momentum: expected a number in [0, 1)"),
    (["--dataset", "xor", "--activation", "relu", "--l2", "-1"], "l2: expected a finite number >= 0"),
    (["--dataset", "xor", "--save", "/no/such/folder/run.npz"], "--save: folder /no/such/folder does"),
    (["--dataset", "xor", "--dp-clip", "1"], "--dp-clip, --dp-noise: DP-SGD needs both"),
    (["--dataset", "xor", "--dp-clip", "1", "--dp-noise", "-1"], "noise_multiplier: expected a finite number >= 0"),
])
def test_bad_input_is_a_clear_error(capsys, argv, message):
    rc, out, err = _run(capsys, "train", *argv)
    assert rc == 2 and message in err and "gradient check" not in out + err


@pytest.mark.parametrize("option", ["--lr", "--epochs", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_settings_are_refused_by_the_parser(capsys, option, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", option, value])
    assert e.value.code == 2 and f"argument {option}: expected a number > 0, got {value}" in capsys.readouterr().err


def test_bad_files(capsys, tmp_path):
    np.savez(tmp_path / "no_y.npz", X=np.ones((10, 2)))
    rc, _, err = _run(capsys, "--dataset", str(tmp_path / "no_y.npz"))
    assert rc == 2 and "expected arrays 'X' and 'y', missing ['y']" in err
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    rc, _, err = _run(capsys, "--resume", str(bad), "--save", str(bad))
    assert rc == 2 and "truncated or corrupted" in err
    assert bad.read_bytes() == b"PK\x03\x04 not really a zip"  # left as it was


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--dataset", "--sizes", "--activation", "--loss", "--epochs", "--batch-size",
                   "--lr", "--momentum", "--l2", "--seed", "--dtype", "--plot", "--save",
                   "--resume", "--json"):
        assert option in text


def _one_line_error(rc, out, err, message):
    lines = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and "gradient check" not in out + err  # before any work


@pytest.mark.parametrize("make, message", [
    (lambda d: ["--plot", str(d)], "--plot: {d} is a folder, expected a file path"),
    (lambda d: ["--save", str(d)], "--save: {d} is a folder"),
    (lambda d: ["--save", "/proc/run.npz"], "--save: cannot write to /proc/run.npz"),
    (lambda d: ["--plot", str(d / "file.txt" / "c.png")], "--plot: folder {d}/file.txt does not exist"),
    (lambda d: ["--seed", str(2**64)], None),
])
def test_outputs_and_seed_are_checked_before_training(capsys, tmp_path, make, message):
    (tmp_path / "file.txt").write_text("")
    argv = ["train", *XOR, "--epochs", "1", *make(tmp_path)]
    if message is None:  # the parser's one line
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert f"argument --seed: expected an int64 seed, got {2**64}" in capsys.readouterr().err
        return
    _one_line_error(*_run(capsys, *argv), message.format(d=tmp_path))


def test_a_failed_plot_keeps_the_json(capsys, tmp_path, monkeypatch):
    from handbackprop import train_command

    def broken(*args):  # _plot(path, history, metric, title, l2)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train_command, "_plot", broken)
    rc, out, err = _run(capsys, *XOR, "--epochs", "1", "--json", "--plot", str(tmp_path / "c.png"))
    assert json.loads(out)["history"]["epoch"] == [1]  # the results are not lost
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and errors == [f"handbackprop train: error: --plot: could not write "
                                  f"{tmp_path / 'c.png'}: [Errno 28] No space left on device"]


def test_a_diverged_run_gives_valid_json_with_null(capsys):
    rc, out, err = _run(capsys, *XOR, "--epochs", "1", "--lr", "1e6", "--json")
    result = json.loads(out)  # strict JSON: no NaN tokens
    assert rc == 1 and result["diverged"] is True and result["train"]["loss"] is None
    assert "NaN" not in out and "the run diverged" in err


def test_a_missing_extra_is_named(capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if not installed: import raises
    _one_line_error(*_run(capsys, *XOR, "--epochs", "1"),
                    "needs 'tqdm', which comes with the train extra: pip install \"handbackprop[train]\"")


@pytest.fixture(scope="module")
def xor_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "run.npz"
    assert cli.main([*XOR, "--epochs", "1", "--save", str(path)]) == 0
    return path


@pytest.mark.parametrize("settings, message", [
    ([1, 2], "settings: expected a dict, got list"),
    ({"batch_size": 0}, "settings: batch_size: expected an int > 0, got 0"),
    ({"lr": "0.1"}, "settings: lr: expected a number > 0, got '0.1'"),
    ({"seed": 2**70}, "settings: seed: expected an int64"),
    ({"epochs": 3}, "settings: unknown setting 'epochs'"),
])
def test_tampered_settings_are_refused(capsys, tmp_path, xor_checkpoint, settings, message):
    with np.load(xor_checkpoint) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(str(arrays["header"]))
    meta = header["metadata"]
    meta["settings"] = settings if isinstance(settings, list) else {**meta["settings"], **settings}
    arrays["header"] = np.array(json.dumps(header))
    np.savez(tmp_path / "t.npz", **arrays)
    _one_line_error(*_run(capsys, "--resume", str(tmp_path / "t.npz"), "--epochs", "2"), message)


def test_an_inferred_task_is_said(capsys, tmp_path):
    rng = np.random.default_rng(0)
    np.savetxt(tmp_path / "d.csv", np.column_stack([rng.standard_normal((60, 2)), np.arange(60) % 3]),
               delimiter=",")
    # Said as the data is loaded; the oversized batch then stops the run before any training.
    rc, out, err = _run(capsys, "--dataset", str(tmp_path / "d.csv"), "--batch-size", "100")
    assert rc == 2 and "--batch-size: expected at most the 48" in err
    assert f"{tmp_path / 'd.csv'}: classification, 3 classes, inferred from y (--task to choose)" in out
