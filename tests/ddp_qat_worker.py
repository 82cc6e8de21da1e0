"""Two-rank DDP run of QAT fine-tuning on localhost (gloo, CPU); used by tests/test_finetune_ddp.py.

``python tests/ddp_qat_worker.py OUT_DIR`` spawns 2 processes with torch.multiprocessing, each trains the
same QAT model on its own data (a) with fxopt.finetune and (b) with an ordinary loop over a user-made
DistributedDataParallel wrapper (LSQ scales), and saves its state dicts to OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

STEPS = 3


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def _data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
    return [(torch.randn(4, 3, 8, 8, generator=g) * (1 + rank), torch.randint(0, 4, (4,), generator=g))
            for _ in range(STEPS)]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import fxopt
    from fxopt import recipes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = SmallNet().eval()
        example = (torch.randn(1, 3, 8, 8),)
        # (a) fxopt.finetune wraps in DDP itself
        qat = fxopt.compile(model, recipes.qat(freeze_bn_after=2), example_inputs=example)
        initial = {k: v.clone() for k, v in qat.state_dict().items()}
        fxopt.finetune(qat, _data(rank), steps=STEPS, teacher=model, lr=1e-2, progress=False)
        # (b) the prepared module is DDP-wrappable: an ordinary training loop, learnable (LSQ) scales
        lsq = fxopt.compile(model, recipes.qat(learnable=True), example_inputs=example)
        with torch.no_grad():
            lsq.train()(torch.randn(2, 3, 8, 8))  # initialise the scales (same input on every rank)
        ddp = nn.parallel.DistributedDataParallel(lsq)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-2)
        for x, y in _data(rank):
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({"initial": initial, "finetune": qat.state_dict(), "ddp": lsq.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(_worker, args=(2, _free_port(), sys.argv[1]), nprocs=2, join=True)
