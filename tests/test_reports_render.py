"""Report / Comparison rendered as markdown and HTML; the per-layer SQNR chart; fxopt.testing; recipes by name."""

from __future__ import annotations

import html.parser

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import recipe_args, recipes
from fxopt.recipe_args import UsageError


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


class _Cells(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        if data.strip():
            self.cells.append(data.strip())


def test_report_markdown_and_html_hold_the_same_rows_and_totals():
    rep = fxopt.report(_cnn())
    md = rep.to_markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| name") and set(lines[1]) <= set("|-: ")
    assert len([line for line in lines if line.startswith("|")]) == 2 + len(rep.rows) + 1  # header, rule, rows, total
    assert f"{rep.total_bytes:,}" in md and "sparsity:" in md
    page = _Cells()
    page.feed(rep.to_html())
    assert page.tags.count("tr") == 1 + len(rep.rows) + 1 and "table" in page.tags
    assert "total" in page.cells and f"{rep.total_bytes:,}" in page.cells


def test_html_escapes_cell_text():
    rep = fxopt.report(_cnn())
    rep.rows[0]["notes"] = "<script>alert(1)</script>"
    assert "<script>" not in rep.to_html() and "&lt;script&gt;" in rep.to_html()


def test_comparison_markdown_html_and_sqnr_png(tmp_path):
    model = _cnn()
    x = torch.randn(4, 3, 12, 12)
    fused = fxopt.compile(model, recipes.fuse(), example_inputs=(x[:1],))
    int8 = fxopt.compile(model, recipes.static_int8([x]), example_inputs=(x[:1],), backend="x86")
    cmp = fxopt.compare(fused, int8, x)
    assert cmp.layers, "fused float and int8 share layer names"
    md = cmp.to_markdown()
    assert md.splitlines()[0].startswith("| name") and "output" in md and "-- layers --" in md
    page = _Cells()
    page.feed(cmp.to_html())
    assert f"{cmp.sqnr_db:.2f}" in page.cells
    png = cmp.plot_sqnr(tmp_path / "sqnr.png")
    data = png.read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 5_000
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] >= 400 and img.shape[1] >= 600  # readable size


def test_sqnr_chart_without_shared_layers_says_why(tmp_path):
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    cmp = fxopt.compare(a, b, torch.randn(2, 3))
    with pytest.raises(fxopt.FxoptError, match="no per-layer results"):
        cmp.plot_sqnr(tmp_path / "x.png")


def test_recipes_by_name_parse_build_and_errors():
    assert recipe_args.parse("fuse, static_int8") == [("fuse", {}), ("static_int8", {})]
    assert recipe_args.parse("static_int8:observer='minmax':per_channel=False") == [
        ("static_int8", {"observer": "minmax", "per_channel": False})]
    with pytest.raises(UsageError, match="unknown recipe 'nope'; valid recipes: .*fuse"):
        recipe_args.parse("fuse,nope")
    with pytest.raises(UsageError, match="not key=value"):
        recipe_args.parse("fuse:oops")
    with pytest.raises(UsageError, match="needs calibration data"):
        recipe_args.build("static_int8")
    with pytest.raises(UsageError, match="has no option 'colour'"):
        recipe_args.build("fuse", {"colour": 1})
    passes = recipe_args.build("static_int8", {"observer": "minmax"}, calibration=[torch.randn(1, 3)],
                               backend="qnnpack")
    names = [p.name for p in passes]
    assert names == [p.name for p in recipes.static_int8([torch.randn(1, 3)])]
    stubs = next(p for p in passes if p.name == "insert-quant-stubs")
    assert stubs.backend in ("qnnpack", None)
    assert recipe_args.targets_backend("static_int8") and not recipe_args.targets_backend("fuse")


def test_compile_recipes_lowers_prepared_graphs_and_says_when_nothing_to_lower():
    model = _cnn()
    x = torch.randn(2, 3, 12, 12)
    int8, note = recipe_args.compile_recipes(model, [("static_int8", {})], "x86", x[:1], [x])
    assert note == "" and fxopt.meta.backend_of(int8) == "x86"
    fp16, note = recipe_args.compile_recipes(model, [("fp16", {})], "x86", x[:1])
    assert "nothing for backend 'x86' to lower" in note
    with torch.no_grad():
        torch.testing.assert_close(fp16(x), model(x), rtol=1e-2, atol=1e-2)


def test_check_latency_records_extra_info_and_checks_sqnr():
    from fxopt.testing import check_latency

    class FakeBenchmark:  # what pytest-benchmark's fixture offers: callable + extra_info
        def __init__(self, disabled):
            self.extra_info, self.disabled, self.calls = {}, disabled, 0

        def __call__(self, fn, *args):
            self.calls += 1
            return fn(*args)

    model = _cnn()
    x = torch.randn(1, 3, 12, 12)
    int8 = fxopt.compile(model, recipes.static_int8([torch.randn(4, 3, 12, 12)]), example_inputs=(x,), backend="x86")
    bench = FakeBenchmark(disabled=False)
    info = check_latency(bench, int8, (x,), baseline=model, min_sqnr=15, rounds=1, iters=2, threads=1)
    assert bench.calls == 1 and bench.extra_info == info
    assert info["bytes"] == fxopt.report(int8).total_bytes < info["baseline_bytes"]
    assert info["sqnr_db"] > 15 and info["speedup"] > 0 and info["threads"] == 1
    with pytest.raises(AssertionError, match="below min_sqnr=200"):
        check_latency(FakeBenchmark(disabled=True), int8, (x,), baseline=model, min_sqnr=200)
    disabled = FakeBenchmark(disabled=True)
    info = check_latency(disabled, int8, (x,), baseline=model, min_speedup=1e9)  # not timed when disabled
    assert "speedup" not in info
    with pytest.raises(ValueError, match="needs baseline"):
        check_latency(disabled, int8, (x,), min_speedup=2)


@pytest.mark.benchmark(max_time=0.01, min_rounds=1, warmup=False)
def test_check_latency_with_the_real_fixture(fxopt_latency):
    model = _cnn()
    info = fxopt_latency(model, torch.randn(1, 3, 12, 12))
    assert info["bytes"] == fxopt.report(model).total_bytes


from fxopt.testing import fxopt_latency  # noqa: E402,F401  (the fixture, as users enable it)
