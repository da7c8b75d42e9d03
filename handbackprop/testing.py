"""pytest helpers: assert that a gradient, a VJP, a JVP or a custom rule is right.

Each runs the matching check and raises ``AssertionError`` whose message is the whole report
table, naming the failing leaf or (input leaf, output leaf) block::

    from handbackprop.testing import assert_rule

    def test_my_layer_rule():
        assert_rule(my_layer, x, w)
"""

from handbackprop.rules import verify_jvp, verify_rule, verify_vjp
from handbackprop.verify import verify_gradient


def assert_gradient(loss_fn, grad_fn, params, *args, **kw):
    """:func:`~handbackprop.verify_gradient`, raising ``AssertionError(report table)`` on failure;
    returns the report."""
    return _passed(verify_gradient(loss_fn, grad_fn, params, *args, **kw))


def assert_vjp(f, vjp_fn, *primals, **kw):
    """:func:`~handbackprop.verify_vjp`, raising ``AssertionError(report table)`` on failure."""
    return _passed(verify_vjp(f, vjp_fn, *primals, **kw))


def assert_jvp(f, jvp_fn, *primals, **kw):
    """:func:`~handbackprop.verify_jvp`, raising ``AssertionError(report table)`` on failure."""
    return _passed(verify_jvp(f, jvp_fn, *primals, **kw))


def assert_rule(f, *primals, **kw):
    """:func:`~handbackprop.verify_rule`, raising ``AssertionError(report table)`` on failure."""
    return _passed(verify_rule(f, *primals, **kw))


def _passed(report):
    report.raise_if_failed()
    return report
