"""Pass, PassResult, function_pass, PassManager and instruments."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import pytest
import torch
import torch.fx

import fxopt
from fxopt.pipeline import DumpGraphs, PassManager, TimingInstrument


class Tiny(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def _gm():
    return torch.fx.symbolic_trace(Tiny())


@dataclass(frozen=True)
class AddOne(fxopt.Pass):
    name = "add-one"
    amount: float = 1.0

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.add, (out.args[0], self.amount))
        out.args = (new,)
        return fxopt.PassResult(gm, modified=True, stats={"added": 1})


def test_pass_is_frozen_dataclass_with_label():
    p = AddOne(amount=2.0)
    assert p == AddOne(amount=2.0) and p != AddOne()
    assert p.label() == "add-one{amount=2.0}"
    assert AddOne().label() == "add-one"
    with pytest.raises(Exception):
        p.amount = 3.0  # frozen


def test_pass_name_must_be_kebab_case():
    with pytest.raises(ValueError, match="kebab-case"):

        class Bad(fxopt.Pass):
            name = "Bad_Name"


def test_pass_returns_result_and_modifies_in_place():
    gm = _gm()
    res = AddOne()(gm)
    assert res.modified is True and res.graph_module is gm and res.stats == {"added": 1}
    gm.recompile()
    x = torch.randn(4)
    assert torch.equal(gm(x), torch.relu(x) + 2)


def test_pass_returning_none_is_a_type_error_that_says_what_to_return():
    class Forgetful(fxopt.Pass):
        name = "forgetful"

        def call(self, gm):
            return None

    with pytest.raises(TypeError, match=r"return fxopt.PassResult\(gm, modified="):
        Forgetful()(_gm())
    with pytest.raises(TypeError, match="returned None"):
        fxopt.compile(Tiny(), passes=[Forgetful()])


def test_function_pass_contract():
    @fxopt.function_pass("noop")
    def noop(gm):
        return False

    @fxopt.function_pass("returns-none")
    def returns_none(gm):
        pass

    assert noop(_gm()).modified is False
    assert noop.label() == "noop"
    with pytest.raises(TypeError, match="return True if it changed the graph and False"):
        returns_none(_gm())
    with pytest.raises(ValueError, match="kebab-case"):
        fxopt.function_pass("Not Kebab")


def test_pass_error_names_pass_and_previous_and_chains_cause():
    @fxopt.function_pass("boom")
    def boom(gm):
        raise KeyError("missing-thing")

    with pytest.raises(fxopt.PassError) as info:
        fxopt.compile(Tiny(), passes=[AddOne(), boom])
    err = info.value
    assert err.pass_name == "boom" and err.previous == ("add-one",)
    assert "boom" in str(err) and "add-one" in str(err)
    assert isinstance(err.__cause__, KeyError)


def test_verification_catches_broken_graph():
    @fxopt.function_pass("dangling")
    def dangling(gm):
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        node.target = "not-callable"
        return True

    with pytest.raises(fxopt.VerificationError, match="dangling"):
        PassManager([dangling])(_gm())


def test_unmodified_pass_is_not_verified_and_recorded():
    @fxopt.function_pass("look")
    def look(gm):
        return False

    timing = TimingInstrument()
    gm, recs = PassManager([look, AddOne()], instruments=[timing])(_gm())
    assert [r.name for r in recs] == ["look", "add-one"]
    assert [r.modified for r in recs] == [False, True]
    assert recs[1].nodes_after == recs[1].nodes_before + 1
    assert [t[0] for t in timing.timings] == ["look", "add-one"]
    assert all(t[1] >= 0 for t in timing.timings)


def test_dump_graphs_instrument(tmp_path):
    PassManager([AddOne()], instruments=[DumpGraphs(tmp_path)])(_gm())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["000-input.txt", "001-add-one.txt"]
    assert "torch.add" in (tmp_path / "001-add-one.txt").read_text() or "add" in (tmp_path / "001-add-one.txt").read_text()


def test_non_pass_in_list_is_rejected():
    with pytest.raises(TypeError, match="not a pass"):
        PassManager([42])


def test_pass_must_return_the_graph_module_it_was_given():
    @fxopt.function_pass("noop")
    def noop(gm):
        return False

    @dataclass(frozen=True)
    class Swapper(fxopt.Pass):
        name = "swapper"

        def call(self, gm):
            return fxopt.PassResult(torch.fx.symbolic_trace(Tiny()), modified=True)

    with pytest.raises(fxopt.PassContractError, match="different GraphModule") as info:
        PassManager([noop, Swapper()])(_gm())
    assert isinstance(info.value, fxopt.PassError) and info.value.previous == ("noop",)


@dataclass(frozen=True)
class NeedsRelu(fxopt.Pass):
    name = "needs-relu"

    def requires(self, gm):
        if not any(n.target is torch.relu for n in gm.graph.nodes):
            raise fxopt.UnsupportedError("no relu to work on")

    def ensures(self, gm):
        if any(n.target in (torch.add, operator.add) for n in gm.graph.nodes):
            raise ValueError("an add is left")

    def call(self, gm):
        return fxopt.PassResult(gm, modified=False)


def test_precondition_error_names_pass_and_previous_and_keeps_error_class():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Identity()))
    with pytest.raises(fxopt.PreconditionError, match="no relu to work on") as info:
        PassManager([AddOne(), NeedsRelu()])(gm)
    err = info.value
    assert isinstance(err, fxopt.UnsupportedError) and isinstance(err, fxopt.PassError)  # both catchable
    assert err.pass_name == "needs-relu" and err.previous == ("add-one",)
    assert "passes run before it: add-one" in str(err)
    assert isinstance(err.__cause__, fxopt.UnsupportedError)


def test_postcondition_error_names_pass():
    with pytest.raises(fxopt.PostconditionError, match="needs-relu.*an add is left") as info:
        NeedsRelu()(_gm())
    assert isinstance(info.value.__cause__, ValueError) and info.value.pass_name == "needs-relu"


def test_fxopt_error_inside_call_is_a_pass_error_of_its_own_class():
    @fxopt.function_pass("calib")
    def calib(gm):
        raise fxopt.CalibrationError("no data")

    with pytest.raises(fxopt.CalibrationError, match="pass 'calib' failed.*no data") as info:
        PassManager([AddOne(), calib])(_gm())
    assert isinstance(info.value, fxopt.PassError) and info.value.previous == ("add-one",)


def test_debug_verify_checks_passes_that_say_they_changed_nothing(monkeypatch):
    @fxopt.function_pass("sneaky")
    def sneaky(gm):  # breaks the graph but reports modified=False
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        node.target = "not-callable"
        return False

    assert fxopt.Pass.debug_verify  # tests/conftest.py turns it on for every test
    with pytest.raises(fxopt.VerificationError, match="sneaky"):
        sneaky(_gm())
    monkeypatch.setattr(fxopt.Pass, "debug_verify", False)
    assert sneaky(_gm()).modified is False  # off: only modifying passes are verified (by the PassManager)


def test_pass_manager_hands_its_context_to_passes():
    seen = []

    @dataclass(frozen=True)
    class Target(fxopt.Pass):
        name = "target"
        backend: str | None = None

        def with_context(self, context):
            return self if self.backend is not None else Target(context.target_backend)

        def call(self, gm):
            seen.append(self.backend)
            return fxopt.PassResult(gm, modified=False)

    PassManager([Target()], context=fxopt.PassContext("qnnpack"))(_gm())
    PassManager([Target()])(_gm())
    Target()(_gm())
    Target("mine")(_gm(), fxopt.PassContext("qnnpack"))
    assert seen == ["qnnpack", "x86", "x86", "mine"]
