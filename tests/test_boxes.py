"""Box converters, IoU variants, letterbox undo and NMS."""
import math

import numpy as np
import pytest
import torch

from utils.boxes import (bbox_iou, box_iou, clip_boxes, non_max_suppression, scale_boxes, xywh2xyxy,
                         xywhn2xyxy, xyxy2xywh, xyxy2xywhn)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_conversions_round_trip(kind):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (20, 2))
    xyxy = np.concatenate((xy, xy + rng.uniform(1, 200, (20, 2))), 1)
    boxes = torch.tensor(xyxy) if kind == "torch" else xyxy
    back = xywh2xyxy(xyxy2xywh(boxes))
    np.testing.assert_allclose(np.asarray(back), xyxy, atol=1e-9)
    back = xywhn2xyxy(xyxy2xywhn(boxes, w=640, h=480), w=640, h=480)
    np.testing.assert_allclose(np.asarray(back), xyxy, atol=1e-9)
    assert np.allclose(np.asarray(boxes), xyxy)  # input untouched


def test_conversion_values_and_padding():
    xywh = torch.tensor([[30.0, 50.0, 40.0, 60.0]])
    assert xywh2xyxy(xywh).tolist() == [[10.0, 20.0, 50.0, 80.0]]
    assert xyxy2xywh(torch.tensor([[10, 20, 50, 80]])).tolist() == [[30.0, 50.0, 40.0, 60.0]]  # int input
    xywhn = np.array([[0.5, 0.5, 0.5, 0.25]])
    np.testing.assert_allclose(xywhn2xyxy(xywhn, w=200, h=100, padw=3, padh=7), [[53, 44.5, 153, 69.5]])
    # clip=True clips to the image before normalising
    out = xyxy2xywhn(np.array([[-10.0, 0, 110, 50]]), w=100, h=100, clip=True)
    np.testing.assert_allclose(out, [[0.5, 0.25, 1.0, 0.5]])
    # leading dims are kept
    assert xywh2xyxy(torch.zeros(2, 3, 4)).shape == (2, 3, 4)


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 2, 2]])
    b = torch.tensor([[5.0, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    expected = [[25 / 175, 1.0, 0.0], [0.0, 4 / 100, 0.0]]
    assert torch.allclose(iou, torch.tensor(expected), atol=1e-6)
    assert isinstance(box_iou(a.numpy(), b.numpy()), np.ndarray)


def test_bbox_iou_variants():
    box = torch.tensor([[5.0, 5, 4, 2]])  # xywh
    for kw in ({}, {"GIoU": True}, {"DIoU": True}, {"CIoU": True}):
        assert bbox_iou(box, box, **kw).item() == pytest.approx(1.0, abs=1e-6)
    # hand-made pair in xyxy: a = (0,0,2,2), b = (1,0,3,1)
    a, b = torch.tensor([0.0, 0, 2, 2]), torch.tensor([1.0, 0, 3, 1])
    iou = 1 / (4 + 2 - 1)
    assert bbox_iou(a, b, xywh=False).item() == pytest.approx(iou, abs=1e-6)
    assert bbox_iou(a, b, xywh=False, GIoU=True).item() == pytest.approx(iou - (6 - 5) / 6, abs=1e-6)
    rho2, c2 = 1.0 ** 2 + 0.5 ** 2, 3.0 ** 2 + 2.0 ** 2  # centres (1,1) vs (2,0.5); enclosure 3 x 2
    assert bbox_iou(a, b, xywh=False, DIoU=True).item() == pytest.approx(iou - rho2 / c2, abs=1e-6)
    v = 4 / math.pi ** 2 * (math.atan(2 / 1) - math.atan(2 / 2)) ** 2
    alpha = v / (v - iou + 1)
    ciou = iou - (rho2 / c2 + v * alpha)
    assert bbox_iou(a, b, xywh=False, CIoU=True).item() == pytest.approx(ciou, abs=1e-6)
    # element-wise with broadcasting, trailing dim kept
    assert bbox_iou(torch.rand(7, 4) + 1, torch.rand(1, 4) + 1).shape == (7, 1)


def test_ciou_gradient_and_degenerate():
    p = torch.tensor([[5.0, 5, 4, 2]], requires_grad=True)
    loss = (1 - bbox_iou(p, torch.tensor([[6.0, 5, 3, 3]]), CIoU=True)).sum()
    loss.backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    zero = bbox_iou(torch.zeros(1, 4), torch.zeros(1, 4), CIoU=True)  # zero-size boxes: finite
    assert torch.isfinite(zero).all()


def test_clip_boxes_in_place():
    t = torch.tensor([[-5.0, -5, 700, 500]])
    assert clip_boxes(t, (480, 640)) is t and t.tolist() == [[0, 0, 640, 480]]
    n = np.array([[-5.0, 10, 700, 500]])
    clip_boxes(n, (480, 640))
    assert n.tolist() == [[0, 10, 640, 480]]


def test_scale_boxes_undoes_letterbox():
    h0, w0, new = 480, 640, 320  # gain 0.5 -> 240 x 320, padded 40 px top and bottom
    boxes0 = torch.tensor([[10.0, 20, 100, 200], [300, 100, 640, 480]])
    gain, padw, padh = 0.5, 0.0, 40.0
    boxes1 = boxes0 * gain + torch.tensor([padw, padh, padw, padh])
    back = scale_boxes((new, new), boxes1.clone(), (h0, w0))
    assert torch.allclose(back, boxes0, atol=1e-4)
    back = scale_boxes((new, new), boxes1.clone(), (h0, w0), ratio_pad=((gain, gain), (padw, padh)))
    assert torch.allclose(back, boxes0, atol=1e-4)
    # boxes falling into the padding are clipped to the original image
    out = scale_boxes((new, new), torch.tensor([[0.0, 0, 320, 320]]), (h0, w0))
    assert out.tolist() == [[0, 0, 640, 480]]


def test_scale_boxes_with_ratio_pad_uses_the_height_ratio_on_both_axes():
    # a 100 x 131 (w x h) image resized to 123 x 160: ratio_h = 160 / 131, ratio_w = 123 / 100
    rh, rw, padw, padh = 160 / 131, 123 / 100, 4.5, 0.0
    boxes1 = torch.tensor([[14.5, 16.0, 104.5, 136.0]])
    back = scale_boxes((160, 132), boxes1.clone(), (131, 100), ratio_pad=((rh, rw), (padw, padh)))
    want = [(14.5 - padw) / rh, 16.0 / rh, (104.5 - padw) / rh, 136.0 / rh]
    assert torch.allclose(back[0], torch.tensor(want), atol=1e-4)
    assert not torch.allclose(back[0, 0], torch.tensor((14.5 - padw) / rw), atol=1e-2)


def _pred(rows, nc):
    """rows of (x, y, w, h, obj, cls, cls_prob) -> decoded prediction [1, n, 5 + nc]."""
    p = torch.zeros(1, len(rows), 5 + nc)
    for k, (x, y, w, h, obj, c, pc) in enumerate(rows):
        p[0, k, :5] = torch.tensor([x, y, w, h, obj])
        p[0, k, 5 + c] = pc
    return p


def test_nms_removes_duplicate_and_separates_classes():
    rows = [(50, 50, 20, 20, 0.9, 0, 0.9), (51, 50, 20, 20, 0.8, 0, 0.9),  # duplicate, same class
            (50, 51, 20, 20, 0.7, 1, 0.9),  # same place, other class
            (150, 150, 20, 20, 0.6, 0, 0.9)]  # far away
    out = non_max_suppression(_pred(rows, nc=3), conf_thres=0.25, iou_thres=0.45)
    assert len(out) == 1 and out[0].shape == (3, 6)
    assert out[0][:, 4].tolist() == pytest.approx([0.81, 0.63, 0.54])  # conf = obj * cls, sorted
    assert out[0][:, 5].tolist() == [0, 1, 0]
    assert torch.allclose(out[0][0, :4], torch.tensor([40.0, 40, 60, 60]))
    agn = non_max_suppression(_pred(rows, nc=3), conf_thres=0.25, iou_thres=0.45, agnostic=True)[0]
    assert agn.shape == (2, 6) and agn[:, 5].tolist() == [0, 0]


def test_nms_multi_label_max_det_classes_and_thresholds():
    p = _pred([(50, 50, 20, 20, 0.9, 0, 0.8), (150, 50, 20, 20, 0.9, 0, 0.8)], nc=3)
    p[0, :, 6] = 0.6  # second class also likely for both boxes
    single = non_max_suppression(p, conf_thres=0.25)[0]
    assert single.shape[0] == 2 and single[:, 5].tolist() == [0, 0]
    multi = non_max_suppression(p, conf_thres=0.25, multi_label=True)[0]
    assert multi.shape[0] == 4 and sorted(multi[:, 5].tolist()) == [0, 0, 1, 1]
    assert non_max_suppression(p, conf_thres=0.25, multi_label=True, max_det=3)[0].shape[0] == 3
    only1 = non_max_suppression(p, conf_thres=0.25, multi_label=True, classes=[1])[0]
    assert only1.shape[0] == 2 and only1[:, 5].eq(1).all()
    assert non_max_suppression(p, conf_thres=0.25, classes=[2])[0].shape[0] == 0
    # objectness gate: obj below conf_thres -> nothing even with a certain class
    low = _pred([(50, 50, 20, 20, 0.2, 0, 1.0)], nc=3)
    assert non_max_suppression(low, conf_thres=0.25)[0].shape == (0, 6)
    with pytest.raises(ValueError, match="conf_thres"):
        non_max_suppression(p, conf_thres=1.5)


def test_nms_batch_and_model_tuple_output():
    torch.manual_seed(0)
    p = torch.rand(3, 200, 8)
    p[..., :2] *= 320
    p[..., 2:4] = p[..., 2:4] * 40 + 2
    out = non_max_suppression((p, ["raw maps"]), conf_thres=0.3, iou_thres=0.5, max_det=10)
    assert len(out) == 3
    for o in out:
        assert o.shape[1] == 6 and o.shape[0] <= 10
        assert (o[:, 4] > 0.3).all() and (o[:, 4][:-1] >= o[:, 4][1:]).all()
        for c in o[:, 5].unique():  # after class-aware NMS, same-class boxes overlap less than iou_thres
            b = o[o[:, 5] == c, :4]
            iou = box_iou(b, b).fill_diagonal_(0)
            assert (iou <= 0.5 + 1e-6).all()


def test_nms_many_candidates_matches_offset_reference():
    """> 2000 candidates on CPU take the per-class path: it must keep what the offset trick keeps."""
    import torchvision
    torch.manual_seed(1)
    n, nc = 3000, 4
    p = torch.zeros(1, n, 5 + nc)
    p[0, :, :2] = torch.rand(n, 2) * 300
    p[0, :, 2:4] = torch.rand(n, 2) * 60 + 4
    p[0, :, 4] = torch.rand(n) * 0.5 + 0.5
    p[0, torch.arange(n), 5 + torch.randint(0, nc, (n,))] = 1.0
    out = non_max_suppression(p, conf_thres=0.25, iou_thres=0.5, max_det=n)[0]
    x = p[0].double()
    boxes, conf, cls = xywh2xyxy(x[:, :4]), x[:, 4], x[:, 5:].argmax(1).double()
    keep = torchvision.ops.nms(boxes + cls[:, None] * 1000, conf, 0.5)  # float64: offset is exact
    ref = torch.cat((boxes[keep], conf[keep, None], cls[keep, None]), 1).float()
    assert out.shape == ref.shape and torch.allclose(out, ref)
