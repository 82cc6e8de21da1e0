"""Rewrite rules: matching (literals exact, wildcards), checks with reasons, fixpoint, loop guard, explain.

Follows torch.fx's own test pattern: pattern, replacement and comparison functions; trace; rewrite;
lint; compare outputs; count nodes.
"""

from __future__ import annotations

import contextlib
import io
import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.fx
import torch.nn.functional as F

import fxopt
from fxopt import rewrite
from fxopt.rewrite import MatchResult, RewriteLoopError, RewritePass, RewriteRule, RuleError
from fxopt.rewrite_explain import explain

README_SNIPPET = '''\
import torch, fxopt
import torch.nn.functional as F

class SiLU(fxopt.RewriteRule):                 # x * sigmoid(x) -> silu(x): one kernel instead of two
    def pattern(self, x):
        return x * torch.sigmoid(x)
    def replacement(self, x):
        return F.silu(x)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
    def forward(self, x):
        h = self.fc(x)
        return h * torch.sigmoid(h) + torch.sigmoid(x) * x   # 2nd product written the other way round

model, x = Net().eval(), torch.randn(4, 16)
fast = fxopt.compile(model, passes=[fxopt.RewritePass([SiLU()])], example_inputs=(x,), check=True)
print(fxopt.records(fast)[0].stats)            # {'SiLU': 1}
print(fxopt.explain(fxopt.trace(model), [SiLU()]))
# rule SiLU: 1 match
#   matched at mul (nodes: sigmoid, mul)
#   not at mul_1: anchor matched, but where the pattern wants torch.sigmoid, the graph has x (graph input) [1 of 2 pattern operations found]
'''


def test_readme_snippet_runs_as_documented():
    assert len(README_SNIPPET.splitlines()) <= 25
    out = io.StringIO()
    ns: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(README_SNIPPET, "README.md", "exec"), ns)
    text = out.getvalue()
    assert "{'SiLU': 1}" in text
    assert "rule SiLU: 1 match" in text and "matched at mul (nodes: sigmoid, mul)" in text
    assert "not at mul_1: anchor matched, but where the pattern wants torch.sigmoid, the graph has x" in text
    fast, model, x = ns["fast"], ns["model"], ns["x"]
    torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=0)
    assert _count(fast, F.silu) == 1 and _count(fast, torch.sigmoid) == 1


# --------------------------------------------------------------------------- helpers


def _count(gm: torch.fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target or n.target == target)


def _run(module: torch.nn.Module, *rules, **kwargs):
    gm = torch.fx.symbolic_trace(module)
    result = RewritePass(list(rules), **kwargs)(gm)
    gm.graph.lint()
    return gm, result


class LinearReLU(RewriteRule):
    def pattern(self, x, w, b):
        return torch.relu(F.linear(x, w, b))

    def replacement(self, x, w, b):
        return torch.clamp(F.linear(x, w, b), min=0.0)


class TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8))
        self.w2, self.b2 = torch.nn.Parameter(torch.randn(3, 8)), torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.relu(F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2))


# --------------------------------------------------------------------------- rewriting


def test_class_rule_rewrites_every_match_and_keeps_numerics():
    model = TwoLinear()
    x = torch.randn(5, 4)
    gm, result = _run(model, LinearReLU())
    assert result.modified and result.stats == {"LinearReLU": 2} and result.notes == []
    assert _count(gm, torch.relu) == 0 and _count(gm, torch.clamp) == 2 and _count(gm, F.linear) == 2
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)


def test_function_rule_torch_fx_style():
    def pattern(x):
        return x * 2.0

    def replacement(x):
        return x + x

    def comparison(x):
        return torch.sin(x + x) + (x + x)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.sin(x * 2.0) + x * 2.0

    gm, result = _run(M(), fxopt_rule := rewrite.rule(pattern, replacement))
    assert fxopt_rule.name == "pattern->replacement"
    assert result.stats == {"pattern->replacement": 2}
    x = torch.randn(3, 3)
    torch.testing.assert_close(gm(x), comparison(x))
    ref = torch.fx.symbolic_trace(comparison)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [
        n.target for n in ref.graph.nodes if n.op == "call_function"
    ]


def test_nothing_matches_means_modified_false_and_graph_untouched():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x) + 1

    gm = torch.fx.symbolic_trace(M())
    code = gm.code
    result = RewritePass([LinearReLU()])(gm)
    assert result.modified is False and result.stats == {"LinearReLU": 0} and result.notes == []
    assert gm.code == code


def test_literal_mismatch_does_not_match_and_explain_says_why():
    def pattern(x):
        return x * 2.0

    def replacement(x):
        return x + x

    class M(torch.nn.Module):
        def forward(self, x):
            return x * 3.0 + x * 2  # neither 3.0 nor the int 2 is the float 2.0

    r = rewrite.rule(pattern, replacement, name="double")
    gm, result = _run(M(), r)
    assert result.modified is False and _count(gm, operator.mul) == 2
    text = str(explain(gm, [r]))
    assert "rule double: 0 matches" in text
    assert "literal 3.0 (float) in the graph ≠ 2.0 (float) in the pattern (argument of mul)" in text
    assert "literal 2 (int) in the graph ≠ 2.0 (float) in the pattern (argument of mul_1)" in text


class LeakyReLU(RewriteRule):
    wildcards = ("alpha",)  # alpha may bind to any literal slope

    def pattern(self, x, alpha):
        return torch.where(x > 0, x, x * alpha)

    def replacement(self, x, alpha):
        return F.leaky_relu(x, alpha)


class Leaky(torch.nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x, x * 0.1) + torch.where(x > 0, x, x * 0.3)


def test_wildcard_binds_literals_and_replacement_receives_them():
    model = Leaky()
    gm, result = _run(model, LeakyReLU())
    assert result.stats == {"LeakyReLU": 2}
    assert _count(gm, torch.where) == 0 and _count(gm, F.leaky_relu) == 2
    slopes = sorted(n.kwargs["negative_slope"] for n in gm.graph.nodes if n.target is F.leaky_relu)
    assert slopes == [0.1, 0.3]
    x = torch.randn(64)
    torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=0)


def test_without_wildcard_an_argument_never_binds_a_literal():
    class Strict(LeakyReLU):
        wildcards = ()

    gm, result = _run(Leaky(), Strict())
    assert result.modified is False and _count(gm, torch.where) == 2
    assert len(result.notes) == 2
    assert "Strict rejected at where: argument alpha would bind to the literal 0.1" in result.notes[0]
    assert "wildcards" in result.notes[0]
    assert "argument alpha would bind to the literal 0.3" in str(explain(gm, [Strict()]))


class ConstLinearReLU(LinearReLU):
    name = "const-linear-relu"

    def check(self, match):
        if not match.is_constant("w"):
            return MatchResult.fail(f"weight {match['w'].name} must be a constant (a parameter or buffer)")
        assert isinstance(match.value("w"), torch.Tensor) and match.gm is not None
        return True


class WeightFromInput(torch.nn.Module):
    def forward(self, x, w, b):
        return torch.relu(F.linear(x, w, b))


def test_check_rejection_reason_in_notes_and_explain():
    gm, result = _run(WeightFromInput(), ConstLinearReLU())
    assert result.modified is False
    assert result.notes == ["const-linear-relu rejected at relu: weight w must be a constant (a parameter or buffer)"]
    text = str(explain(gm, [ConstLinearReLU()]))
    assert "not at relu: the pattern matched but was rejected: weight w must be a constant" in text
    # The same rule accepts parameters.
    gm2, result2 = _run(TwoLinear(), ConstLinearReLU())
    assert result2.stats == {"const-linear-relu": 2} and result2.notes == []


def test_function_rule_with_check_returning_bool():
    r = rewrite.rule(lambda x: torch.relu(torch.relu(x)), lambda x: torch.relu(x), name="never",
                     check=lambda m: False)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(torch.relu(x))

    _, result = _run(M(), r)
    assert result.modified is False and result.notes == ["never rejected at relu_1: check() returned False"]


def test_overlapping_matches_are_rewritten_to_a_fixpoint():
    r = rewrite.rule(lambda x: torch.relu(torch.relu(x)), lambda x: torch.relu(x), name="relu-relu")

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(torch.relu(torch.relu(torch.relu(x - 1))))

    model = M()
    text = str(explain(torch.fx.symbolic_trace(model), [r]))
    assert "rule relu-relu: 2 matches" in text
    assert "not at relu_2: the pattern matched but overlaps the match at relu_1, taken first" in text
    gm, result = _run(model, r)
    assert result.stats == {"relu-relu": 3} and _count(gm, torch.relu) == 1
    x = torch.randn(10)
    torch.testing.assert_close(gm(x), model(x))


def test_intermediate_used_outside_is_not_replaced_and_explained():
    class M(torch.nn.Module):
        def forward(self, x):
            s = torch.sigmoid(x)
            return x * s + s

    r = rewrite.rule(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), name="silu")
    gm, result = _run(M(), r)
    assert result.modified is False
    assert "its intermediate sigmoid is also used by ['add'] outside the match" in str(explain(gm, [r]))


# --------------------------------------------------------------------------- explain


def test_explain_best_partial_match_names_the_wrong_producer():
    class M(torch.nn.Module):
        def forward(self, x, w, b, k):
            y = torch.relu(F.conv2d(x, k)).sum() + torch.relu(F.linear(x.flatten(1), w, b)).sum()
            return y + torch.relu(F.linear(x.flatten(1), w)).sum()  # no bias: 2 arguments, not 3

    text = str(explain(torch.fx.symbolic_trace(M()), [LinearReLU()]))
    assert "rule LinearReLU: 1 match" in text and "matched at relu_1 (nodes: linear, relu_1)" in text
    assert ("not at relu: anchor matched, but where the pattern wants torch.nn.functional.linear, the graph has "
            "conv2d (torch.conv2d) [1 of 2 pattern operations found]") in text
    assert ("not at relu_2: anchor matched, but linear_1 is called with 2 positional argument(s), the pattern with 3 "
            "positional argument(s); write the pattern's call the way the model writes it") in text
    # Closest misses first: relu_2 (2 of 2 operations found) before relu (1 of 2).
    assert text.index("not at relu_2") < text.index("not at relu:")


def test_explain_points_at_module_calls_and_look_alike_functions():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    report = explain(model, LinearReLU())["LinearReLU"]
    assert not report.matched
    assert "no node calls torch.relu" in report.note
    assert ("module calls of torch.nn.modules.activation.ReLU (_1) are not matched by function patterns"
            in report.note)

    class M(torch.nn.Module):
        def forward(self, x, w, b):
            return F.relu(F.linear(x, w, b))

    note = explain(torch.fx.symbolic_trace(M()), [LinearReLU()])["LinearReLU"].note
    assert "torch.nn.functional.relu (relu) is a different function with the same name" in note


def test_explain_module_call_inside_the_pattern():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(x))

    text = str(explain(torch.fx.symbolic_trace(M()), [LinearReLU()]))
    assert "the graph has fc (module call fc: torch.nn.modules.linear.Linear)" in text
    assert "module calls are not matched by function patterns" in text


# --------------------------------------------------------------------------- loop guard and numerics


def test_ping_pong_rules_raise_a_loop_error():
    to_clamp = rewrite.rule(lambda x: torch.relu(x), lambda x: torch.clamp(x, min=0.0), name="relu-to-clamp")
    to_relu = rewrite.rule(lambda x: torch.clamp(x, min=0.0), lambda x: torch.relu(x), name="clamp-to-relu")

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    with pytest.raises(RewriteLoopError, match="relu-to-clamp → clamp-to-relu .*ping-pong") as info:
        _run(M(), to_clamp, to_relu)
    assert isinstance(info.value, fxopt.PassError) and info.value.pass_name == "rewrite"
    with pytest.raises(RewriteLoopError):  # the same through compile: fxopt errors pass through unchanged
        fxopt.compile(M(), passes=[RewritePass([to_clamp, to_relu])])


def test_rule_that_regrows_its_pattern_hits_max_iterations():
    grow = rewrite.rule(lambda x: torch.sigmoid(x), lambda x: torch.sigmoid(x * 1.0), name="grow")

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    with pytest.raises(RewriteLoopError, match="fixpoint after max_iterations=5 rounds.*grow"):
        _run(M(), grow, max_iterations=5)


def test_rewrite_that_breaks_numerics_is_caught_by_compile_check():
    wrong = rewrite.rule(lambda x: torch.relu(x), lambda x: torch.sigmoid(x), name="wrong")

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    x = torch.randn(8)
    with pytest.raises(fxopt.NumericsError, match="breaks numerics") as info:
        fxopt.compile(M(), passes=[RewritePass([wrong])], example_inputs=(x,), check=True)
    assert info.value.pass_name.startswith("rewrite")


def test_pass_is_frozen_named_and_labelled():
    p = RewritePass([LinearReLU()], max_iterations=3)
    assert p.name == "rewrite" and isinstance(p, fxopt.Pass) and isinstance(p.rules, tuple)
    assert p.label() == "rewrite{rules=(LinearReLU(),),max_iterations=3}"
    with pytest.raises(Exception):
        p.max_iterations = 4  # frozen


# --------------------------------------------------------------------------- replacements and bad rules


def test_replacement_constants_are_copied_onto_the_module():
    # tanh(x) = 2 * sigmoid(2x) - 1; torch.tensor(...) becomes a constant of the traced replacement
    r = rewrite.rule(lambda x: torch.tanh(x), lambda x: torch.sigmoid(x * torch.tensor([2.0, 2.0])) * 2.0 - 1.0,
                     name="const")

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x)

    model = M()
    gm, result = _run(model, r)
    assert result.modified and _count(gm, torch.tanh) == 0
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["_rewrite_const0"]
    fxopt.verify(gm, pass_name="rewrite")
    x = torch.randn(2)
    torch.testing.assert_close(gm(x), model(x))


def test_multi_output_pattern():
    def pattern(x, y):
        return x + y, x - y

    def replacement(x, y):
        d = x - y
        return d + 2 * y, d

    class M(torch.nn.Module):
        def forward(self, x, y):
            s = x + y
            t = torch.exp(s)
            return t * (x - y)

    model = M()
    gm, result = _run(model, rewrite.rule(pattern, replacement, name="sumdiff"))
    assert result.stats == {"sumdiff": 1} and _count(gm, operator.add) == 1
    x, y = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(gm(x, y), model(x, y))


def test_malformed_rules_raise_rule_errors():
    with pytest.raises(RuleError, match="pattern arguments \\['y'\\] are not used"):
        _run(TwoLinear(), rewrite.rule(lambda x, y: torch.relu(x), lambda x, y: x, name="r"))
    with pytest.raises(RuleError, match="replacement arguments \\['z'\\] are not pattern arguments"):
        _run(TwoLinear(), rewrite.rule(lambda x: torch.relu(x), lambda z: z, name="r"))
    with pytest.raises(RuleError, match="wildcards \\['a'\\] are not pattern arguments"):
        _run(TwoLinear(), rewrite.rule(lambda x: torch.relu(x), lambda x: x, name="r", wildcards=("a",)))
    with pytest.raises(RuleError, match="returned NoneType"):
        _run(TwoLinear(), rewrite.rule(lambda x: torch.relu(x), lambda x: x, name="r", check=lambda m: None))
    with pytest.raises(RuleError, match="several rules are named \\['LinearReLU'\\]"):
        RewritePass([LinearReLU(), LinearReLU()])
    with pytest.raises(RuleError, match="RewriteRule objects"):
        RewritePass([lambda x: x])

    class NoReplacement(RewriteRule):
        def pattern(self, x):
            return torch.relu(x)

    with pytest.raises(RuleError, match="has no replacement"):
        _run(TwoLinear(), NoReplacement())
    assert issubclass(RuleError, fxopt.FxoptError)


def test_max_iterations_counts_rewriting_rounds():
    r = rewrite.rule(lambda x: torch.relu(torch.relu(x)), lambda x: torch.relu(x), name="relu-relu")

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(torch.relu(x))

    _, result = _run(M(), r, max_iterations=1)  # one round rewrites, the next finds nothing: fine
    assert result.stats == {"relu-relu": 1}
    with pytest.raises(RuleError, match="max_iterations must be a positive int"):
        RewritePass([r], max_iterations=0)


def test_on_a_torchvision_model():
    import torchvision
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    flat = rewrite.rule(lambda x: torch.flatten(x, 1), lambda x: x.reshape(x.size(0), -1), name="flatten")
    flat2 = rewrite.rule(lambda x: torch.flatten(x, 2), lambda x: x.reshape(x.size(0), x.size(1), -1), name="f2")
    x = torch.randn(2, 3, 64, 64)
    out = fxopt.compile(model, passes=[RewritePass([flat, flat2])], example_inputs=(x,), check=True)
    rec = fxopt.records(out)[0]
    assert rec.modified and rec.stats == {"flatten": 1, "f2": 0}
    assert _count(out, torch.flatten) == 0 and _count(out, "reshape") == 1
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=0)
    text = str(explain(fxopt.trace(model), [flat2, LinearReLU()]))
    assert "not at flatten: anchor matched, but literal 1 (int) in the graph ≠ 2 (int) in the pattern" in text
    assert ("module calls of torch.nn.modules.activation.ReLU (relu, layer1_0_relu, layer1_0_relu_1 and 14 more) "
            "are not matched by function patterns") in text


# --------------------------------------------------------------------------- property: random graphs

_OPS = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "times2": lambda v: v * 2.0,
    "times3": lambda v: v * 3.0,
    "double": lambda v: v + v,
}
_PROPERTY_RULES = [
    rewrite.rule(lambda x: x * 2.0, lambda x: x + x, name="times2"),
    rewrite.rule(lambda x: torch.relu(torch.relu(x)), lambda x: torch.relu(x), name="relu-relu"),
    rewrite.rule(lambda x: torch.sigmoid(x), lambda x: torch.tanh(x * 0.5) * 0.5 + 0.5, name="sigmoid-tanh"),
]


class _Chain(torch.nn.Module):
    def __init__(self, ops, skips):
        super().__init__()
        self.ops, self.skips = ops, skips

    def forward(self, x):
        values = [x]
        for op, skip in zip(self.ops, self.skips):
            y = _OPS[op](values[-1])
            values.append(y + values[skip % len(values)] if skip else y)
        return values[-1]


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(st.sampled_from(sorted(_OPS)), min_size=1, max_size=8),
                  skips=st.lists(st.integers(0, 8), min_size=8, max_size=8))
def test_random_graphs_stay_valid_equal_and_reach_a_fixpoint(ops, skips):
    model = _Chain(ops, skips)
    gm, result = _run(model, *_PROPERTY_RULES)
    fxopt.verify(gm, pass_name="rewrite")
    x = torch.randn(16)
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
    assert result.modified == (sum(result.stats.values()) > 0)
    for r in _PROPERTY_RULES:  # fixpoint: nothing left to rewrite
        assert all(f.reason for f in rewrite.scan(gm, r))
    if "sigmoid" in ops or "times2" in ops:  # one-operation patterns always match
        assert result.modified
    elif ("relu", "relu") not in set(zip(ops, ops[1:])):
        assert not result.modified and result.stats == {r.name: 0 for r in _PROPERTY_RULES}
