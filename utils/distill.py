"""Fine-grained Feature Imitation (Wang et al., CVPR 2019): imitation masks, adaptation layers, loss.

The student imitates the teacher's neck features (the maps Detect consumes) only at the cells near
objects. A cell belongs to the mask of a level when one of that level's anchors, centred on the cell,
overlaps some ground-truth box with IoU > psi * (the best IoU any anchor/cell of the level reaches with
that box). The imitation loss is the squared error between adapt(student) and teacher over masked cells
and channels, divided by 2 * (number of masked cells).

`imitation_masks` / `imitation_mask` are the fast path (no loop over images or boxes, no host sync); they
return exactly the booleans of `imitation_mask_reference`, the definition written out with loops (see
`_fine_rows` for why the two agree bit for bit).
"""
import contextlib
import functools
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("fine", "gt", "full")
ADAPTERS = ("3x3", "1x1", "none")
_EPS = 1e-9  # added to anchor area + box area so that a zero-size box never gives 0/0


# ----------------------------------------------------------------------------------------------------
# Geometry shared by the fast path and the reference: one float formula, so both see identical values.

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


def _boxes_px(targets, scale):
    """Targets [n, 6] -> image index [n] (long) and boxes [3, 2, n] in input pixels: (start, end, size) x (x, y).
    scale [4, 1]: input width, height, width, height in pixels (float32, on the targets' device). Non-finite
    values become 0 and the rest is clipped to +-1e4, so broken labels mark nothing or little instead of
    breaking the arithmetic."""
    t = targets.float().nan_to_num(0.0, 0.0, 0.0).clamp_(-1e4, 1e4)
    xywh = t[:, 2:].T * scale  # [4, n]
    half = xywh[2:] / 2
    return t[:, 0].long(), torch.stack((xywh[:2] - half, xywh[:2] + half, xywh[2:]))


def _input_scale(stride, h, w, device):
    """The `scale` of _boxes_px for a level of stride `stride` and map size h x w."""
    return torch.tensor([w * stride, h * stride] * 2, dtype=torch.float32, device=device).view(4, 1)


def _centres(n, stride, device):
    """Cell centres (i + 0.5) * stride in pixels, [n] ascending."""
    return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * stride


def _reach(centres, half, b1, b2):
    """How far an anchor of half-length `half` centred on each cell reaches into the box [b1, b2].

    Returns (r, l): r = anchor end - box start (non-decreasing along the cells), l = box end - anchor start
    (non-increasing); centres [cells], half [na, 1 or cells], b1/b2 broadcast in front ([n, 1, 1] or 0-d).
    """
    return (centres + half) - b1, b2 - (centres - half)


def _overlap(r, l, a_len, b_len):
    """Length of the 1-D intersection: max(0, min(r, l, anchor length, box length)); overwrites r.

    A min of one non-decreasing and one non-increasing sequence (and constants): exactly unimodal along
    the cells in floating point too, which the fast path relies on.
    """
    torch.minimum(r, l, out=r)
    torch.minimum(r, a_len, out=r)
    torch.minimum(r, b_len, out=r)
    return r.clamp_(min=0)


def _union_base(anchor_area, box_area):
    """Anchor area + box area (+eps); IoU = inter / (this - inter)."""
    return (anchor_area + box_area) + _EPS


def _matches_level(anchors, bw, bh, anchor_t):
    """YOLOv5's target matching: max(w/a_w, a_w/w, h/a_h, a_h/h) < anchor_t for at least one anchor.

    anchors [..., na, 2] -> bool [n, ...] (one level: [n]; levels side by side: [n, L])."""
    wh = torch.stack((bw, bh), -1).view(-1, *[1] * (anchors.ndim - 1), 2)
    r = wh / anchors  # [n, ..., na, 2]
    return (torch.max(r, 1 / r).amax(-1) < anchor_t).any(-1)


def anchor_box_iou(anchors, stride, h, w, x1, x2, y1, y2, bw, bh):
    """IoU [na, h, w] of each anchor centred on each cell with one box (pixel corners x1, x2, y1, y2, size)."""
    aw, ah = anchors[:, :1], anchors[:, 1:]  # [na, 1]
    ovx = _overlap(*_reach(_centres(w, stride, x1.device), aw / 2, x1, x2), aw, bw)  # [na, w]
    ovy = _overlap(*_reach(_centres(h, stride, x1.device), ah / 2, y1, y2), ah, bh)  # [na, h]
    inter = ovy[:, :, None] * ovx[:, None, :]
    return inter / (_union_base(aw * ah, bw * bh)[:, :, None] - inter)


def imitation_mask_reference(targets, anchors, stride, feature_hw, batch_size, thresh=0.5, kind="fine",
                             anchor_t=None):
    """Test/benchmark reference: the same mask written straight from the definition, image by image and box
    by box (dense IoU of every anchor at every cell). Slow; same signature and result as imitation_mask."""
    stride = float(stride)
    _check_args(targets, anchors, stride, feature_hw, batch_size, thresh, kind)
    h, w = int(feature_hw[0]), int(feature_hw[1])
    dev = targets.device
    mask = torch.zeros(batch_size, h, w, dtype=torch.bool, device=dev)
    if kind == "full":
        return mask | True
    anchors = anchors.to(device=dev, dtype=torch.float32)
    img, box = _boxes_px(targets, _input_scale(stride, h, w, dev))
    (x1, y1), (x2, y2), (bw, bh) = box
    cx, cy = _centres(w, stride, dev), _centres(h, stride, dev)
    for i in range(batch_size):
        for j in torch.nonzero(img == i).flatten().tolist():
            if anchor_t is not None and not _matches_level(anchors, bw[j:j + 1], bh[j:j + 1], float(anchor_t))[0]:
                continue
            if kind == "gt":
                inside_x = (cx > x1[j]) & (cx < x2[j])
                inside_y = (cy > y1[j]) & (cy < y2[j])
                mask[i] |= inside_y[:, None] & inside_x[None, :]
                continue
            iou = anchor_box_iou(anchors, stride, h, w, x1[j], x2[j], y1[j], y2[j], bw[j], bh[j])  # [na, h, w]
            mask[i] |= (iou > thresh * iou.max()).any(0)
    return mask


# ----------------------------------------------------------------------------------------------------
# Fast path. The levels are laid side by side: rows r = (level, y) and columns (level, x) of all levels
# are concatenated, so one torch op serves every level. On CPU the cost is about half op overhead (~5 us per
# op, ~155 ops) and half memory traffic over [2, boxes, anchors, rows] tensors; both shaped what is below.

_SLACK = 1 / 64  # cells; > |real estimate - float boundary| (a few ulps) while box coordinates stay < ~1e5 px
_BIG = float(2 ** 20)  # added to an interval start to empty it (ends stay exact integers in float32)


@contextlib.contextmanager
def _one_cpu_thread(device):
    """Run the mask ops single-threaded on CPU (thread count restored after): they are many small ops, for
    which intra-op threads only add overhead, and each parallel op can stall for milliseconds when the
    cores are shared (measured: 160 ms instead of 0.5 ms for 20 adds of 57k floats on a busy 2-core box)."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=64)
def _layout(hws, strides, batch_size, device):
    """Tables for levels side by side, built once per shape on the device.

    Rows r = (level l, y) of all levels: level, centre cy, stride, width w_l, offset of (image 0, y) in the flat
    difference buffer and the step from one image to the next; the buffer holds per level batch_size images
    of h_l rows of w_l + 1 counters. Columns (l, x): centre cx. Constants of `_peak_overlap` (per candidate
    cell), `_fine_rows` (per side of the row intervals) and `_paint`.
    """
    def cat(parts, dtype):
        return torch.cat([p.to(dtype) for p in parts])

    full = functools.partial(torch.full, device=device)
    rows, cols, levels, off = [], [], [], 0
    for lvl, ((h, w), s) in enumerate(zip(hws, strides)):
        y = torch.arange(h, device=device)
        rows.append((full((h,), lvl), _centres(h, s, device), full((h,), s), full((h,), w), off + y * (w + 1),
                     full((h,), h * (w + 1))))
        cols.append(_centres(w, s, device))
        levels.append((off, h, w))
        off += batch_size * h * (w + 1)
    f32, i64 = torch.float32, torch.int64
    lvl_r, cy, s_r, w_r, base_r, step_r = (cat(p, d) for p, d in zip(zip(*rows), (i64, f32, f32, f32, i64, i64)))
    cx = torch.cat(cols)
    tensor = functools.partial(torch.tensor, dtype=f32, device=device)
    wmax, n_lvl, n_rows = max(w for _, w in hws), len(hws), len(s_r)

    def per_side(side0, side1):  # [2, 1, 1, R], full rows: clamp/add with [2, 1, 1, 1] operands is ~5x slower
        return torch.stack(torch.broadcast_tensors(tensor(side0), tensor(side1), s_r)[:2]).view(2, 1, 1, n_rows)

    return SimpleNamespace(
        lvl_r=lvl_r, cy=cy, s_r=s_r, w_r=w_r, base_r=base_r, step_r=step_r, cx=cx,
        base_f=base_r.float(), step_f=step_r.float(),  # exact while size < 2 ** 24
        ws=[w for _, w in hws], levels=levels, size=off,
        zero=torch.zeros((), device=device), scale=_input_scale(strides[0], *hws[0], device),
        # _peak_overlap, per candidate cell k = (level, j): level, 1 / (2 stride), j - 1, stride, last x/y cell
        lvl_k=torch.arange(n_lvl, device=device).repeat_interleave(3),
        inv2s_k=tensor([0.5 / s for s in strides for _ in range(3)]), off_k=tensor([-1.0, 0.0, 1.0] * n_lvl),
        s_k=tensor([s for s in strides for _ in range(3)]),
        last_k=tensor([[w - 1 for _, w in hws for _ in range(3)],
                       [h - 1 for h, _ in hws for _ in range(3)]]).view(2, 1, 1, 3 * n_lvl),
        # _fine_rows: the ulp steps of the I* search, then per side (0: interval start, from r[x]; 1: end,
        # from l[x] mirrored to -x)
        ulps=torch.arange(-8, 9, dtype=torch.int32, device=device),
        sgn2=tensor([[1.0], [-1.0]]), half_sgn=per_side(0.5, -0.5),
        kappa=per_side(1.0 - 0.5 - _SLACK, 1.0 + 0.5 - _SLACK) * s_r,  # (1 - sign/2 - slack) * stride
        y_min=per_side(-1.0, -(wmax + 2.0)), y_max=per_side(wmax + 2.0, 1.0),
        # _paint: clip bounds (lo and stop in [0, w]) and the +1/-1 of each side
        clip_min=torch.stack((torch.zeros_like(w_r), 1 - w_r)).view(2, 1, n_rows),
        clip_max=torch.stack((w_r, torch.ones_like(w_r))).view(2, 1, n_rows),
        pm_i32=torch.tensor([1, -1], dtype=torch.int32, device=device).view(2, 1, 1),
        pm_u8=torch.tensor([1, 255], dtype=torch.uint8, device=device).view(2, 1, 1))  # 255 = -1 modulo 256


def _less(p, t):
    """1.0 where p < t else 0.0, written over p (float). A comparison into a float `out` on CPU costs about
    half of in-place arithmetic (p - t, sign, clamp) and a small fraction of a bool result cast back."""
    return torch.lt(p, t, out=p)


def _ulp_window(x, steps):
    """Floats around positive x: x stepped by `steps` (int32, e.g. -8..8) units in the last place, [..., len(steps)]."""
    bits = x.clamp(min=1e-30, max=1e30).view(torch.int32)  # positive finite floats order like their bits
    return (bits[..., None] + steps).view(torch.float32)


def _peak_overlap(lay, a, b1, b2, blen):
    """Best 1-D overlap over the map's columns and over its rows, [2, n, na, L] (axis x/y, box, anchor, level).

    The overlap along the cells (ovx, ovy) is unimodal in floating point with its maximum at one of the two
    cells whose centres bracket the box centre: further away r < l (or l < r) by whole strides, and r, l are
    monotone. So on the map it peaks at one of those two clipped to the map, and evaluating the 3 cells
    around the rounded centre with the same float ops as `_reach` gives the maximum of the dense map exactly.
    a [2, na, L] anchor (w, h); b1, b2, blen [2, n, 1, 1] box (x, y) start, end, length.
    """
    n, (_, na, n_lvl) = b1.shape[1], a.shape
    cells = torch.addcmul(lay.zero, b1 + b2, lay.inv2s_k).sub_(0.5).round_().add_(lay.off_k)  # [2, n, 1, 3L]
    centres = cells.clamp_(min=lay.zero, max=lay.last_k).add_(0.5).mul_(lay.s_k)
    a_k = a.index_select(2, lay.lvl_k)[:, None]  # [2, 1, na, 3L]
    ov = _overlap(*_reach(centres, a_k / 2, b1, b2), a_k, blen)  # [2, n, na, 3L]
    return ov.view(2, n, na, n_lvl, 3).amax(-1)


def _fine_rows(lay, anchors, box, thresh):
    """For every (box, anchor, row r = (level, y)): the cells [lo, stop) of that row whose IoU > psi * best.

    Why this equals the dense definition bit for bit (float32, round to nearest): with I = ovy[y] * ovx[x]
    (rounded), the rounded IoU(I) = I / (S - I) is non-decreasing in I, so IoU > F <=> I >= I*, the first
    float where it holds; I* is found among the floats next to F*S/(1+F) (the real solution, a few ulps
    away; if none is above F, nothing can exceed F, e.g. psi = 1, and the last one is above every I). The
    best IoU is IoU(max ovy * max ovx) by the same monotonicity. In row y (v = ovy[y]),
    rounded v * ovx[x] = max(0, min(v*r[x], v*l[x], v*a_w, v*b_w)) (rounding is monotone), where
    r[x] = anchor end - box start rises with x and l[x] = box end - anchor start falls. So the row's cells
    are [first x with v*r[x] >= I*, last x with v*l[x] >= I*], provided v*a_w, v*b_w >= I*. Each end comes
    from its real-arithmetic estimate, settled by one exact evaluation of v*r[x] (v*l[x]) with the same
    float operations as `_reach`. Rows with v = 0, and boxes without any overlap, come out empty.

    Both ends are computed at once as side 0 and side 1 of one tensor: side 1 works on y = -x, where
    l[x] = ((y - 1/2) * s + a_w/2) - (-x2) holds exactly (negation is exact), so "last x with v*l[x] >= I*"
    becomes "first y with ..." like side 0 with sign -1. anchors [L, na, 2]; box [3, 2, n] (start, end,
    length) x (x, y) in pixels. Returns y [2, n, na, R] (float, integer-valued): lo = y[0], stop = 1 - y[1];
    empty when stop <= lo; they may lie off the map.
    """
    n = box.shape[-1]
    b1, b2, blen = box.view(3, 2, n, 1, 1).unbind(0)  # [2, n, 1, 1] each
    a = anchors.permute(2, 1, 0)  # [2, na, L]: anchor (w, h)
    peak_x, peak_y = _peak_overlap(lay, a, b1, b2, blen)  # [n, na, L]
    best = peak_y * peak_x  # the best intersection: IoU rises with it at fixed areas
    s = _union_base(a[0] * a[1], blen[0] * blen[1])  # [n, na, L]
    f = thresh * (best / (s - best)).amax(1, keepdim=True)  # F per box and level, [n, 1, L]
    cand = _ulp_window(f * s / (1 + f), lay.ulps)  # [n, na, L, 17] floats around the real root of I / (S - I) = F
    above = cand / (s[..., None] - cand) > f[..., None]  # False..False True..True
    i_star = cand.gather(-1, (~above).sum(-1, keepdim=True).clamp_(max=cand.shape[-1] - 1))[..., 0]
    i_star = i_star.index_select(-1, lay.lvl_r)  # [n, na, R]

    a_r = a.index_select(2, lay.lvl_r)  # [2, na, R]; contiguous, or every op below slows down
    half_r = a_r / 2
    v = _overlap(*_reach(lay.cy, half_r[1], b1[1], b2[1]), a_r[1], blen[1])  # ovy, [n, na, R]
    sb = (box[:2, 0] * lay.sgn2).view(2, n, 1, 1)  # (x1, -x2)
    q = i_star / v  # ovx that row needs, real arithmetic (v = 0: inf, clamped below -> empty row)
    # first y with v*g[y] >= I*, g = r (side 0) or mirrored l (side 1): with e the real root of g = q,
    # y0 = floor(e - slack) + 1 is in doubt: y = y0 if v*g[y0] >= I* else y0 + 1. u = e - slack + 1, clamped
    # to y0 in [-1, wmax + 2] along x (whatever lies further out is off the map on the same side).
    u = (q + (lay.kappa - half_r[0])).add_(sb).div_(lay.s_r)  # [2, n, na, R]
    y = u.clamp_(min=lay.y_min, max=lay.y_max).floor_()
    g = (y + lay.half_sgn).mul_(lay.s_r).add_(half_r[0]).sub_(sb).mul_(v)  # v * g[y0], exactly as `_reach`
    y.add_(_less(g, i_star))
    # v*a_w >= I* and v*b_w >= I*, else empty (both sides pushed out)
    return y.add_(_less(v.mul_(torch.minimum(a_r[0], blen[0])), i_star), alpha=_BIG)


def _gt_rows(lay, box):
    """For every (box, row r): cells [lo, stop) whose centre lies strictly inside the box, in the form of
    `_fine_rows` (lo = y[0], stop = 1 - y[1]), [2, n, 1, R]."""
    (x1, y1), (x2, y2) = box[0], box[1]
    per_level = lay.cx.split(lay.ws)
    lo = torch.stack([torch.searchsorted(c, x1, side="right") for c in per_level], -1)  # first centre > x1
    stop = torch.stack([torch.searchsorted(c, x2, side="left") for c in per_level], -1)  # first centre >= x2
    y = torch.stack((lo, 1 - stop)).float().index_select(-1, lay.lvl_r)  # [2, n, R]
    outside = ((lay.cy <= y1[:, None]) | (lay.cy >= y2[:, None])).float()  # [n, R]
    return y.add_(outside, alpha=_BIG)[:, :, None]


def _paint(lay, img, y, batch_size):
    """Union of row intervals (lo = y[0], stop = 1 - y[1], float, integer-valued, [2, n, k, R]) into one bool
    [bs, h_l, w_l] mask per level: +1 at lo, -1 at stop, cumulative sum along x. Empty (stop <= lo) or
    off-map parts add nothing, and so do boxes of images outside [0, batch_size). Overwrites y.

    The k intervals of a (box, row) are first merged into one, [min lo, max stop) over the non-empty ones,
    which costs a few ops on [2, n, k, R] and saves k - 1 of every later op. Exact for the anchors'
    intervals of `_fine_rows`: each non-empty one holds one of the two cells whose centres bracket the box
    centre (its ovx is unimodal with the maximum there, see `_peak_overlap`), so any union of them is an
    interval. Clipping to the row comes after the merge: clipping is intersecting with [0, w), which
    distributes over the union.
    """
    if y.shape[2] > 1:  # float arithmetic only: on CPU, bool masks (masked_fill, where) cost 20x more
        nonempty = _less(y[0] + y[1], 1.0)  # 1 where lo < stop, else 0
        y = y.sub_(nonempty, alpha=_BIG).amin(2).add_(_BIG)  # [2, n, R]; all empty: lo, 1 - stop beyond the row
    else:
        y = y[:, :, 0]
    img_in = img.clamp(0, batch_size - 1)
    y.add_((img_in != img)[:, None], alpha=_BIG)  # boxes of other images: empty intervals
    y = y.clamp_(min=lay.clip_min, max=lay.clip_max)  # lo, stop in [0, w]
    stop = y[1].neg_().add_(1)
    torch.maximum(stop, y[0], out=stop)  # = lo for empty intervals: +1 and -1 cancel
    if lay.size < 2 ** 24:  # offsets of (image, row) are exact in float32: add them before the (costly) int64 cast
        idx = y.add_(torch.addcmul(lay.base_f, img_in[:, None], lay.step_f)).long()
    else:
        idx = y.long().add_(lay.base_r + img_in[:, None] * lay.step_r)
    # A cell's count is the number of boxes covering it, at most n: with n < 256, byte counters modulo 256
    # (unsigned: wrap-around is defined) are zero exactly where the count is, at a quarter of the traffic.
    pm = lay.pm_u8 if len(img) < 256 else lay.pm_i32
    diff = torch.zeros(lay.size, dtype=pm.dtype, device=img.device)
    diff.scatter_add_(0, idx.view(-1), pm.expand(idx.shape).reshape(-1))
    counts = diff.cumsum(0, dtype=pm.dtype).bool()  # each row's +1/-1 pairs sit inside the row: no carry-over
    return [counts[o:o + batch_size * h * (w + 1)].view(batch_size, h, w + 1)[..., :w] for o, h, w in lay.levels]


def imitation_masks(targets, anchors, strides, feature_hws, batch_size, thresh=0.5, kind="fine", anchor_t=None):
    """Imitation masks of several levels of one input at once: list of bool [batch_size, h_l, w_l].

    Each equals imitation_mask(targets, anchors[l], strides[l], feature_hws[l], ...); sharing the torch ops
    across levels makes it about L times cheaper. anchors: list of [na, 2] (pixels) or [L, na, 2];
    strides: Python numbers. Levels of different input sizes (h_l * stride_l) are computed one by one.
    """
    strides = [float(s) for s in strides]
    hws = [(int(h), int(w)) for h, w in feature_hws]
    if not len(anchors) == len(strides) == len(hws):
        raise ValueError(f"levels differ: {len(anchors)} anchors, {len(strides)} strides, {len(hws)} feature sizes")
    for a, s, hw in zip(anchors, strides, hws):
        _check_args(targets, a, s, hw, batch_size, thresh, kind)
    dev = targets.device
    with _one_cpu_thread(dev):
        if kind == "full" or batch_size == 0 or not hws:
            return [torch.full((batch_size, h, w), kind == "full", dtype=torch.bool, device=dev) for h, w in hws]
        if len({(h * s, w * s) for (h, w), s in zip(hws, strides)}) > 1:  # box pixels differ per level
            return [imitation_masks(targets, [a], [s], [hw], batch_size, thresh, kind, anchor_t)[0]
                    for a, s, hw in zip(anchors, strides, hws)]
        anchors = torch.stack([torch.as_tensor(a) for a in anchors]).to(device=dev, dtype=torch.float32)  # [L, na, 2]
        lay = _layout(tuple(hws), tuple(strides), int(batch_size), dev)
        img, box = _boxes_px(targets, lay.scale)  # box [3, 2, n]: (start, end, length) x (x, y)
        y = _gt_rows(lay, box) if kind == "gt" else _fine_rows(lay, anchors, box, float(thresh))
        if anchor_t is not None:  # boxes YOLOv5 assigns to other levels: empty intervals
            other = (~_matches_level(anchors, *box[2], float(anchor_t))).float()  # [n, L]
            y = y.add_(other.index_select(-1, lay.lvl_r)[:, None], alpha=_BIG)
        return _paint(lay, img, y, batch_size)


def imitation_mask(targets, anchors, stride, feature_hw, batch_size, thresh=0.5, kind="fine", anchor_t=None):
    """Imitation mask of one level, bool [batch_size, H, W], on targets' device.

    targets [n, 6] (image index, class, x, y, w, h normalised to the input of size (H*stride, W*stride));
    anchors [na, 2] in pixels; stride a Python number; thresh = psi. kind: 'fine' (the paper's anchor-IoU
    rule), 'gt' (cells whose centre lies strictly inside a box), 'full' (every cell of every image, with
    or without boxes). anchor_t: if set, only boxes that YOLOv5's target matching assigns to this level
    count ('fine', 'gt'). Rows whose image index is outside [0, batch_size) are ignored; zero-size boxes
    mark nothing. Vectorised over images, boxes, anchors and cells; no host sync.
    """
    return imitation_masks(targets, [anchors], [stride], [feature_hw], batch_size, thresh, kind, anchor_t)[0]


def mask_coverage(masks):
    """Percentage of cells in each level's mask (list of floats; syncs with the device, call when logging)."""
    return [100.0 * m.float().mean().item() if m.numel() else 0.0 for m in masks]


# ----------------------------------------------------------------------------------------------------
# Adaptation layers and loss

def build_adapters(student_ch, teacher_ch, kind="1x1"):
    """One adaptation layer per level, student channels -> teacher channels.

    '1x1' (the trainer's default): a 1x1 Conv2d, no activation. '3x3': Conv2d 3x3 (pad 1, bias) + ReLU, as
    in the paper; YOLOv5 neck features come out of SiLU (>= -0.28), which a ReLU cannot reproduce, and
    it has 9x the weights and cost; on the shapes benchmark it closed less of the gap than 1x1 (README).
    'none': identity (needs equal channels).
    Weights start small (normal, std 0.01; zero bias): the adapter output starts near zero, so the first
    imitation gradients reaching the (often pretrained) student are small and not a random projection of
    the full error; the adapter learns the channel map before it pulls hard on the student.
    """
    student_ch, teacher_ch = list(student_ch), list(teacher_ch)
    if kind not in ADAPTERS:
        raise ValueError(f"adapter kind '{kind}' is not one of {ADAPTERS}")
    if len(student_ch) != len(teacher_ch):
        raise ValueError(f"student has {len(student_ch)} imitated levels, teacher {len(teacher_ch)}")
    layers = []
    for cs, ct in zip(student_ch, teacher_ch):
        if kind == "none":
            if cs != ct:
                raise ValueError(f"adapter 'none' needs equal channels, got student {cs} vs teacher {ct}; "
                                 f"use '1x1' or '3x3'")
            layers.append(nn.Identity())
            continue
        conv = nn.Conv2d(cs, ct, 3 if kind == "3x3" else 1, padding=1 if kind == "3x3" else 0, bias=True)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        layers.append(nn.Sequential(conv, nn.ReLU()) if kind == "3x3" else conv)
    return nn.ModuleList(layers)


def _conv_of(adapt):
    """(conv, activation) of an adapter made by build_adapters; (None, None) for anything else."""
    if isinstance(adapt, nn.Conv2d):
        return adapt, None
    if isinstance(adapt, nn.Sequential) and len(adapt) == 2 and isinstance(adapt[0], nn.Conv2d):
        return adapt[0], adapt[1]
    return None, None


def adapt_at(adapt, s, b, y, x):
    """The adapter's output at cells (b, y, x) only: [n, C_out], equal to adapt(s)[b, :, y, x].

    The loss reads the adapted student only under the mask (typically a few % of the cells), so a
    3x3 conv over the whole map would spend ~9x the adapter's useful work. Here the k x k patches of
    the masked cells are gathered and multiplied by the conv's weight: cost proportional to the mask.
    """
    conv, act = _conv_of(adapt)
    if conv is None or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 \
            or conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):
        return adapt(s)[b, :, y, x]  # generic module: evaluate everywhere, then pick
    kh, kw = conv.kernel_size
    ph, pw = conv.padding
    sp = F.pad(s, (pw, pw, ph, ph)) if ph or pw else s
    bs, c, hp, wp = sp.shape
    rows = sp.permute(0, 2, 3, 1).reshape(bs * hp * wp, c)  # one row of channels per padded cell
    # padded index of cell (y, x) is (y + ph, x + pw); its 'same' patch starts k//2 = padding before that,
    # i.e. at (y, x): the patch is rows (b, y + dy, x + dx) for dy < kh, dx < kw, read with one index_select
    corner = (b * hp + y) * wp + x
    offsets = torch.tensor([dy * wp + dx for dy in range(kh) for dx in range(kw)], device=s.device)
    patches = rows.index_select(0, (corner[:, None] + offsets).reshape(-1)).view(len(b), kh * kw * c)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, kh * kw * c)  # same (dy, dx, c) order
    out = patches @ weight.t() if conv.bias is None else torch.addmm(conv.bias, patches, weight.t())
    return act(out) if act is not None else out


NORMS = (None, "channel", "pkd")


def standardize_channels(x, eps=1e-5):
    """x [N, C, H, W] with each channel shifted and scaled to mean 0, variance 1 over the batch and the cells
    (a constant channel becomes 0)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) * (var + eps).rsqrt()


def imitation_loss(student_feats, teacher_feats, masks, adapters, normalize=None):
    """Sum over levels of sum_{masked cells, channels} (adapt(s) - t)^2 / (2 * N_p), in float32.

    N_p = masked cells of the level over the batch; a level with no masked cell gives 0 that is still
    connected to the student and the adapter. normalize='channel' also divides each level by its channels.
    normalize='pkd' (Cao et al., NeurIPS 2022) first standardises every channel of adapt(s) and of t over
    the whole maps of the batch (standardize_channels), then divides by the channels too: the term then
    depends neither on the teacher's feature magnitudes nor on its channel count (with every cell masked
    it is the mean over channels of 1 - the Pearson correlation of the two maps: 0 to 2).
    The adapter is evaluated at the masked cells only (adapt_at), unless more than half the cells are
    masked (e.g. kind 'full') or 'pkd' needs the whole map, where one conv over the map is used.
    Returns (loss scalar, per_level detached [nl]).
    """
    if normalize not in NORMS:
        raise ValueError(f"normalize must be one of {NORMS}, got {normalize}")
    if not len(student_feats) == len(teacher_feats) == len(masks) == len(adapters):
        raise ValueError(f"levels differ: {len(student_feats)} student, {len(teacher_feats)} teacher, "
                         f"{len(masks)} masks, {len(adapters)} adapters")
    terms = []
    for s, t, m, adapt in zip(student_feats, teacher_feats, masks, adapters):
        t = t.detach().float()
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:] or m.shape != (t.shape[0], *t.shape[2:]):
            raise ValueError(f"shapes differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}, "
                             f"mask {tuple(m.shape)}")
        b, y, x = m.nonzero(as_tuple=True)  # one host sync per level: the number of masked cells
        with torch.autocast(device_type=s.device.type, enabled=False):
            if normalize == "pkd":
                a, t = standardize_channels(adapt(s.float()))[b, :, y, x], standardize_channels(t)
            elif 2 * b.numel() > m.numel():
                a = adapt(s.float())[b, :, y, x]
            else:
                a = adapt_at(adapt, s.float(), b, y, x)  # [N_p, C_t]
        if a.shape[1] != t.shape[1]:
            raise ValueError(f"adapted student has {a.shape[1]} channels, teacher {t.shape[1]}")
        sq = (a - t[b, :, y, x]).pow(2).sum()  # no masked cell: an empty sum, 0 still connected to s and adapt
        term = sq / (2 * max(b.numel(), 1))
        terms.append(term if normalize is None else term / t.shape[1])
    loss = torch.stack(terms).sum()
    return loss, torch.stack(terms).detach()


class FeatureImitation(nn.Module):
    """Adapters + settings of the imitation term.

    student_ch, teacher_ch: channels of every level Detect consumes; levels: indices imitated (default
    all); adapter: build_adapters kind; thresh (psi), kind, anchor_t: imitation_mask settings; weight:
    lambda; warmup: iterations before the term switches on; normalize: imitation_loss option.
    state_dict() has exactly the keys of build_adapters(...).state_dict() (the adapters are the only
    children), so it can be a checkpoint's 'adapters' and loaded into either.
    """

    def __init__(self, student_ch, teacher_ch, levels=None, adapter="1x1", thresh=0.5, kind="fine",
                 anchor_t=None, weight=0.01, warmup=0, normalize=None):
        super().__init__()
        levels = list(range(len(student_ch))) if levels is None else [int(i) for i in levels]
        if not levels or any(not 0 <= i < len(student_ch) for i in levels):
            raise ValueError(f"imitated levels {levels} not within 0..{len(student_ch) - 1}")
        if kind not in KINDS or normalize not in NORMS:
            raise ValueError(f"bad imitation kind '{kind}' or normalize '{normalize}'")
        adapters = build_adapters([student_ch[i] for i in levels], [teacher_ch[i] for i in levels], adapter)
        for k, m in enumerate(adapters):
            self.add_module(str(k), m)
        self.adapters = list(adapters)  # plain list: the modules are registered once, under '0', '1', ...
        self.levels, self.thresh, self.kind, self.anchor_t = levels, thresh, kind, anchor_t
        self.weight, self.warmup, self.normalize = weight, warmup, normalize

    def forward(self, student_feats, teacher_feats, targets, anchors_px_per_level, strides, iteration):
        """-> (weight * imitation loss, stats), for all levels' features (lists indexed like Detect's inputs),
        the batch targets [n, 6], anchors in pixels per level ([na, 2] each), strides (Python numbers or a
        CPU tensor) and the global iteration. Before `warmup` iterations: a zero still connected to the
        student features and the adapters. stats: 'loss' (weighted), 'raw', 'per_level' (detached tensors),
        'masks' (list of bool masks, also during warm-up, so the first batch's plot and the coverage log
        exist from the start; pass to mask_coverage when logging); 'active' (False during warm-up)."""
        s = [student_feats[i] for i in self.levels]
        masks = imitation_masks(targets, [anchors_px_per_level[i] for i in self.levels],
                                [float(strides[i]) for i in self.levels], [x.shape[2:] for x in s], s[0].shape[0],
                                self.thresh, self.kind, self.anchor_t)
        if iteration < self.warmup:
            zero = sum(x.float().sum() for x in s) * 0.0
            zero = zero + sum(p.sum() for p in self.parameters()) * 0.0
            z = zero.detach()
            return zero, {"loss": z, "raw": z, "per_level": z.repeat(len(s)), "masks": masks, "active": False}
        t = [teacher_feats[i] for i in self.levels]
        raw, per_level = imitation_loss(s, t, masks, self.adapters, self.normalize)
        loss = raw * self.weight
        return loss, {"loss": loss.detach(), "raw": raw.detach(), "per_level": per_level, "masks": masks,
                      "active": True}
