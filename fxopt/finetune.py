"""``fxopt.finetune``: the short training run after QAT preparation or compression, with optional distillation.

A plain PyTorch loop with the parts people get wrong written once:

* ``data`` is any iterable of ``(inputs, target)`` pairs (``inputs``: a Tensor, a tuple of positional inputs
  or a dict of keyword inputs) or of bare inputs when a ``teacher`` supplies the targets;
* distillation (Hinton et al. 2015): ``alpha * T² * KL(softmax(teacher / T) ‖ softmax(student / T)) +
  (1 - alpha) * loss(student, target)``; the teacher runs in eval mode without gradients;
* a progress bar (tqdm; off when stderr is not a terminal) with the running loss and accuracy;
* deterministic with ``seed`` (the global RNG is forked, so the caller's random state is left alone);
* under ``torch.distributed`` (a process group is initialised, world size > 1) the module is wrapped in
  ``DistributedDataParallel``: gradients are averaged across ranks, every rank takes the same number of
  steps, and the buffers (BatchNorm statistics, fake-quant ranges) are broadcast from rank 0 at the end,
  so all ranks hold the same model. Each rank reads its own ``data`` (e.g. a DataLoader with a
  ``DistributedSampler``).

The module is trained in place and returned, in the train/eval mode it came in.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import FxoptError
from .quant.nn.qat import is_distributed

__all__ = ["finetune", "distillation_loss"]

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` over the class dim (1), batch mean."""
    t = float(temperature)
    log_p = F.log_softmax(student.float() / t, dim=1)
    log_q = F.log_softmax(teacher.float() / t, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


def finetune(
    module: nn.Module,
    data: Iterable[Any],
    *,
    steps: int | None = None,
    epochs: int = 1,
    optimizer: torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    loss: LossFn | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    lr: float = 1e-4,
    seed: int | None = 0,
    progress: bool | None = None,
) -> nn.Module:
    """Train ``module`` on ``data`` for ``epochs`` passes (or exactly ``steps`` optimizer steps).

    ``optimizer``: an optimizer over ``module``'s parameters, or a factory ``params -> optimizer``;
    default ``Adam(lr=lr)``. ``loss(output, target)``: default cross-entropy for integer class targets,
    MSE for float targets. ``teacher``: a model to distill from (e.g. the float model), weighted by
    ``alpha`` (1.0 = distillation only; items may then be bare inputs). ``seed=None`` leaves the RNG
    alone. ``progress=None`` shows a bar only on a terminal (and only on rank 0).
    """
    if data is None:
        raise FxoptError("finetune got no data: pass an iterable of (inputs, target) batches, e.g. a DataLoader")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise FxoptError(f"steps must be a positive int, got {steps!r}")
    if steps is None and (not isinstance(epochs, int) or epochs < 1):
        raise FxoptError(f"epochs must be a positive int, got {epochs!r}")
    if not 0.0 <= alpha <= 1.0:
        raise FxoptError(f"alpha must be in [0, 1] (weight of the distillation term), got {alpha}")
    if temperature <= 0:
        raise FxoptError(f"temperature must be > 0, got {temperature}")
    if teacher is None:
        alpha = 0.0  # no teacher: labels only
    distributed = is_distributed()
    model = module
    if distributed and not isinstance(module, nn.parallel.DistributedDataParallel):
        model = nn.parallel.DistributedDataParallel(module)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    steps = _agree_on_steps(data, steps, epochs, distributed)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FxoptError("the module has no trainable parameters (requires_grad=False everywhere)")
    if optimizer is None:
        opt = torch.optim.Adam(params, lr=lr)
    elif isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif callable(optimizer):
        opt = optimizer(params)
    else:
        raise FxoptError(f"optimizer must be a torch.optim.Optimizer or a factory params -> optimizer, got "
                         f"{type(optimizer).__name__}")

    was_training = inner.training
    teacher_training = teacher.training if teacher is not None else False
    device = next(iter(params)).device
    rank0 = not distributed or torch.distributed.get_rank() == 0
    bar = _progress_bar(steps, progress if rank0 else False)
    seen = correct = 0
    running = math.nan
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    try:
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            model.train()
            if teacher is not None:
                teacher.eval()
            done = 0
            for index, item in enumerate(_batches(data, steps, epochs)):
                args, kwargs, target = _split(item, index, teacher is not None)
                args, kwargs, target = _to(device, (args, kwargs, target))
                out = _logits(model(*args, **kwargs))
                value = _objective(out, target, args, kwargs, teacher, loss, temperature, alpha)
                if not torch.isfinite(value):
                    raise FxoptError(f"finetune: the loss became {value.item()} at step {done + 1}; lower the "
                                     "learning rate or check the data for NaN/inf")
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                done += 1
                running = value.item() if math.isnan(running) else 0.9 * running + 0.1 * value.item()
                hit = _hits(out, target)
                if hit is not None:
                    seen, correct = seen + hit[1], correct + hit[0]
                if bar is not None:
                    postfix = {"loss": f"{running:.4f}"}
                    if seen:
                        postfix["acc"] = f"{100.0 * correct / seen:.1f}%"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
            if done == 0:
                raise FxoptError("finetune got empty data: give at least one (inputs, target) batch")
    finally:
        if bar is not None:
            bar.close()
        inner.train(was_training)
        if teacher is not None:
            teacher.train(teacher_training)
    if distributed:
        _broadcast_buffers(inner)
    logger.info("finetune: %d steps, loss %.4f%s", done, running,
                f", train accuracy {100.0 * correct / seen:.2f}%" if seen else "")
    return module


# ---- data -------------------------------------------------------------------------------------

def _batches(data: Iterable[Any], steps: int | None, epochs: int):
    """``epochs`` passes over ``data``, or exactly ``steps`` items (cycling through ``data`` as needed)."""
    if steps is None:
        for _ in range(epochs):
            yield from data
        return
    produced = 0
    while produced < steps:
        empty = True
        for item in data:
            empty = False
            yield item
            produced += 1
            if produced >= steps:
                return
        if empty:
            return


def _split(item: Any, index: int, has_teacher: bool) -> tuple[tuple, dict, Any]:
    """``(args, kwargs, target)`` of one item; ``target`` is None for bare inputs (distillation only)."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        inputs, target = item
    elif has_teacher:
        inputs, target = item, None
    else:
        raise FxoptError(
            f"finetune item {index} is a {type(item).__name__}"
            f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}; give (inputs, target) "
            "pairs, or bare inputs together with a teacher to distill from"
        )
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}, target
    if isinstance(inputs, dict):
        return (), dict(inputs), target
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}, target
    raise FxoptError(f"finetune item {index}: inputs must be a Tensor, a tuple of Tensors or a dict, "
                     f"got {type(inputs).__name__}")


def _to(device: torch.device, tree: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t, tree)


def _logits(out: Any) -> torch.Tensor:
    """The tensor to train on: the output itself, ``out["logits"]`` / ``out.logits``, or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise FxoptError(f"finetune cannot find the output tensor in a {type(out).__name__}; give loss= that takes it")


# ---- loss -------------------------------------------------------------------------------------

def _objective(out, target, args, kwargs, teacher, loss, temperature, alpha) -> torch.Tensor:
    parts = []
    if teacher is not None and alpha > 0:
        with torch.no_grad():
            t_out = _logits(teacher(*args, **kwargs))
        parts.append(alpha * distillation_loss(out, t_out.detach(), temperature))
    if target is not None and alpha < 1:
        parts.append((1.0 - alpha) * (loss or _default_loss(target))(out, target))
    if not parts:
        raise FxoptError("finetune has nothing to train on: items have no target and alpha=0 ignores the teacher")
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _default_loss(target: Any) -> LossFn:
    if isinstance(target, torch.Tensor) and not target.is_floating_point():
        return F.cross_entropy
    if isinstance(target, torch.Tensor):
        return F.mse_loss
    raise FxoptError(f"finetune: no default loss for a target of type {type(target).__name__}; pass loss=")


def _hits(out: torch.Tensor, target: Any) -> tuple[int, int] | None:
    """(correct, count) of top-1 predictions for integer class targets, else None."""
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or out.dim() != target.dim() + 1:
        return None
    pred = out.detach().argmax(dim=1)
    if pred.shape != target.shape:
        return None
    return int((pred == target).sum()), target.numel()


# ---- distributed --------------------------------------------------------------------------------

def _agree_on_steps(data: Iterable[Any], steps: int | None, epochs: int, distributed: bool) -> int | None:
    """Every rank must take the same number of steps (DDP's all-reduces would hang otherwise)."""
    if not distributed or steps is not None:
        return steps
    if not hasattr(data, "__len__"):
        raise FxoptError("under torch.distributed, finetune needs steps= when data has no len() (every rank must "
                         "take the same number of steps)")
    local = torch.tensor([len(data) * epochs], dtype=torch.int64)
    torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MIN)
    if int(local) < 1:
        raise FxoptError("finetune got empty data on at least one rank")
    return int(local)


def _broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers everywhere: the last step's BatchNorm statistics differ per rank otherwise."""
    for buf in module.buffers():
        torch.distributed.broadcast(buf.data, src=0)


# ---- progress -----------------------------------------------------------------------------------

def _progress_bar(total: int | None, enabled: bool | None):
    if enabled is False:
        return None
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc="fxopt finetune", unit="step", leave=True, disable=None if enabled is None
                else not enabled)
