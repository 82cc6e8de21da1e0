"""``explain(gm, rules)``: where each rewrite rule matched, and why it did not elsewhere.

For every node that could end a match (same operation as the pattern's last one), explain replays
torch.fx's ``SubgraphMatcher`` on it, remembering the first difference met walking the pattern
backwards: another operation ("where the pattern wants torch.nn.functional.linear, the graph has
conv2d"), another literal ("literal 3.0 ≠ 2.0"), a module call, arguments written differently.
Matches that were found but rejected (check failed, literal needing a wildcard, overlap) say why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import _get_qualified_name
from torch.fx.passes.utils.fuser_utils import validate_partition
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from .errors import FxoptError
from .graph_utils import get_attr_path
from .rewrite import RewritePass, RewriteRule, RuleError, compile_rule, rule_name, scan

__all__ = ["explain", "Explanation", "RuleReport"]


@dataclass
class RuleReport:
    """What :func:`explain` found for one rule."""

    rule: str
    matched: dict[str, list[str]] = field(default_factory=dict)  # anchor name -> covered node names
    misses: list[tuple[str, str]] = field(default_factory=list)  # (candidate anchor name, why not)
    note: str = ""  # when no node could even start a match

    def __str__(self) -> str:
        n = len(self.matched)
        lines = [f"rule {self.rule}: {n} match{'es' if n != 1 else ''}"]
        lines += [f"  matched at {a} (nodes: {', '.join(ns)})" for a, ns in self.matched.items()]
        lines += [f"  not at {a}: {why}" for a, why in self.misses[:_SHOWN]]
        if len(self.misses) > _SHOWN:
            lines.append(f"  ... and {len(self.misses) - _SHOWN} more candidates")
        if self.note:
            lines.append(f"  {self.note}")
        return "\n".join(lines)


_SHOWN = 20


@dataclass
class Explanation:
    """``str(explanation)`` says, rule by rule, where it matched and why not elsewhere."""

    reports: list[RuleReport]

    def __getitem__(self, rule: str) -> RuleReport:
        for r in self.reports:
            if r.rule == rule:
                return r
        raise KeyError(f"no rule named {rule!r}; rules: {[r.rule for r in self.reports]}")

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.reports)


def explain(gm: torch.nn.Module, rules: RewriteRule | RewritePass | Iterable[RewriteRule]) -> Explanation:
    """Why each rule does or does not match in ``gm`` (a GraphModule, or a model to trace).

    Candidates are the nodes with the operation of the pattern's (first) returned value; for each,
    the report gives the first difference with the pattern and how many pattern operations were found.
    """
    if isinstance(rules, RewritePass):
        rules = rules.rules
    elif isinstance(rules, RewriteRule):
        rules = [rules]
    rules = list(rules)
    for r in rules:
        if not isinstance(r, RewriteRule):
            raise RuleError(f"explain takes fxopt.RewriteRule objects, got {r!r}")
    if not isinstance(gm, GraphModule):
        if not isinstance(gm, torch.nn.Module):
            raise FxoptError(f"explain expects a GraphModule or an nn.Module, got {type(gm).__name__}")
        from .tracing import trace

        gm = trace(gm)
    return Explanation([_explain_rule(gm, r) for r in rules])


def _explain_rule(gm: GraphModule, r: RewriteRule) -> RuleReport:
    compiled = compile_rule(r)
    report = RuleReport(rule_name(r))
    covered: set[Node] = set()
    for f in scan(gm, r):
        covered.update(f.match.nodes)
        anchor = f.match.anchor.name
        if not f.reason:
            report.matched[anchor] = [n.name for n in f.match.nodes]
        elif f.kind == "overlap":
            report.misses.append((anchor, f"the pattern matched but {f.reason}; it is rewritten in a later round "
                                          "if it still matches"))
        else:
            report.misses.append((anchor, f"the pattern matched but was rejected: {f.reason}"))
    matcher = _DiagnosingMatcher(compiled.pattern, gm)
    if not matcher.pattern_anchors:
        report.note = "the pattern's result is also used inside the pattern; it cannot anchor a match"
        return report
    anchor = matcher.pattern_anchors[0]
    total = sum(1 for n in compiled.pattern.nodes if n.op not in ("placeholder", "output"))
    candidates = [n for n in gm.graph.nodes if matcher._nodes_are_equal(anchor, n)]
    partial: list[tuple[int, int, str, str]] = []  # (-progress, position, node, why): closest misses first
    for pos, gn in enumerate(candidates):
        if gn in covered:
            continue
        matcher.failure, matcher.progress = None, 0
        im = InternalMatch([anchor])
        if matcher._match_nodes(anchor, gn, im):
            partial.append((-total, pos, gn.name, _why_dropped(matcher, im)))
        else:
            why = f"anchor matched, but {matcher.failure} [{matcher.progress} of {total} pattern operations found]"
            partial.append((-matcher.progress, pos, gn.name, why))
    report.misses += [(name, why) for _, _, name, why in sorted(partial)]
    if not candidates:
        report.note = _no_anchor(gm, anchor)
    return report


def _why_dropped(matcher: _DiagnosingMatcher, im: InternalMatch) -> str:
    inner = {pn: gn for pn, gn in im.nodes_map.items() if pn.op not in ("placeholder", "output")}
    nodes = set(inner.values())
    for pn, gn in inner.items():
        if pn in matcher.pattern_returning_nodes:
            continue
        outside = [u.name for u in gn.users if u not in nodes]
        if outside:
            return (f"the whole pattern matched, but its intermediate {gn.name} is also used by {outside} outside "
                    "the match, so it cannot be replaced")
    if not validate_partition(list(nodes)):
        return "the whole pattern matched, but replacing it would create a cycle in the graph"
    return "this output matched, but the pattern's other outputs did not match around it"


def _short_name(op: str, target: Any, gm: torch.nn.Module) -> str:
    if op == "call_module":
        target = type(get_attr_path(gm, target, None))
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.lower().strip("_")


def _no_anchor(gm: GraphModule, anchor: Node) -> str:
    """No node has the pattern's last operation: point at look-alikes (module calls, same-named functions)."""
    want = _short_name(anchor.op, anchor.target, gm)
    groups: dict[tuple[str, str], list[str]] = {}  # (what, the rest of the sentence) -> node names
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module") and _short_name(n.op, n.target, gm) == want:
            if n.op == "call_module":
                mod = type(get_attr_path(gm, n.target, None))
                key = (f"module calls of {mod.__module__}.{mod.__name__}", "are not matched by function patterns")
            else:
                key = (_callable_name(n.op, n.target), "is a different function with the same name; the pattern "
                       "must call exactly what the model calls")
            groups.setdefault(key, []).append(n.name)
    hints = [f"{what} ({_names(names)}) {rest}" for (what, rest), names in groups.items()]
    return "; ".join([f"no node calls {_wants(anchor)}, the pattern's last operation"] + hints)


def _names(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


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
        mod = get_attr_path(gm, node.target, None) if gm is not None else None
        kind = f"{type(mod).__module__}.{type(mod).__name__}" if mod is not None else "module"
        return f"{node.name} (module call {node.target}: {kind})"
    return f"{node.name} ({_callable_name(node.op, node.target)})"


def _wants(pn: Node) -> str:
    if pn.op == "placeholder":
        return f"the argument {pn.name}"
    return _callable_name(pn.op, pn.target)


def _fmt_call(n: Node) -> str:
    kw = f", keywords {list(n.kwargs)}" if n.kwargs else ""
    return f"{len(n.args)} positional argument(s){kw}"


# --------------------------------------------------------------------------- matching with a memory


class _DiagnosingMatcher(SubgraphMatcher):
    """torch.fx's SubgraphMatcher that also remembers the first (deepest) difference it met.

    It wraps the matcher's per-node and per-literal comparisons (``_match_nodes``,
    ``_match_literals``), which torch marks as not backward compatible: only explain uses this
    class; rewriting itself goes through the public ``SubgraphMatcher.match``.
    """

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
                self._fail(f"where the pattern wants {_wants(pn)}, the graph has the literal {gn!r}{at}", match)
            elif isinstance(gn, Node):
                self._fail(f"where the pattern wants the literal {pn!r}, the graph has {_describe(gn, self.gm)}{at}",
                           match)
            else:
                self._fail(f"literal {gn!r} ({type(gn).__name__}) in the graph ≠ {pn!r} ({type(pn).__name__}) in "
                           f"the pattern{at}", match)
        return ok

    def _match_nodes(self, pn: Node, gn: Node, match: InternalMatch, *args: Any, **kwargs: Any) -> bool:
        bound = match.nodes_map.get(pn)
        taken = gn in match.nodes_map.values()  # (before the matcher's optimistic pn -> gn entry)
        self._where.append(gn)
        try:
            ok = super()._match_nodes(pn, gn, match, *args, **kwargs)
        finally:
            self._where.pop()
        if not ok:
            if bound is not None and pn.op == "placeholder":
                why = (f"the argument {pn.name} is used twice in the pattern, but the graph has "
                       f"{_show(bound)} and {_show(gn)} there")
            elif bound is not None or taken:
                why = f"{gn.name} would have to match two different parts of the pattern"
            elif not self._nodes_are_equal(pn, gn):
                why = f"where the pattern wants {_wants(pn)}, the graph has {_describe(gn, self.gm)}"
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
