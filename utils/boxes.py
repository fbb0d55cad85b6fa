"""Box formats, IoU variants, undoing the letterbox, and non-maximum suppression.

Formats (see docs/ARCHITECTURE.md): xyxy = corners in pixels, xywh = centre + size in pixels,
xywhn = centre + size normalised to the image. The converters accept torch tensors or numpy arrays
of shape [..., 4] and return a new object of the same kind (inputs are never modified).
"""
import math
import time

import numpy as np
import torch
import torchvision

from utils.logging import LOGGER


def _copy(x):
    """A float copy of a tensor / array (integer boxes would truncate the /2 of centres)."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_floating_point() else x.float()
    x = np.asarray(x)
    return x.astype(np.float64) if x.dtype.kind in "biu" else x.copy()


def xyxy2xywh(x):
    """Corners -> centre + size."""
    y = _copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywh2xyxy(x):
    """Centre + size -> corners."""
    y = _copy(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xywhn2xyxy(x, w=640, h=640, padw=0, padh=0):
    """Normalised centre + size (YOLO label) -> pixel corners in a w x h image shifted by the padding."""
    y = _copy(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x, w=640, h=640, clip=False, eps=0.0):
    """Pixel corners -> normalised centre + size; `clip` first clips to the (h - eps, w - eps) image."""
    x = _copy(x)
    if clip:
        clip_boxes(x, (h - eps, w - eps))
    y = _copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2 / w
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2 / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def box_iou(box1, box2, eps=1e-7):
    """Pairwise IoU of xyxy boxes: [N, 4] x [M, 4] -> [N, M]. numpy in -> numpy out."""
    as_numpy = isinstance(box1, np.ndarray)
    b1, b2 = torch.as_tensor(box1), torch.as_tensor(box2)
    b1, b2 = b1.to(torch.promote_types(b1.dtype, torch.float32)), b2.to(torch.promote_types(b2.dtype, torch.float32))
    lt = torch.max(b1[:, None, :2], b2[None, :, :2])  # [N, M, 2]
    rb = torch.min(b1[:, None, 2:], b2[None, :, 2:])
    inter = (rb - lt).clamp(0).prod(2)
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    iou = inter / (area1[:, None] + area2[None] - inter + eps)
    return iou.numpy() if as_numpy else iou


def bbox_iou(box1, box2, xywh=True, GIoU=False, DIoU=False, CIoU=False, eps=1e-7):
    """Element-wise (broadcasting) IoU / GIoU / DIoU / CIoU of [..., 4] boxes -> [..., 1].

    The trailing size-1 dim is kept, as upstream does (callers index [..., 0] or squeeze).
    CIoU's trade-off weight alpha is computed without gradient, as in the CIoU paper's implementation.
    """
    if xywh:
        (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.chunk(4, -1), box2.chunk(4, -1)
        b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
        b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    else:
        b1_x1, b1_y1, b1_x2, b1_y2 = box1.chunk(4, -1)
        b2_x1, b2_y1, b2_x2, b2_y2 = box2.chunk(4, -1)
        w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1
        w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1
    h1, h2 = h1.clamp(min=eps), h2.clamp(min=eps)  # avoid w/h division by zero in the aspect term

    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * \
            (torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not (GIoU or DIoU or CIoU):
        return iou
    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)  # smallest enclosing box
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    if GIoU and not (DIoU or CIoU):
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    c2 = cw ** 2 + ch ** 2 + eps  # squared diagonal of the enclosing box
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4  # centre dist²
    if not CIoU:
        return iou - rho2 / c2
    v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def clip_boxes(boxes, shape):
    """Clip xyxy boxes in place to an image of shape (h, w); returns them too."""
    h, w = shape[0], shape[1]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_boxes(img1_shape, boxes, img0_shape, ratio_pad=None):
    """Map xyxy boxes from the letterboxed image (h1, w1) back to the original (h0, w0), in place.

    ratio_pad = ((ratio_h, ratio_w), (padw, padh)) as stored by the loader in `shapes[i][1]`: both axes
    are divided by ratio_h, the single gain upstream YOLOv5's val applies, so that val's boxes and metrics
    equal upstream's (ratio_w differs slightly: the resized width is a whole number of pixels). Without
    it the letterbox gain and centred padding are recomputed from the two shapes.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])  # new / old
        pad = ((img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2)
    else:
        gain, pad = ratio_pad[0][0], ratio_pad[1]
    boxes[..., [0, 2]] = (boxes[..., [0, 2]] - pad[0]) / gain
    boxes[..., [1, 3]] = (boxes[..., [1, 3]] - pad[1]) / gain
    return clip_boxes(boxes, img0_shape)


def _classwise_nms(boxes, scores, cls, iou_thres):
    """Indices kept by NMS run separately per class, sorted by score (descending)."""
    keep = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    for c in cls.unique():
        idx = (cls == c).nonzero().view(-1)
        keep[idx[torchvision.ops.nms(boxes[idx], scores[idx], iou_thres)]] = True
    keep = keep.nonzero().view(-1)
    return keep[scores[keep].argsort(descending=True, stable=True)]


def non_max_suppression(prediction, conf_thres=0.25, iou_thres=0.45, classes=None, agnostic=False,
                        multi_label=False, max_det=300, max_nms=30000, max_wh=7680, time_limit="auto"):
    """Per-image NMS on decoded predictions [bs, N, 5 + nc] (xywh px, objectness, class probabilities).

    Returns a list (one per image) of [k, 6] tensors (x1, y1, x2, y2, conf, cls), conf = obj * cls prob,
    sorted by conf. Class-aware NMS offsets each class's boxes by cls * max_wh so they never overlap
    (on CPU with > 2000 candidates it runs per class instead: same result, much faster).
    time_limit: seconds after which later images are left empty ("auto": 0.5 + 0.05 * bs, as upstream, for
    live inference); None never cuts, so that metrics do not depend on the machine's speed.
    """
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres={conf_thres} must be in [0, 1]")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres={iou_thres} must be in [0, 1]")
    if isinstance(prediction, (list, tuple)):  # eval-mode model output: (decoded, raw maps)
        prediction = prediction[0]
    bs, nc = prediction.shape[0], prediction.shape[2] - 5
    multi_label &= nc > 1  # one class: one row per box anyway
    time_limit = 0.5 + 0.05 * bs if time_limit == "auto" else time_limit
    keep_cls = None if classes is None else torch.as_tensor(classes, device=prediction.device).view(1, -1)

    t = time.time()
    output = [torch.zeros((0, 6), device=prediction.device, dtype=prediction.dtype)] * bs
    for xi, x in enumerate(prediction):
        x = x[x[:, 4] > conf_thres]  # objectness gate first: cheap and removes most rows
        if not x.shape[0]:
            continue
        box = xywh2xyxy(x[:, :4])
        if nc == 0:  # objectness-only head: a single implicit class
            conf, j = x[:, 4:5], torch.zeros_like(x[:, 4:5])
            x = torch.cat((box, conf, j), 1)[conf.view(-1) > conf_thres]
        elif multi_label:
            scores = x[:, 5:] * x[:, 4:5]
            i, j = (scores > conf_thres).nonzero(as_tuple=False).T
            x = torch.cat((box[i], scores[i, j, None], j[:, None].to(x.dtype)), 1)
        else:
            conf, j = (x[:, 5:] * x[:, 4:5]).max(1, keepdim=True)
            x = torch.cat((box, conf, j.to(x.dtype)), 1)[conf.view(-1) > conf_thres]
        if keep_cls is not None:
            x = x[(x[:, 5:6] == keep_cls).any(1)]
        if not x.shape[0]:
            continue
        x = x[x[:, 4].argsort(descending=True)[:max_nms]]
        if agnostic or x.device.type != "cpu" or x.shape[0] <= 2000:
            offset = x[:, 5:6] * (0 if agnostic else max_wh)
            i = torchvision.ops.nms((x[:, :4] + offset).float(), x[:, 4].float(), iou_thres)[:max_det]
        else:  # many candidates on CPU: per-class NMS is O(sum n_c^2) instead of O(n^2), same boxes kept
            i = _classwise_nms(x[:, :4].float(), x[:, 4].float(), x[:, 5], iou_thres)[:max_det]
        output[xi] = x[i]
        if time_limit is not None and time.time() - t > time_limit:
            LOGGER.warning(f"WARNING ⚠️ NMS time limit {time_limit:.3f}s exceeded; later images left empty")
            break
    return output
