"""A small fine-tuning loop for the compression tests (until ``fxopt.finetune`` lands from the QAT work)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxopt.compress import pruning_hook


def finetune(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 2, lr: float = 1e-3,
             batch: int = 64, seed: int = 0, prune_schedule: bool = False) -> torch.nn.Module:
    """Adam on cross-entropy; with ``prune_schedule`` the pruning masks advance after every step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    if prune_schedule:
        opt.register_step_post_hook(pruning_hook(model))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()
