"""The detector retention harness (bench/detectors.py): its labelled scenes and its retention metric. The
heavy figures (trained heads, int8 compiles) are in tests/backends/test_check_zoo.py under ``slow``."""

from __future__ import annotations

import torch

from bench import detectors as D


def _out(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}


def test_labelled_scenes_draw_their_shapes_inside_their_boxes():
    scenes = D.labelled_scenes(6, size=64, seed=3)
    again = D.labelled_scenes(6, size=64, seed=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(scenes, again))  # seeded
    for img, target in scenes:
        assert img.shape == (3, 64, 64) and 0 <= float(img.min()) and float(img.max()) <= 1
        boxes, labels = target["boxes"], target["labels"]
        assert D.OBJECTS[0] <= len(boxes) <= D.OBJECTS[1] and set(labels.tolist()) <= {1, 2, 3}
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= 64).all()
        # shapes overlap little: no box has more than 20 % of its area under another one
        inter = (torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
                 - torch.maximum(boxes[:, None, :2], boxes[None, :, :2])).clamp(min=0).prod(-1)
        area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
        inter.fill_diagonal_(0)
        assert (inter <= 0.2 * torch.minimum(area[:, None], area[None, :]) + 1e-3).all()
    # a rectangle fills its box, an ellipse leaves the corners to the background: check on the last shape
    img, target = scenes[0]
    x0, y0, x1, y1 = target["boxes"][-1].tolist()
    centre = img[:, int((y0 + y1) / 2), int((x0 + x1) / 2)]
    corner = img[:, int(y0) + 1, int(x0) + 1]
    same = bool((centre - corner).abs().max() < 0.15)
    assert same == (int(target["labels"][-1]) == 1)


def test_retention_counts_matching_boxes_with_the_same_label():
    ref = [_out([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [1, 2, 3], [0.9, 0.6, 0.1])]
    assert D.retention(ref, ref) == 1.0
    moved = [_out([[1, 1, 11, 11], [20, 20, 40, 40], [0, 50, 5, 60]], [1, 3, 3], [0.9, 0.6, 0.1])]
    # box 0 kept (IoU 0.68), box 1 has another label, box 2 moved away
    assert D.retention(ref, moved) == 1 / 3
    assert D.retention(ref, moved, min_score=0.5) == 1 / 2  # only the two confident float boxes count
    # one int8 box cannot keep two float boxes
    twice = [_out([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 1], [0.9, 0.8])]
    assert D.retention(twice, [_out([[0, 0, 10, 10]], [1], [0.9])]) == 0.5
    assert D.retention(ref, [_out([], [], [])]) == 0.0
    assert abs(D.matched_iou(ref, moved) - 0.68) < 0.01  # the one kept box moved by a pixel


def test_found_objects_is_recall_of_the_true_objects_at_a_score():
    truth = [{"boxes": torch.tensor([[0., 0, 10, 10], [20, 20, 40, 40]]), "labels": torch.tensor([1, 2])}]
    outs = [_out([[0, 0, 10, 10], [20, 20, 40, 40], [21, 21, 40, 40]], [1, 2, 2], [0.9, 0.4, 0.8])]
    assert D.found_objects(outs, truth) == 1.0  # the second object found by the 0.8 box
    assert D.found_objects(outs, truth, min_score=0.85) == 0.5
    wrong = [_out([[0, 0, 10, 10]], [3], [0.9])]
    assert D.found_objects(wrong, truth) == 0.0


def test_noisy_images_move_by_about_one_intensity_step():
    images = D.scenes(2, size=32, seed=4)
    moved = D.noisy(images)
    assert all(m.shape == i.shape for m, i in zip(moved, images))
    diff = torch.cat([(m - i).flatten() for m, i in zip(moved, images)])
    assert 0.5 / 255 < float(diff.std()) < 1.5 / 255 and float(diff.abs().max()) < 6 / 255


class _Boxes(torch.nn.Module):
    """A stand-in detector: one box per image whose position follows the image's mean (so chance < 1)."""

    def forward(self, images):
        outs = []
        for img in images:
            x = float(img.mean()) * 100
            outs.append(_out([[x, x, x + 20, x + 20]], [1], [0.9]))
        return outs


class _Fails(torch.nn.Module):
    def forward(self, images):
        raise RuntimeError("INTERNAL ASSERT FAILED at Pooling.cpp. failed to create QNNPACK MaxPool operator")


def test_measure_reports_a_torch_ao_model_that_fails_at_run_time(monkeypatch):
    monkeypatch.setattr(D, "detector", lambda name: _Boxes())
    small = D.labelled_scenes
    monkeypatch.setattr(D, "labelled_scenes", lambda n, size=32, seed=0: small(n, size=32, seed=seed))
    monkeypatch.setattr(D, "fxopt_int8", lambda model, calib, backend, check=False: model)
    monkeypatch.setattr(D, "torchao_backbone_int8", lambda model, calib, backend: _Fails())
    found = D.measure("fasterrcnn_mobilenet_v3_large_320_fpn", "qnnpack", n_test=3)
    assert found["fxopt"] == 1.0 and found["fxopt, float score >= 0.5"] == 1.0
    assert found["float detections >= 0.5"] == 3  # one 0.9 box per image
    assert found["fxopt box IoU"] == 1.0 and 0 <= found["fxopt objects found"] <= 1
    assert found["torch.ao backbone"] is None and found["torch.ao, float score >= 0.5"] is None
    assert found["torch.ao box IoU"] is None and found["torch.ao objects found"] is None
    assert found["torch.ao error"] == "failed to create QNNPACK MaxPool operator"
