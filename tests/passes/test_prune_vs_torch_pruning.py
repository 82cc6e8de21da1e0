"""Against Torch-Pruning (DepGraph): same ratio, L1, first conv and classifier kept. fxopt removes at
least as many parameters, and every group Torch-Pruning prunes but fxopt leaves alone has a reason."""

from __future__ import annotations

import pytest
import torch
import torchvision

from bench.compress_models import prune_both

pytest.importorskip("torch_pruning")


def _check(name: str, size: int) -> None:
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    tp_model, fx_model, missed = prune_both(model, x, 0.3)
    tp_params = sum(p.numel() for p in tp_model.parameters())
    fx_params = sum(p.numel() for p in fx_model.parameters())
    assert fx_params <= tp_params, f"{name}: fxopt keeps {fx_params:,} params, Torch-Pruning {tp_params:,}"
    assert all("channels kept:" in why for why in missed.values()), missed
    # the pruned model is the user's own class (eager, like Torch-Pruning's), not a GraphModule: no fx call overhead
    assert type(fx_model) is type(model) and type(tp_model) is type(model)
    # ... with the same layers as Torch-Pruning's (every option and size) and tensors of the same shapes and
    # strides: the same kernels run, so batch-1 latency can differ only by noise
    assert repr(fx_model) == repr(tp_model)
    tp_state = tp_model.state_dict()
    for key, value in fx_model.state_dict().items():
        assert (value.shape, value.stride()) == (tp_state[key].shape, tp_state[key].stride()), key
    with torch.no_grad():
        assert fx_model(x).shape == tp_model(x).shape


def test_at_least_as_many_params_removed_as_torch_pruning():
    _check("mobilenet_v2", 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0", "regnet_x_400mf", "densenet121"])
def test_at_least_as_many_params_removed_as_torch_pruning_slow(name):
    _check(name, 64)
