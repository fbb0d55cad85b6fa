"""Imitation masks of Fine-grained Feature Imitation (Wang et al., CVPR 2019).

A cell of a pyramid level is in the mask of an image when one of the level's anchors, centred on the
cell, overlaps some ground-truth box of that image with IoU > psi * (the best IoU any anchor at any cell
of the level reaches with that box). Computed densely for all boxes at once, as defined: per level,
  the x-overlap [n, na, 1, w] and y-overlap [n, na, h, 1] of every box with every anchor centred on every
  cell; their product [n, na, h, w], the intersection, divided by the least intersection whose IoU
  passes the box's threshold (`_margin`: same cells as comparing the IoU, see there); the max of that
  per image [batch, na, h, w] (union over the image's boxes); > 1 for any anchor.
Boxes go in chunks when one level's [n, na, h, w] tensor would exceed MAX_ELEMENTS (per device type); the
chunks of all levels write their product into one scratch tensor, allocated once per call: a fresh 4 MB
tensor per chunk pays its page faults each time, which made the masks ~1.5x slower in a training process.
"""
import warnings

import torch

# index_reduce_ (the max per image) warns once per process that its API is in beta
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")

KINDS = ("fine", "gt", "full")
# [boxes, na, h, w] elements per chunk. CPU: 4 MB float32 temporaries stay in cache and off the
# allocator's page-faulting path (2-3x faster than 32 MB ones in a training step); GPU: fewer launches.
MAX_ELEMENTS = {"cpu": 2 ** 20, "other": 2 ** 23}


def _check_args(targets, anchors, stride, feature_hw, batch_size, thresh, kind):
    if kind not in KINDS:
        raise ValueError(f"imitation mask kind '{kind}' is not one of {KINDS}")
    if not 0.0 < float(thresh) <= 1.0:
        raise ValueError(f"imitation mask thresh (psi) must be in (0, 1], got {thresh}")
    if targets.ndim != 2 or targets.shape[1] != 6:
        raise ValueError(f"targets must be [n, 6] (image, class, x, y, w, h), got {tuple(targets.shape)}")
    if anchors.ndim != 2 or anchors.shape[1] != 2:
        raise ValueError(f"anchors must be [na, 2] in pixels, got {tuple(anchors.shape)}")
    h, w = feature_hw
    if h < 1 or w < 1 or batch_size < 0 or stride <= 0:
        raise ValueError(f"bad feature_hw={feature_hw}, batch_size={batch_size} or stride={stride}")


def _overlap(centres, anchor_len, lo, hi):
    """1-D overlap of an anchor of length anchor_len [1, na, 1, 1] centred at each of `centres` (broadcast
    along the last or second-to-last axis) with the box interval [lo, hi] ([n, 1, 1, 1]): >= 0."""
    half = anchor_len / 2
    return (torch.minimum(centres + half, hi) - torch.maximum(centres - half, lo)).clamp_(min=0)


def _margin(ovx, ovy, anchor_area, box_area, thresh, keep, out):
    """[n, na, h, w] in `out`: intersection / (the least intersection that passes), > 1 exactly at the
    anchors and cells whose IoU with the box is > thresh * the box's best IoU (in real arithmetic).

    ovx [n, na, 1, w], ovy [n, na, h, 1]; anchor_area [1, na, 1, 1], box_area and keep [n, 1, 1, 1] (boxes
    with keep False get 0); out: a float32 tensor of at least n * na * h * w elements. With I the
    intersection and s = anchor area + box area, IoU = I / (s - I), which increases with I. Hence the
    best IoU of an anchor is at its largest intersection, max ovx * max ovy, and IoU > f <=>
    I > f * s / (1 + f): the threshold on the IoU becomes one on the intersection, per anchor and box.
    """
    s = anchor_area + box_area  # [n, na, 1, 1]
    peak = ovx.amax(3, keepdim=True) * ovy.amax(2, keepdim=True)
    f = thresh * (peak / (s - peak)).amax(1, keepdim=True)  # psi * best IoU per box, [n, 1, 1, 1]; none: 0
    inter_min = f * s / (1 + f)
    # inter_min = 0 only for a box that overlaps no anchor anywhere (every I is 0); the clamp keeps
    # 1 / inter_min finite there (and below 1e-30 px^2, i.e. for boxes narrower than 1e-15 px)
    scale = torch.where(keep, 1 / inter_min.clamp(min=1e-30), 0.0)
    n, na, h, w = len(ovx), ovx.shape[1], ovy.shape[2], ovx.shape[3]
    return torch.mul(ovy * scale, ovx, out=out[:n * na * h * w].view(n, na, h, w))


def _parse_targets(targets, batch_size):
    """targets [n, 6] -> (keep [n] bool, image index [n] long, xywh [n, 4] float32 normalised). keep is False
    for rows holding a non-finite value or an image index outside [0, batch_size); their values become 0."""
    t = targets.float()
    keep = t.isfinite().all(1) & (t[:, 0] >= 0) & (t[:, 0] < batch_size)
    t = t.nan_to_num(0.0, 0.0, 0.0)
    return keep, t[:, 0].clamp(0, batch_size - 1).long(), t[:, 2:]


def _level_mask(keep, img, xywh, anchors, stride, h, w, batch_size, thresh, kind, anchor_t, scratch):
    """One level's mask from parsed targets (see imitation_mask); scratch: float32, >= one chunk."""
    dev = xywh.device
    if kind == "full" or batch_size == 0:
        return torch.full((batch_size, h, w), kind == "full", dtype=torch.bool, device=dev)
    anchors = anchors.to(device=dev, dtype=torch.float32)
    box = xywh * torch.tensor([w * stride, h * stride] * 2, device=dev)  # centres and sizes in input pixels
    if anchor_t is not None:  # YOLOv5's matching: max(w / a_w, a_w / w, h / a_h, a_h / h) < anchor_t
        r = box[:, None, 2:] / anchors  # [n, na, 2]
        keep = keep & (torch.max(r, 1 / r).amax(2) < anchor_t).any(1)
    lo, hi = box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2
    cx = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * stride
    cy = (torch.arange(h, device=dev, dtype=torch.float32)[:, None] + 0.5) * stride  # [h, 1]
    aw, ah = anchors[:, 0].view(1, -1, 1, 1), anchors[:, 1].view(1, -1, 1, 1)
    if kind == "gt":
        per_image = torch.zeros(batch_size, h, w, dtype=torch.bool, device=dev)  # union of the boxes inside
    else:
        per_image = torch.zeros(batch_size, len(anchors), h, w, device=dev)  # largest margin of the boxes
    chunk = _chunk_boxes(len(anchors), h, w, dev)
    for i in range(0, len(box), chunk):
        j = slice(i, i + chunk)
        x1, y1, x2, y2 = (v.view(-1, 1, 1, 1) for v in (*lo[j].T, *hi[j].T))  # [n, 1, 1, 1] each
        keep_j = keep[j].view(-1, 1, 1, 1)
        if kind == "gt":
            inside = ((cy > y1) & (cy < y2) & keep_j) & ((cx > x1) & (cx < x2))  # [n, 1, h, w]
            per_image.index_put_((img[j],), inside[:, 0], accumulate=True)  # OR per image
        else:
            ovx = _overlap(cx, aw, x1, x2)  # [n, na, 1, w]
            ovy = _overlap(cy, ah, y1, y2)  # [n, na, h, 1]
            area = (box[j, 2] * box[j, 3]).view(-1, 1, 1, 1)
            margin = _margin(ovx, ovy, aw * ah, area, thresh, keep_j, scratch)  # [n, na, h, w] in scratch
            per_image.index_reduce_(0, img[j], margin, "amax")  # max per image, over all chunks so far
    return per_image if kind == "gt" else per_image.amax(1) > 1  # 'fine': passes for some anchor


def _chunk_boxes(na, h, w, device):
    """Boxes per chunk of a level: [boxes, na, h, w] within MAX_ELEMENTS, at least one box."""
    return max(1, MAX_ELEMENTS["cpu" if device.type == "cpu" else "other"] // (na * h * w))


def imitation_masks(targets, anchors, strides, feature_hws, batch_size, thresh=0.5, kind="fine", anchor_t=None):
    """imitation_mask of several levels: list of bool [batch_size, h_l, w_l].

    anchors: list of [na, 2] (pixels) or [L, na, 2]; strides: Python numbers; feature_hws: (h, w) each."""
    if not len(anchors) == len(strides) == len(feature_hws):
        raise ValueError(f"levels differ: {len(anchors)} anchors, {len(strides)} strides, "
                         f"{len(feature_hws)} feature sizes")
    anchors = [torch.as_tensor(a) for a in anchors]
    strides = [float(s) for s in strides]
    hws = [(int(h), int(w)) for h, w in feature_hws]
    for a, s, hw in zip(anchors, strides, hws):
        _check_args(targets, a, s, hw, batch_size, thresh, kind)
    parsed = _parse_targets(targets, batch_size)
    anchor_t = None if anchor_t is None else float(anchor_t)
    dev = targets.device
    elements = [min(len(targets), _chunk_boxes(len(a), h, w, dev)) * len(a) * h * w
                for a, (h, w) in zip(anchors, hws)]
    scratch = torch.empty(max(elements, default=0) if kind == "fine" else 0, device=dev)
    return [_level_mask(*parsed, a, s, h, w, batch_size, float(thresh), kind, anchor_t, scratch)
            for a, s, (h, w) in zip(anchors, strides, hws)]


def imitation_mask(targets, anchors, stride, feature_hw, batch_size, thresh=0.5, kind="fine", anchor_t=None):
    """Imitation mask of one level, bool [batch_size, H, W], on targets' device.

    targets [n, 6] (image index, class, x, y, w, h normalised to the input of size (H*stride, W*stride));
    anchors [na, 2] in pixels (positive); stride a Python number; thresh = psi. kind: 'fine' (the paper's
    anchor-IoU rule), 'gt' (cells whose centre lies strictly inside a box), 'full' (every cell of every
    image, with or without boxes). anchor_t: if set, only boxes that YOLOv5's target matching assigns to
    this level count ('fine', 'gt'). Rows whose image index is outside [0, batch_size) or that hold a
    non-finite value are ignored; zero-size boxes mark nothing. No host sync.
    """
    return imitation_masks(targets, [anchors], [stride], [feature_hw], batch_size, thresh, kind, anchor_t)[0]


def mask_coverage(masks):
    """Percentage of cells in each level's mask (list of floats; syncs with the device, call when logging)."""
    return [100.0 * m.float().mean().item() if m.numel() else 0.0 for m in masks]
