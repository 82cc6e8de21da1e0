import io

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

from fxopt import meta
from fxopt.report import Report, report, tensor_bytes

pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")


def _row(rep: Report, name: str) -> dict:
    (row,) = [r for r in rep.rows if r["name"] == name]
    return row


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 3.0, 3.0]]))
        m[0].bias.zero_()
        m[2].weight.fill_(0.5)
        m[2].bias.copy_(torch.tensor([1.0, -1.0]))
    return m


def test_float_mlp_counts_by_hand():
    rep = report(_mlp())
    assert [r["name"] for r in rep.rows] == ["0", "2"]
    first, second = _row(rep, "0"), _row(rep, "2")
    assert (first["op"], first["dtype"]) == ("Linear", "float32")
    assert first["params"] == 15 and first["bytes"] == 60
    assert first["nonzero"] == 8  # weight: 1,2 | 1,1,1,1 | 3,3 ; bias all zero
    assert first["unique"] == 4  # weight values {0, 1, 2, 3}
    assert second["params"] == 8 and second["nonzero"] == 8 and second["unique"] == 1
    assert rep.total_params == 23 and rep.total_bytes == 92
    assert rep.sparsity == pytest.approx(1 - 16 / 23)
    text = str(rep)
    assert text.splitlines()[0].split()[:3] == ["name", "op", "dtype"]
    assert "total" in text and "92" in text and "sparsity: 30.43%" in text


def test_graph_module_gives_same_totals_and_output_shapes():
    m = _mlp()
    gm = torch.fx.symbolic_trace(m)
    rep = report(gm, torch.randn(5, 4))
    assert (rep.total_params, rep.total_bytes) == (23, 92)
    assert _row(rep, "0")["output shape"] == "5x3"
    assert _row(rep, "2")["output shape"] == "5x2"
    assert "output shape" in str(rep)


def test_batchnorm_statistics_count_in_bytes_not_params():
    m = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4))
    rep = report(m)
    conv, bn = _row(rep, "0"), _row(rep, "1")
    assert conv["params"] == 72 and conv["bytes"] == 288
    # weight + bias (8 floats) are params; running mean/var (8 floats) + num_batches_tracked (int64) are state
    assert bn["params"] == 8 and bn["bytes"] == 8 * 4 + 8 * 4 + 8
    assert bn["nonzero"] == 4  # weight ones, bias zeros


def test_shared_tensor_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 4, bias=False)
            self.dec = nn.Linear(4, 4, bias=False)
            self.dec.weight = self.enc.weight

        def forward(self, x):
            return self.dec(self.enc(x))

    rep = report(Tied())
    assert rep.total_params == 16 and rep.total_bytes == 64
    assert "weight shared with enc.weight" in _row(rep, "dec")["notes"]


def test_resnet18_bytes_close_to_torch_save_and_params_exact():
    m = torchvision.models.resnet18(weights=None)
    rep = report(m)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    assert rep.total_params == sum(p.numel() for p in m.parameters()) == 11_689_512
    assert abs(rep.total_bytes - len(buf.getvalue())) / len(buf.getvalue()) < 0.02
    import fxopt

    gm_rep = report(fxopt.compile(m))
    assert (gm_rep.total_bytes, gm_rep.total_params) == (rep.total_bytes, rep.total_params)


class _SelfDescribed(nn.Module):
    def __init__(self, qweight, bias=None):
        super().__init__()
        self.qweight, self.qbias = qweight, bias

    def fxopt_weights(self):
        out = {"weight": self.qweight}
        if self.qbias is not None:
            out["bias"] = self.qbias
        return out

    def forward(self, x):
        return x


def test_qint8_weights_count_one_byte_plus_qparams():
    w = torch.randn(10, 100)
    per_tensor = torch.quantize_per_tensor(w, 0.05, 0, torch.qint8)
    per_channel = torch.quantize_per_channel(w, torch.full((10,), 0.05), torch.zeros(10, dtype=torch.long), 0,
                                             torch.qint8)
    assert tensor_bytes(per_tensor) == 1000 + 16
    assert tensor_bytes(per_channel) == 1000 + 10 * 16
    rep = report(nn.Sequential(_SelfDescribed(per_channel, torch.zeros(10))))
    row = _row(rep, "0")
    assert row["dtype"] == "qint8/float32"
    assert row["params"] == 1010 and row["bytes"] == 1000 + 160 + 40
    assert row["nonzero"] == int((per_channel.int_repr() != 0).sum())
    assert row["unique"] == int(torch.unique(per_channel.int_repr()).numel())


def test_packed_weights_are_unpacked():
    qw = torch.quantize_per_tensor(torch.randn(6, 8), 0.1, 0, torch.qint8)
    bias = torch.randn(6)

    class Lowered(nn.Module):
        def __init__(self):
            super().__init__()
            self.packed = torch.ops.quantized.linear_prepack(qw, bias)
            self.conv_packed = torch.ops.quantized.conv2d_prepack(
                torch.quantize_per_tensor(torch.randn(4, 3, 3, 3), 0.1, 0, torch.qint8), None, [1, 1], [0, 0],
                [1, 1], 1)

    rep = report(Lowered())
    row = _row(rep, "(root)")
    assert row["params"] == 48 + 6 + 108
    assert row["bytes"] == (48 + 16) + 24 + (108 + 16)
    assert row["dtype"] == "qint8/float32"


def test_graph_root_packed_attribute_row_names_its_op_and_shape():
    qw = torch.quantize_per_channel(torch.randn(6, 8), torch.full((6,), 0.02), torch.zeros(6, dtype=torch.long),
                                    0, torch.qint8)
    root = nn.Module()
    root.fc_packed = torch.ops.quantized.linear_prepack(qw, torch.zeros(6))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    xq = graph.call_function(torch.quantize_per_tensor, (x, 0.1, 128, torch.quint8))
    packed = graph.get_attr("fc_packed")
    y = graph.call_function(torch.ops.quantized.linear, (xq, packed, 0.2, 64))
    graph.output(graph.call_method("dequantize", (y,)))
    gm = torch.fx.GraphModule(root, graph)
    rep = report(gm, torch.randn(3, 8))
    row = _row(rep, "fc_packed")
    assert "quantized.linear" in row["op"]
    assert row["output shape"] == "3x6"
    assert row["params"] == 54 and row["bytes"] == 48 + 6 * 16 + 24
    assert row["nonzero"] == int((qw.int_repr() != 0).sum())


def test_torch_ao_quantized_module_and_fp16():
    import torch.ao.nn.quantized as nnq

    q = nn.Sequential(nnq.Linear(8, 4))
    rep = report(q)
    row = _row(rep, "0")
    assert row["op"] == "Linear" and row["params"] == 32 + 4
    assert row["bytes"] == 32 + 16 + 16
    assert [r["name"] for r in rep.rows] == ["0"]  # its _packed_params submodule is not a second row

    half = _mlp().half()
    assert report(half).total_bytes == 46
    packed16 = nn.Module()
    packed16.p = torch.ops.quantized.linear_prepack_fp16(torch.randn(4, 8), None)
    row = _row(report(packed16), "(root)")
    assert (row["dtype"], row["bytes"]) == ("float16", 64)


def test_float_island_rows_and_unique_shows_clustering():
    m = _mlp()
    with torch.no_grad():
        m[2].weight.copy_(torch.tensor([[0.1, 0.2, 0.1], [0.2, 0.3, 0.3]]))
    gm = torch.fx.symbolic_trace(m, )
    meta.set_leaves(gm, [meta.LeafInfo("1", "ReLU", "data-dependent control flow")])
    rep = report(gm)
    island = _row(rep, "1")
    assert island["params"] == 0 and "float island" in island["notes"]
    assert "data-dependent control flow" in island["notes"]
    assert _row(rep, "2")["unique"] == 3
    assert "float island" in str(rep)


def test_report_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        report(torch.randn(3))


def test_bad_example_inputs_raise_fxopt_error():
    from fxopt import FxoptError

    with pytest.raises(FxoptError, match="example_inputs"):
        report(_mlp(), torch.randn(2, 7))


def test_export_graph_rows_name_aten_ops():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(m, (x,)).module()
    rep, eager = report(exported, x), report(m, x)
    assert (rep.total_params, rep.total_bytes) == (eager.total_params, eager.total_bytes) == (1396, 5656)
    assert _row(rep, "0")["op"] == "aten.conv2d.default"
    assert [r["output shape"] for r in rep.rows] == [r["output shape"] for r in eager.rows]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_int8_model_from_reference_flow_counts_one_byte_per_weight():
    # torch.ao's FX flow is used here only as a reference producer of int8 modules.
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    rep = report(convert_fx(prepared), x)
    conv, fc = _row(rep, "0"), _row(rep, "3")
    assert conv["dtype"] == "qint8/float32" and conv["output shape"] == "2x16x6x6"
    assert conv["params"] == 432 + 16
    assert conv["bytes"] == 432 + 16 * 16 + 16 * 4  # int8 weight, per-channel scale+zp, float bias
    assert fc["bytes"] == 5760 + 10 * 16 + 10 * 4
    float_weights = report(m).total_bytes
    assert rep.total_bytes < 0.3 * float_weights


def test_quantization_float_islands_are_listed():
    m = nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1), nn.Linear(4, 2))
    gm = torch.fx.symbolic_trace(m)
    nodes = {n.target: n.name for n in gm.graph.nodes if n.op == "call_module"}
    meta.set_float_islands(gm, [meta.FloatIsland(nodes["2"], "linear", "kept in float by the user"),
                                meta.FloatIsland(nodes["1"], "softmax", "no int8 kernel")])
    rep = report(gm)
    assert "float island" in _row(rep, "2")["notes"] and "kept in float" in _row(rep, "2")["notes"]
    softmax = _row(rep, "1")
    assert softmax["params"] == 0 and "no int8 kernel" in softmax["notes"] and softmax["op"] == "Softmax"
    assert "float island" not in _row(rep, "0")["notes"]
