"""The ``fxopt`` command line.

    fxopt summary resnet18 [--recipe fuse] [--size 224]   graph summary + per-layer report of a torchvision model
    fxopt demo                                           train a small CNN on digits, compile it with every recipe
    fxopt passes                                         list the built-in passes and backends
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Sequence

import torch

__all__ = ["main", "graph_summary"]


def graph_summary(gm: torch.fx.GraphModule) -> str:
    """A short text summary of a traced graph: node counts per kind and op, and untraced leaves."""
    from tabulate import tabulate

    from fxopt import meta

    counts: collections.Counter = collections.Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            what = type(gm.get_submodule(node.target)).__name__
        elif node.op in ("call_function", "call_method"):
            what = getattr(node.target, "__name__", str(node.target))
        else:
            what = ""
        counts[(node.op, what)] += 1
    rows = [(op, what, n) for (op, what), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    text = tabulate(rows, headers=["node kind", "op", "count"])
    leaves = meta.leaves(gm)
    text += f"\n\n{len(gm.graph.nodes)} nodes; {len(leaves)} untraced leaves"
    for info in leaves:
        text += f"\n  leaf: {info}"
    return text


def _torchvision_model(name: str) -> torch.nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None).eval()
    except ValueError:
        names = ", ".join(torchvision.models.list_models(module=torchvision.models)[:12])
        raise SystemExit(f"fxopt: unknown torchvision model {name!r}; try one of: {names}, ...")


def _cmd_summary(args: argparse.Namespace) -> int:
    import fxopt
    from fxopt import recipes

    model = _torchvision_model(args.model)
    x = torch.randn(1, 3, args.size, args.size)
    passes = {"none": [], "fuse": recipes.fuse()}[args.recipe]
    gm = fxopt.compile(model, passes, example_inputs=(x,))
    print(f"== {args.model}: graph after recipe '{args.recipe}' ==")
    print(graph_summary(gm))
    for rec in fxopt.records(gm):
        print(f"  pass {rec.name}: modified={rec.modified} {rec.stats} ({rec.seconds * 1000:.1f} ms)")
    print("\n== report ==")
    print(fxopt.report(gm, (x,)))
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from fxopt import backends, passes

    print("passes:  " + ", ".join(f"{name} ({getattr(passes, name).name})" for name in passes.__all__))
    print("backends: " + ", ".join(backends.available()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fxopt import demo

    print(demo.run(threads=args.threads))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxopt", description="Make PyTorch models smaller and faster.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="trace a torchvision model and print its graph summary and report")
    p.add_argument("model", help="torchvision model name, e.g. resnet18 (random weights)")
    p.add_argument("--recipe", choices=["none", "fuse"], default="fuse")
    p.add_argument("--size", type=int, default=224, help="input image size")
    p.set_defaults(func=_cmd_summary)
    p = sub.add_parser("demo", help="train a small CNN on digits and compare every recipe")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for the latency column")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("passes", help="list built-in passes and backends")
    p.set_defaults(func=_cmd_passes)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
