"""The ``fxopt`` command line.

    fxopt demo [--png PATH]                      train two small models on digits, run every recipe, one table
    fxopt optimize MODEL --recipe R[,R...] [--backend B] [--calib random|folder:PATH|npz:PATH] -o OUT
    fxopt inspect MODEL [--sensitivity]           graph summary, float islands, per-backend support, params/FLOPs
    fxopt bench MODEL --recipes R,... --backends B,...   interleaved latency table
    fxopt passes                                  the built-in passes, recipes and backends
    fxopt summary resnet18 [--recipe fuse]        graph summary + per-layer report of a torchvision model

``MODEL`` is ``torchvision:NAME`` (random weights), ``path/to/file.py:factory`` (a function returning the
model) or a file saved by ``fxopt.save`` (``.pt``, ``.pt2``, ``.onnx``, ``.xml``, ``.tflite``). ``--input-shape 1,3,224,224``
sets the example input. Usage errors (unknown names, bad specs, unreadable calibration data) exit with 2,
other fxopt errors with 1. Progress bars go to stderr on a terminal only; ``--quiet`` silences them.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import FxoptError
from .recipe_args import UsageError

__all__ = ["main", "graph_summary", "load_model", "load_calibration", "parse_shape", "UsageError"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_ARTIFACT_SUFFIXES = (".pt", ".pt2", ".onnx", ".xml", ".tflite")


# ---- shared helpers ----------------------------------------------------------------------------------


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


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"--input-shape {text!r} is not a list of positive integers, e.g. 1,3,224,224")
    return shape


def _torchvision_model(name: str) -> torch.nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = [n for n in names if name.lower()[:4] in n][:8] or names[:12]
        raise UsageError(f"unknown torchvision model {name!r}; e.g. {', '.join(close)} "
                         f"({len(names)} models: torchvision.models.list_models())")
    return torchvision.models.get_model(name, weights=None).eval()


def _factory_model(path: Path, factory: str) -> torch.nn.Module:
    if not path.is_file():
        raise UsageError(f"model file {str(path)!r} does not exist (MODEL is path/to/file.py:factory)")
    spec = importlib.util.spec_from_file_location(f"fxopt_user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise FxoptError(f"importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.pop(0)
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UsageError(f"{str(path)!r} has no function {factory!r}; "
                         f"it defines: {', '.join(found) or 'nothing callable'}")
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{path.name}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def load_model(spec: str) -> torch.nn.Module:
    """The model a ``MODEL`` argument names (see the module docstring); ``UsageError`` for a bad spec."""
    import fxopt

    if spec.startswith("torchvision:"):
        return _torchvision_model(spec.split(":", 1)[1])
    path_part, sep, factory = spec.rpartition(":")
    if sep and path_part.endswith(".py") and factory:
        return _factory_model(Path(path_part), factory)
    path = Path(spec)
    if path.suffix.lower() in _ARTIFACT_SUFFIXES:
        if not path.is_file():
            raise UsageError(f"saved model {spec!r} does not exist")
        try:
            return fxopt.load(path)
        except FxoptError:
            raise
        except Exception as exc:
            raise FxoptError(f"could not load {spec!r}: {type(exc).__name__}: {exc}") from exc
    raise UsageError(
        f"cannot tell what model {spec!r} is; MODEL is one of: torchvision:NAME (e.g. torchvision:resnet18), "
        f"path/to/file.py:factory (a function returning an nn.Module), or a file saved by fxopt "
        f"({', '.join(_ARTIFACT_SUFFIXES)})")


def _batches_of(x: torch.Tensor, batch: int, limit: int) -> list[torch.Tensor]:
    return [x[i : i + batch] for i in range(0, min(len(x), batch * limit), batch)]


def _image_folder(folder: Path, shape: tuple[int, ...], limit: int) -> list[torch.Tensor]:
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_image

    if len(shape) != 4:
        raise UsageError(f"folder calibration needs a 4-d image input shape N,C,H,W, got --input-shape {shape}")
    if not folder.is_dir():
        raise UsageError(f"calibration folder {str(folder)!r} does not exist or is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"calibration folder {str(folder)!r} holds no images ({', '.join(_IMAGE_SUFFIXES)})")
    n, c, h, w = shape
    files = files[: n * limit]
    mode = ImageReadMode.RGB if c == 3 else ImageReadMode.GRAY
    images = []
    for p in files:
        try:
            img = decode_image(str(p), mode=mode).float().div(255.0)
        except Exception as exc:
            raise UsageError(f"cannot read calibration image {str(p)!r}: {exc}") from exc
        images.append(F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0])
    x = torch.stack(images)
    if c == 3:  # ImageNet normalisation: what torchvision's models expect
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return _batches_of(x, n, limit)


def _npz(path: Path, shape: tuple[int, ...], limit: int) -> list[torch.Tensor]:
    import numpy as np

    if not path.is_file():
        raise UsageError(f"calibration file {str(path)!r} does not exist")
    try:
        with np.load(path) as data:
            keys = list(data.keys())
            if not keys:
                raise UsageError(f"calibration file {str(path)!r} holds no arrays")
            key = next((k for k in ("x", "inputs", "images", "data") if k in keys), keys[0])
            array = data[key]
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot read calibration file {str(path)!r} as .npz: {exc}") from exc
    x = torch.as_tensor(array).float()
    if tuple(x.shape[1:]) != tuple(shape[1:]):
        raise UsageError(f"calibration array {key!r} in {str(path)!r} has samples of shape {tuple(x.shape[1:])} "
                         f"but the model input is {tuple(shape[1:])} (--input-shape)")
    return _batches_of(x, shape[0], limit)


def load_calibration(spec: str, shape: tuple[int, ...], batches: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Calibration batches from ``random``, ``folder:PATH`` (images) or ``npz:PATH`` (first array, or ``x``)."""
    kind, _, where = spec.partition(":")
    if kind == "random" and not where:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(shape, generator=gen) for _ in range(batches)]
    if kind == "folder" and where:
        return _image_folder(Path(where), shape, batches)
    if kind == "npz" and where:
        return _npz(Path(where), shape, batches)
    raise UsageError(f"--calib {spec!r} is not one of: random, folder:PATH (images), npz:PATH (numpy arrays)")


def _backend_names() -> list[str]:
    from fxopt import backends

    return backends.available()


def _check_backend(name: str | None) -> str | None:
    if name is None:
        return None
    names = _backend_names()
    if name not in names:
        raise UsageError(f"unknown backend {name!r}; valid backends: {', '.join(names) or 'none'}")
    return name


def _input_shape(args: argparse.Namespace, model_spec: str) -> tuple[int, ...]:
    if args.input_shape:
        return parse_shape(args.input_shape)
    if model_spec.startswith("torchvision:"):
        return (1, 3, 224, 224)
    raise UsageError(f"give --input-shape for {model_spec!r} (e.g. --input-shape 1,3,224,224)")


def _example(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _render(obj: Any, fmt: str) -> str:
    if fmt == "markdown" and hasattr(obj, "to_markdown"):
        return obj.to_markdown()
    if fmt == "html" and hasattr(obj, "to_html"):
        return obj.to_html()
    return str(obj)


def _table(rows: list[list[Any]], headers: list[str], fmt: str) -> str:
    from tabulate import tabulate

    tablefmt = {"markdown": "github", "html": "html"}.get(fmt, "simple")
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def _needs_calibration(recipes: list[tuple[str, dict]]) -> bool:
    from fxopt import recipe_args

    return any(recipe_args.needs_calibration(name) for name, _ in recipes)


def _quiet(args: argparse.Namespace) -> None:
    from fxopt import progress

    if getattr(args, "quiet", False):
        progress.quiet(True)


def _info(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr, flush=True)


# ---- commands -------------------------------------------------------------------------------------


def _cmd_summary(args: argparse.Namespace) -> int:
    import fxopt
    from fxopt import recipes

    model = _torchvision_model(args.model.removeprefix("torchvision:"))
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
    from fxopt import passes, recipe_args

    print("passes:   " + ", ".join(f"{name} ({getattr(passes, name).name})" for name in passes.__all__
                                    if isinstance(getattr(getattr(passes, name), "name", None), str)))
    print("recipes:  " + ", ".join(recipe_args.recipe_names()))
    print("backends: " + ", ".join(_backend_names()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fxopt import demo

    result = demo.run(threads=args.threads, png=args.png, fast=args.fast)
    print(result.table("github") if args.format == "markdown" else result.table("html") if args.format == "html"
          else str(result))
    if args.png:
        _info(args, f"wrote {args.png}")
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    import fxopt
    from fxopt import recipe_args

    recipes = recipe_args.parse(args.recipe)
    backend = _check_backend(args.backend)
    out_path = Path(args.output)
    if out_path.suffix.lower() not in _ARTIFACT_SUFFIXES:
        raise UsageError(f"-o {args.output!r}: use one of {', '.join(_ARTIFACT_SUFFIXES)} (the format follows the "
                         "extension; .pt for int8 models)")
    model = load_model(args.model)
    shape = _input_shape(args, args.model)
    example = _example(shape)
    calibration = None
    if _needs_calibration(recipes):
        calibration = load_calibration(args.calib, shape, args.calib_batches)
    _info(args, f"optimizing {args.model} with {args.recipe}" + (f" for {backend}" if backend else ""))
    result, note = recipe_args.compile_recipes(model, recipes, backend, example, calibration)
    test = [_example(shape, seed=s) for s in (1, 2)]
    before, after = fxopt.report(model), fxopt.report(result)
    cmp = fxopt.compare(model, result, test)
    timing = fxopt.benchmark_many({"before": model, "after": result}, (example,), rounds=args.rounds, iters=5,
                                  warmup=2, threads=args.threads)
    tb, ta = timing.timings["before"], timing.timings["after"]
    rows = [["params", f"{before.total_params:,}", f"{after.total_params:,}", ""],
            ["bytes", f"{before.total_bytes:,}", f"{after.total_bytes:,}",
             f"{after.total_bytes / max(before.total_bytes, 1):.2f}x"],
            ["sparsity", f"{before.sparsity:.1%}", f"{after.sparsity:.1%}", ""],
            [f"median ms (batch {shape[0]})", f"{tb.median_ms:.3f}", f"{ta.median_ms:.3f}",
             f"speed-up {tb.median_ms / ta.median_ms:.2f}x"],
            ["SQNR vs before (dB)", "", f"{cmp.sqnr_db:.2f}", ""]]
    if cmp.top1_agreement is not None:
        rows.append(["top-1 agreement", "", f"{cmp.top1_agreement:.1%}", ""])
    print(f"== {args.model} -> {args.recipe}" + (f" on {backend}" if backend else "") + " ==")
    print(_table(rows, ["", "before", "after", "ratio"], args.format))
    for rec in fxopt.records(result):
        print(f"  pass {rec.name}: modified={rec.modified} {rec.stats}")
    if note:
        print(f"note: {note}")
    if args.layers:
        print("\n== per-layer report (after) ==")
        print(_render(after, args.format))
    try:
        fxopt.save(result, out_path, example_inputs=(example,))
    except FxoptError as exc:
        raise FxoptError(f"could not save to {args.output!r}: {exc}") from exc
    print(f"saved {out_path} ({out_path.stat().st_size:,} bytes)")
    return 0


def _support_table(gm: torch.fx.GraphModule, names: list[str]) -> tuple[list[list[str]], list[str], list[str]]:
    from fxopt import backends
    from fxopt.backends.spec import op_key

    objs: dict[str, Any] = {}
    for name in names:  # aliases (fbgemm -> x86) collapse onto one column, under the backend's own name
        obj = backends.get(name)
        if all(o is not obj for o in objs.values()):
            objs[getattr(obj, "name", "") or name] = obj
    per_op: dict[str, dict[str, set[str]]] = {}
    counts: collections.Counter = collections.Counter()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        key = op_key(node, gm) or (type(gm.get_submodule(node.target)).__name__ if node.op == "call_module"
                                   else getattr(node.target, "__name__", str(node.target)))
        counts[key] += 1
        for bname, obj in objs.items():
            try:
                s = obj.supports(node)
                verdict = "yes" if s.ok else f"no: {s.reason}"
            except Exception as exc:  # a backend's support table must not break inspect
                verdict = f"no: supports() failed ({type(exc).__name__})"
            per_op.setdefault(key, {}).setdefault(bname, set()).add(verdict)
    rows = []
    for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        cells = []
        for bname in objs:
            verdicts = per_op[key][bname]
            cells.append("int8" if verdicts == {"yes"} else "float" if not any(v == "yes" for v in verdicts)
                         else "some")
        rows.append([key, str(n), *cells])
    reasons = sorted({f"{bname}: {v[4:]}" for per in per_op.values() for bname, vs in per.items() for v in vs
                      if v.startswith("no: ")})
    return rows, list(objs), reasons


def _float_islands(gm: torch.fx.GraphModule, backend: str) -> list[str] | None:
    """Ops InsertQuantStubs would keep float for ``backend`` (None when the backend has no stub placement)."""
    import copy

    from fxopt import meta, passes

    try:
        result = passes.InsertQuantStubs(backend=backend)(copy.deepcopy(gm))
    except Exception:
        return None
    return [str(island) for island in meta.float_islands(result.graph_module)]


def _flops(model: torch.nn.Module, example: torch.Tensor) -> int | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(example)
        return int(counter.get_total_flops())
    except Exception:
        return None


def _cmd_inspect(args: argparse.Namespace) -> int:
    import fxopt

    model = load_model(args.model)
    shape = _input_shape(args, args.model)
    example = _example(shape)
    gm = fxopt.trace(model, (example,))
    params = sum(p.numel() for p in model.parameters())
    flops = _flops(model, example)
    print(f"== {args.model}: input {tuple(shape)} ==")
    print(f"parameters: {params:,} ({sum(p.numel() * p.element_size() for p in model.parameters()):,} bytes)")
    print(f"FLOPs: {flops:,} ({flops / 2:,.0f} MACs) per call" if flops is not None else "FLOPs: not countable here")
    print("\n== graph ==")
    print(graph_summary(gm))
    names = [_check_backend(b) for b in args.backends.split(",")] if args.backends else _backend_names()
    rows, columns, reasons = _support_table(gm, names)
    print("\n== per-backend support (int8 = runs in int8; float = stays float) ==")
    print(_table(rows, ["op", "count", *columns], args.format))
    if reasons:
        print("why not:")
        for r in reasons:
            print(f"  {r}")
    print("\n== float islands (untraced modules and ops that stay float between quant/dequant) ==")
    leaves = fxopt.untraced(gm)
    print(f"untraced: {', '.join(leaves)}" if leaves else "untraced: none (the whole model traced)")
    for name in columns:
        islands = _float_islands(gm, name)
        if islands is None:
            continue
        print(f"{name}: {len(islands)} float island(s)")
        for island in islands[: args.max_islands]:
            print(f"  {island}")
        if len(islands) > args.max_islands:
            print(f"  ... and {len(islands) - args.max_islands} more")
    if args.sensitivity:
        _print_sensitivity(model, example, shape, args)
    return 0


def _print_sensitivity(model: torch.nn.Module, example: torch.Tensor, shape: tuple[int, ...],
                       args: argparse.Namespace) -> None:
    """Static int8 (x86) on the calibration data, then each int8 op quantized alone: the output SQNR it leaves
    (``fxopt.passes.float_fallback.rank_sensitivity``), worst first; ``--sensitivity-png`` draws the bars."""
    import fxopt
    from fxopt import recipes
    from fxopt.passes.float_fallback import rank_sensitivity

    calibration = load_calibration(args.calib, shape, args.calib_batches)
    prepared = fxopt.compile(model, recipes.static_int8(calibration), example_inputs=(example,))
    rows = rank_sensitivity(prepared, calibration[:2])
    print(f"\n== sensitivity: each int8 op quantized alone (x86, {args.calib} calibration), worst first ==")
    table = [[r["node"], r["op"], r["target"], f"{r['sqnr_db']:.1f}"] for r in rows[: args.max_islands]]
    print(_table(table, ["node", "op", "layer", "output SQNR dB"], args.format))
    if len(rows) > args.max_islands:
        print(f"... and {len(rows) - args.max_islands} more (--max-islands)")
    if args.sensitivity_png:
        _sensitivity_chart(rows[: args.max_islands], args.sensitivity_png)
        print(f"wrote {args.sensitivity_png}")


def _sensitivity_chart(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise FxoptError("the sensitivity chart needs matplotlib: pip install 'fxopt[plot]'") from exc
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5), dpi=110)
    labels = [r["target"] for r in rows][::-1]
    values = [r["sqnr_db"] for r in rows][::-1]
    ax.barh(labels, values, color=["tab:red" if v == min(values) else "tab:blue" for v in values])
    ax.set_xlabel("output SQNR with only this op in int8 (dB; lower = more sensitive)")
    ax.set_ylabel("layer")
    ax.set_title("per-layer int8 sensitivity (worst at the top)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cmd_bench(args: argparse.Namespace) -> int:
    import fxopt
    from fxopt import progress, recipe_args
    from fxopt.compare import compare

    recipes = recipe_args.parse(args.recipes)
    backends = [_check_backend(b.strip()) for b in args.backends.split(",") if b.strip()] if args.backends else []
    model = load_model(args.model)
    shape = _input_shape(args, args.model)
    example = _example(shape)
    calibration = load_calibration(args.calib, shape, args.calib_batches) if _needs_calibration(recipes) else None
    variants: dict[str, torch.nn.Module] = {"float": model}
    jobs = [(r, b) for r in recipes for b in (backends or [None])]
    for (name, options), backend in progress.bar(jobs, "compiling", unit="variant"):
        module, note = recipe_args.compile_recipes(model, [(name, options)], backend, example, calibration)
        label = name + "".join(f":{k}={v}" for k, v in options.items())
        label += f" @ {backend}" if backend and not note else ""
        if label in variants:  # a recipe no backend lowers: one eager variant, whatever --backends lists
            continue
        variants[label] = module
    _info(args, f"timing {len(variants)} variants interleaved, {args.rounds} rounds x {args.iters} calls ...")
    cmp = fxopt.benchmark_many(variants, (example,), rounds=args.rounds, iters=args.iters, warmup=args.warmup,
                               threads=args.threads)
    test = [_example(shape, seed=1)]
    rows = []
    for r in cmp.rows:
        sqnr = "" if r["name"] == "float" else f"{compare(model, variants[r['name']], test).sqnr_db:.1f}"
        rows.append([r["name"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['fps']:.1f}",
                     f"{r['speedup']:.2f}x", f"{fxopt.report(variants[r['name']]).total_bytes:,}", sqnr])
    print(f"== {args.model}, input {tuple(shape)}, {cmp.timings['float'].threads} thread(s) ==")
    print(_table(rows, ["variant", "median ms", "p90 ms", "FPS", "vs float", "bytes", "SQNR dB"], args.format))
    return 0


# ---- parser ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    common.add_argument("--format", choices=["text", "markdown", "html"], default="text",
                        help="how tables are printed")
    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("model", help="torchvision:NAME, path/to/file.py:factory, or a saved fxopt file")
    model_args.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default for torchvision)")
    model_args.add_argument("--threads", type=int, default=None, help="intra-op threads for timing (default: torch's)")

    parser = argparse.ArgumentParser(prog="fxopt", description="Make PyTorch models smaller and faster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", parents=[common], help="train small models on digits and compare every recipe")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for the latency columns")
    p.add_argument("--png", help="also write an accuracy-vs-size chart here (needs matplotlib)")
    p.add_argument("--fast", action="store_true", help="1 training epoch, short timings: a smoke run")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("optimize", parents=[common, model_args], help="optimize a model with recipes and save it")
    p.add_argument("--recipe", required=True, help="recipe[,recipe...], options as name:key=value")
    p.add_argument("--backend", help="lower to this backend (see `fxopt passes`)")
    p.add_argument("--calib", default="random", help="random | folder:PATH | npz:PATH (default random)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches (default 8)")
    p.add_argument("-o", "--output", required=True, help="where to save (.pt, .pt2, .onnx, .xml, .tflite)")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds for the before/after latency")
    p.add_argument("--layers", action="store_true", help="also print the per-layer report of the result")
    p.set_defaults(func=_cmd_optimize)

    p = sub.add_parser("inspect", parents=[common, model_args],
                       help="graph summary, float islands, per-backend support, params/FLOPs")
    p.add_argument("--backends", help="backends to check (default: all available)")
    p.add_argument("--sensitivity", action="store_true",
                   help="per-layer int8 sensitivity ranking (static int8 on the calibration data)")
    p.add_argument("--sensitivity-png", help="also draw the ranking as a bar chart (needs matplotlib)")
    p.add_argument("--calib", default="random", help="random | folder:PATH | npz:PATH (default random)")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--max-islands", type=int, default=20, help="float islands listed per backend")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("bench", parents=[common, model_args], help="interleaved latency of recipes x backends")
    p.add_argument("--recipes", required=True, help="recipe[,recipe...]; each is one variant per backend")
    p.add_argument("--backends", default="", help="backend[,backend...] to lower to")
    p.add_argument("--calib", default="random", help="random | folder:PATH | npz:PATH (default random)")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("passes", parents=[common], help="list the built-in passes, recipes and backends")
    p.set_defaults(func=_cmd_passes)

    p = sub.add_parser("summary", parents=[common], help="graph summary and report of a torchvision model")
    p.add_argument("model", help="torchvision model name, e.g. resnet18 (random weights)")
    p.add_argument("--recipe", choices=["none", "fuse"], default="fuse")
    p.add_argument("--size", type=int, default=224, help="input image size")
    p.set_defaults(func=_cmd_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # argparse exits with 2 on its own usage errors
    _quiet(args)
    try:
        return args.func(args)
    except UsageError as exc:
        parser.exit(2, f"{parser.prog} {args.command}: error: {exc}\n")
    except (FxoptError, ValueError) as exc:  # ValueError: e.g. a recipe prepared for another backend
        parser.exit(1, f"{parser.prog} {args.command}: error: {exc}\n")
    return 1  # pragma: no cover - parser.exit raises


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
