"""fxopt.finetune and QAT graphs under torch.distributed: 2 ranks on localhost (gloo), bounded steps."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _worker_module():
    """tests/ddp_qat_worker.py, importable by name in the spawned processes (they inherit sys.path)."""
    here = str(Path(__file__).parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("ddp_qat_worker")


def test_two_ranks_end_with_identical_params_and_quant_scales(tmp_path):
    worker = _worker_module()
    mp.spawn(worker._worker, args=(2, worker._free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for run in ("finetune", "ddp"):
        assert r0[run].keys() == r1[run].keys()
        for key, value in r0[run].items():
            if run == "ddp" and ".bn." in key:
                continue  # a bare DDP loop leaves each rank's last BatchNorm update (finetune broadcasts them)
            assert torch.equal(value, r1[run][key]), f"{run}: {key} differs between ranks"
    state = r0["finetune"]
    scales = [k for k in state if k.endswith(".scale")]
    assert len(scales) >= 6  # activation and weight fake quantizers
    # training happened: weights, BN statistics and activation ranges all moved from their initial values
    moved = [k for k in state if not torch.equal(state[k], r0["initial"][k])]
    assert any(k.endswith("conv.weight") for k in moved)
    assert any(k.endswith("bn.running_mean") for k in moved)
    assert any(k.startswith("fxopt_obs") and k.endswith(".scale") for k in moved)
    # LSQ scales are parameters that DDP kept in sync
    assert any(k.startswith("fxopt_obs") and k.endswith(".scale") for k in r0["ddp"])
