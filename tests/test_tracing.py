"""fxopt.trace: symbolic, auto (leaves + specialization on example inputs), export; metadata; errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fxopt
from fxopt import meta


def assert_same(a, b):
    """Same structure (tuple/list/dict/namedtuple) and identical tensors."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on values: cannot be traced symbolically
            return x * 2
        return x - 1


class WithBranchyChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.branchy = DataDependent()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.branchy(torch.relu(self.conv(x)))
        return {"logits": self.fc(y.mean((2, 3))), "features": (y, y.sum())}


class Flags(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, flag=False, *, scale=1.0):
        y = self.fc(x)
        if flag:
            y = -y
        return y * scale


def test_symbolic_traces_plain_model_and_keeps_structure():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxopt.trace(model, (x,), mode="symbolic")
    assert isinstance(gm, torch.fx.GraphModule)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    assert fxopt.untraced(gm) == []
    assert gm.training is False
    assert_same(gm(x), model(x))


def test_symbolic_fails_on_data_dependent_child_naming_it():
    with pytest.raises(fxopt.TraceError) as info:
        fxopt.trace(WithBranchyChild(), mode="symbolic")
    assert info.value.module == "branchy"
    assert info.value.location is not None and "test_tracing.py" in info.value.location
    assert 'mode="auto"' in str(info.value)


def test_symbolic_leaf_modules_by_type_name_and_instance():
    model = WithBranchyChild()
    for leaf in (DataDependent, "branchy", model.branchy):
        gm = fxopt.trace(model, mode="symbolic", leaf_modules=[leaf])
        assert fxopt.untraced(gm) == ["branchy"]
        assert meta.leaves(gm)[0].requested
    x = torch.randn(1, 3, 6, 6)
    assert_same(gm(x), model(x))


def test_auto_makes_only_the_failing_child_a_leaf():
    model = WithBranchyChild().eval()
    x = torch.randn(2, 3, 6, 6)
    for inputs in ((x,), None):
        gm = fxopt.trace(model, inputs)
        assert fxopt.untraced(gm) == ["branchy"]
        (info,) = meta.leaves(gm)
        assert info.type_name == "DataDependent" and not info.requested
        assert "control flow" in info.reason and "test_tracing.py" in info.reason
        assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"conv", "branchy", "fc"}
        assert_same(gm(x), model(x))
        assert_same(gm(-x), model(-x))  # the leaf keeps its Python control flow


def test_defaults_not_passed_are_constants():
    model = Flags()
    x = torch.randn(3, 4)
    gm = fxopt.trace(model, (x,), mode="symbolic")
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "flag", "scale"]
    assert_same(gm(x), model(x))
    assert_same(gm(x, False), model(x, False))
    assert not any(n.op == "call_function" and n.target is torch.neg for n in gm.graph.nodes)
    with pytest.raises(AssertionError, match="specialized"):
        gm(x, True)  # torch.fx guards the specialized constant


def test_trace_does_not_mutate_model_and_keeps_training_flag():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model.train()
    before = copy.deepcopy(model.state_dict())
    gm = fxopt.trace(model, (torch.randn(2, 3, 8, 8),))
    assert gm.training is True
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics untouched by the example run
    gm.get_submodule("0").weight.data.zero_()
    assert not torch.equal(model[0].weight, gm.get_submodule("0").weight)  # no shared storage


def test_shape_metadata_on_every_node():
    model = WithBranchyChild().eval()
    gm = fxopt.trace(model, (torch.randn(2, 3, 6, 6),))
    nodes = {n.name: n for n in gm.graph.nodes}
    assert meta.shape_of(nodes["conv"]) == torch.Size([2, 4, 4, 4])
    assert meta.shape_of(nodes["branchy"]) == torch.Size([2, 4, 4, 4])
    assert meta.dtype_of(nodes["fc"]) == torch.float32
    for node in gm.graph.nodes:
        assert meta.tensor_meta(node) is not None, node.name
    symbolic = fxopt.trace(nn.Linear(4, 2), (torch.randn(3, 4),), mode="symbolic")
    assert all(meta.shape_of(n) is not None for n in symbolic.graph.nodes)


def test_export_mode_returns_aten_graph():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 3, 6, 6)
    model(x)
    model.eval()
    gm = fxopt.trace(model, (x,), mode="export")
    assert isinstance(gm, torch.fx.GraphModule)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert any(t.startswith("aten.") for t in targets)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)
    with pytest.raises(fxopt.TraceError, match="example_inputs"):
        fxopt.trace(model, mode="export")
    with pytest.raises(fxopt.TraceError, match="leaf_modules"):
        fxopt.trace(model, (x,), mode="export", leaf_modules=[nn.ReLU])


def test_export_failure_is_trace_error():
    class Bad(nn.Module):
        def forward(self, x):
            return x * int(x.sum().item() > 0.5) if x.sum().item() > 0 else x

    with pytest.raises(fxopt.TraceError, match="torch.export"):
        fxopt.trace(Bad(), (torch.randn(3),), mode="export")


def test_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        fxopt.trace(lambda x: x)
    with pytest.raises(ValueError, match="auto, symbolic, export"):
        fxopt.trace(nn.ReLU(), mode="jit")
    with pytest.raises(fxopt.TraceError, match="not a submodule"):
        fxopt.trace(WithBranchyChild(), leaf_modules=["nope"])


def test_root_failure_without_examples_names_root_and_line():
    class RootLoop(nn.Module):
        def forward(self, xs):
            return sum(x * 2 for x in xs)

    with pytest.raises(fxopt.TraceError) as info:
        fxopt.trace(RootLoop())
    assert info.value.module == ""
    assert "example_inputs" in str(info.value) and "test_tracing.py" in info.value.location
    xs = [torch.randn(2), torch.randn(2)]
    gm = fxopt.trace(RootLoop(), (xs,))  # specialized on the example: two inputs
    assert_same(gm(xs), RootLoop()(xs))
    assert any("length 2" in note for note in meta.trace_notes(gm))


# ----------------------------------------------------------------------------------------------
# torchvision


def _classifier(name):
    model = torchvision.models.get_model(name, weights=None)
    if name.startswith(("inception", "googlenet")):
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    return model.eval()


def _image_size(name):
    if name.startswith("inception"):
        return 299
    if name.startswith(("vit", "swin", "maxvit")):
        return 224
    return 64


def check_classifier(name):
    torch.manual_seed(0)
    model = _classifier(name)
    size = _image_size(name)
    x = torch.randn(1, 3, size, size)
    gm = fxopt.trace(model, (x,))
    assert fxopt.untraced(gm) == [], meta.leaves(gm)
    with torch.no_grad():
        assert_same(gm(x), model(x))


FAST_ZOO = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_0", "googlenet", "efficientnet_b0"]


@pytest.mark.parametrize("name", FAST_ZOO)
def test_classification_zoo_fast(name):
    check_classifier(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_classification_zoo_full(name):
    check_classifier(name)


def check_detector(name, size):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
    img = torch.rand(3, size, size)
    with pytest.raises(fxopt.TraceError):
        fxopt.trace(model, mode="symbolic")
    gm = fxopt.trace(model, ([img],))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "backbone" not in fxopt.untraced(gm)
    assert sum(t.startswith("backbone.") for t in targets) > 20  # the backbone is real graph nodes
    assert all(not q.startswith("backbone") for q in fxopt.untraced(gm))
    assert meta.trace_notes(gm), "specializations on the example inputs are recorded"
    with torch.no_grad():
        assert_same(gm([img]), model([img]))
    return gm, model


def test_detection_ssdlite():
    gm, model = check_detector("ssdlite320_mobilenet_v3_large", 96)
    leaves = {info.qualname: info for info in meta.leaves(gm)}
    # the model's own names (root method, module.method); the graph's attribute only in the details
    assert fxopt.untraced(gm) == ["postprocess_detections", "transform.postprocess"]
    assert leaves["postprocess_detections"].type_name == "SSD.postprocess_detections"
    assert leaves["transform.postprocess"].attribute == "fxopt_island_transform_postprocess"
    assert callable(getattr(model.get_submodule("transform"), "postprocess"))
    assert callable(getattr(model, "postprocess_detections"))
    check_untraced_names(gm, model)
    assert any("iteration over images specialized to length 1" in n for n in meta.trace_notes(gm))
    img = torch.rand(3, 96, 96)  # same size, other pixels: the postprocess island keeps its control flow
    copied = copy.deepcopy(gm)  # passes work on copies: islands must survive it
    with torch.no_grad():
        assert_same(gm([img]), model([img]))
        assert_same(copied([img]), model([img]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn"])
def test_detection_slow(name):
    gm, model = check_detector(name, 128)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert any(t.startswith("backbone.fpn.") for t in targets)
    check_untraced_names(gm, model)


def check_untraced_names(gm, model):
    """Every name fxopt.untraced lists is found in the model: a submodule, or a method of one."""
    for name in fxopt.untraced(gm):
        assert not name.startswith("fxopt_"), name
        owner, _, method = name.rpartition(".")
        if name in dict(model.named_modules()):
            continue
        assert callable(getattr(model.get_submodule(owner), method)), name
    for info in meta.leaves(gm):
        if info.attribute is not None:  # where the graph calls it
            assert info.attribute in {n.target for n in gm.graph.nodes if n.op == "call_module"}


@pytest.mark.slow
def test_untraced_names_fasterrcnn():
    """Issue 7.7: the detector's islands by the model's names, not fxopt_island_* (about 40 s here)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                         weights_backbone=None).eval()
    img = torch.rand(3, 64, 64)
    gm = fxopt.trace(model, ([img],))
    assert fxopt.untraced(gm) == ["rpn", "roi_heads", "transform.postprocess"]
    info = {i.qualname: i for i in meta.leaves(gm)}["transform.postprocess"]
    assert info.type_name == "GeneralizedRCNNTransform.postprocess"
    assert info.attribute == "fxopt_island_transform_postprocess"
    check_untraced_names(gm, model)
    with torch.no_grad():
        assert_same(gm([img]), model([img]))


def test_auto_reports_a_graph_that_diverges_from_eager(caplog):
    class IsTensor(nn.Module):
        def forward(self, x):
            return x + 1 if isinstance(x, torch.Tensor) else x - 1  # a Proxy is no Tensor

    x = torch.randn(3)
    with caplog.at_level("WARNING", logger="fxopt.tracing"):
        gm = fxopt.trace(IsTensor(), (x,))
    assert any("differ" in note for note in meta.trace_notes(gm))
    assert "differ" in caplog.text
    assert meta.trace_notes(fxopt.trace(WithBranchyChild().eval(), (torch.randn(1, 3, 6, 6),))) == []


def test_model_failing_on_examples_is_a_trace_error():
    with pytest.raises(fxopt.TraceError, match="raises on example_inputs"):
        fxopt.trace(nn.Linear(4, 2), (torch.randn(3, 5),))
