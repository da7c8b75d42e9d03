"""The ``handbackprop`` command.

    python -m handbackprop            # the default command (demo)
    python -m handbackprop demo       # hand backprop vs jax.grad and finite differences
"""

import argparse
import sys

DEFAULT_COMMAND = "demo"


def _demo(args) -> int:
    import jax
    import jax.numpy as jnp

    import handbackprop as hbp

    jax.config.update("jax_enable_x64", True)
    net = hbp.MLP(tuple(args.sizes), activation=args.activation, loss="softmax_cross_entropy")
    kp, kx, ky = jax.random.split(jax.random.key(args.seed), 3)
    params = hbp.init_params(kp, net, jnp.float64)
    x = jax.random.normal(kx, (args.batch, net.sizes[0]), jnp.float64)
    y = jax.random.randint(ky, (args.batch,), 0, net.sizes[-1])
    f = lambda p: hbp.loss(net, p, x, y)  # noqa: E731
    hand = jax.jit(hbp.backprop, static_argnums=0)(net, params, x, y)
    auto = jax.grad(f)(params)
    # Central differences along one random direction u: (f(p + hu) - f(p - hu)) / 2h ~ <g, u>.
    u = jax.tree.map(lambda a, k: jax.random.normal(k, a.shape, a.dtype), params,
                     jax.tree.unflatten(jax.tree.structure(params),
                                        list(jax.random.split(kp, len(jax.tree.leaves(params))))))
    h = 1e-5
    fd = (f(jax.tree.map(lambda p, v: p + h * v, params, u))
          - f(jax.tree.map(lambda p, v: p - h * v, params, u))) / (2 * h)
    dot = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(hand), jax.tree.leaves(u)))
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(hand), jax.tree.leaves(auto)))
    print(f"network {'-'.join(map(str, net.sizes))}, {args.activation}, softmax cross-entropy, "
          f"batch {args.batch}, float64, {net.num_params} parameters")
    print(f"hand backprop vs jax.grad:             max |difference| = {err:.2e}")
    print(f"directional derivative, hand vs FD:   {float(dot):.12f} vs {float(fd):.12f} "
          f"(relative difference {abs(float(dot) - float(fd)) / abs(float(fd)):.1e})")
    return 0


def _parser():
    parser = argparse.ArgumentParser(prog="handbackprop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="hand backprop against jax.grad and finite differences")
    demo.add_argument("--sizes", type=lambda s: [int(d) for d in s.split(",")], default=[64, 32, 10],
                      help="layer sizes d0,...,dL (default 64,32,10)")
    demo.add_argument("--activation", default="tanh", help="hidden activation (default tanh)")
    demo.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = [DEFAULT_COMMAND, *argv]
    args = _parser().parse_args(argv)
    return args.func(args)
