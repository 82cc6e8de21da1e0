"""fxopt.compile / fxopt.lower: copying, checking, records, drop-in behaviour, errors."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

import fxopt


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.a = nn.Linear(16, 3)
        self.b = nn.Linear(16, 2)

    def forward(self, x):
        h = self.body(x)
        return {"a": self.a(h), "pair": (self.b(h), h.sum(dim=1))}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@fxopt.function_pass("scale-weights")
def scale_weights(gm):
    for p in gm.parameters():
        p.data.mul_(1.5)
    return True


def test_compile_never_mutates_the_model():
    model = TwoHeads().eval()
    before = _state(model)
    out = fxopt.compile(model, passes=[scale_weights], example_inputs=torch.randn(2, 8))
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert out is not model


def test_result_is_drop_in_with_same_output_structure_and_other_batch_size():
    model = TwoHeads().eval()
    out_model = fxopt.compile(model, example_inputs=torch.randn(2, 8))
    x = torch.randn(5, 8)
    ref, got = model(x), out_model(x)
    assert set(got) == {"a", "pair"} and isinstance(got["pair"], tuple)
    torch.testing.assert_close(got["a"], ref["a"])
    torch.testing.assert_close(got["pair"][0], ref["pair"][0])
    torch.testing.assert_close(got["pair"][1], ref["pair"][1])


def test_check_names_the_first_pass_that_breaks_numerics():
    @fxopt.function_pass("harmless")
    def harmless(gm):
        return False

    with pytest.raises(fxopt.NumericsError) as info:
        fxopt.compile(TwoHeads().eval(), passes=[harmless, scale_weights], example_inputs=torch.randn(2, 8), check=True)
    assert info.value.pass_name == "scale-weights"
    assert "scale-weights" in str(info.value)


def test_check_tolerance_can_be_loosened():
    @fxopt.function_pass("nudge")
    def nudge(gm):
        for p in gm.parameters():
            p.data.add_(1e-3)
        return True

    with pytest.raises(fxopt.NumericsError):
        fxopt.compile(TwoHeads().eval(), passes=[nudge], example_inputs=torch.randn(2, 8), check=True)
    fxopt.compile(TwoHeads().eval(), passes=[nudge], example_inputs=torch.randn(2, 8), check=0.5)


def test_records_are_kept_on_the_result():
    out = fxopt.compile(TwoHeads().eval(), passes=[scale_weights])
    recs = fxopt.records(out)
    assert [r.name for r in recs] == ["scale-weights"] and recs[0].modified and recs[0].seconds >= 0


def test_compile_rejects_non_modules_and_unknown_backends():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        fxopt.compile(lambda x: x)
    with pytest.raises(ValueError, match="unknown backend 'tpu9000'; available backends"):
        fxopt.compile(TwoHeads(), backend="tpu9000")
    with pytest.raises(ValueError, match="example_inputs"):
        fxopt.compile(TwoHeads(), check=True)


def test_training_flag_is_preserved():
    model = TwoHeads().train()
    assert fxopt.compile(model).training is True
    assert fxopt.compile(model.eval()).training is False


def test_plain_callable_pass_is_accepted():
    def count_nodes(gm):
        return fxopt.PassResult(gm, modified=False, stats={"nodes": len(gm.graph.nodes)})

    out = fxopt.compile(TwoHeads(), passes=[count_nodes])
    assert fxopt.records(out)[0].stats["nodes"] > 5


def test_recipe_backend_must_match_compile_backend():
    from fxopt import recipes

    model = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="prepares the graph for backend 'qnnpack' but compile was asked for"):
        fxopt.compile(model, recipes.static_int8([x], backend="qnnpack"), example_inputs=x, backend="x86")
    prepared = fxopt.compile(model, recipes.static_int8([x], backend="qnnpack"), example_inputs=x)
    with pytest.raises(ValueError, match="prepared for backend 'qnnpack'"):
        fxopt.lower(prepared, "x86")
    lowered = fxopt.lower(prepared, "qnnpack")
    torch.testing.assert_close(lowered(x), model(x), atol=0.05, rtol=0.05)
    assert fxopt.meta.backend_of(prepared) == "qnnpack"  # lower() does not mutate its input


@pytest.mark.parametrize("backend", ["qnnpack", "x86", "fbgemm"])
def test_recipe_without_backend_follows_compile(backend):
    """The README's call: the recipe names no backend, compile does; the graph is prepared for that backend."""
    from fxopt import recipes

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    recipe = recipes.static_int8([x])
    assert all(getattr(p, "backend", None) is None for p in recipe)  # the recipe fixes nothing
    q = fxopt.compile(model, recipe, example_inputs=x, backend=backend)
    want = "qnnpack" if backend == "qnnpack" else "x86"
    assert fxopt.meta.backend_of(q) == want and q.engine in ((want,) if want == "qnnpack" else ("x86", "fbgemm"))
    assert fxopt.compare(model, q, [x]).sqnr_db > 25


def test_no_backend_anywhere_prepares_for_x86_and_explicit_agreement_is_fine():
    from fxopt import passes as fp
    from fxopt import recipes

    model = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    prepared = fxopt.compile(model, recipes.static_int8([x]), example_inputs=x)
    assert fxopt.meta.backend_of(prepared) == "x86"
    assert fxopt.meta.backend_of(fp.InsertQuantStubs()(fxopt.trace(model, x)).graph_module) == "x86"
    q = fxopt.compile(model, recipes.static_int8([x], backend="fbgemm"), example_inputs=x, backend="x86")
    assert fxopt.meta.backend_of(q) == "x86"  # fbgemm is x86's alias: no contradiction
    with pytest.raises(ValueError, match="prepares the graph for backend 'x86' but compile was asked for "
                                         "backend='qnnpack'"):
        fxopt.compile(model, [fp.InsertQuantStubs(backend="x86")], example_inputs=x, backend="qnnpack")


def test_backend_object_with_options_is_what_the_recipe_prepares_for():
    from fxopt import recipes
    from fxopt.backends.x86 import X86Backend

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    q = fxopt.compile(model, recipes.static_int8([x]), example_inputs=x, backend=X86Backend(reduce_range=True))
    config = fxopt.meta.quant_config(q)
    assert config.backend == "x86" and config.activation_spec.reduce_range  # observers used the object's spec
    assert fxopt.compare(model, q, [x]).sqnr_db > 20


def test_check_does_not_calibrate_the_int8_model():
    """compile(check=True) runs the graph after each pass; a calibrated graph's observers must not record
    those runs (an example input wider than the calibration data would widen every scale)."""
    from fxopt import recipes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    calib = [(torch.rand(1, 3, 16, 16),) for _ in range(2)]
    wide = (4 * torch.randn(1, 3, 16, 16),)
    plain = fxopt.compile(model, recipes.static_int8(calib), example_inputs=wide, backend="x86")
    checked = fxopt.compile(model, recipes.static_int8(calib), example_inputs=wide, backend="x86", check=True)
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(plain(x), checked(x))
