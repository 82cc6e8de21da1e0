"""The demo's row registry, file sizes and chart (the full demo runs in tests/test_cli.py, --fast)."""

from __future__ import annotations

import torch
import torch.nn as nn

from fxopt import demo


def _ctx() -> demo.DemoContext:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 16, 16)
    y = torch.arange(8) % 10
    return demo.DemoContext(models={"cnn": demo.DigitsCNN().eval()}, train_x={"cnn": x}, train_y=y,
                            test_x={"cnn": x}, test_y=y, calibration={"cnn": [x]})


def test_rows_say_what_is_missing():
    assert demo.DemoRow("x", "eager", "cnn", lambda c: c.models["cnn"], requires=("recipes.no_such",)).missing() \
        == "recipe 'no_such' not in fxopt.recipes yet"
    assert demo.DemoRow("x", "tpu", "cnn", lambda c: c.models["cnn"], requires=("backend:tpu9000",)).missing() \
        == "backend 'tpu9000' not available"
    assert demo.DemoRow("x", "eager", "cnn", lambda c: c.models["cnn"], requires=("recipes.fuse", "backend:x86")
                        ).missing() is None
    present = [r for r in demo.ROWS if r.missing() is None]
    assert {(r.recipe, r.backend) for r in present} >= {("float", "eager"), ("static_int8", "x86"),
                                                          ("static_int8", "qnnpack"), ("fp16", "eager"),
                                                          ("dynamic_int8", "x86")}


def test_run_with_a_custom_row_list_builds_measures_and_reports_failures(monkeypatch, tmp_path):
    ctx = _ctx()
    monkeypatch.setattr(demo, "_context", lambda seed, fast=False: ctx)

    def broken(_ctx):
        raise RuntimeError("this recipe is broken\nsecond line")

    rows = [demo.ROWS[0], next(r for r in demo.ROWS if (r.recipe, r.backend) == ("static_int8", "x86")),
            demo.DemoRow("broken", "eager", "cnn", broken),
            demo.DemoRow("later", "eager", "cnn", broken, requires=("recipes.not_yet",))]
    result = demo.run(rows=rows, fast=True, png=str(tmp_path / "d.png"))
    by = {(r["recipe"], r["backend"]): r for r in result.rows}
    assert by[("float", "eager")]["speedup"] == 1.0
    int8 = by[("static_int8", "x86")]
    assert int8["bytes"] < by[("float", "eager")]["bytes"] / 3 and int8["native_file"]
    assert int8["zlib_bytes"] < int8["file_bytes"]
    assert by[("broken", "eager")]["error"] == "RuntimeError: this recipe is broken"
    assert result.skipped == [("later", "eager", "recipe 'not_yet' not in fxopt.recipes yet")]
    text = str(result)
    assert "failed: RuntimeError: this recipe is broken" in text and "skipped later (eager)" in text
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    assert "| cnn" in result.table("github")


def test_why_it_loses_only_when_slower_or_less_accurate():
    row = demo.DemoRow("fp16", "eager", "cnn", lambda c: None, loses="no fast fp16 here")
    assert demo._why(row, 99.0, 99.0, 1.2) == ""
    assert demo._why(row, 99.0, 99.0, 0.8) == "no fast fp16 here"
    assert demo._why(row, 96.0, 99.0, 1.2) == "accuracy -3.0 pts"


def test_artifact_bytes_native_and_fallback():
    raw, packed, native = demo.artifact_bytes(nn.Linear(64, 64))
    assert native and raw > 64 * 65 * 4 and 0 < packed <= raw

    # dynamic int8 LSTM: whether fxopt.save stores it natively or the demo falls back to a full pickle,
    # the size counted holds every int8 weight (a state dict of packed modules would be nearly empty)
    import fxopt
    from fxopt import recipes

    x = torch.randn(1, 16, 16)
    q = fxopt.compile(demo.DigitsLSTM(hidden=64).eval(), recipes.dynamic_int8(), example_inputs=(x,))
    raw, packed, _native = demo.artifact_bytes(q, torch.randn(1, 16, 16))
    assert raw >= fxopt.report(q).total_bytes and 0 < packed <= raw
