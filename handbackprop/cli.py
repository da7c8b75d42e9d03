"""The ``handbackprop`` command.

    python -m handbackprop            # the default command (train on digits)
    python -m handbackprop train      # mini-batch SGD on a data set; see train --help
    python -m handbackprop verify     # the full gradient report; exit status 1 on failure
    python -m handbackprop verify-rule MODULE:FUNCTION --shapes 8x16,16   # a function's derivative rule
"""

import argparse
import sys

DEFAULT_COMMAND = "train"


def _verify_usage(args) -> str | None:
    """What is wrong with the ``verify`` flags, as one line naming the flag, or ``None``."""
    from handbackprop.activations import ACTIVATIONS

    hidden = sorted(set(ACTIVATIONS) - {"softmax"})
    try:
        sizes = [int(d) for d in args.sizes.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) < 2 or min(sizes) < 1:
        return f"--sizes: expected two or more positive integers d0,...,dL such as 64,32,10, got {args.sizes!r}"
    if args.activation not in hidden:
        return f"--activation: expected one of {', '.join(hidden)}, got {args.activation!r}"
    for flag, value in (("--batch", args.batch), ("--directions", args.directions)):
        if value < 1:
            return f"{flag}: expected an integer >= 1, got {value}"
    return None


def _verify(args) -> int:
    import json

    problem = _verify_usage(args)
    if problem:
        print(f"handbackprop verify: error: {problem}", file=sys.stderr)
        return 2
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import handbackprop as hbp

    dtype = jnp.dtype(args.dtype)
    net = hbp.MLP(tuple(int(d) for d in args.sizes.split(",")), activation=args.activation, loss=args.loss)
    kp, kx, ky, kd = jax.random.split(jax.random.key(args.seed), 4)
    params = hbp.init_params(kp, net, dtype)
    x = jax.random.normal(kx, (args.batch, net.sizes[0]), dtype)
    k = net.sizes[-1]
    y = {"squared_error": lambda: jax.random.normal(ky, (args.batch, k), dtype),
         "binary_cross_entropy": lambda: jax.random.bernoulli(ky, 0.5, (args.batch, k)).astype(dtype),
         "softmax_cross_entropy": lambda: jax.random.randint(ky, (args.batch,), 0, k)}[net.loss]()
    report = hbp.check_backprop(net, params, x, y, key=kd, num_directions=args.directions,
                                exhaustive=args.exhaustive)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.ok else 1


RULE_DTYPES = ("float32", "float64", "bfloat16", "float16")


def _load(flag, spec):
    """The function named ``MODULE:FUNCTION`` (``FUNCTION`` may be dotted), or a one-line problem."""
    import importlib

    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        return None, f"{flag}: expected MODULE:FUNCTION such as mypkg.layers:layer_norm, got {spec!r}"
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 (any import failure is the user's module)
        return None, f"{flag}: cannot import module {module!r}: {type(e).__name__}: {e}"
    for part in name.split("."):
        if not hasattr(obj, part):
            return None, f"{flag}: module {module!r} has no attribute {name!r}"
        obj = getattr(obj, part)
    if not callable(obj):
        return None, f"{flag}: expected a function, got {type(obj).__name__} {spec!r}"
    return obj, None


def _shapes(text):
    """``"8x16,16"`` -> ``[(8, 16), (16,)]``; ``"s"`` for a scalar. ``None`` if malformed."""
    try:
        shapes = [() if t == "s" else tuple(int(d) for d in t.split("x")) for t in text.split(",")]
    except ValueError:
        return None
    return shapes if all(d >= 1 for s in shapes for d in s) else None


def _verify_rule(args) -> int:
    import json

    def usage(problem):
        print(f"handbackprop verify-rule: error: {problem}", file=sys.stderr)
        return 2

    shapes = _shapes(args.shapes)
    if shapes is None:
        return usage(f"--shapes: expected comma-separated shapes of positive sizes such as 8x16,16 "
                     f"(s for a scalar), got {args.shapes!r}")
    if args.dtype not in RULE_DTYPES:
        return usage(f"--dtype: expected one of {', '.join(RULE_DTYPES)}, got {args.dtype!r}")
    if not 0 <= args.seed < 2**63:
        return usage(f"--seed: expected an integer in [0, 2^63), got {args.seed}")
    sys.path.insert(0, "")  # MODULE from the working directory, as python -m does
    f, problem = _load("MODULE:FUNCTION", args.function)
    reference, problem = (None, problem) if problem or args.reference is None else _load("--reference", args.reference)
    if problem:
        return usage(problem)
    import jax

    jax.config.update("jax_enable_x64", True)  # the checks difference in float64
    import jax.numpy as jnp
    import numpy as np

    import handbackprop as hbp

    rng = np.random.default_rng(args.seed)
    primals = [jnp.asarray(rng.standard_normal(s), args.dtype) for s in shapes]
    try:
        jax.eval_shape(f, *primals)
    except Exception as e:  # noqa: BLE001 (f's own complaint about the shapes)
        return usage(f"--shapes: {args.function} fails on primals of shapes {args.shapes} "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    try:
        report = hbp.verify_rule(f, *primals, reference=reference, key=jax.random.key(args.seed))
    except (TypeError, ValueError) as e:
        return usage(str(e).splitlines()[0])
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.ok else 1


def _parser():
    parser = argparse.ArgumentParser(prog="handbackprop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    verify = sub.add_parser("verify", help="check backprop against jax.grad and finite differences")
    verify.add_argument("--sizes", default="64,32,10",
                        help="layer sizes d0,...,dL (default 64,32,10)")
    verify.add_argument("--activation", default="tanh", help="hidden activation (default tanh)")
    verify.add_argument("--loss", default="squared_error",
                        choices=["squared_error", "binary_cross_entropy", "softmax_cross_entropy"])
    verify.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    verify.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    verify.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    verify.add_argument("--directions", type=int, default=8, help="random directions per leaf (default 8)")
    verify.add_argument("--exhaustive", action=argparse.BooleanOptionalAction, default=None,
                        help="check every coordinate (default: up to 4096 parameters)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=_verify)
    rule = sub.add_parser("verify-rule", help="check a JAX function's derivative rule (custom_vjp, custom_jvp)",
                          description="Draw standard normal primals of the given shapes and check the "
                          "derivative JAX uses for MODULE:FUNCTION against finite differences and autodiff "
                          "of its undecorated primal. Exit status 0 pass, 1 fail, 2 usage error.")
    rule.add_argument("function", metavar="MODULE:FUNCTION", help="the function, e.g. mypkg.layers:layer_norm")
    rule.add_argument("--shapes", required=True, help="the primals' shapes, e.g. 8x16,16 (s for a scalar)")
    rule.add_argument("--dtype", default="float32", help=f"the primals' dtype: {', '.join(RULE_DTYPES)} "
                      "(default float32)")
    rule.add_argument("--reference", metavar="MODULE:FUNCTION",
                      help="a high-precision reference of the same signature (low-precision mode)")
    rule.add_argument("--seed", type=int, default=0, help="seed of the primals and directions (default 0)")
    rule.add_argument("--json", action="store_true", help="print the report as JSON")
    rule.set_defaults(func=_verify_rule)
    from handbackprop import train_command
    train = sub.add_parser("train", help="mini-batch SGD on a data set (the default command)",
                           description=train_command.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train_command.add_arguments(train)
    train.set_defaults(func=train_command.main)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = [DEFAULT_COMMAND, *argv]
    args = _parser().parse_args(argv)
    return args.func(args)
