"""YOLOv5 loss: target matching, perfect predictions, zero targets, gradients, gain scaling."""
import math
from types import SimpleNamespace

import pytest
import torch

from utils.loss import ComputeLoss, bce_loss, scale_loss_gains, smooth_bce

HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5, "cls_pw": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0}
STRIDES = [8, 16, 32]
ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def fake_model(nc=3, anchors_grid=None, hyp=None):
    """A Detect-like stand-in: .model[-1] with na, nc, nl, anchors [nl, na, 2] in stride units, stride."""
    stride = torch.tensor(STRIDES, dtype=torch.float32)
    if anchors_grid is None:
        anchors_grid = torch.tensor(ANCHORS_PX, dtype=torch.float32).view(3, 3, 2) / stride.view(-1, 1, 1)
    det = SimpleNamespace(nc=nc, na=anchors_grid.shape[1], nl=anchors_grid.shape[0], anchors=anchors_grid,
                          stride=stride)
    return SimpleNamespace(model=[det], hyp=dict(HYP if hyp is None else hyp))


def maps(bs=2, nc=3, img=128, value=None, requires_grad=False):
    out = []
    for s in STRIDES:
        t = torch.randn(bs, 3, img // s, img // s, 5 + nc) if value is None else \
            torch.full((bs, 3, img // s, img // s, 5 + nc), float(value))
        out.append(t.requires_grad_(requires_grad))
    return out


def reference_matches(targets, anchors, ny, nx, anchor_t=4.0):
    """Per-target loop of the matching rules -> set of (b, a, gj, gi, tbox rounded)."""
    found = set()
    for b, c, x, y, w, h in targets.tolist():
        gx, gy, gw, gh = x * nx, y * ny, w * nx, h * ny
        for a, (aw, ah) in enumerate(anchors.tolist()):
            if max(gw / aw, aw / gw, gh / ah, ah / gh) >= anchor_t:
                continue
            cells = [(int(gx), int(gy))]
            if gx % 1 < 0.5 and gx > 1:
                cells.append((int(gx) - 1, int(gy)))
            if gy % 1 < 0.5 and gy > 1:
                cells.append((int(gx), int(gy) - 1))
            if (nx - gx) % 1 < 0.5 and nx - gx > 1:
                cells.append((int(gx) + 1, int(gy)))
            if (ny - gy) % 1 < 0.5 and ny - gy > 1:
                cells.append((int(gx), int(gy) + 1))
            for gi, gj in cells:
                gi, gj = min(max(gi, 0), nx - 1), min(max(gj, 0), ny - 1)
                tb = (round(gx - gi, 4), round(gy - gj, 4), round(gw, 4), round(gh, 4))
                found.add((int(b), a, gj, gi, int(c)) + tb)
    return found


def _as_set(tcls, tbox, idx):
    b, a, gj, gi = (v.tolist() for v in idx)
    return {(b[k], a[k], gj[k], gi[k], tcls[k].item()) + tuple(round(v, 4) for v in tbox[k].tolist())
            for k in range(len(b))}


def test_target_near_cell_corner_gets_three_cells():
    anchors = torch.tensor([[[1.0, 1.0], [4.0, 4.0], [16.0, 16.0]]] * 3)  # grid units, same on all levels
    loss = ComputeLoss(fake_model(anchors_grid=anchors))
    p = maps(bs=1, img=64)  # 8x8, 4x4, 2x2
    # centre at (3.2, 5.3) cells on the 8x8 level (top-left part of cell (3, 5)); 1x1 cell box
    t = torch.tensor([[0, 2, 3.2 / 8, 5.3 / 8, 1 / 8, 1 / 8]])
    tcls, tbox, idx, anch = loss.build_targets(p, t)
    b, a, gj, gi = idx[0]
    assert a.tolist() == [0, 0, 0]  # ratio to anchor 1 is exactly 4 -> not < anchor_t
    assert sorted(zip(gi.tolist(), gj.tolist())) == [(2, 5), (3, 4), (3, 5)]
    assert tcls[0].tolist() == [2, 2, 2] and b.tolist() == [0, 0, 0]
    assert torch.allclose(anch[0], torch.tensor([[1.0, 1.0]] * 3))
    # offsets are measured from each cell's corner: 0.2 in its own cell, 1.2 from the left neighbour
    own = (gi == 3) & (gj == 5)
    assert torch.allclose(tbox[0][own], torch.tensor([[0.2, 0.3, 1.0, 1.0]]), atol=1e-5)
    left = (gi == 2) & (gj == 5)
    assert torch.allclose(tbox[0][left], torch.tensor([[1.2, 0.3, 1.0, 1.0]]), atol=1e-5)
    # the same box is 0.5 cells on the 4x4 level: ratio 2 to anchor 0, within 4 -> matched there too
    assert idx[1][1].tolist() == [0] * len(idx[1][1])
    # near the image border: no neighbour across it
    t = torch.tensor([[0, 0, 0.3 / 8, 0.2 / 8, 1 / 8, 1 / 8]])
    _, _, idx, _ = loss.build_targets(p, t)
    assert list(zip(idx[0][3].tolist(), idx[0][2].tolist())) == [(0, 0)]


def test_wh_ratio_beyond_anchor_t_not_matched():
    anchors = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]] * 3)
    loss = ComputeLoss(fake_model(anchors_grid=anchors))
    p = maps(bs=1, img=64)
    t = torch.tensor([[0, 0, 0.5, 0.5, 1 / 8, 20 / 8]])  # h/w ratio 20 on 8x8: too tall for every anchor
    _, _, idx, _ = loss.build_targets(p, t)
    assert idx[0][0].numel() == 0
    t = torch.tensor([[0, 0, 0.5, 0.5, 3.9 / 8, 3.9 / 8]])  # 3.9 / 1 < 4: matched on all 3 anchors
    _, _, idx, _ = loss.build_targets(p, t)
    assert sorted(set(idx[0][1].tolist())) == [0, 1, 2]


def test_matching_equals_per_target_reference():
    torch.manual_seed(0)
    loss = ComputeLoss(fake_model())
    p = maps(bs=4, img=128)
    n = 60
    xy = torch.rand(n, 2)
    wh = torch.rand(n, 2) * 0.6 + 0.01
    t = torch.cat((torch.randint(0, 4, (n, 1)).float(), torch.randint(0, 3, (n, 1)).float(), xy, wh), 1)
    tcls, tbox, idx, anch = loss.build_targets(p, t)
    for i in range(3):
        ny, nx = p[i].shape[2:4]
        assert _as_set(tcls[i], tbox[i], idx[i]) == reference_matches(t, loss.detect.anchors[i], ny, nx)
        assert len(tcls[i]) == len(tbox[i]) == len(anch[i]) == idx[i][0].numel()


def _logit(x):
    x = x.clamp(1e-6, 1 - 1e-6)
    return torch.log(x / (1 - x))


def test_perfect_prediction_has_near_zero_loss():
    nc, bs = 3, 2
    loss = ComputeLoss(fake_model(nc=nc))
    # well separated targets so no two share an (image, anchor, cell)
    # (centres off exact cell borders: there the 'far side' neighbour is the target's own cell)
    t = torch.tensor([[0, 0, 0.23, 0.27, 0.10, 0.12],
                      [0, 2, 0.71, 0.69, 0.40, 0.30],
                      [1, 1, 0.41, 0.61, 0.05, 0.08]])
    p = maps(bs=bs, nc=nc, img=128, value=-12.0)  # low objectness, low class everywhere
    tcls, tbox, idx, anch = loss.build_targets(p, t)
    for i in range(3):
        b, a, gj, gi = idx[i]
        if not b.numel():
            continue
        cell = torch.stack((b, a, gj, gi), 1)
        assert cell.unique(dim=0).shape[0] == cell.shape[0]  # the test's assumption
        p[i][b, a, gj, gi, 0:2] = _logit((tbox[i][:, :2] + 0.5) / 2)  # invert 2σ - 0.5
        p[i][b, a, gj, gi, 2:4] = _logit(torch.sqrt(tbox[i][:, 2:] / anch[i]) / 2)  # invert (2σ)² · anchor
        p[i][b, a, gj, gi, 4] = 12.0
        p[i][b, a, gj, gi, 5 + tcls[i]] = 12.0
    total, items = loss(p, t)
    lbox, lobj, lcls = items.tolist()
    assert lbox < 1e-3 and lobj < 1e-3 and lcls < 1e-3
    assert total.shape == (1,) and total.item() == pytest.approx(bs * sum(items.tolist()), rel=1e-5)
    random_total, _ = loss(maps(bs=bs, nc=nc, img=128), t)
    assert random_total.item() > 100 * total.item()


def test_zero_targets_finite_and_gradients_flow():
    loss = ComputeLoss(fake_model())
    p = maps(bs=2, img=64, requires_grad=True)
    total, items = loss(p, torch.zeros(0, 6))
    assert torch.isfinite(total).all() and items[0] == 0 and items[2] == 0 and items[1] > 0
    total.backward()
    assert all(torch.isfinite(pi.grad).all() for pi in p)
    assert p[0].grad[..., 4].abs().sum() > 0 and p[0].grad[..., :4].abs().sum() == 0

    p = maps(bs=2, img=64, requires_grad=True)
    t = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.3], [1, 0, 0.3, 0.6, 0.1, 0.1]])
    total, items = loss(p, t)
    total.backward()
    assert (items > 0).all() and not items.requires_grad
    assert sum(pi.grad[..., :4].abs().sum() for pi in p) > 0  # box loss reaches xywh logits
    assert sum(pi.grad[..., 5:].abs().sum() for pi in p) > 0  # class loss reaches class logits


def test_single_class_no_cls_loss_and_bad_inputs():
    loss = ComputeLoss(fake_model(nc=1))
    _, items = loss(maps(bs=1, nc=1, img=64), torch.tensor([[0, 0, 0.5, 0.5, 0.2, 0.2]]))
    assert items[2] == 0 and items[0] > 0
    with pytest.raises(ValueError, match="model.hyp"):
        ComputeLoss(SimpleNamespace(model=fake_model().model))
    with pytest.raises(ValueError, match=r"\[n, 6\]"):
        loss(maps(bs=1, nc=1, img=64), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="image indices"):
        loss(maps(bs=1, nc=1, img=64), torch.tensor([[1, 0, 0.5, 0.5, 0.2, 0.2]]))


def test_ddp_unwrap_focal_and_smoothing():
    inner = fake_model(hyp=dict(HYP, fl_gamma=1.5, label_smoothing=0.1))
    loss = ComputeLoss(SimpleNamespace(module=inner))
    assert loss.gamma == 1.5 and (loss.cp, loss.cn) == pytest.approx((0.95, 0.05))
    assert smooth_bce(0.0) == (1.0, 0.0)
    total, _ = loss(maps(bs=1, img=64), torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2]]))
    assert torch.isfinite(total).all()
    x, y = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    plain = bce_loss(x, y)
    focal = bce_loss(x, y, gamma=2.0, alpha=0.25)
    p = torch.sigmoid(x)
    expected = torch.stack((-torch.log(p[0]) * 0.25 * (1 - p[0]) ** 2, -torch.log(1 - p[1]) * 0.75 * p[1] ** 2))
    assert focal.item() == pytest.approx(expected.mean().item(), rel=1e-5) and focal < plain
    assert bce_loss(x, y, pos_weight=2.0).item() == pytest.approx(
        ((-2 * torch.log(p[0])) + -torch.log(1 - p[1])).item() / 2, rel=1e-5)


def test_scale_loss_gains():
    h = {"box": 0.05, "obj": 1.0, "cls": 0.5, "lr0": 0.01}
    s = scale_loss_gains(h, nl=3, nc=80, imgsz=640)
    assert s == pytest.approx(h) and s is not h
    s = scale_loss_gains(h, nl=4, nc=3, imgsz=320)
    assert s["box"] == pytest.approx(0.05 * 3 / 4)
    assert s["cls"] == pytest.approx(0.5 * 3 / 80 * 3 / 4)
    assert s["obj"] == pytest.approx(0.25 * 3 / 4) and s["lr0"] == 0.01 and h["box"] == 0.05


def test_with_detection_model_if_present():
    yolo = pytest.importorskip("models.yolo")
    cfg = {"nc": 2, "depth_multiple": 0.33, "width_multiple": 0.125,
           "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
           "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 1, "C3", [128]],
                        [-1, 1, "Conv", [256, 3, 2]], [-1, 1, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
                        [-1, 1, "SPPF", [512, 5]]],
           "head": [[[2, 4, 6], 1, "Detect", ["nc", "anchors"]]]}
    model = yolo.DetectionModel(cfg)
    model.hyp = scale_loss_gains(HYP, nl=3, nc=2, imgsz=64)
    model.train()
    p = model(torch.rand(2, 3, 64, 64))
    total, items = ComputeLoss(model)(p, torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 0, 0.2, 0.3, 0.1, 0.1]]))
    total.backward()
    assert torch.isfinite(total).all() and items.shape == (3,)
    assert math.isfinite(sum(q.grad.abs().sum().item() for q in model.parameters() if q.grad is not None))
