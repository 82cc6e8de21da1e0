"""Models and references shared by bench/compress_digits.py, bench/prune_vs_torch_pruning.py and their tests
(tests/test_compress_digits.py, tests/passes/test_prune_vs_torch_pruning.py).

Fine-tuning is ``fxopt.finetune`` (Adam on cross-entropy) on shuffled batches of the training set.
Torch-Pruning is the reference for structured pruning (benchmarks and tests only).
"""

from __future__ import annotations

import copy

import torch

import fxopt
from fxopt import passes as fp, recipes
from fxopt.compress import PolynomialDecay, pruning_hook
from fxopt.demo import DigitsCNN, load_digits_tensors, train


def prune_both(model: torch.nn.Module, x: torch.Tensor, ratio: float = 0.3):
    """Prune ``model`` with Torch-Pruning (MetaPruner, L1 magnitude, first conv and classifier ignored) and
    with fxopt (PruneChannels, same settings). Returns ``(tp_model, fxopt_model, missed)`` where ``missed``
    maps each layer Torch-Pruning shrank but fxopt did not to fxopt's reason (its report note)."""
    import copy

    import torch_pruning as tp

    import fxopt
    from fxopt import passes as fp

    def ends(m):  # noqa: E306
        layers = [mod for mod in m.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
        return [layers[0], [mod for mod in layers if isinstance(mod, torch.nn.Linear)][-1]]

    tp_model = copy.deepcopy(model).eval()
    pruner = tp.pruner.MetaPruner(tp_model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=ends(tp_model))
    pruner.step()
    fx_model = fxopt.compile(model, [fp.PruneChannels(ratio, importance="l1")], example_inputs=(x,))
    notes = {row["name"]: row["notes"] for row in fxopt.report(fx_model).rows}
    fx_layers = dict(fx_model.named_modules())
    missed = {}
    for name, layer in tp_model.named_modules():
        if not isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        original = model.get_submodule(name).weight.shape[0]
        if layer.weight.shape[0] < original and fx_layers[name].weight.shape[0] == original:
            missed[name] = notes.get(name, "")
    return tp_model, fx_model, missed


def digits_variants(epochs: int = 6, finetune_epochs: int = 2):
    """``[(name, module)]``: the float model and every compressed variant (fine-tuned)."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_tensors(16, seed=0)
    model = train(DigitsCNN(), xtr, ytr, epochs=epochs, seed=0)
    example = (xte[:1],)
    calib = [xtr[i : i + 32] for i in range(0, 256, 32)]

    gen = torch.Generator().manual_seed(1)
    batches = [(xtr[idx], ytr[idx]) for _ in range(finetune_epochs + 1)
               for idx in torch.randperm(len(xtr), generator=gen).split(64)]
    steps = finetune_epochs * len(batches) // (finetune_epochs + 1)

    def tuned(passes, lr=1e-3):
        gm = fxopt.compile(model, passes, example_inputs=example)
        return fxopt.finetune(gm, batches[:steps], lr=lr)

    pruned = tuned(recipes.prune(0.5))
    # gradual pruning to 80%: TF-MOT's polynomial schedule, advanced after every optimizer step
    gradual = fxopt.compile(model, recipes.prune(0.8, schedule=PolynomialDecay(initial_sparsity=0.3, end_step=30,
                                                                               frequency=5)), example_inputs=example)
    opt = torch.optim.Adam([p for p in gradual.parameters() if p.requires_grad], lr=1e-3)
    opt.register_step_post_hook(pruning_hook(gradual))
    fxopt.finetune(gradual, batches, optimizer=opt)  # one epoch more: the masks keep growing until step 30
    channels = tuned(recipes.prune(0.3, structured=True))
    clustered = tuned(recipes.cluster(16), lr=1e-4)  # centroids need a small step (TF-MOT advises the same)
    # the 1-channel first conv and the 10-way classifier hold 1% of the weights: factorizing them only hurts
    low = tuned([fp.LowRankFactorize(rank_ratio=0.5, exclude=("features.0", "classifier"))])
    # AIMET's spatial SVD: every 3x3 conv becomes 3x1 then 1x3 at half its parameters
    spatial = tuned([fp.LowRankFactorize(rank_ratio=0.5, scheme="spatial", exclude=("features.0", "classifier"))])
    variants = [
        ("float", model),
        ("int8 (x86)", fxopt.compile(model, recipes.static_int8(calib), example_inputs=example, backend="x86")),
        ("prune 50%", fxopt.compile(pruned, [fp.ApplyMasks()], example_inputs=example)),
        ("prune 80% gradual", fxopt.compile(gradual, [fp.ApplyMasks()], example_inputs=example)),
        ("channels 30%", channels),
        ("cluster 16", fxopt.compile(clustered, [fp.ApplyMasks()], example_inputs=example)),
        ("low-rank 50% params", low),
        ("spatial SVD 50% params", spatial),
    ]
    for name, base in (("prune 50% + int8", pruned), ("cluster 16 + int8", clustered),
                       ("low-rank 50% + int8", low), ("channels 30% + int8", channels)):
        variants.append((name, fxopt.compile(copy.deepcopy(base), [fp.ApplyMasks()] + recipes.static_int8(calib),
                                             example_inputs=example, backend="x86")))
    return variants, (xtr, ytr, xte, yte)
