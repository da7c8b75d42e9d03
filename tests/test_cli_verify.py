"""The ``verify`` and ``verify-rule`` commands: reports, exit statuses, one-line usage errors."""

import pytest

from handbackprop import cli

SMALL = ["verify", "--sizes", "3,4,2", "--batch", "2", "--directions", "1"]


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("flag, value, expected", [
    ("--activation", "gelu", "expected one of elu, identity"),
    ("--sizes", "3", "expected two or more positive integers"),
    ("--sizes", "3,x", "expected two or more positive integers"),
    ("--sizes", "3,0,2", "expected two or more positive integers"),
    ("--directions", "0", "expected an integer >= 1"),
    ("--batch", "0", "expected an integer >= 1"),
    ("--batch", "-1", "expected an integer >= 1"),
])
def test_verify_usage_error_is_one_line_and_exit_2(capsys, flag, value, expected):
    rc, out, err = _run(capsys, *SMALL, flag, value)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"handbackprop verify: error: {flag}: {expected}"), lines[0]
    assert repr(value) in lines[0] or f"got {value}" in lines[0], lines[0]
