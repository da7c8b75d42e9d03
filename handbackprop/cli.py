"""The ``handbackprop`` command.

    python -m handbackprop            # the default command (train on digits)
    python -m handbackprop train      # mini-batch SGD on a data set; see train --help
    python -m handbackprop verify     # the full gradient report; exit status 1 on failure
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
