"""The YOLOv5 training loss: target-to-anchor matching, CIoU box loss, objectness and class BCE.

Gains come from `model.hyp` (box, obj, cls, cls_pw, obj_pw, anchor_t, fl_gamma, label_smoothing).
The trainer rescales the yaml gains to the model's number of levels, classes and image size with
`scale_loss_gains` BEFORE building `ComputeLoss`, as upstream's train.py does.
"""
import torch
import torch.nn.functional as F

from utils.boxes import bbox_iou

# Objectness weight per level, small strides first (P3 sees most of the small objects).
LEVEL_BALANCE = {3: [4.0, 1.0, 0.4]}
LEVEL_BALANCE_P6 = [4.0, 1.0, 0.25, 0.06, 0.02]

# Neighbour cells as (dx, dy) of the centre: self, left, up, right, down. A target also claims the
# neighbour on the side of the cell its centre is nearest, so 3 cells per matched anchor in general.
_NEIGHBOURS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32)


def scale_loss_gains(hyp: dict, nl: int, nc: int, imgsz: int) -> dict:
    """Gains in hyp yamls are tuned for 3 levels, 80 classes and 640 px; rescale them (new dict).

    box *= 3/nl, cls *= nc/80 * 3/nl, obj *= (imgsz/640)^2 * 3/nl. Called once by the trainer.
    """
    h = dict(hyp)
    h["box"] = h["box"] * 3 / nl
    h["cls"] = h["cls"] * nc / 80 * 3 / nl
    h["obj"] = h["obj"] * (imgsz / 640) ** 2 * 3 / nl
    return h


def smooth_bce(eps: float = 0.0):
    """Label-smoothed BCE targets (positive, negative) = (1 - eps/2, eps/2)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


def bce_loss(logits, target, pos_weight: float = 1.0, gamma: float = 0.0, alpha: float = 0.25):
    """Mean BCE-with-logits; gamma > 0 adds the focal factor alpha_t * (1 - p_t)^gamma (Lin et al. 2017)."""
    pw = torch.tensor(pos_weight, device=logits.device, dtype=logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
    if gamma > 0:
        p = logits.sigmoid()
        p_t = target * p + (1 - target) * (1 - p)
        alpha_t = target * alpha + (1 - target) * (1 - alpha)
        loss = loss * alpha_t * (1.0 - p_t) ** gamma
    return loss.mean()


class ComputeLoss:
    """loss, items = ComputeLoss(model)(p, targets); p = Detect's raw maps [bs, na, ny, nx, 5 + nc]."""

    def __init__(self, model):
        model = getattr(model, "module", model)  # DDP / DataParallel
        h = getattr(model, "hyp", None)
        if not isinstance(h, dict) or any(k not in h for k in ("box", "obj", "cls")):
            raise ValueError("ComputeLoss needs model.hyp: a dict with at least 'box', 'obj', 'cls' gains "
                             f"(the trainer sets it from the hyp yaml); got {type(h).__name__}")
        self.detect = model.model[-1]  # anchors are read at call time: follows .to() and AutoAnchor
        self.na, self.nc, self.nl = self.detect.na, self.detect.nc, self.detect.nl
        self.hyp = h
        self.balance = LEVEL_BALANCE.get(self.nl, LEVEL_BALANCE_P6)
        if len(self.balance) < self.nl:
            raise ValueError(f"no objectness level balance for nl={self.nl} detection levels")
        self.cp, self.cn = smooth_bce(h.get("label_smoothing", 0.0))
        self.cls_pw, self.obj_pw = float(h.get("cls_pw", 1.0)), float(h.get("obj_pw", 1.0))
        self.gamma = float(h.get("fl_gamma", 0.0))
        self.anchor_t = float(h.get("anchor_t", 4.0))
        self.gr = 1.0  # objectness target = gr * IoU + (1 - gr)

    def __call__(self, p, targets):
        device = p[0].device
        targets = targets.to(device)
        lbox, lobj, lcls = (torch.zeros(1, device=device) for _ in range(3))
        tcls, tbox, indices, anchors = self.build_targets(p, targets)
        for i, pi in enumerate(p):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=device)  # [bs, na, ny, nx]
            if b.shape[0]:
                ps = pi[b, a, gj, gi]  # [n, 5 + nc] logits at the matched cells
                pxy = ps[:, :2].sigmoid() * 2 - 0.5  # offset in the cell, range (-0.5, 1.5)
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anchors[i]  # up to 4x the anchor, grid units
                iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox[i], CIoU=True)[:, 0]
                lbox = lbox + (1.0 - iou).mean()
                tobj[b, a, gj, gi] = ((1.0 - self.gr) + self.gr * iou.detach().clamp(0)).to(tobj.dtype)
                if self.nc > 1:  # a single class needs no class loss
                    t = torch.full_like(ps[:, 5:], self.cn)
                    t[torch.arange(b.shape[0], device=device), tcls[i]] = self.cp
                    lcls = lcls + bce_loss(ps[:, 5:], t, self.cls_pw, self.gamma)
            lobj = lobj + bce_loss(pi[..., 4], tobj, self.obj_pw, self.gamma) * self.balance[i]
        lbox = lbox * self.hyp["box"]
        lobj = lobj * self.hyp["obj"]
        lcls = lcls * self.hyp["cls"]
        bs = p[0].shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(self, p, targets):
        """Match targets [n, 6] (img, cls, xywhn) to anchors and cells of every level.

        Per level: tcls [m], tbox [m, 4] (xy offset from the cell corner, wh; grid units), indices
        (b, a, gj, gi) each [m], anch [m, 2] (grid units). An anchor matches when both wh ratios r
        satisfy max(r, 1/r) < anchor_t; each match is repeated in up to two neighbour cells nearest
        the centre (not across the image border). Order: neighbour, then anchor, then target.
        """
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f"targets must be [n, 6] (img, cls, x, y, w, h); got {tuple(targets.shape)}")
        bs, device = p[0].shape[0], targets.device
        if targets.shape[0] and (targets[:, 0].min() < 0 or targets[:, 0].max() >= bs):
            raise ValueError(f"target image indices must lie in [0, {bs}); got {targets[:, 0].unique().tolist()}")
        g = 0.5  # neighbour offset: a centre within 0.5 of a cell side also claims the cell beyond it
        neighbours = _NEIGHBOURS.to(device) * g
        tcls, tbox, indices, anch = [], [], [], []
        for i in range(self.nl):
            anchors = self.detect.anchors[i].to(device=device, dtype=targets.dtype)  # [na, 2] grid units
            ny, nx = p[i].shape[2:4]
            size = torch.tensor([nx, ny], device=device, dtype=targets.dtype)
            gxy, gwh = targets[:, 2:4] * size, targets[:, 4:6] * size  # [nt, 2] grid units
            r = gwh[None] / anchors[:, None]  # [na, nt, 2]
            match = torch.max(r, 1 / r).max(2).values < self.anchor_t  # [na, nt]
            a, t = match.nonzero(as_tuple=True)  # anchor-major
            xy = gxy[t]
            inv = size - xy  # distance to the right / bottom border
            near = torch.stack((torch.ones_like(xy[:, 0], dtype=torch.bool),
                                (xy[:, 0] % 1 < g) & (xy[:, 0] > 1),  # left half of cell, not first column
                                (xy[:, 1] % 1 < g) & (xy[:, 1] > 1),  # top half
                                (inv[:, 0] % 1 < g) & (inv[:, 0] > 1),  # right half, not last column
                                (inv[:, 1] % 1 < g) & (inv[:, 1] > 1)))  # bottom half  -> [5, m]
            o, k = near.nonzero(as_tuple=True)  # neighbour-major
            a, t, xy = a[k], t[k], xy[k]
            gij = (xy - neighbours[o]).long()
            gi, gj = gij[:, 0].clamp(0, nx - 1), gij[:, 1].clamp(0, ny - 1)
            b = targets[t, 0].long()
            indices.append((b, a, gj, gi))
            tbox.append(torch.cat((xy - torch.stack((gi, gj), 1), gwh[t]), 1))
            anch.append(anchors[a])
            tcls.append(targets[t, 1].long())
        return tcls, tbox, indices, anch
