"""The ``verify`` and ``verify-rule`` commands: reports, exit statuses, one-line usage errors."""

import json

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


RULES = '''
import jax, jax.numpy as jnp

def _f(x, w):
    return jnp.tanh(x @ w)

def _bwd(sign):
    def bwd(res, g):
        x, w = res
        d = g * (1 - jnp.tanh(x @ w) ** 2)
        return d @ w.T, sign * (x.T @ d)
    return bwd

right = jax.custom_vjp(_f)
right.defvjp(lambda x, w: (_f(x, w), (x, w)), _bwd(1.0))
wrong = jax.custom_vjp(_f)
wrong.defvjp(lambda x, w: (_f(x, w), (x, w)), _bwd(-1.0))
number = 3
'''


@pytest.fixture
def rules_module(tmp_path, monkeypatch):
    (tmp_path / "cli_rules_mod.py").write_text(RULES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cli_rules_mod"


@pytest.mark.slow
def test_verify_rule_exit_statuses_and_json(capsys, rules_module):
    rc, out, err = _run(capsys, "verify-rule", f"{rules_module}:right", "--shapes", "4x3,3x2")
    assert rc == 0, out + err
    assert out.startswith("rule check: 3 blocks") and out.rstrip().endswith("PASS")
    rc, out, err = _run(capsys, "verify-rule", f"{rules_module}:wrong", "--shapes", "4x3,3x2", "--json")
    assert rc == 1
    report = json.loads(out)
    assert not report["ok"] and [b["name"] for b in report["leaves"] if not b["ok"]] == ["arg1 -> out"]
    rc, out, err = _run(capsys, "verify-rule", f"{rules_module}:right", "--shapes", "4x3,3x2",
                        "--dtype", "bfloat16", "--reference", f"{rules_module}:_f")
    assert rc == 0 and "reference mode: f in bfloat16" in out, out + err


@pytest.mark.parametrize("argv, expected", [
    (["{m}:right", "--shapes", "4x3,4x2"], "--shapes: {m}:right fails on primals of shapes 4x3,4x2"),
    (["{m}:right", "--shapes", "4xa"], "--shapes: expected comma-separated shapes"),
    (["{m}:right", "--shapes", "4x0"], "--shapes: expected comma-separated shapes"),
    (["{m}", "--shapes", "4"], "MODULE:FUNCTION: expected MODULE:FUNCTION"),
    (["no_such_module_xyz:f", "--shapes", "4"], "MODULE:FUNCTION: cannot import module 'no_such_module_xyz'"),
    (["{m}:absent", "--shapes", "4"], "MODULE:FUNCTION: module '{m}' has no attribute 'absent'"),
    (["{m}:number", "--shapes", "4"], "MODULE:FUNCTION: expected a function, got int"),
    (["{m}:right", "--shapes", "4", "--dtype", "int8"], "--dtype: expected one of float32"),
    (["{m}:right", "--shapes", "4x3,3x2", "--reference", "{m}:absent"], "--reference: module '{m}' has no"),
])
def test_verify_rule_usage_errors_are_one_line_exit_2(capsys, rules_module, argv, expected):
    rc, out, err = _run(capsys, "verify-rule", *(a.format(m=rules_module) for a in argv))
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "handbackprop verify-rule: error: " + expected.format(m=rules_module)), err
