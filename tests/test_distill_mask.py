"""Imitation masks (distill/masks.py): hand-computed cases, and the per-box loop of distill/mask_reference.py
at tolerance (cells whose IoU is within TOL of the threshold may differ)."""
import pytest
import torch

import distill.masks as distill_mask
from distill.mask_reference import ANCHORS, STRIDES, imitation_mask_loop
from distill.masks import imitation_mask, imitation_masks, mask_coverage

TOL = 1e-6


def random_targets(g, bs, max_boxes, grid_px=None, img_hw=(96, 128)):
    """Random batch targets [n, 6]: some empty images, boxes over the borders, tiny and zero-size boxes.
    grid_px: snap box edges to multiples of this many pixels (exact ties between cells and anchors)."""
    rows = []
    for i in range(bs):
        n = int(torch.randint(0, max_boxes + 1, (1,), generator=g))
        if i == 0:
            n = 0  # always one image without boxes
        xy = torch.rand(n, 2, generator=g) * 1.2 - 0.1  # centres may lie outside the image
        wh = torch.rand(n, 2, generator=g) ** 2 * 0.9
        kind = torch.randint(0, 6, (n,), generator=g)
        wh[kind == 0] *= 1e-3  # tiny
        wh[kind == 1, 0] = 0.0  # zero width
        if grid_px:
            h, w = img_hw
            scale = torch.tensor([w, h], dtype=torch.float32) / grid_px
            xy, wh = (xy * scale).round() / scale, ((wh * scale).round() / scale)
        cls = torch.randint(0, 3, (n, 1), generator=g).float()
        rows.append(torch.cat((torch.full((n, 1), float(i)), cls, xy, wh), 1))
    return torch.cat(rows)


class LoopCheck:
    """Compares imitation_mask with the loop reference (float64); counts the cells marked and in doubt."""

    def __init__(self):
        self.cells = self.marked = self.doubtful = 0

    def __call__(self, targets, anchors, stride, hw, bs, **kw):
        dense = imitation_mask(targets, anchors, stride, hw, bs, **kw)
        ref, doubt = imitation_mask_loop(targets.double(), anchors, stride, hw, bs, tol=TOL, **kw)
        assert dense.shape == (bs, *hw) and dense.dtype == torch.bool
        wrong = (dense != ref) & ~doubt
        assert not wrong.any(), f"{int(wrong.sum())} cells differ from the loop, e.g. {wrong.nonzero()[0].tolist()}"
        self.cells += ref.numel()
        self.marked += int(ref.sum())
        self.doubtful += int(doubt.sum())
        return dense

    def assert_meaningful(self):
        """The comparison was not vacuous: cells were marked, and most of them were not in doubt (those that
        are come from exact ties on pixel grids, tiny boxes, and psi = 1, where nothing passes in reals)."""
        assert self.marked > 0.02 * self.cells and self.doubtful < 0.5 * self.marked, vars(self)


def box(img, cx, cy, w, h, size=64):
    """A target row for a box given in pixels of a size x size input."""
    return [img, 0, cx / size, cy / size, w / size, h / size]


# ------------------------------------------------------------------------------------------------ by hand

# One 24x24 anchor, stride 8, and a 24x24 box centred on cell (row 2, col 3) of an 8x8 map. The anchor
# on the cell (dy, dx) away overlaps the box by (24 - 8|dy|) x (24 - 8|dx|) px; IoU = I / (2 * 576 - I):
HAND_IOU = {(0, 0): 1.0, (0, 1): 384 / 768, (1, 1): 256 / 896, (0, 2): 192 / 960, (1, 2): 128 / 1024,
            (2, 2): 64 / 1088}  # (min(|dy|, |dx|), max(...)); 0 from 3 cells away


@pytest.mark.parametrize("psi, n_cells", [(0.6, 1), (0.4, 5), (0.25, 9), (0.15, 13), (0.1, 21), (0.05, 25)])
def test_mask_by_hand_one_anchor(psi, n_cells):
    targets = torch.tensor([box(0, 28, 20, 24, 24)])
    anchors = torch.tensor([[24.0, 24.0]])
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    for r in range(8):
        for c in range(8):
            d = tuple(sorted((abs(r - 2), abs(c - 3))))
            expected[0, r, c] = HAND_IOU.get(d, 0.0) > psi  # best IoU is 1
    assert int(expected.sum()) == n_cells
    assert torch.equal(imitation_mask(targets, anchors, 8, (8, 8), 1, thresh=psi), expected)
    assert torch.equal(imitation_mask_loop(targets, anchors, 8, (8, 8), 1, thresh=psi), expected)


def test_mask_by_hand_two_anchors_and_boxes():
    """Anchors 16x32 (tall) and 32x16 (wide), stride 8, 8x8 maps of a 64x64 input.

    Image 0, box A = 16x32 at cell (3, 3): the tall anchor matches it (best IoU 1); one row up or down it
    overlaps 16x24 px, IoU 384/640 = 0.6; two rows: 256/768 = 1/3, one column: 1/3 too. The wide anchor
    reaches 16x16 px, IoU 1/3, on the 3x3 cells around (3, 3), 1/7 or less further out.
    Image 0, box B = 4x4 at cell (6, 6): both anchors contain it at (6, 6) and the tall one also a row
    away, the wide one a column away: IoU 16/512 = 1/32, the best; elsewhere at most 8/520 < 1/64.
    Image 2: box A alone. Image 1: no box.
    """
    anchors = torch.tensor([[16.0, 32.0], [32.0, 16.0]])
    targets = torch.tensor([box(0, 28, 28, 16, 32), box(0, 52, 52, 4, 4), box(2, 28, 28, 16, 32)])
    a_05 = [(2, 3), (3, 3), (4, 3)]  # psi 0.5: the tall anchor only (IoU 1 and 0.6)
    a_03 = [(r, c) for r in (2, 3, 4) for c in (2, 3, 4)] + [(1, 3), (5, 3)]  # psi 0.3: also the 1/3s
    b_05 = [(6, 6), (5, 6), (7, 6), (6, 5), (6, 7)]  # psi 0.5: IoU 1/32 > 1/64
    for psi, rows, cells in ((0.5, [0, 1, 2], {0: a_05 + b_05, 2: a_05}), (0.3, [0, 2], {0: a_03, 2: a_03})):
        expected = torch.zeros(3, 8, 8, dtype=torch.bool)
        for img, rc in cells.items():
            expected[img, [r for r, _ in rc], [c for _, c in rc]] = True
        assert torch.equal(imitation_mask(targets[rows], anchors, 8, (8, 8), 3, thresh=psi), expected), psi
        assert torch.equal(imitation_mask_loop(targets[rows], anchors, 8, (8, 8), 3, thresh=psi), expected), psi
    # 'gt': centres strictly inside A's x in (20, 36), y in (12, 44): column 3 (centre 28), rows 2-4
    # (centres 20, 28, 36; 12 and 44 lie on the edges); B (50..54) holds the centre of cell (6, 6)
    gt = imitation_mask(targets, anchors, 8, (8, 8), 3, kind="gt")
    assert sorted(map(tuple, gt[0].nonzero().tolist())) == [(2, 3), (3, 3), (4, 3), (6, 6)]
    assert not gt[1].any() and torch.equal(gt[2], gt[0] & (torch.arange(8)[:, None] < 5))
    assert torch.equal(gt, imitation_mask_loop(targets, anchors, 8, (8, 8), 3, kind="gt"))


# ----------------------------------------------------------------------------------- against the loop

@pytest.mark.parametrize("kind", ["fine", "gt", "full"])
def test_mask_matches_loop_random(kind):
    g = torch.Generator().manual_seed(0)
    check = LoopCheck()
    hw_px = [(96, 128), (128, 64), (64, 64)]  # input sizes; the maps are non-square for two of them
    for seed in range(18):
        img_hw = hw_px[seed % 3]
        t = random_targets(g, bs=4, max_boxes=6, grid_px=8 if seed % 4 == 3 else None, img_hw=img_hw)
        thresh = (0.5, 0.2, 0.8, 1.0)[seed % 4]
        for anchors, s in zip(ANCHORS, STRIDES):
            for anchor_t in (None, 4.0):
                m = check(t, anchors, s, (img_hw[0] // s, img_hw[1] // s), 5, thresh=thresh, kind=kind,
                          anchor_t=anchor_t)  # batch 5: one past the last image index
                assert not m[0].any() or kind == "full"  # image 0 has no boxes
                assert not m[4].any() or kind == "full"
    check.assert_meaningful()


def test_masks_of_all_levels_equal_each_level():
    """imitation_masks == imitation_mask level by level, also when the levels describe different input
    sizes (h_l * stride_l)."""
    g = torch.Generator().manual_seed(2)
    for seed in range(6):
        t = random_targets(g, bs=3, max_boxes=7, img_hw=(96, 160))
        for kind in ("fine", "gt"):
            for hws in ([(12, 20), (6, 10), (3, 5)], [(12, 20), (6, 10), (4, 6)]):  # 96x160; then 128x192
                masks = imitation_masks(t, ANCHORS, STRIDES, hws, 4, kind=kind, anchor_t=4.0 if seed % 2 else None)
                for m, a, s, hw in zip(masks, ANCHORS, STRIDES, hws):
                    assert torch.equal(m, imitation_mask(t, a, s, hw, 4, kind=kind, anchor_t=4.0 if seed % 2 else None))
    assert imitation_masks(t, torch.stack(ANCHORS[:2]), STRIDES[:2], hws[:2], 4)[1].shape == (4, 6, 10)
    assert imitation_masks(t, [], [], [], 4) == []
    with pytest.raises(ValueError, match="levels differ"):
        imitation_masks(t, ANCHORS[:2], STRIDES, hws, 4)


def test_mask_matches_loop_on_varied_heads():
    """1-4 levels (P6 strides included), 1-4 random anchors per level (on a pixel grid every other time, for
    exact ties), maps of different sizes, boxes far outside the image, several thresholds."""
    g = torch.Generator().manual_seed(5)
    check = LoopCheck()
    for it in range(30):
        n_lvl, na, bs = (int(torch.randint(1, 5, (1,), generator=g)) for _ in range(3))
        strides = [8 * 2 ** i for i in range(n_lvl)]
        hgt, wid = (strides[-1] * int(torch.randint(1, 5, (1,), generator=g)) for _ in range(2))
        grid = 4 if it % 2 else None
        anchors = [(torch.randint(1, 16, (na, 2), generator=g).float() * 4 if grid else
                    torch.rand(na, 2, generator=g) * 60 + 2) * 2 ** i for i in range(n_lvl)]
        t = random_targets(g, bs=bs, max_boxes=10, grid_px=grid, img_hw=(hgt, wid))
        if len(t) and it % 3 == 0:
            t[-1, 2:4] += 20.0  # centre 20 image sizes away
        for kind, thresh in (("fine", (0.5, 0.3, 1 / 3, 0.9)[it % 4]), ("gt", 0.5)):
            for a, s in zip(anchors, strides):
                check(t, a, s, (hgt // s, wid // s), bs, thresh=thresh, kind=kind)
    check.assert_meaningful()


def test_mask_chunks_and_duplicate_boxes(monkeypatch):
    """Chunks of boxes (here forced down to one box, and to a few) give the mask of one pass; many copies of
    one box give the mask of that box."""
    g = torch.Generator().manual_seed(7)
    t = torch.cat([random_targets(g, bs=3, max_boxes=40) for _ in range(3)])
    hws = [(12, 16), (6, 8), (3, 4)]
    for kind in ("fine", "gt"):
        whole = imitation_masks(t, ANCHORS, STRIDES, hws, 3, kind=kind)
        assert whole[0].any()
        for elements in (1, 3 * 12 * 16 * 5 + 7):  # one box per chunk; 5 boxes of P3 per chunk
            monkeypatch.setattr(distill_mask, "MAX_ELEMENTS", {"cpu": elements, "other": elements})
            chunked = imitation_masks(t, ANCHORS, STRIDES, hws, 3, kind=kind)
            assert all(torch.equal(a, b) for a, b in zip(chunked, whole))
        monkeypatch.undo()
    one = torch.tensor([[1, 0, 0.4, 0.6, 0.3, 0.2]])
    for copies in (2, 300):
        for kind in ("fine", "gt"):
            single = imitation_mask(one, ANCHORS[0], 8, (8, 8), 2, kind=kind)
            assert single[1].any() and not single[0].any()
            assert torch.equal(imitation_mask(one.repeat(copies, 1), ANCHORS[0], 8, (8, 8), 2, kind=kind), single)


# --------------------------------------------------------------------------------------- other behaviour

def test_mask_edge_cases():
    a, s = ANCHORS[0], 8
    empty = torch.zeros(0, 6)
    for kind in ("fine", "gt"):
        assert not imitation_mask(empty, a, s, (4, 6), 3, kind=kind).any()
    assert imitation_mask(empty, a, s, (4, 6), 3, kind="full").all()  # 'full': every cell, boxes or not
    assert imitation_mask(empty, a, s, (4, 6), 0).shape == (0, 4, 6)
    assert imitation_mask(torch.tensor([[0, 0, 0.5, 0.5, 0.2, 0.2]]), a, s, (4, 6), 0).shape == (0, 4, 6)
    degenerate = torch.tensor([[0, 0, 0.5, 0.5, 0.0, 0.0], [1, 0, 0.5, 0.5, 0.3, 0.0], [1, 0, 0.0, 1.0, 0, 0]])
    for kind in ("fine", "gt"):
        assert not imitation_mask(degenerate, a, s, (4, 6), 2, kind=kind).any(), kind
    border = torch.tensor([[0, 0, 0.0, 0.0, 0.5, 0.5], [0, 0, 1.0, 1.0, 0.3, 0.3]])  # centred on the corners
    m = LoopCheck()(border, a, s, (8, 8), 1)
    assert m[0, 0, 0] and m[0, -1, -1]
    stray = torch.tensor([[7, 0, 0.5, 0.5, 0.2, 0.2], [-1, 0, 0.5, 0.5, 0.2, 0.2]])  # image index out of range
    assert not imitation_mask(stray, a, s, (8, 8), 2).any()
    huge = torch.tensor([[1, 0, 0.5, 0.5, 1e6, 1e6]])  # covers the input: every anchor's IoU is the best
    assert imitation_mask(huge, a, s, (8, 8), 2)[1].all()
    nan, inf = float("nan"), float("inf")
    good = torch.tensor([[0, 0, 0.3, 0.5, 0.2, 0.2], [1, 0, 0.6, 0.4, 0.3, 0.1], [1, 0, 3e3, -1e5, 1e6, 5e3]])
    broken = torch.cat((good, torch.tensor([[0, 0, nan, 0.5, 0.2, 0.2], [1, 0, 0.5, 0.5, inf, nan],
                                            [nan, 0, 0.5, 0.5, 0.2, 0.2], [0, 0, 0.5, 0.5, -inf, 0.2]])))
    before = broken.clone()
    for kind in ("fine", "gt"):  # rows holding a non-finite value are ignored
        m = imitation_mask(broken, a, s, (8, 8), 2, kind=kind)
        assert m.any() and torch.equal(m, imitation_mask(good, a, s, (8, 8), 2, kind=kind))
        assert torch.equal(m, LoopCheck()(broken, a, s, (8, 8), 2, kind=kind))
    assert torch.allclose(broken, before, equal_nan=True)  # targets untouched
    with pytest.raises(ValueError, match="kind"):
        imitation_mask(border, a, s, (8, 8), 1, kind="box")
    with pytest.raises(ValueError, match="thresh"):
        imitation_mask(border, a, s, (8, 8), 1, thresh=0.0)
    with pytest.raises(ValueError, match="targets"):
        imitation_mask(border[:, :5], a, s, (8, 8), 1)


def test_mask_anchor_t_assigns_boxes_to_levels():
    """A 300 px box matches only the stride-32 anchors (ratio < 4), a 20 px box only the stride-8 ones."""
    t = torch.tensor([[0, 0, 0.5, 0.5, 300 / 640, 300 / 640], [1, 0, 0.5, 0.5, 20 / 640, 20 / 640]])
    found = []
    for anchors, s in zip(ANCHORS, STRIDES):
        m = imitation_mask(t, anchors, s, (640 // s, 640 // s), 2, anchor_t=4.0)
        found.append((bool(m[0].any()), bool(m[1].any())))
    assert found == [(False, True), (False, True), (True, False)]
    assert imitation_mask(t, ANCHORS[0], 8, (80, 80), 2)[0].any()  # without anchor_t every level sees it


def test_mask_has_no_host_sync():
    """Runs on the meta device, where any .item()/.cpu()/data-dependent shape would fail."""
    t = torch.empty(7, 6, device="meta")
    for kind in ("fine", "gt", "full"):
        m = imitation_mask(t, ANCHORS[1].to("meta"), 16, (6, 5), 3, kind=kind, anchor_t=4.0)
        assert m.shape == (3, 6, 5) and m.device.type == "meta"


def test_mask_coverage():
    masks = [torch.zeros(2, 4, 4, dtype=torch.bool), torch.ones(2, 2, 2, dtype=torch.bool)]
    masks[0][0, 0, :2] = True
    assert mask_coverage(masks) == pytest.approx([100 * 2 / 32, 100.0])
