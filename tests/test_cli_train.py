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
     "binary_cross_entropy expects floating targets of shape (1438, 10)"),
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

