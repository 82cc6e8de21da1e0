"""fxopt.save / fxopt.load of a whole int8 detector: SSDlite traces completely (transform, backbone, head,
box decoding and torchvision's nms), so its int8 model is one graph that calls ``torch.ops.torchvision.nms``.
torchvision's operator namespace is allowed in files (its kernels are tensor math); other libraries' are not."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import fxopt
from fxopt import UnsupportedError
from fxopt.io import graph_format
from tests.io.payload import tamper

pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions", "ignore:.*TypedStorage")


@pytest.fixture(scope="module")
def ssdlite_int8():
    from bench import detectors as D

    model = D.detector("ssdlite320_mobilenet_v3_large", train_steps=0)  # untrained: the format is what is tested
    calib = D.scenes(2, seed=1)
    return D.fxopt_int8(model, calib, "x86"), D.scenes(1, seed=5)


def _torchvision_ops(module: torch.nn.Module) -> set[str]:
    names = {graph_format.op_name(n.target) for n in getattr(module, "graph", torch.fx.Graph()).nodes
             if isinstance(n.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))}
    return {n for n in names if n.startswith("torch.ops.torchvision.")}


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_int8_ssdlite_round_trips_bit_identically(ssdlite_int8, suffix, tmp_path):
    q, images = ssdlite_int8
    assert fxopt.untraced(q) == []
    ops = set().union(*(_torchvision_ops(m) for m in q.modules()))
    assert "torch.ops.torchvision.nms" in ops  # before: "namespace 'torchvision'" refused at save
    fxopt.save(q, tmp_path / f"ssdlite{suffix}")
    loaded = fxopt.load(tmp_path / f"ssdlite{suffix}")
    with torch.no_grad():
        want, got = q(images)[0], loaded(images)[0]
    assert len(want["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(want[key], got[key])


def test_other_operator_libraries_stay_refused():
    assert graph_format.resolve_op("torch.ops.torchvision.roi_align.default") is torch.ops.torchvision.roi_align.default
    for name, message in {"torch.ops.image.read_file.default": "namespace 'image'",
                          "torch.ops.torchvision.no_such_op.default": "not registered"}.items():
        with pytest.raises(UnsupportedError, match=message):
            graph_format.resolve_op(name)


def test_tampered_detector_file_cannot_reach_an_image_reader(ssdlite_int8, tmp_path):
    q, _ = ssdlite_int8
    swapped = []

    def swap(obj):  # every place the stored payload names the operator
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
        for key, value in items:
            if value == "torch.ops.torchvision.nms":
                obj[key] = "torch.ops.image.read_file.default"
                swapped.append(key)
            else:
                swap(value)

    path = tamper(q, tmp_path / "evil.pt", swap)
    assert swapped
    with pytest.raises(UnsupportedError, match="namespace 'image'"):
        fxopt.load(path)
