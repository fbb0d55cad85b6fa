"""The imitation mask as a per-image, per-box loop: the reference for tests/test_distill_mask.py and the
baseline the masks are timed against in benchmarks/step_speed.py.

Written independently of distill/masks.py: boxes and anchor boxes as corners, their IoU by
utils.boxes.box_iou, in the dtype of the targets (float64 targets give a reference well below float32
rounding).
"""
import torch

from utils.boxes import box_iou

STRIDES = (8, 16, 32)
ANCHORS = [torch.tensor(a, dtype=torch.float32).view(-1, 2) for a in  # yolov5s's, in pixels, per level
           ([10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326])]


def imitation_mask_loop(targets, anchors, stride, feature_hw, batch_size, thresh=0.5, kind="fine", anchor_t=None,
                        tol=None):
    """bool [batch_size, h, w], the mask distill.masks.imitation_mask defines (same arguments).

    For each image and each of its boxes: the IoU of the box with the anchor boxes centred on every cell,
    cells with IoU > thresh * (the box's best IoU), any over anchors, OR into the image's mask. Rows with
    a non-finite value are skipped. With tol (a float): returns (mask, doubt), doubt marking the cells
    where float32 rounding may decide either way: some box's IoU is within tol of its threshold (IoU 0
    never passes), or ('gt') the cell's centre lies within tol pixels of a box's edge.
    """
    h, w = feature_hw
    dtype = targets.dtype if targets.is_floating_point() else torch.float32
    anchors = anchors.to(dtype)
    na = len(anchors)
    mask = torch.zeros(batch_size, h, w, dtype=torch.bool)
    doubt = torch.zeros_like(mask)
    if kind == "full":
        mask[:] = True
    cy, cx = torch.meshgrid((torch.arange(h, dtype=dtype) + 0.5) * stride,
                            (torch.arange(w, dtype=dtype) + 0.5) * stride, indexing="ij")  # [h, w] pixels
    half = torch.cat((-anchors / 2, anchors / 2), 1).view(na, 1, 1, 4)
    anchor_boxes = (torch.stack((cx, cy, cx, cy), -1) + half).view(-1, 4)  # [na * h * w, 4] corners
    size = torch.tensor([w * stride, h * stride] * 2, dtype=dtype)
    for i in range(batch_size if kind != "full" else 0):
        for x, y, bw, bh in (targets[targets[:, 0] == i, 2:].to(dtype) * size).tolist():
            if not all(abs(v) < float("inf") for v in (x, y, bw, bh)):
                continue
            if anchor_t is not None:
                r = torch.tensor([bw, bh], dtype=dtype) / anchors  # [na, 2]
                if not (torch.max(r, 1 / r).amax(1) < anchor_t).any():
                    continue  # YOLOv5 assigns this box to another level
            x1, y1, x2, y2 = x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2
            if kind == "gt":
                mask[i] |= (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)
                if tol is not None:
                    near = torch.stack([(c - e).abs() <= tol for c, e in ((cx, x1), (cx, x2), (cy, y1), (cy, y2))])
                    doubt[i] |= near.any(0)
                continue
            iou = box_iou(torch.tensor([[x1, y1, x2, y2]], dtype=dtype), anchor_boxes)[0].view(na, h, w)
            limit = thresh * iou.max()
            mask[i] |= (iou > limit).any(0)
            if tol is not None:
                doubt[i] |= (((iou - limit).abs() <= tol) & (iou > 0)).any(0)
    return (mask, doubt) if tol is not None else mask
