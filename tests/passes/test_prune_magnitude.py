"""prune-magnitude / apply-masks: exact sparsity, masks survive training, schedules, baking, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import fxopt
from fxopt import passes as fp
from fxopt.compress import ConstantSparsity, MagnitudeMask, PolynomialDecay, masked_weights, pruning_hook, pruning_step


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()


def _zeros(m: nn.Module) -> tuple[int, int]:
    ws = [mod.weight for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


def test_global_sparsity_is_exact_and_smallest_weights_go():
    m = _net()
    gm = fxopt.compile(m, [fp.PruneMagnitude(0.6)])
    zeros, total = _zeros(gm)
    assert zeros == round(0.6 * total)
    all_w = torch.cat([mod.weight.detach().reshape(-1) for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))])
    threshold = all_w.abs().kthvalue(zeros).values
    kept = torch.cat([mod.weight.detach().reshape(-1) for mod in gm.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))])
    assert bool((kept[kept != 0].abs() >= threshold).all())
    assert isinstance(gm.get_submodule("0").parametrizations.weight[0], MagnitudeMask)
    assert _zeros(m)[0] == 0  # the user's model is untouched


def test_layer_scope_prunes_each_layer_to_the_target():
    gm = fxopt.compile(_net(), [fp.PruneMagnitude(0.5, scope="layer")])
    for name in ("0", "3"):
        w = gm.get_submodule(name).weight
        assert int((w == 0).sum()) == round(0.5 * w.numel())


def test_fine_tuning_cannot_revive_pruned_weights():
    gm = fxopt.compile(_net(), [fp.PruneMagnitude(0.7)])
    before = [mod.weight.detach() == 0 for mod in gm.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    opt = torch.optim.Adam(gm.parameters(), lr=0.05)
    gm.train()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(gm(torch.randn(4, 3, 8, 8)), torch.tensor([1, 2, 3, 4])).backward()
        opt.step()
    after = [mod.weight.detach() == 0 for mod in gm.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    for b, a in zip(before, after):
        assert bool(a[b].all())  # every pruned weight is still zero


def test_polynomial_decay_follows_tf_mot_formula():
    s = PolynomialDecay(initial_sparsity=0.1, begin_step=10, end_step=110, frequency=20, power=3)
    assert s.sparsity_at(5, 0.8) is None  # before begin_step
    assert s.sparsity_at(10, 0.8) == pytest.approx(0.1)
    assert s.sparsity_at(15, 0.8) is None  # not an update step
    assert s.sparsity_at(30, 0.8) == pytest.approx(0.8 + (0.1 - 0.8) * (1 - 0.2) ** 3)
    assert s.sparsity_at(110, 0.8) == pytest.approx(0.8)
    assert s.sparsity_at(130, 0.8) is None  # after end_step the masks stay
    c = ConstantSparsity(begin_step=0, frequency=5)
    assert [c.sparsity_at(i, 0.5) for i in (0, 3, 5)] == [0.5, None, 0.5]
    with pytest.raises(ValueError):
        PolynomialDecay(end_step=-1)
    with pytest.raises(ValueError):
        PolynomialDecay(initial_sparsity=1.0)


def test_schedule_step_hook_raises_sparsity_gradually_and_monotonically():
    sched = PolynomialDecay(initial_sparsity=0.0, begin_step=0, end_step=8, frequency=2)
    gm = fxopt.compile(_net(), [fp.PruneMagnitude(0.8, schedule=sched)])
    assert _zeros(gm)[0] == 0  # step 0 of the schedule: sparsity 0
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    opt.register_step_post_hook(pruning_hook(gm))
    seen, masks = [], None
    gm.train()
    for _ in range(10):
        opt.zero_grad()
        gm(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        zeros, total = _zeros(gm)
        seen.append(zeros / total)
        now = [e.mask.mask.clone() for e in masked_weights(gm)]
        if masks is not None:
            assert all(bool((n <= o).all()) for o, n in zip(masks, now))  # a kept weight may go, never come back
        masks = now
    assert seen == sorted(seen)  # never decreases
    assert 0.0 < seen[1] < seen[5] < 0.8
    assert seen[-1] == pytest.approx(0.8, abs=1e-3)
    assert pruning_step(gm) == {}  # past end_step: nothing updates


def test_apply_masks_bakes_and_keeps_values():
    gm = fxopt.compile(_net(), [fp.PruneMagnitude(0.5)])
    x = torch.randn(2, 3, 8, 8)
    ref = gm(x)
    copy_of = copy.deepcopy(gm)
    result = fp.ApplyMasks()(copy_of)
    assert result.modified and result.stats["baked"] == 2
    assert not any(parametrize.is_parametrized(m) for m in copy_of.modules())
    torch.testing.assert_close(copy_of(x), ref, atol=1e-6, rtol=1e-6)
    assert gm.get_submodule("0").weight.shape == (8, 3, 3, 3)  # the original still works (shared class)
    again = fp.ApplyMasks()(copy_of)
    assert not again.modified and "no pruning mask" in again.notes[0]


def test_prune_then_static_int8_keeps_zeros_and_shrinks_compressed_size():
    m = _net()
    calib = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    pruned = fxopt.compile(m, [fp.PruneMagnitude(0.5)])
    q_plain = fxopt.compile(m, fxopt.recipes.static_int8(calib), example_inputs=(calib[0],), backend="x86")
    q_pruned = fxopt.compile(pruned, [fp.ApplyMasks()] + fxopt.recipes.static_int8(calib),
                             example_inputs=(calib[0],), backend="x86")
    rp, rq = fxopt.report(q_plain), fxopt.report(q_pruned)
    assert rq.sparsity > 0.45
    assert rq.compressed_bytes < 0.8 * rp.compressed_bytes
    assert rq.compressed_bytes < 0.25 * fxopt.report(m).compressed_bytes  # int8 x sparsity


def test_report_shows_per_layer_sparsity_and_compressed_size():
    gm = fxopt.compile(_net(), [fp.PruneMagnitude(0.5, scope="layer")])
    rep = fxopt.report(gm)
    row = next(r for r in rep.rows if r["name"] == "0")
    assert row["sparsity"].endswith("%") and float(row["sparsity"][:-1]) > 45
    assert row["params"] == 8 * 27 + 8  # the effective weight, not original + mask
    dense = fxopt.report(_net())
    assert rep.total_bytes == dense.total_bytes  # dense storage gains nothing...
    assert rep.compressed_bytes < 0.8 * dense.compressed_bytes  # ...gzip does
    assert "compressed (gzip)" in str(rep)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 2, True, "half"])
def test_bad_sparsity_is_a_value_error(bad):
    with pytest.raises(ValueError, match="sparsity"):
        fp.PruneMagnitude(bad)
    with pytest.raises(ValueError, match="sparsity|fraction"):
        fxopt.recipes.prune(bad, structured=True)


def test_bad_scope_and_schedule():
    with pytest.raises(ValueError, match="scope"):
        fp.PruneMagnitude(0.5, scope="model")
    with pytest.raises(TypeError, match="schedule"):
        fp.PruneMagnitude(0.5, schedule="poly")


def test_nothing_prunable_is_not_an_error():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)))
    result = fp.PruneMagnitude(0.5)(gm)
    assert result.modified is False and "nothing to prune" in result.notes[0]
    assert fp.PruneMagnitude(0.0)(torch.fx.symbolic_trace(_net())).modified is False


def test_include_names_an_embedding_and_module_level_apply():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4))
    result = fp.PruneMagnitude(0.5, scope="layer", include=("0",))(torch.fx.symbolic_trace(model))
    assert result.stats["layers"] == 2
    # module level: works on a plain module (e.g. a root that cannot be traced)
    plain = copy.deepcopy(model)
    modified, stats, _ = fp.PruneMagnitude(0.5, exclude=(nn.Embedding,)).apply(plain)
    assert modified and stats["layers"] == 1 and not parametrize.is_parametrized(plain[0])
