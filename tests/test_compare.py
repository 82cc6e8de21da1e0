import copy
import math

import pytest
import torch
import torch.fx
from torch import nn

from fxopt import FxoptError
from fxopt.compare import Comparison, compare, sqnr_db

pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")


class Const(nn.Module):
    """Returns fixed outputs, whatever the input (lets a test choose the exact noise)."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def _noise_at(signal: torch.Tensor, db: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(signal.shape, generator=g, dtype=torch.float64)
    target = (signal.double() ** 2).sum() / 10 ** (db / 10)
    return (noise * torch.sqrt(target / (noise**2).sum())).float()


def test_sqnr_of_known_noise_level():
    torch.manual_seed(0)
    ref = torch.randn(64, 100)
    for db in (10.0, 30.0, 45.0):
        cand = ref + _noise_at(ref, db)
        result = compare(Const(ref), Const(cand), torch.zeros(1))
        assert result.sqnr_db == pytest.approx(db, abs=0.1)
        assert sqnr_db(ref, cand) == pytest.approx(db, abs=0.1)
        assert result.max_abs_error == pytest.approx(float((ref - cand).abs().max()), rel=1e-6)


def test_identical_models_are_infinite_sqnr_with_full_agreement():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5)).eval()
    result = compare(model, copy.deepcopy(model), torch.randn(4, 8))
    assert math.isinf(result.sqnr_db) and result.sqnr_db > 0
    assert result.max_abs_error == 0.0
    assert result.top1_agreement == 1.0
    assert [r["name"] for r in result.layers] == ["0", "2"]  # the ReLU ends layer 0's group
    assert "inf" in str(result)


def test_top1_agreement_counts_rows_with_same_argmax():
    ref = torch.zeros(10, 4)
    ref[torch.arange(10), torch.arange(10) % 4] = 5.0  # argmax = row % 4
    cand = ref.clone()
    cand[[1, 4, 7], 0] = 9.0  # rows 1, 7 (argmax 1, 3) change; row 4 (argmax 0) stays 0
    result = compare(Const(ref), Const(cand), torch.zeros(1))
    assert result.top1_agreement == pytest.approx(8 / 10)
    assert result.outputs[0]["top1"] == pytest.approx(0.8)
    # Not 2-D logits: no top-1
    assert compare(Const(ref[None]), Const(cand[None]), torch.zeros(1)).top1_agreement is None


def test_per_layer_names_match_between_eager_and_graph_module():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 3)).eval()
    cand = torch.fx.symbolic_trace(copy.deepcopy(ref))
    with torch.no_grad():
        cand.get_submodule("2").weight.add_(0.01)
    result = compare(ref, cand, torch.randn(16, 6))
    layers = {r["name"]: r for r in result.layers}
    assert set(layers) == {"0", "2", "3"}  # the ReLU "1" ends layer 0's group
    assert math.isinf(layers["0"]["sqnr_db"])
    assert 10 < layers["2"]["sqnr_db"] < 80
    assert result.worst_layer["name"] in {"2", "3"}
    assert result.rows == result.outputs + result.layers


def test_quantized_outputs_are_dequantized():
    torch.manual_seed(0)
    ref = torch.randn(8, 16)
    q = torch.quantize_per_tensor(ref, 0.05, 0, torch.qint8)
    result = compare(Const(ref), Const(q), torch.zeros(1))
    expected = 10 * math.log10(float((ref.double() ** 2).sum() / ((ref - q.dequantize()).double() ** 2).sum()))
    assert result.sqnr_db == pytest.approx(expected, abs=1e-6)
    assert result.max_abs_error <= 0.025 + 1e-6


def test_structured_outputs_and_batches_aggregate():
    class Two(nn.Module):
        def __init__(self, noise):
            super().__init__()
            self.noise = noise

        def forward(self, x):
            return {"a": x, "b": (x * 2 + self.noise, x.sum(dim=1))}

    b1, b2 = torch.randn(4, 3), torch.randn(4, 3)
    result = compare(Two(0.0), Two(0.1), [b1, b2])
    rows = {r["name"]: r for r in result.outputs}
    assert set(rows) == {"output['a']", "output['b'][0]", "output['b'][1]"}
    both = torch.cat([b1, b2]) * 2
    expected = 10 * math.log10(float((both.double() ** 2).sum() / (0.1**2 * both.numel())))
    assert rows["output['b'][0]"]["sqnr_db"] == pytest.approx(expected, abs=1e-3)
    assert result.sqnr_db == pytest.approx(expected, abs=1e-3)  # worst output
    assert result.batches == 2
    assert isinstance(result, Comparison)


def test_bad_inputs_raise_fxopt_errors():
    model = nn.Linear(3, 2)
    with pytest.raises(FxoptError, match="tensor, a tuple"):
        compare(model, model, "not a tensor")
    with pytest.raises(FxoptError, match="empty list"):
        compare(model, model, [])
    with pytest.raises(FxoptError, match="returns 1 tensors but the candidate returns 2"):
        compare(model, Const((torch.zeros(2), torch.zeros(2))), torch.randn(1, 3))


def test_layers_of_a_lowered_int8_model_line_up_with_the_fused_float_model():
    import torchvision

    import fxopt
    from fxopt import recipes

    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = fxopt.compile(model, recipes.fuse(), example_inputs=x)
    int8 = fxopt.compile(model, recipes.static_int8([x]), example_inputs=x, backend="x86")
    cmp = fxopt.compare(fused, int8, x)
    names = {row["name"] for row in cmp.layers}
    assert {"conv1", "layer1.0.conv1", "fc"} <= names
    assert all(row["sqnr_db"] > 15 for row in cmp.layers)


def _int8_vs_float(name: str):
    import torchvision

    from fxopt import compile as fx_compile
    from fxopt import recipes

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64))
    model.eval()
    calib = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    int8 = fx_compile(model, recipes.static_int8(calib, observer="minmax"), example_inputs=(calib[0][:1],),
                      backend="x86")
    return compare(model, int8, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("name,fused", [("resnet18", "layer4.0.conv1"), ("mobilenet_v3_large", "features.1.block.0.0")])
def test_fused_layers_line_up_with_the_end_of_their_group(name, fused):
    """The README's compare(model, int8, x): a conv with BN folded and ReLU fused is compared with the
    original's value after BN and ReLU (not its raw conv output: 2.7 dB on resnet18's layer4.0.conv1)."""
    result = _int8_vs_float(name)
    layers = {r["name"]: r for r in result.layers}
    assert fused in layers
    worst = result.worst_layer
    assert worst["sqnr_db"] > 12.0, worst  # every row compares like with like
    assert layers[fused]["sqnr_db"] > 15.0
    assert not any(n.endswith(("bn1", "bn2")) for n in layers)  # BatchNorms are inside their conv's group


class _DataDependentRoot(nn.Module):
    """torchvision's Conv2dNormActivation blocks under a root whose forward cannot be traced symbolically
    (like a detector's postprocessing), so compare reads the reference through hooks."""

    def __init__(self):
        from torchvision.ops.misc import Conv2dNormActivation

        super().__init__()
        self.features = nn.Sequential(
            Conv2dNormActivation(3, 8, 3),
            Conv2dNormActivation(8, 8, 3, activation_layer=nn.Hardswish),
            Conv2dNormActivation(8, 8, 1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.features(x)
        if y.sum() > -1e9:  # data-dependent control flow
            y = y * 1.0
        return self.head(y)


def test_untraceable_reference_reads_conv_norm_activation_at_the_end_of_its_group():
    """A fused conv+BN(+ReLU) against a reference read through hooks: the reference's value is taken after
    its BatchNorm and ReLU (it was the raw conv output: 2-3 dB for an exact float rewrite)."""
    import fxopt
    from fxopt import recipes
    from fxopt.layer_groups import sequential_group_ends

    torch.manual_seed(0)
    model = _DataDependentRoot().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 16, 16))
    model.eval()
    assert sequential_group_ends(model) == {
        "features.0.0": None, "features.0.2": "features.0.0",
        "features.1.0": None, "features.1.1": "features.1.0",  # Hardswish is not fused: its own layer
        "features.2.0": None, "features.2.2": "features.2.0"}
    x = torch.randn(2, 3, 16, 16)
    fused = fxopt.compile(model, recipes.fuse(), example_inputs=(x,))
    result = compare(model, fused, x)
    layers = {r["name"]: r["sqnr_db"] for r in result.layers}
    assert {"features.0.0", "features.1.0", "features.2.0", "head"} <= set(layers)
    assert min(layers.values()) > 80, layers  # BatchNorm folding is exact: every row agrees
