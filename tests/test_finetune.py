"""fxopt.finetune: labels, distillation, determinism, bad input (DDP lives in test_finetune_ddp.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.finetune import distillation_loss


def _blobs(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 8, generator=g) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + torch.randn(n, 8, generator=g)
    return x, y


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _batches(x, y, bs=32):
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]


def test_trains_on_labels_in_place_and_keeps_mode():
    x, y = _blobs()
    model = _net().eval()
    before = _acc(model, x, y)
    out = fxopt.finetune(model, _batches(x, y), epochs=3, lr=1e-2, progress=False)
    assert out is model and not model.training  # trained in place, mode restored
    assert _acc(model, x, y) > max(0.9, before + 0.2)


def test_deterministic_with_seed_and_leaves_global_rng_alone():
    x, y = _blobs()
    a, b = _net(), _net()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    fxopt.finetune(a, _batches(x, y), steps=5, lr=1e-2, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    fxopt.finetune(b, _batches(x, y), steps=5, lr=1e-2, seed=7, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)  # dropout masks and all


def test_steps_count_optimizer_steps_cycling_the_data():
    x, y = _blobs(64)
    calls = []
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.register_step_post_hook(lambda *_: calls.append(1))
    fxopt.finetune(model, _batches(x, y), steps=7, optimizer=opt, progress=False)  # 2 batches, cycled
    assert len(calls) == 7


def test_distillation_pulls_student_towards_teacher_without_labels():
    x, y = _blobs()
    teacher = _net(1)
    fxopt.finetune(teacher, _batches(x, y), epochs=3, lr=1e-2, progress=False)
    student = _net(2)

    def agreement():
        with torch.no_grad():
            return (student.eval()(x).argmax(1) == teacher.eval()(x).argmax(1)).float().mean().item()

    start = agreement()
    teacher.train()
    fxopt.finetune(student, [x[i : i + 32] for i in range(0, 256, 32)], epochs=3, teacher=teacher, alpha=1.0,
                   lr=1e-2, progress=False)
    assert teacher.training  # its mode is restored
    assert agreement() > max(0.9, start + 0.2)


def test_distillation_loss_is_zero_for_equal_logits_and_scales_with_t_squared():
    s = torch.randn(6, 5)
    assert distillation_loss(s, s).abs().item() < 1e-6
    t = torch.randn(6, 5)
    manual = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    assert torch.allclose(distillation_loss(s, t, 2.0), manual, atol=1e-6)


def test_alpha_mixes_the_two_losses():
    from fxopt.finetune import _objective

    x, y = _blobs(32)
    teacher, student = _net(1).eval(), _net(2).eval()
    out = student(x)
    ce = F.cross_entropy(out, y)
    kd = distillation_loss(out, teacher(x))
    assert torch.allclose(_objective(out, y, (x,), {}, teacher, None, 4.0, 0.25), 0.25 * kd + 0.75 * ce, atol=1e-5)
    assert torch.allclose(_objective(out, y, (x,), {}, teacher, None, 4.0, 1.0), kd, atol=1e-6)
    assert torch.allclose(_objective(out, y, (x,), {}, None, None, 4.0, 0.0), ce, atol=1e-6)


@pytest.mark.parametrize("data", [None, []], ids=["none", "empty"])
def test_no_data_is_a_clear_error(data):
    with pytest.raises(fxopt.FxoptError, match="no data|empty data"):
        fxopt.finetune(_net(), data, steps=2, progress=False)


def test_bare_inputs_without_teacher_is_a_clear_error():
    with pytest.raises(fxopt.FxoptError, match=r"\(inputs, target\) pairs, or bare inputs together with a teacher"):
        fxopt.finetune(_net(), [torch.randn(4, 8)], steps=1, progress=False)


def test_progress_bar_shows_loss_and_accuracy(capsys):
    x, y = _blobs(64)
    fxopt.finetune(_net(), _batches(x, y), steps=3, lr=1e-2, progress=True)
    err = capsys.readouterr().err
    assert "fxopt finetune" in err and "loss=" in err and "acc=" in err
    fxopt.finetune(_net(), _batches(x, y), steps=3, lr=1e-2)  # default: off when stderr is not a terminal
    assert "fxopt finetune" not in capsys.readouterr().err
