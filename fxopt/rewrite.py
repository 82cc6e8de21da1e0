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
  rejected matches are listed in the pass's notes and by :func:`fxopt.rewrite_explain.explain`.
* **Fixpoint with a loop guard.** :class:`RewritePass` applies the rules until nothing matches,
  and raises :class:`RewriteLoopError` on ping-pong (A → B → A) or after ``max_iterations``.
* **explain(gm, rules)** says where each rule matched and, for every candidate anchor where it
  did not, the first difference between the pattern and the graph.

Patterns are functions, so they match ``call_function`` and ``call_method`` nodes (``torch.relu``,
``F.linear``, ``operator.add``, ``x.view(...)``) exactly by callable: ``torch.relu`` is not
``F.relu``, and module calls (``call_module``, e.g. an ``nn.Linear`` layer) are not matched by
function patterns. :func:`fxopt.rewrite_explain.explain` points such near misses out.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.fx
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg
from torch.fx.passes.tools_common import legalize_graph
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from .errors import FxoptError, PassError
from .graph_utils import get_attr_path, unique_name
from .pass_base import Pass, PassResult

__all__ = [
    "RewriteRule", "rule", "RewritePass", "compile_rule", "Match", "MatchResult", "Found", "scan",
    "RuleError", "RewriteLoopError",
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
            return get_attr_path(self.gm, bound.target, None)
        return None

    def is_constant(self, name: str) -> bool:
        return self.value(name) is not None


class RewriteRule:
    """Base class of rewrite rules: define ``pattern``, ``replacement`` and optionally ``check``.

    ``name`` (default: the class name) labels the rule in stats, notes and :func:`fxopt.rewrite_explain.explain`;
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


# traced pattern/replacement per rule object, kept only while the rule lives (nothing is stored on the rule)
_COMPILED: dict[int, tuple[weakref.ref, _Compiled]] = {}


def compile_rule(r: RewriteRule) -> _Compiled:
    """The traced pattern and replacement of ``r`` (traced once per rule object)."""
    cached = _COMPILED.get(id(r))
    if cached is not None and cached[0]() is r:
        return cached[1]
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
    returned = next(iter(reversed(replacement.graph.nodes))).args[0]
    n_out = len(returned) if isinstance(returned, (tuple, list)) else 1
    if n_out != len(outputs):
        raise RuleError(f"rule {label!r}: the pattern returns {len(outputs)} value(s) but the replacement {n_out}")
    try:
        SubgraphMatcher(pattern)
    except AssertionError as exc:
        raise RuleError(f"rule {label!r}: the pattern has computations that do not reach its result ({exc}); "
                        "remove them") from exc
    compiled = _Compiled(pattern, replacement, params)
    key = id(r)
    _COMPILED[key] = (weakref.ref(r, lambda _ref: _COMPILED.pop(key, None)), compiled)
    return compiled


# --------------------------------------------------------------------------- matching


def _only_nodes(value: Any) -> bool:
    if isinstance(value, Node):
        return True
    if isinstance(value, (list, tuple)):
        return all(_only_nodes(v) for v in value)
    return False


@dataclass
class Found:
    """One structural match of a rule and its fate: accepted (``reason == ""``) or rejected."""

    match: Match
    reason: str = ""
    kind: str = ""  # why rejected: "literal" (needs a wildcard), "check", or "overlap"


def _to_match(gm: GraphModule, im: InternalMatch, order: dict[Node, int]) -> Match:
    bindings = {pn.target: gn for pn, gn in im.nodes_map.items() if pn.op == "placeholder"}
    covered = {gn for pn, gn in im.nodes_map.items() if pn.op not in ("placeholder", "output")}
    return Match(gm, bindings, sorted(covered, key=order.__getitem__), list(im.returning_nodes))


def _verdict(r: RewriteRule, m: Match) -> tuple[str, str]:
    """``("", "")`` if the match is acceptable, else ``(kind, reason)``."""
    for name in compile_rule(r).params:
        if name not in r.wildcards and not _only_nodes(m.bindings[name]):
            return "literal", (f"argument {name} would bind to the literal {m.bindings[name]!r}; literals match "
                               f"exactly unless {name!r} is listed in the rule's wildcards")
    try:
        verdict = r.check(m)
    except FxoptError:
        raise
    except Exception as exc:
        raise RuleError(f"check() of rule {rule_name(r)!r} raised {type(exc).__name__}: {exc} "
                        f"(at {m.anchor.name})") from exc
    if isinstance(verdict, MatchResult):
        return ("", "") if verdict.matched else ("check", verdict.reason or "check() failed")
    if isinstance(verdict, bool):
        return ("", "") if verdict else ("check", "check() returned False")
    raise RuleError(f"check() of rule {rule_name(r)!r} returned {type(verdict).__name__}; return True/False "
                    "or fxopt.rewrite.MatchResult.fail('reason')")


def scan(gm: GraphModule, r: RewriteRule) -> list[Found]:
    """Every structural match of ``r`` in ``gm`` (torch.fx's SubgraphMatcher), judged in graph order.

    A match is rejected when a non-wildcard argument binds a literal, when ``check`` fails, or when it
    overlaps a match accepted before it (that one is rewritten first; the next round looks again).
    """
    compiled = compile_rule(r)
    found: list[Found] = []
    taken: dict[Node, Node] = {}  # graph node -> anchor of the accepted match that covers it
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for im in SubgraphMatcher(compiled.pattern, remove_overlapping_matches=False).match(gm.graph):
        m = _to_match(gm, im, order)
        kind, reason = _verdict(r, m)
        if not reason:
            clash = next((taken[n] for n in m.nodes if n in taken), None)
            if clash is not None:
                kind, reason = "overlap", f"overlaps the match at {clash.name}, taken first"
            else:
                taken.update({n: m.anchor for n in m.nodes})
        found.append(Found(m, reason, kind))
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
                attr = unique_name("_rewrite_const", lambda n: hasattr(gm, n), start=0, sep="")
                value = get_attr_path(compiled.replacement, rn.target, None)
                if isinstance(value, torch.Tensor):
                    gm.register_buffer(attr, value.detach().clone())
                else:
                    setattr(gm, attr, value)
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
    for node in dict.fromkeys(inputs):  # inputs only the pattern used (e.g. a weight the replacement drops)
        if node.graph is graph and not node.users and node.op in ("get_attr", "call_function", "call_method") \
                and not node.is_impure():
            graph.erase_node(node)
    if len(m.outputs) > 1:  # an outside user of a returned value may sit before the insertion point
        legalize_graph(gm)


def _fingerprint(graph: Graph) -> tuple:
    """The graph's structure without node names: equal for graphs that compute the same way."""
    index: dict[Node, int] = {}
    items = []
    for i, n in enumerate(graph.nodes):
        index[n] = i
        target = n.target if isinstance(n.target, str) else (
            f"{getattr(n.target, '__module__', '')}.{getattr(n.target, '__qualname__', repr(n.target))}")
        items.append((n.op, target, repr(map_arg((n.args, n.kwargs), lambda a: f"%{index[a]}"))))
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
        state = _Progress({rule_name(r): 0 for r in self.rules}, seen={_fingerprint(gm.graph): 0})
        rounds = 0
        while self._round(gm, state):
            rounds += 1
            if rounds > self.max_iterations:
                raise RewriteLoopError(
                    f"rewrite rules did not reach a fixpoint after max_iterations={self.max_iterations} rounds "
                    f"(last rules to fire: {state.history[-4:]}); a rule probably re-creates its own pattern",
                    pass_name=self.name)
        modified = any(state.counts.values())
        if modified:
            gm.graph.lint()
            gm.recompile()
        logger.debug("rewrite: %s in %d round(s)", state.counts, rounds)
        return PassResult(gm, modified, state.counts, state.notes)

    def _round(self, gm: GraphModule, state: _Progress) -> bool:
        """Each rule once, in order, on every match it has; True if anything was rewritten."""
        fired = False
        for r in self.rules:
            compiled, renamed, n = compile_rule(r), {}, 0
            for f in scan(gm, r):
                if not f.reason:
                    _replace(gm, compiled, f.match, renamed)
                    n += 1
                elif f.kind != "overlap":  # overlaps are looked at again in the next round
                    note = f"{rule_name(r)} rejected at {f.match.anchor.name}: {f.reason}"
                    if note not in state.notes:
                        state.notes.append(note)
            if not n:
                continue
            fired = True
            state.counts[rule_name(r)] += n
            state.history.append(rule_name(r))
            fp = _fingerprint(gm.graph)
            if fp in state.seen:
                loop = " → ".join(state.history[state.seen[fp]:])
                raise RewriteLoopError(
                    f"rewrite rules loop: {loop} gives back a graph seen before (ping-pong). Drop one direction "
                    "of the rewrite or add a check() that stops it.", pass_name=self.name)
            state.seen[fp] = len(state.history)
        return fired


@dataclass
class _Progress:
    counts: dict[str, int]  # replacements per rule
    notes: list[str] = field(default_factory=list)
    seen: dict[tuple, int] = field(default_factory=dict)  # graph fingerprint -> len(history) when seen
    history: list[str] = field(default_factory=list)  # the rule behind each rewrite step

