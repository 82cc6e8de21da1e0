"""Rewrite rules: pattern → replacement on torch.fx graphs, with checks, wildcards and ``explain``.

A rule is a pattern function, a replacement function and an optional ``check``::

    class SiLU(fxopt.RewriteRule):
        def pattern(self, x): return x * torch.sigmoid(x)
        def replacement(self, x): return torch.nn.functional.silu(x)

Both functions are traced with ``torch.fx`` and the pattern is found with torch.fx's
``SubgraphMatcher`` (which drops matches whose inner nodes are used outside the match or that
would form a cycle). What fxopt adds:

* **Literals match exactly.** ``x * 2.0`` matches ``x * 2.0``, never ``x * 3.0`` nor ``x * 2``.
  A pattern argument binds to graph *values* (nodes) only; to let it bind to a Python literal
  too, name it in ``wildcards`` (``wildcards = ("alpha",)``). The replacement then receives
  the literal.
* **Checks give reasons.** ``check(self, match)`` returns a bool or ``MatchResult.fail("why")``;
  rejected matches are listed in the pass's notes and by :func:`explain`.
* **Fixpoint with a loop guard.** :class:`RewritePass` applies the rules until nothing matches,
  and raises :class:`RewriteLoopError` on ping-pong (A → B → A) or after ``max_iterations``.
* **explain(gm, rules)** says where each rule matched and, for every candidate anchor where it
  did not, the first difference between the pattern and the graph.

Patterns are functions, so they match ``call_function`` and ``call_method`` nodes (``torch.relu``,
``F.linear``, ``operator.add``, ``x.view(...)``) exactly by callable: ``torch.relu`` is not
``F.relu``, and module calls (``call_module``, e.g. an ``nn.Linear`` layer) are not matched by
function patterns. :func:`explain` points such near misses out.
"""

from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.fx
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import _get_qualified_name, map_arg
from torch.fx.passes.tools_common import legalize_graph
from torch.fx.passes.utils.fuser_utils import validate_partition
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from .errors import FxoptError, PassError
from .pass_base import Pass, PassResult

__all__ = [
    "RewriteRule", "rule", "RewritePass", "explain", "Explanation", "RuleReport",
    "Match", "MatchResult", "RuleError", "RewriteLoopError",
]

logger = logging.getLogger(__name__)


class RuleError(FxoptError):
    """A rewrite rule is malformed (pattern/replacement/check); the message names the rule."""


class RewriteLoopError(PassError):
    """The rewrite rules do not reach a fixpoint (ping-pong A → B → A, or endless growth)."""


@dataclass(frozen=True)
class MatchResult:
    """What ``check`` may return: ``MatchResult.success()`` or ``MatchResult.fail("reason")``."""

    matched: bool
    reason: str = ""

    @classmethod
    def success(cls) -> MatchResult:
        return cls(True)

    @classmethod
    def fail(cls, reason: str) -> MatchResult:
        return cls(False, reason)

    def __bool__(self) -> bool:
        return self.matched


@dataclass
class Match:
    """One occurrence of a pattern, as ``check`` sees it.

    ``match["w"]`` is what the pattern argument ``w`` bound to (a graph ``Node``, or a literal for a
    wildcard); ``match.value("w")`` the constant behind it (the tensor of a ``get_attr`` node, or the
    literal) or ``None``; ``match.gm`` the GraphModule, for its attributes and submodules.
    """

    gm: GraphModule
    bindings: dict[str, Any]
    nodes: list[Node]  # graph nodes the pattern covers, in graph order
    outputs: list[Node]  # the graph nodes the pattern returns

    @property
    def anchor(self) -> Node:
        return self.outputs[-1]

    def __getitem__(self, name: str) -> Any:
        if name not in self.bindings:
            raise RuleError(f"the pattern has no argument {name!r}; its arguments are {list(self.bindings)}")
        return self.bindings[name]

    def value(self, name: str) -> Any:
        bound = self[name]
        if not isinstance(bound, Node):
            return bound
        if bound.op == "get_attr":
            return _get_attr(self.gm, bound.target)
        return None

    def is_constant(self, name: str) -> bool:
        return self.value(name) is not None


class RewriteRule:
    """Base class of rewrite rules: define ``pattern``, ``replacement`` and optionally ``check``.

    ``name`` (default: the class name) labels the rule in stats, notes and :func:`explain`;
    ``wildcards`` names pattern arguments that may bind to Python literals.
    """

    name: str = ""
    wildcards: ClassVar[tuple[str, ...]] = ()

    def check(self, match: Match) -> bool | MatchResult:
        return True

    def __repr__(self) -> str:
        return f"{rule_name(self)}()"


class _FunctionRule(RewriteRule):
    def __init__(self, pattern: Callable, replacement: Callable, check: Callable | None,
                 name: str, wildcards: tuple[str, ...]) -> None:
        self.pattern, self.replacement, self._check = pattern, replacement, check
        self.name, self.wildcards = name, tuple(wildcards)  # type: ignore[misc]

    def check(self, match: Match) -> bool | MatchResult:
        return True if self._check is None else self._check(match)


def rule(pattern: Callable, replacement: Callable, *, check: Callable[[Match], Any] | None = None,
         name: str | None = None, wildcards: Iterable[str] = ()) -> RewriteRule:
    """Build a rule from two plain functions (and an optional ``check(match)``)."""
    if not callable(pattern) or not callable(replacement):
        raise RuleError("fxopt.rule(pattern, replacement) needs two functions")
    label = name or f"{pattern.__name__}->{replacement.__name__}"
    return _FunctionRule(pattern, replacement, check, label, tuple(wildcards))


def rule_name(r: RewriteRule) -> str:
    return r.name or type(r).__name__


# --------------------------------------------------------------------------- tracing the rule


@dataclass
class _Compiled:
    pattern: Graph
    replacement: GraphModule
    params: list[str]  # pattern argument names, in order


def _trace(fn: Callable, what: str, label: str) -> GraphModule:
    try:
        if hasattr(fn, "__self__") and hasattr(fn, "__func__"):  # bound method: trace with self bound
            func, owner = fn.__func__, fn.__self__

            class _Root(torch.nn.Module):
                @functools.wraps(func)  # the tracer reads the parameter names through __wrapped__
                def forward(self, *args):
                    return func(owner, *args)

            return torch.fx.symbolic_trace(_Root())
        return torch.fx.symbolic_trace(fn)
    except Exception as exc:
        raise RuleError(f"rule {label!r}: its {what} could not be traced by torch.fx ({type(exc).__name__}: "
                        f"{exc}); write it as straight-line tensor code without data-dependent control flow") from exc


def _compile(r: RewriteRule) -> _Compiled:
    cached = getattr(r, "_fxopt_compiled", None)
    if cached is not None:
        return cached
    label = rule_name(r)
    for fn in ("pattern", "replacement"):
        if not callable(getattr(r, fn, None)):
            raise RuleError(f"rule {label!r} has no {fn}(); define {fn}(self, ...) on the rule")
    pattern = _trace(r.pattern, "pattern", label).graph
    replacement = _trace(r.replacement, "replacement", label)
    params = [n.target for n in pattern.nodes if n.op == "placeholder"]
    unused = [n.target for n in pattern.nodes if n.op == "placeholder" and not n.users]
    if unused:
        raise RuleError(f"rule {label!r}: pattern arguments {unused} are not used; remove them")
    outputs = next(iter(reversed(pattern.nodes))).all_input_nodes
    if not outputs or any(n.op == "placeholder" for n in outputs):
        raise RuleError(f"rule {label!r}: the pattern must compute something and return the computed values")
    repl_params = [n.target for n in replacement.graph.nodes if n.op == "placeholder"]
    extra = [p for p in repl_params if p not in params]
    if extra:
        raise RuleError(f"rule {label!r}: replacement arguments {extra} are not pattern arguments {params}; "
                        "name the replacement's arguments like the pattern's")
    bad_wild = [w for w in r.wildcards if w not in params]
    if bad_wild:
        raise RuleError(f"rule {label!r}: wildcards {bad_wild} are not pattern arguments {params}")
    n_out = len(next(iter(reversed(replacement.graph.nodes))).args[0]) if isinstance(
        next(iter(reversed(replacement.graph.nodes))).args[0], (tuple, list)) else 1
    if n_out != len(outputs):
        raise RuleError(f"rule {label!r}: the pattern returns {len(outputs)} value(s) but the replacement {n_out}")
    try:
        SubgraphMatcher(pattern)
    except AssertionError as exc:
        raise RuleError(f"rule {label!r}: the pattern has computations that do not reach its result ({exc}); "
                        "remove them") from exc
    compiled = _Compiled(pattern, replacement, params)
    r._fxopt_compiled = compiled  # type: ignore[attr-defined]
    return compiled


# --------------------------------------------------------------------------- describing nodes

_OPERATORS = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
              operator.matmul: "@", operator.getitem: "[]", operator.floordiv: "//", operator.pow: "**"}


def _callable_name(op: str, target: Any) -> str:
    if op == "call_method":
        return f".{target}()"
    if op in ("call_module", "get_attr", "placeholder", "output"):
        return str(target)
    try:
        name = _get_qualified_name(target)
    except Exception:
        name = repr(target)
    name = name.replace("torch._C._nn.", "torch.nn.functional.")
    return f"{name} ({_OPERATORS[target]})" if target in _OPERATORS else name


def _describe(node: Node, gm: torch.nn.Module | None = None) -> str:
    if node.op == "placeholder":
        return f"{node.name} (graph input)"
    if node.op == "get_attr":
        return f"{node.name} (attribute {node.target})"
    if node.op == "call_module":
        mod = _get_attr(gm, node.target) if gm is not None else None
        kind = f"{type(mod).__module__}.{type(mod).__name__}" if mod is not None else "module"
        return f"{node.name} (module call {node.target}: {kind})"
    return f"{node.name} ({_callable_name(node.op, node.target)})"


def _wants(pn: Node) -> str:
    if pn.op == "placeholder":
        return f"the argument {pn.name}"
    return _callable_name(pn.op, pn.target)


def _get_attr(root: torch.nn.Module | None, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _fmt_call(n: Node) -> str:
    kw = f", keywords {list(n.kwargs)}" if n.kwargs else ""
    return f"{len(n.args)} positional argument(s){kw}"


# --------------------------------------------------------------------------- matching


class _DiagnosingMatcher(SubgraphMatcher):
    """torch.fx's SubgraphMatcher that also remembers the first (deepest) difference it met."""

    def __init__(self, pattern: Graph, gm: torch.nn.Module) -> None:
        super().__init__(pattern, remove_overlapping_matches=False)
        self.gm = gm
        self.failure: str | None = None
        self.progress = 0
        self._where: list[Node] = []

    def _fail(self, reason: str, match: InternalMatch) -> None:
        if self.failure is None:
            self.failure = reason
            self.progress = sum(1 for p in match.nodes_map if p.op not in ("placeholder", "output"))

    def _match_literals(self, pn: Any, gn: Any, match: InternalMatch) -> bool:
        ok = super()._match_literals(pn, gn, match)
        if not ok:
            at = f" (argument of {self._where[-1].name})" if self._where else ""
            if isinstance(pn, Node) and pn.op == "placeholder":
                self._fail(f"the argument {pn.name} is used twice in the pattern, but the graph has "
                           f"{_show(match.nodes_map[pn])} and {_show(gn)} there", match)
            elif isinstance(pn, Node):
                self._fail(f"the pattern wants {_wants(pn)} but the graph has the literal {gn!r}{at}", match)
            elif isinstance(gn, Node):
                self._fail(f"the pattern wants the literal {pn!r} but the graph has {_describe(gn, self.gm)}{at}",
                           match)
            else:
                self._fail(f"literal {gn!r} ({type(gn).__name__}) ≠ {pn!r} ({type(pn).__name__}) the pattern "
                           f"wants{at}", match)
        return ok

    def _match_nodes(self, pn: Node, gn: Node, match: InternalMatch, *args: Any, **kwargs: Any) -> bool:
        bound = match.nodes_map.get(pn)
        self._where.append(gn)
        try:
            ok = super()._match_nodes(pn, gn, match, *args, **kwargs)
        finally:
            self._where.pop()
        if not ok:
            if bound is not None and pn.op == "placeholder":
                why = (f"the argument {pn.name} is used twice in the pattern, but the graph has "
                       f"{_show(bound)} and {_show(gn)} there")
            elif bound is not None or gn in match.nodes_map.values():
                why = f"{gn.name} would have to match two different parts of the pattern"
            elif not self._nodes_are_equal(pn, gn):
                why = f"the pattern wants {_wants(pn)} but the graph has {_describe(gn, self.gm)}"
                if gn.op == "call_module":
                    why += "; module calls are not matched by function patterns"
                elif getattr(gn.target, "__name__", 0) == getattr(pn.target, "__name__", 1):
                    why += "; same name, different function: the pattern must call the function the model calls"
            else:
                why = (f"{gn.name} is called with {_fmt_call(gn)}, the pattern with {_fmt_call(pn)}; write the "
                       "pattern's call the way the model writes it")
            self._fail(why, match)
        return ok


def _show(value: Any) -> str:
    return value.name if isinstance(value, Node) else f"the literal {value!r}"


def _only_nodes(value: Any) -> bool:
    if isinstance(value, Node):
        return True
    if isinstance(value, (list, tuple)):
        return all(_only_nodes(v) for v in value)
    return False


@dataclass
class _Candidate:
    anchor: Node
    match: Match | None = None
    reason: str = ""  # empty: accepted
    kind: str = ""  # "literal", "check", "overlap", "structure"


def _to_match(gm: GraphModule, compiled: _Compiled, im: InternalMatch) -> Match:
    bindings = {pn.target: gn for pn, gn in im.nodes_map.items() if pn.op == "placeholder"}
    covered = {gn for pn, gn in im.nodes_map.items() if pn.op not in ("placeholder", "output")}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return Match(gm, bindings, sorted(covered, key=order.__getitem__), list(im.returning_nodes))


def _check(r: RewriteRule, m: Match) -> str:
    for name in compiled_params(r):
        if name not in r.wildcards and not _only_nodes(m.bindings[name]):
            return (f"argument {name} would bind to the literal {m.bindings[name]!r}; literals match exactly "
                    f"unless {name!r} is listed in the rule's wildcards")
    try:
        verdict = r.check(m)
    except FxoptError:
        raise
    except Exception as exc:
        raise RuleError(f"check() of rule {rule_name(r)!r} raised {type(exc).__name__}: {exc} "
                        f"(at {m.anchor.name})") from exc
    if isinstance(verdict, MatchResult):
        return "" if verdict.matched else (verdict.reason or "check() failed")
    if isinstance(verdict, bool):
        return "" if verdict else "check() returned False"
    raise RuleError(f"check() of rule {rule_name(r)!r} returned {type(verdict).__name__}; return True/False "
                    "or fxopt.rewrite.MatchResult.fail('reason')")


def compiled_params(r: RewriteRule) -> list[str]:
    return _compile(r).params


def _scan(gm: GraphModule, r: RewriteRule) -> list[_Candidate]:
    """Every match of ``r`` in ``gm``, accepted (reason "") or rejected with the reason."""
    compiled = _compile(r)
    found: list[_Candidate] = []
    taken: dict[Node, Node] = {}  # graph node -> anchor of the accepted match that covers it
    for im in _DiagnosingMatcher(compiled.pattern, gm).match(gm.graph):
        m = _to_match(gm, compiled, im)
        cand = _Candidate(m.anchor, m)
        cand.reason = _check(r, m)
        cand.kind = "literal" if cand.reason.startswith("argument ") else "check"
        if not cand.reason:
            clash = next((taken[n] for n in m.nodes if n in taken), None)
            if clash is not None:
                cand.reason, cand.kind = f"overlaps the match at {clash.name}, taken first", "overlap"
            else:
                taken.update({n: m.anchor for n in m.nodes})
        found.append(cand)
    return found


# --------------------------------------------------------------------------- replacing


def _replace(gm: GraphModule, compiled: _Compiled, m: Match, renamed: dict[Node, Node]) -> None:
    graph = gm.graph
    fix = lambda v: map_arg(v, lambda n: renamed.get(n, n))  # noqa: E731 - inputs replaced earlier
    val_map: dict[Node, Any] = {}
    last = m.nodes[-1]
    with graph.inserting_before(last):
        for rn in compiled.replacement.graph.nodes:
            if rn.op == "placeholder":
                val_map[rn] = fix(m.bindings[rn.target])
            elif rn.op == "get_attr":  # a constant the replacement creates: copy it onto gm
                attr = _fresh_name(gm, "_rewrite_const")
                setattr(gm, attr, _get_attr(compiled.replacement, rn.target))
                val_map[rn] = graph.get_attr(attr)
        new_out = graph.graph_copy(compiled.replacement.graph, val_map)
    new_outs = list(new_out) if isinstance(new_out, (tuple, list)) else [new_out]
    for old, new in zip(m.outputs, new_outs):
        old.replace_all_uses_with(new)
        renamed[old] = new
    inputs: list[Node] = []
    map_arg(fix(list(m.bindings.values())), inputs.append)
    for node in reversed(m.nodes):
        graph.erase_node(node)
    for node in inputs:  # inputs only the pattern used (e.g. a weight the replacement drops)
        if node.graph is graph and not node.users and node.op in ("get_attr", "call_function", "call_method") \
                and not node.is_impure():
            graph.erase_node(node)
    if len(m.outputs) > 1:  # an outside user of a returned value may sit before the insertion point
        legalize_graph(gm)


def _fresh_name(gm: torch.nn.Module, base: str) -> str:
    i = 0
    while hasattr(gm, f"{base}{i}"):
        i += 1
    return f"{base}{i}"


def _fingerprint(graph: Graph) -> tuple:
    index: dict[Node, int] = {}
    items = []
    for i, n in enumerate(graph.nodes):
        index[n] = i
        args = map_arg((n.args, n.kwargs), lambda a: f"%{index[a]}")
        items.append((n.op, _callable_name(n.op, n.target), repr(args)))
    return tuple(items)


@dataclass(frozen=True)
class RewritePass(Pass):
    """Applies ``rules`` until none matches (a fixpoint), at most ``max_iterations`` rounds.

    Stats: replacements per rule name. Notes: the matches a rule's ``check`` (or a literal that
    needs a wildcard) rejected, with the reason.
    """

    name: ClassVar[str] = "rewrite"
    rules: tuple = ()
    max_iterations: int = 100

    def __post_init__(self) -> None:
        rules = (self.rules,) if isinstance(self.rules, RewriteRule) else tuple(self.rules)
        for r in rules:
            if not isinstance(r, RewriteRule):
                raise RuleError(f"RewritePass takes fxopt.RewriteRule objects (or fxopt.rule(...)), got {r!r}")
        names = [rule_name(r) for r in rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RuleError(f"several rules are named {dup}; give them distinct names (class attribute name=...)")
        if not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise RuleError(f"max_iterations must be a positive int, got {self.max_iterations!r}")
        object.__setattr__(self, "rules", rules)

    def call(self, gm: GraphModule) -> PassResult:
        counts = {rule_name(r): 0 for r in self.rules}
        notes: list[str] = []
        seen = {_fingerprint(gm.graph): 0}
        history: list[str] = []
        for _ in range(self.max_iterations):
            fired = False
            for r in self.rules:
                compiled, renamed, n = _compile(r), {}, 0
                for cand in _scan(gm, r):
                    if cand.reason:
                        if cand.kind in ("check", "literal"):
                            note = f"{rule_name(r)} rejected at {cand.anchor.name}: {cand.reason}"
                            if note not in notes:
                                notes.append(note)
                        continue
                    _replace(gm, compiled, cand.match, renamed)
                    n += 1
                if not n:
                    continue
                fired = True
                counts[rule_name(r)] += n
                history.append(rule_name(r))
                fp = _fingerprint(gm.graph)
                if fp in seen:
                    loop = " → ".join(history[seen[fp]:])
                    raise RewriteLoopError(
                        f"rewrite rules loop: {loop} gives back a graph seen before (ping-pong). Drop one direction "
                        "of the rewrite or add a check() that stops it.", pass_name=self.name)
                seen[fp] = len(history)
            if not fired:
                break
        else:
            raise RewriteLoopError(
                f"rewrite rules did not reach a fixpoint after max_iterations={self.max_iterations} rounds "
                f"(last rules to fire: {history[-4:]}); a rule probably re-creates its own pattern",
                pass_name=self.name)
        modified = any(counts.values())
        if modified:
            gm.graph.lint()
            gm.recompile()
        logger.debug("rewrite: %s", counts)
        return PassResult(gm, modified, counts, notes)
