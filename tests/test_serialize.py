import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxopt import FxoptError, UnsupportedError, backends, meta
from fxopt import registry as registry_module
from fxopt.backends import Backend
from fxopt.io import check_pt2_archive, load, save

pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def test_pt2_round_trip_eager_module(tmp_path):
    model, x = _cnn(), torch.randn(2, 3, 16, 16)
    path = tmp_path / "model.pt2"
    save(model, path, example_inputs=(x,))
    loaded = load(path)
    assert isinstance(loaded, nn.Module)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)


def test_pt2_uses_shapes_recorded_on_a_graph_module(tmp_path):
    gm = torch.fx.symbolic_trace(_cnn())
    x = torch.randn(2, 3, 16, 16)
    ShapeProp(gm).propagate(x)
    save(gm, tmp_path / "gm.pt2")  # no example_inputs: built from tensor_meta
    torch.testing.assert_close(load(tmp_path / "gm.pt2")(x), gm(x), rtol=0, atol=1e-6)


def test_pt2_of_a_compiled_model_needs_no_inputs(tmp_path):
    import fxopt

    model, x = _cnn(), torch.randn(1, 3, 8, 8)
    compiled = fxopt.compile(model, example_inputs=(x,))
    save(compiled, tmp_path / "compiled.pt2")
    torch.testing.assert_close(load(tmp_path / "compiled.pt2")(x), model(x), rtol=0, atol=1e-6)


def test_pt2_without_inputs_says_what_to_pass(tmp_path):
    with pytest.raises(UnsupportedError, match="example_inputs"):
        save(_cnn(), tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


def test_pt_holds_weights_and_needs_the_architecture(tmp_path):
    model, x = _cnn(), torch.randn(1, 3, 8, 8)
    path = tmp_path / "weights.pt"
    save(model, path)
    with pytest.raises(UnsupportedError, match="model=MyModel"):
        load(path)
    skeleton = _cnn()
    with torch.no_grad():
        for p in skeleton.parameters():
            p.zero_()
    restored = load(path, model=skeleton)
    assert restored is not skeleton and float(skeleton[5].weight.detach().abs().sum()) == 0.0  # skeleton untouched
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    with pytest.raises(FxoptError, match="do not fit"):
        load(path, model=nn.Linear(2, 2))


def test_quantized_weights_round_trip_through_pt(tmp_path):
    import torch.ao.nn.quantized as nnq

    q = nn.Sequential(nnq.Linear(4, 3))
    save(q, tmp_path / "q.pt")
    restored = load(tmp_path / "q.pt", model=nn.Sequential(nnq.Linear(4, 3)))
    assert torch.equal(restored[0].weight().int_repr(), q[0].weight().int_repr())


class _Payload:
    """Unpickling this would create a file: the test checks that it never happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_load_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(str(marker))}, bad)
    with pytest.raises(FxoptError, match="never runs code"):
        load(bad, model=nn.Linear(1, 1))
    assert not marker.exists()
    # the same payload would have run with a plain pickle load: the test can fail
    with open(bad, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(UnsupportedError, match=r"use one of \.pt2, \.pt, \.onnx, \.xml"):
        save(_cnn(), tmp_path / "model.bin")
    with pytest.raises(UnsupportedError, match="extension 'none'"):
        load(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(tmp_path / "missing.pt2")


@pytest.fixture
def registry(monkeypatch):
    """Isolated backend registry: test backends come and go with the test."""
    monkeypatch.setattr(registry_module, "_REGISTERED", {})
    monkeypatch.setattr(registry_module, "_CACHE", {})
    monkeypatch.setattr(registry_module, "_BUILTIN", {})
    monkeypatch.setattr(registry_module, "_entry_points", lambda: {})
    return backends


class _Recorder(Backend):
    name = "recorder"
    saved: list = []

    def save(self, module, path):
        Path(path).write_text("saved by recorder")
        self.saved.append((type(module).__name__, Path(path).name))

    def load(self, path):
        return nn.Identity()


class _NoSaver(Backend):
    name = "nosaver"


def test_missing_onnx_or_openvino_backend_is_named(registry, tmp_path):
    with pytest.raises(UnsupportedError, match="needs the 'onnx' backend"):
        save(_cnn(), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedError, match="needs the 'openvino' backend"):
        save(_cnn(), tmp_path / "m.xml")
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(UnsupportedError, match="needs the 'onnx' backend"):
        load(tmp_path / "m.onnx")


def test_save_and_load_delegate_to_backends(registry, tmp_path):
    registry.register("recorder", _Recorder)
    registry.register("onnx", _Recorder)
    registry.register("nosaver", _NoSaver)
    _Recorder.saved.clear()

    marked = torch.fx.symbolic_trace(_cnn())
    meta.set_backend(marked, "recorder")
    save(marked, tmp_path / "a.pt2")  # the marker wins over the extension
    assert (tmp_path / "a.pt2").read_text() == "saved by recorder"
    save(_cnn(), tmp_path / "b.onnx")
    assert [name for _, name in _Recorder.saved] == ["a.pt2", "b.onnx"]
    assert isinstance(load(tmp_path / "b.onnx"), nn.Identity)

    # a backend without its own saver: the generic .pt path is used (a graph: stored whole, as plain data)
    plain = torch.fx.symbolic_trace(_cnn())
    meta.set_backend(plain, "nosaver")
    save(plain, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["modules"]["0"]["class"] == "torch.nn.Conv2d"

    gone = torch.fx.symbolic_trace(_cnn())
    meta.set_backend(gone, "not-installed")
    with pytest.raises(UnsupportedError, match="lowered by backend 'not-installed'"):
        save(gone, tmp_path / "d.pt")
    assert not os.path.exists(tmp_path / "d.pt")


def _tampered(src: Path, dst: Path, edit) -> Path:
    """Copy a .pt2 archive, passing each entry through ``edit(short_name, bytes) -> bytes``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename.split("/", 1)[1], zin.read(info.filename)))
    return dst


def _edit_json(target: str, change):
    def edit(short, data):
        if short != target:
            return data
        obj = json.loads(data)
        change(obj)
        return json.dumps(obj).encode()

    return edit


@pytest.fixture
def pt2_file(tmp_path):
    path = tmp_path / "good.pt2"
    save(nn.Sequential(nn.Linear(3, 2)), path, example_inputs=torch.randn(4, 3))
    check_pt2_archive(path)  # a file fxopt wrote passes the check
    return path


def test_pt2_with_guard_code_is_refused_before_anything_runs(pt2_file, tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch() is None"
    bad = _tampered(pt2_file, tmp_path / "bad.pt2",
                    _edit_json("models/model.json", lambda m: m.__setitem__("guards_code", [code])))
    with pytest.raises(FxoptError, match="shape-guard code"):
        load(bad)
    assert not marker.exists()
    # torch.export.load itself would run it: the check is what protects fxopt.load
    torch.export.load(bad).module()(torch.randn(4, 3))
    assert marker.exists()


def test_pt2_with_pickled_payload_foreign_target_or_expression_is_refused(pt2_file, tmp_path):
    def pickled(cfg):
        next(iter(cfg["config"].values()))["use_pickle"] = True

    def foreign_target(model):
        model["graph_module"]["graph"]["nodes"][0]["target"] = "builtins.eval"

    def expression(model):
        model["graph_module"]["graph"]["nodes"][0]["expr_str"] = "__import__('os').getcwd()"

    cases = [("data/weights/model_weights_config.json", pickled, "pickled Python object"),
             ("models/model.json", foreign_target, "not a torch operator"),
             ("models/model.json", expression, "not plain arithmetic")]
    for i, (entry, change, message) in enumerate(cases):
        bad = _tampered(pt2_file, tmp_path / f"bad{i}.pt2", _edit_json(entry, change))
        with pytest.raises(FxoptError, match=message):
            load(bad)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(FxoptError, match="not a zip file"):
        load(tmp_path / "junk.pt2")


def test_dynamic_shape_archive_passes_the_check(tmp_path):
    class Flat(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], -1).sum(1)

    program = torch.export.export(Flat(), (torch.randn(4, 3),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, tmp_path / "dyn.pt2")
    assert load(tmp_path / "dyn.pt2")(torch.randn(7, 3)).shape == (7,)


def test_corrupt_pt_file_raises_fxopt_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 definitely not a torch file")
    with pytest.raises(FxoptError, match="not a readable .pt file"):
        load(tmp_path / "junk.pt", model=nn.Linear(1, 1))
