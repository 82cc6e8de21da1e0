"""The compression recipes are plain, printable lists of the compression passes."""

from __future__ import annotations

import pytest

from fxopt import passes as fp, recipes
from fxopt.compress import PolynomialDecay


def test_compression_recipes_are_lists_of_passes():
    assert recipes.prune(0.5) == [fp.PruneMagnitude(0.5)]
    assert recipes.prune(0.3, structured=True) == [fp.PruneChannels(0.3)]
    schedule = PolynomialDecay(end_step=100)
    assert recipes.prune(0.8, schedule=schedule)[0].schedule is schedule
    assert recipes.cluster(16) == [fp.ClusterWeights(16)]
    assert recipes.low_rank(energy=0.9) == [fp.LowRankFactorize(energy=0.9)]
    assert recipes.low_rank(rank_ratio=0.25)[0].label() == "low-rank{rank_ratio=0.25}"
    assert fp.PruneChannels(0.3, layer_ratios={"layer4": 0.5}).label() == \
        "prune-channels{layer_ratios=(('layer4', 0.5),)}"


def test_module_level_passes_are_marked():
    for p in (fp.PruneMagnitude(0.5), fp.ClusterWeights(8), fp.LowRankFactorize(), fp.ApplyMasks()):
        assert p.module_level is True and callable(p.apply)
    assert getattr(fp.PruneChannels(0.3), "module_level", False) is False  # needs the graph


@pytest.mark.parametrize("bad", [-1, 1.0])
def test_recipes_reject_bad_numbers(bad):
    with pytest.raises(ValueError):
        recipes.prune(bad)
    with pytest.raises(ValueError):
        recipes.low_rank(rank_ratio=bad if bad != 1.0 else 1.5)
