"""The ``fxopt`` console script, run as a user runs it: in a subprocess, checking output and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fxopt

MODEL_FILE = textwrap.dedent("""
    import torch
    import torch.nn as nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 4))

    def not_a_model():
        return 42
""")
SHAPE = "1,3,16,16"


def fxopt_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fxopt.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny.py"
    path.write_text(MODEL_FILE)
    return path


def test_passes_lists_passes_recipes_and_backends():
    out = fxopt_cli("passes")
    assert out.returncode == 0, out.stderr
    from fxopt import backends, recipes

    assert "FoldBatchNorm (fold-bn)" in out.stdout
    for name in recipes.__all__:
        assert name in out.stdout
    for name in backends.available():
        assert name in out.stdout


def test_optimize_static_int8_from_npz_saves_a_loadable_int8_model(model_file, tmp_path):
    data = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype("float32")
    np.savez(tmp_path / "calib.npz", x=data)
    out_path = tmp_path / "tiny_int8.pt"
    out = fxopt_cli("optimize", f"{model_file}:make", "--recipe", "static_int8", "--backend", "x86",
                    "--calib", f"npz:{tmp_path / 'calib.npz'}", "--input-shape", SHAPE, "-o", str(out_path),
                    "--rounds", "1", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "before" in out.stdout and "after" in out.stdout and "SQNR vs before" in out.stdout
    assert "pass calibrate: modified=True {'batches': 8," in out.stdout  # --calib-batches 8 of batch 1
    assert out.stderr.strip() == "" or "optimizing" not in out.stderr  # --quiet: no status lines
    loaded = fxopt.load(out_path)
    assert fxopt.meta.backend_of(loaded) == "x86"
    x = torch.from_numpy(data[:8])
    cmp = fxopt.compare(_tiny(model_file).eval(), loaded, x)  # make() is seeded: the same float weights
    assert cmp.sqnr_db > 20, cmp


def test_optimize_fuse_to_pt2_and_inspect_the_artifact(model_file, tmp_path):
    out_path = tmp_path / "tiny_fused.pt2"
    out = fxopt_cli("optimize", f"{model_file}:make", "--recipe", "fuse", "--input-shape", SHAPE,
                    "-o", str(out_path), "--rounds", "1", "--layers", "--format", "markdown")
    assert out.returncode == 0, out.stderr
    assert "| params" in out.stdout  # markdown table
    assert "pass fold-bn: modified=True" in out.stdout
    assert "SQNR vs before (dB)" in out.stdout
    sqnr_line = next(line for line in out.stdout.splitlines() if "SQNR" in line)
    assert float(sqnr_line.split("|")[3]) > 80  # fusion does not change numerics
    out = fxopt_cli("inspect", str(out_path), "--input-shape", SHAPE)
    assert out.returncode == 0, out.stderr
    assert "per-backend support" in out.stdout


def test_inspect_shows_support_islands_params_flops_and_sensitivity(model_file):
    out = fxopt_cli("inspect", f"{model_file}:make", "--input-shape", SHAPE, "--sensitivity")
    assert out.returncode == 0, out.stderr
    params = sum(p.numel() for p in _tiny(model_file).parameters())
    assert f"parameters: {params:,}" in out.stdout
    # conv 3->8 at 16x16 with 3x3: 2*3*9*8*256 FLOPs, conv 8->8: 2*8*9*8*256, linear 2*8*4
    flops = 2 * 3 * 9 * 8 * 256 + 2 * 8 * 9 * 8 * 256 + 2 * 8 * 4
    assert f"FLOPs: {flops:,}" in out.stdout
    from fxopt import backends

    header = next(line for line in out.stdout.splitlines() if line.startswith("op ") and "count" in line)
    for name in ("x86", "qnnpack"):
        if name in backends.available():
            assert name in header
    conv_row = next(line for line in out.stdout.splitlines() if line.startswith("conv2d"))
    assert conv_row.split()[1] == "2" and "int8" in conv_row
    assert "float islands" in out.stdout and "untraced: none" in out.stdout
    # the ranking: every int8 compute op (two convs, the linear), each with the output SQNR it leaves alone
    ranking = out.stdout.split("== sensitivity")[1].splitlines()
    rows = [line.split() for line in ranking if line.split()[:1] and line.split()[-1].replace(".", "").isdigit()]
    assert sorted(r[1] for r in rows) == ["conv2d", "conv2d", "linear"], ranking
    sqnrs = [float(r[-1]) for r in rows]
    assert sqnrs == sorted(sqnrs) and all(s > 10 for s in sqnrs)


def test_bench_prints_an_interleaved_table_for_recipes_x_backends(model_file):
    out = fxopt_cli("bench", f"{model_file}:make", "--recipes", "fuse,static_int8", "--backends", "x86,qnnpack",
                    "--input-shape", SHAPE, "--rounds", "2", "--iters", "2", "--warmup", "1", "--threads", "1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    names = [line.split()[0] for line in lines[3:] if line.strip()]
    # fuse targets no backend: one eager variant; static int8 once per backend
    assert names == ["float", "fuse", "static_int8", "static_int8"], out.stdout
    assert "static_int8 @ x86" in out.stdout and "static_int8 @ qnnpack" in out.stdout
    assert "median ms" in lines[1] and "p90 ms" in lines[1] and "FPS" in lines[1] and "vs float" in lines[1]
    float_row = lines[3].split()
    assert float_row[4] == "1.00x"


@pytest.mark.parametrize("args,needle", [
    (["optimize", "{model}", "--recipe", "no_such_recipe", "-o", "x.pt", "--input-shape", SHAPE],
     "unknown recipe 'no_such_recipe'; valid recipes: "),
    (["optimize", "{model}", "--recipe", "fuse", "--backend", "tpu9000", "-o", "x.pt", "--input-shape", SHAPE],
     "unknown backend 'tpu9000'; valid backends: "),
    (["inspect", "resnet18"], "cannot tell what model 'resnet18' is; MODEL is one of: torchvision:NAME"),
    (["inspect", "torchvision:resnet9000"], "unknown torchvision model 'resnet9000'"),
    (["inspect", "{dir}/tiny.py:missing", "--input-shape", SHAPE], "has no function 'missing'; it defines: make"),
    (["inspect", "{dir}/tiny.py:not_a_model", "--input-shape", SHAPE], "returned int, not a torch.nn.Module"),
    (["optimize", "{model}", "--recipe", "static_int8", "--backend", "x86", "--calib", "folder:/no/such/dir",
      "-o", "x.pt", "--input-shape", SHAPE], "calibration folder '/no/such/dir' does not exist"),
    (["optimize", "{model}", "--recipe", "static_int8", "--calib", "csv:data.csv", "-o", "x.pt",
      "--input-shape", SHAPE], "is not one of: random, folder:PATH"),
    (["bench", "{model}", "--recipes", "fuse", "--input-shape", "1,a,3"], "is not a list of positive integers"),
    (["optimize", "{model}", "--recipe", "fuse", "-o", "out.bin", "--input-shape", SHAPE], "use one of .pt"),
    (["optimize", "{model}", "--recipe", "fuse", "-o", "out.pt"], "give --input-shape"),
])
def test_usage_errors_exit_2_with_a_clear_message(model_file, tmp_path, args, needle):
    args = [a.format(model=f"{model_file}:make", dir=model_file.parent) for a in args]
    out = fxopt_cli(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_unreadable_calibration_images_and_empty_folder_exit_2(model_file, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    common = ["optimize", f"{model_file}:make", "--recipe", "static_int8", "--backend", "x86", "-o", "x.pt",
              "--input-shape", SHAPE]
    out = fxopt_cli(*common, "--calib", f"folder:{tmp_path / 'empty'}", cwd=tmp_path)
    assert out.returncode == 2 and "holds no images" in out.stderr
    out = fxopt_cli(*common, "--calib", f"folder:{tmp_path / 'bad'}", cwd=tmp_path)
    assert out.returncode == 2 and "cannot read calibration image" in out.stderr and "broken.png" in out.stderr


def test_argparse_usage_errors_exit_2():
    out = fxopt_cli()
    assert out.returncode == 2 and "COMMAND" in out.stderr
    out = fxopt_cli("optimize", "torchvision:resnet18")
    assert out.returncode == 2 and "--recipe" in out.stderr


def test_summary_still_works_for_torchvision_names():
    out = fxopt_cli("summary", "resnet18", "--size", "32")
    assert out.returncode == 0, out.stderr
    assert "graph after recipe 'fuse'" in out.stdout and "pass fold-bn: modified=True" in out.stdout
    assert "sparsity:" in out.stdout


def test_demo_fast_prints_the_table_and_writes_the_png(tmp_path):
    png = tmp_path / "demo.png"
    out = fxopt_cli("demo", "--fast", "--quiet", "--png", str(png))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = lines[0]
    for col in ("recipe", "backend", "test acc %", "bytes", "zlib bytes", "b1 median ms", "FPS", "speed-up"):
        assert col in header
    rows = [line.split() for line in lines[2:] if line.startswith(("cnn", "lstm"))]
    kinds = {(r[0], r[1], r[2]) for r in rows}
    assert {("cnn", "float", "eager"), ("cnn", "static_int8", "x86"), ("cnn", "static_int8", "qnnpack"),
            ("cnn", "fp16", "eager"), ("lstm", "dynamic_int8", "x86")} <= kinds
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def _tiny(model_file: Path) -> torch.nn.Module:
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_model", model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make()
