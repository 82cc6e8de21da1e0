"""cluster-weights: at most n_clusters values, sparsity kept, centroids trained, k-means quality, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxopt
from fxopt import passes as fp
from fxopt.compress import ClusteredWeight, kmeans_1d


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()


def _layers(m):
    return [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("init", ["kmeans++", "linear", "density"])
def test_each_layer_has_at_most_n_clusters_values(init):
    m = _net()
    gm = fxopt.compile(m, [fp.ClusterWeights(8, init=init)])
    for layer, orig in zip(_layers(gm), _layers(m)):
        assert torch.unique(layer.weight.detach()).numel() <= 8
        assert isinstance(layer.parametrizations.weight[0], ClusteredWeight)
        # uniform init weights, 8 levels: a uniform quantizer's error is step/sqrt(12) ~ 0.125 of the std
        err = (layer.weight - orig.weight).norm() / orig.weight.norm()
        assert err < 0.16


def test_per_channel_clusters_each_output_channel():
    gm = fxopt.compile(_net(), [fp.ClusterWeights(4, per_channel=True)])
    w = gm.get_submodule("0").weight.detach()
    assert all(torch.unique(row).numel() <= 4 for row in w.reshape(16, -1))
    assert torch.unique(w).numel() > 4  # different palettes per channel


def test_zeros_of_a_pruned_model_stay_zero_and_count_as_a_cluster():
    gm = fxopt.compile(_net(), [fp.PruneMagnitude(0.5), fp.ApplyMasks(), fp.ClusterWeights(4)])
    for layer in _layers(gm):
        w = layer.weight.detach()
        assert torch.unique(w).numel() <= 4
    before = fxopt.compile(_net(), [fp.PruneMagnitude(0.5), fp.ApplyMasks()])
    for a, b in zip(_layers(before), _layers(gm)):
        assert torch.equal(a.weight == 0, b.weight == 0)
    assert gm.get_submodule("3").parametrizations.weight[0].centroids.shape[1] == 3  # 3 centroids + zero


def test_training_updates_centroids_and_keeps_the_layer_clustered():
    gm = fxopt.compile(_net(), [fp.ClusterWeights(6)])
    layer = gm.get_submodule("3")
    start = layer.parametrizations.weight[0].centroids.detach().clone()
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    gm.train()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(gm(torch.randn(8, 3, 8, 8)), torch.arange(8)).backward()
        assert layer.parametrizations.weight[0].centroids.grad is not None
        opt.step()
    gm.eval()
    assert not torch.equal(layer.parametrizations.weight[0].centroids.detach(), start)
    assert torch.unique(layer.weight.detach()).numel() <= 6
    fp.ApplyMasks()(gm)
    assert torch.unique(gm.get_submodule("3").weight.detach()).numel() <= 6


def test_kmeans_matches_sklearn_inertia():
    from sklearn.cluster import KMeans

    x = torch.cat([torch.randn(3000) * 0.1, torch.randn(1000) * 0.5 + 1])
    centroids, labels = kmeans_1d(x[None], 8, init="kmeans++")
    ours = float(((x - centroids[0][labels[0]]) ** 2).sum())
    ref = KMeans(8, n_init=4, random_state=0).fit(x.numpy().astype(np.float64)[:, None]).inertia_
    assert ours <= 1.05 * ref
    assert bool((centroids[0][1:] >= centroids[0][:-1]).all())


def test_cluster_then_int8_uses_few_int8_values_per_channel():
    m = _net()
    calib = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    clustered = fxopt.compile(m, [fp.ClusterWeights(16), fp.ApplyMasks()])
    q = fxopt.compile(clustered, fxopt.recipes.static_int8(calib), example_inputs=(calib[0],), backend="x86")
    rep, plain = fxopt.report(q), fxopt.report(fxopt.compile(m, fxopt.recipes.static_int8(calib),
                                                             example_inputs=(calib[0],), backend="x86"))
    assert rep.compressed_bytes < 0.8 * plain.compressed_bytes
    assert rep.compressed_bytes < 0.2 * fxopt.report(m).compressed_bytes


def test_report_gives_palette_bits():
    rep = fxopt.report(fxopt.compile(_net(), [fp.ClusterWeights(16), fp.ApplyMasks()]))
    row = next(r for r in rep.rows if r["name"] == "3")
    assert row["unique"] <= 16
    assert 4.0 <= float(row["bits/w"]) < 4.2  # log2(16) + the palette spread over 5,760 weights


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True])
def test_bad_n_clusters_is_a_value_error(bad):
    with pytest.raises(ValueError, match="n_clusters"):
        fp.ClusterWeights(bad)


def test_bad_init_and_nothing_to_cluster():
    with pytest.raises(ValueError, match="init"):
        fp.ClusterWeights(4, init="random")
    result = fp.ClusterWeights(4)(torch.fx.symbolic_trace(nn.Sequential(nn.ReLU())))
    assert result.modified is False and "nothing to cluster" in result.notes[-1]


@pytest.mark.slow
def test_mobilenet_clusters_every_layer():
    m = torchvision.models.mobilenet_v3_small(weights=None).eval()
    gm = fxopt.compile(m, [fp.ClusterWeights(16), fp.ApplyMasks()], example_inputs=(torch.randn(1, 3, 64, 64),))
    layers = _layers(gm)
    assert max(torch.unique(layer.weight.detach()).numel() for layer in layers) <= 16
    assert fxopt.records(gm)[0].stats["layers"] == sum(1 for layer in layers if layer.weight.numel() > 16)
