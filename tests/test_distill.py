"""Fine-grained Feature Imitation: masks (fast path == loop reference), adapters, loss, FeatureImitation."""
import math

import pytest
import torch
import torch.nn as nn

from utils.distill import (FeatureImitation, anchor_box_iou, build_adapters, imitation_loss, imitation_mask,
                           imitation_mask_reference, imitation_masks, mask_coverage)

ANCHORS = [torch.tensor(a, dtype=torch.float32).view(-1, 2) for a in
           ([10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326])]
STRIDES = (8, 16, 32)


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


@pytest.mark.parametrize("kind", ["fine", "gt", "full"])
def test_mask_equals_reference_random(kind):
    g = torch.Generator().manual_seed(0)
    hw_px = [(96, 128), (128, 64), (64, 64)]  # input sizes; the maps are non-square for two of them
    for seed in range(24):
        img_hw = hw_px[seed % 3]
        t = random_targets(g, bs=4, max_boxes=6, grid_px=8 if seed % 4 == 3 else None, img_hw=img_hw)
        bs = 5  # larger than the last image index + 1
        for anchors, s in zip(ANCHORS, STRIDES):
            for anchor_t in (None, 4.0):
                hw = (img_hw[0] // s, img_hw[1] // s)
                fast = imitation_mask(t, anchors, s, hw, bs, kind=kind, anchor_t=anchor_t)
                ref = imitation_mask_reference(t, anchors, s, hw, bs, kind=kind, anchor_t=anchor_t)
                assert fast.shape == (bs, *hw) and fast.dtype == torch.bool
                assert torch.equal(fast, ref), (seed, s, anchor_t)
                assert not fast[0].any() or kind == "full"  # image 0 has no boxes
                assert not fast[4].any() or kind == "full"  # past the last image index


@pytest.mark.parametrize("kind", ["fine", "gt"])
def test_masks_of_all_levels_at_once_equal_reference(kind):
    """imitation_masks (levels side by side) == the reference level by level, also when the levels describe
    different input sizes (then they are computed one by one)."""
    g = torch.Generator().manual_seed(2)
    for seed in range(10):
        t = random_targets(g, bs=3, max_boxes=7, img_hw=(96, 160))
        anchor_t = 4.0 if seed % 2 else None
        for hws in ([(12, 20), (6, 10), (3, 5)], [(12, 20), (6, 10), (4, 6)]):  # 96x160 input; then 128x192
            masks = imitation_masks(t, ANCHORS, STRIDES, hws, 4, kind=kind, anchor_t=anchor_t)
            for m, a, s, hw in zip(masks, ANCHORS, STRIDES, hws):
                assert torch.equal(m, imitation_mask_reference(t, a, s, hw, 4, kind=kind, anchor_t=anchor_t))
    assert imitation_masks(t, [], [], [], 4) == []
    with pytest.raises(ValueError, match="levels differ"):
        imitation_masks(t, ANCHORS[:2], STRIDES, hws, 4)


def test_masks_equal_reference_on_varied_heads():
    """1-4 levels (P6 strides included), 1-4 random anchors per level (on a pixel grid every other time, for
    exact ties), maps of different sizes, boxes far outside the image: the shortcuts of the fast path (peak
    overlap from 3 cells, anchors' intervals merged per row, both interval ends in one tensor) change no cell."""
    g = torch.Generator().manual_seed(5)
    for it in range(40):
        n_lvl, na, bs = (int(torch.randint(1, 5, (1,), generator=g)) for _ in range(3))
        strides = [8 * 2 ** i for i in range(n_lvl)]
        hgt, wid = (strides[-1] * int(torch.randint(1, 5, (1,), generator=g)) for _ in range(2))
        grid = 4 if it % 2 else None
        anchors = [(torch.randint(1, 16, (na, 2), generator=g).float() * 4 if grid else
                    torch.rand(na, 2, generator=g) * 60 + 2) * 2 ** i for i in range(n_lvl)]
        t = random_targets(g, bs=bs, max_boxes=10, grid_px=grid, img_hw=(hgt, wid))
        if len(t) and it % 3 == 0:
            t[-1, 2:4] += 20.0  # centre 20 image sizes away
        hws = [(hgt // s, wid // s) for s in strides]
        for kind, thresh in (("fine", (0.5, 0.3, 1 / 3, 0.9)[it % 4]), ("gt", 0.5)):
            masks = imitation_masks(t, anchors, strides, hws, bs, thresh=thresh, kind=kind)
            for m, a, s, hw in zip(masks, anchors, strides, hws):
                assert torch.equal(m, imitation_mask_reference(t, a, s, hw, bs, thresh=thresh, kind=kind)), (it, s)


@pytest.mark.parametrize("thresh", [0.2, 0.8, 1.0])
def test_mask_equals_reference_thresholds(thresh):
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        t = random_targets(g, bs=3, max_boxes=8, grid_px=8, img_hw=(64, 96))
        for anchors, s in zip(ANCHORS, STRIDES):
            hw = (64 // s, 96 // s)
            assert torch.equal(imitation_mask(t, anchors, s, hw, 3, thresh=thresh),
                               imitation_mask_reference(t, anchors, s, hw, 3, thresh=thresh))


def test_mask_equals_reference_on_exact_ties():
    """Whole-pixel boxes and anchors (multiples of 8 px, centres on a 4-px grid, power-of-two input): many
    IoUs equal psi * max exactly, where any rounding difference between the two paths would show."""
    g = torch.Generator().manual_seed(0)
    anchors, s, (hgt, wid) = torch.tensor([[24.0, 24], [48, 24], [16, 40]]), 8, (64, 128)
    ties = 0
    for _ in range(12):
        n = 12
        wh = torch.tensor([8.0, 16, 24, 32, 48])[torch.randint(0, 5, (n, 2), generator=g)]
        xy = torch.randint(0, 33, (n, 2), generator=g).float() * 4
        size = torch.tensor([wid, hgt], dtype=torch.float32)
        t = torch.cat((torch.randint(0, 3, (n, 1), generator=g).float(), torch.zeros(n, 1), xy / size, wh / size), 1)
        for thresh in (0.5, 0.25, 1 / 3):
            hw = (hgt // s, wid // s)
            assert torch.equal(imitation_mask(t, anchors, s, hw, 3, thresh=thresh),
                               imitation_mask_reference(t, anchors, s, hw, 3, thresh=thresh))
            for x, y, w, h in (t[:, 2:] * size.repeat(2)).tolist():
                iou = anchor_box_iou(anchors, s, *hw, *torch.tensor([x - w / 2, x + w / 2, y - h / 2, y + h / 2, w, h]))
                ties += int(((iou == thresh * iou.max()) & (iou > 0)).sum())
    assert ties > 100  # the case this test is about did occur


def test_reference_iou_is_the_usual_iou():
    """The shared IoU formula agrees with plain pairwise box IoU for anchors placed on cells."""
    from utils.boxes import box_iou

    anchors, s, h, w = ANCHORS[0], 8, 5, 7
    box = torch.tensor([13.0, 9.0, 37.5, 30.25])  # x1, y1, x2, y2
    iou = anchor_box_iou(anchors, s, h, w, box[0], box[2], box[1], box[3], box[2] - box[0], box[3] - box[1])
    cy, cx = torch.meshgrid((torch.arange(h) + 0.5) * s, (torch.arange(w) + 0.5) * s, indexing="ij")
    for a, (aw, ah) in enumerate(anchors.tolist()):
        cells = torch.stack((cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2), -1).view(-1, 4)
        expected = box_iou(cells, box[None]).view(h, w)
        assert torch.allclose(iou[a], expected, atol=1e-6)


def test_mask_single_box_by_hand():
    """One 40x30 px box centred at (52, 36) on a 64x96 input, stride 8: the cell under the centre is in,
    a far cell is not; an exact tie (IoU == psi * max) is left out."""
    t = torch.tensor([[0, 0, 52 / 96, 36 / 64, 40 / 96, 30 / 64]])
    m = imitation_mask(t, ANCHORS[0], 8, (8, 12), 1)[0]
    assert m[36 // 8, 52 // 8] and not m[0, 0] and not m[7, 0]
    assert not m[:, 10:].any()  # right of the box and its anchors' reach

    # box == 24x24 anchor centred on cell (2, 3): max IoU 1, F 0.5; the side neighbours have IoU exactly
    # 16*24 / (2*576 - 16*24) = 0.5 (not > F), the diagonal ones less: only the centre cell remains.
    anchors = torch.tensor([[24.0, 24.0]])
    t = torch.tensor([[0, 0, 28 / 64, 20 / 64, 24 / 64, 24 / 64]])
    m = imitation_mask(t, anchors, 8, (8, 8), 1)[0]
    assert m.sum() == 1 and m[2, 3]
    assert imitation_mask(t, anchors, 8, (8, 8), 1, thresh=0.49)[0].sum() == 5  # the 4 side cells join
    gt = imitation_mask(t, anchors, 8, (8, 8), 1, kind="gt")[0]  # centres strictly inside [16, 40] x [8, 32]
    assert gt.sum() == 9 and gt[1:4, 2:5].all()


def test_mask_edge_cases():
    a, s = ANCHORS[0], 8
    empty = torch.zeros(0, 6)
    for kind in ("fine", "gt"):
        assert not imitation_mask(empty, a, s, (4, 6), 3, kind=kind).any()
    assert imitation_mask(empty, a, s, (4, 6), 3, kind="full").all()  # 'full': every cell, boxes or not
    assert imitation_mask(empty, a, s, (4, 6), 0).shape == (0, 4, 6)
    degenerate = torch.tensor([[0, 0, 0.5, 0.5, 0.0, 0.0], [1, 0, 0.5, 0.5, 0.3, 0.0], [1, 0, 0.0, 1.0, 0, 0]])
    for kind in ("fine", "gt"):
        m = imitation_mask(degenerate, a, s, (4, 6), 2, kind=kind)
        assert not m.any(), kind
    border = torch.tensor([[0, 0, 0.0, 0.0, 0.5, 0.5], [0, 0, 1.0, 1.0, 0.3, 0.3]])  # centred on the corners
    m = imitation_mask(border, a, s, (8, 8), 1)
    assert m[0, 0, 0] and m[0, -1, -1] and torch.equal(m, imitation_mask_reference(border, a, s, (8, 8), 1))
    stray = torch.tensor([[7, 0, 0.5, 0.5, 0.2, 0.2], [-1, 0, 0.5, 0.5, 0.2, 0.2]])  # image index out of range
    assert not imitation_mask(stray, a, s, (8, 8), 2).any()
    nan = float("nan")
    broken = torch.tensor([[0, 0, nan, 0.5, 0.2, 0.2], [1, 0, 0.5, 0.5, float("inf"), nan],
                           [nan, 0, 0.5, 0.5, 0.2, 0.2], [1, 0, 3e3, -1e5, 1e6, 5e3]])
    before = broken.clone()
    for kind in ("fine", "gt"):  # no crash; NaN coordinates mark nothing
        m = imitation_mask(broken, a, s, (8, 8), 2, kind=kind)
        assert torch.equal(m, imitation_mask_reference(broken, a, s, (8, 8), 2, kind=kind))
    assert torch.allclose(broken, before, equal_nan=True)  # targets untouched
    with pytest.raises(ValueError, match="kind"):
        imitation_mask(border, a, s, (8, 8), 1, kind="box")
    with pytest.raises(ValueError, match="thresh"):
        imitation_mask(border, a, s, (8, 8), 1, thresh=0.0)


@pytest.mark.parametrize("copies", [1, 255, 256, 257])
def test_mask_many_boxes_on_the_same_cells(copies):
    """A cell's painted count is the number of boxes covering it: byte counters (used below 256 boxes) and
    int32 ones (from 256 on) must not let a multiple of 256 read as 'not covered'."""
    a, s = ANCHORS[0], 8
    box = torch.tensor([[1, 0, 0.4, 0.6, 0.3, 0.2]])
    one = imitation_masks(box, [a], [s], [(8, 8)], 2)[0]
    assert one[1].any() and not one[0].any()
    stacked = imitation_masks(box.repeat(copies, 1), [a], [s], [(8, 8)], 2)[0]
    assert torch.equal(stacked, one), copies
    stacked_gt = imitation_masks(box.repeat(copies, 1), [a], [s], [(8, 8)], 2, kind="gt")[0]
    assert torch.equal(stacked_gt, imitation_masks(box, [a], [s], [(8, 8)], 2, kind="gt")[0])


def test_masks_equal_reference_on_a_crowded_batch():
    """Above 255 boxes (int32 counters), every level at once."""
    g = torch.Generator().manual_seed(5)
    t = torch.cat([random_targets(g, bs=3, max_boxes=150) for _ in range(5)])  # images 1, 2 get many boxes
    assert len(t) >= 256
    for kind in ("fine", "gt"):
        masks = imitation_masks(t, ANCHORS, STRIDES, [(12, 16), (6, 8), (3, 4)], 3, kind=kind)
        for m, a, s, hw in zip(masks, ANCHORS, STRIDES, [(12, 16), (6, 8), (3, 4)]):
            assert torch.equal(m, imitation_mask_reference(t, a, s, hw, 3, kind=kind))


def test_mask_anchor_t_assigns_boxes_to_levels():
    """A 300 px box matches only the stride-32 anchors (ratio < 4), a 20 px box only the stride-8 ones."""
    t = torch.tensor([[0, 0, 0.5, 0.5, 300 / 640, 300 / 640], [1, 0, 0.5, 0.5, 20 / 640, 20 / 640]])
    found = []
    for anchors, s in zip(ANCHORS, STRIDES):
        m = imitation_mask(t, anchors, s, (640 // s, 640 // s), 2, anchor_t=4.0)
        found.append((bool(m[0].any()), bool(m[1].any())))
    assert found == [(False, True), (False, True), (True, False)]
    assert imitation_mask(t, ANCHORS[0], 8, (80, 80), 2)[0].any()  # without anchor_t every level sees it


def test_mask_keeps_the_thread_count():
    """The CPU masks run single-threaded inside (see _one_cpu_thread) and restore the setting."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        imitation_masks(torch.tensor([[0, 0, 0.5, 0.5, 0.2, 0.2]]), ANCHORS, STRIDES, [(8, 8), (4, 4), (2, 2)], 1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


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


# ---------------------------------------------------------------------------------------------- adapters

def test_build_adapters_kinds_and_errors():
    a = build_adapters([8, 16], [16, 32], "3x3")
    assert len(a) == 2 and isinstance(a[0][0], nn.Conv2d) and isinstance(a[0][1], nn.ReLU)
    assert a[1][0].kernel_size == (3, 3) and a[1][0].padding == (1, 1) and a[1][0].out_channels == 32
    w = a[1][0].weight
    assert 0.005 < w.std().item() < 0.02 and not a[1][0].bias.any()  # small init, zero bias
    assert tuple(a[0](torch.randn(2, 8, 5, 6)).shape) == (2, 16, 5, 6)
    b = build_adapters([8], [16], "1x1")
    assert isinstance(b[0], nn.Conv2d) and b[0].kernel_size == (1, 1)
    c = build_adapters([8, 8], [8, 8], "none")
    x = torch.randn(1, 8, 3, 3)
    assert torch.equal(c[0](x), x) and not list(c.parameters())
    with pytest.raises(ValueError, match="equal channels"):
        build_adapters([8], [16], "none")
    with pytest.raises(ValueError, match="kind"):
        build_adapters([8], [16], "5x5")
    with pytest.raises(ValueError, match="levels"):
        build_adapters([8, 8], [16], "1x1")


# -------------------------------------------------------------------------------------------------- loss

def test_loss_value_by_hand():
    """1 channel, identity adapter: loss = sum(diff^2 over masked cells) / (2 * N_p), per level, summed."""
    t0, t1 = torch.zeros(2, 1, 3, 4), torch.ones(1, 1, 2, 2)
    s0, s1 = t0.clone(), t1.clone()
    s0[0, 0, 1, 2], s0[1, 0, 0, 0], s0[1, 0, 2, 3] = 3.0, -2.0, 5.0  # last one is outside the mask
    s1[0, 0, 1, 1] = 3.0
    m0 = torch.zeros(2, 3, 4, dtype=torch.bool)
    m0[0, 1, 2] = m0[1, 0, 0] = m0[0, 2, 0] = True  # N_p = 3
    m1 = torch.ones(1, 2, 2, dtype=torch.bool)  # N_p = 4
    adapters = build_adapters([1, 1], [1, 1], "none")
    loss, per_level = imitation_loss([s0, s1], [t0, t1], [m0, m1], adapters)
    expected = [(9 + 4) / (2 * 3), 4 / (2 * 4)]
    assert per_level.tolist() == pytest.approx(expected) and not per_level.requires_grad
    assert loss.item() == pytest.approx(sum(expected))
    two = [torch.cat((s0, s0), 1)], [torch.cat((t0, t0), 1)]  # 2 channels: twice the sum, halved by 'channel'
    raw, _ = imitation_loss(*two, [m0], build_adapters([2], [2], "none"))
    norm, _ = imitation_loss(*two, [m0], build_adapters([2], [2], "none"), normalize="channel")
    assert raw.item() == pytest.approx(2 * expected[0]) and norm.item() == pytest.approx(expected[0])


def _student_teacher(seed=0):
    torch.manual_seed(seed)
    student, teacher = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        t = teacher(x)
    return student, teacher, student(x), t


def test_loss_gradients_reach_student_and_adapter_not_teacher():
    student, teacher, s, t = _student_teacher()
    adapters = build_adapters([4], [6], "3x3")
    masks = [torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5]
    loss, _ = imitation_loss([s], [t], masks, adapters)
    loss.backward()
    assert loss.item() > 0 and math.isfinite(loss.item())
    assert student.weight.grad.abs().sum() > 0 and adapters[0][0].weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None


@pytest.mark.parametrize("kind", ["1x1", "3x3"])
def test_loss_zero_mask_is_zero_and_connected(kind):
    student, _, s, t = _student_teacher()
    adapters = build_adapters([4], [6], kind)
    loss, per_level = imitation_loss([s], [t], [torch.zeros(2, 8, 8, dtype=torch.bool)], adapters)
    assert loss.item() == 0.0 and torch.isfinite(per_level).all() and loss.requires_grad
    loss.backward()
    conv = adapters[0] if kind == "1x1" else adapters[0][0]
    assert student.weight.grad is not None and conv.weight.grad is not None


def test_loss_float32_under_autocast():
    student, _, s, t = _student_teacher()
    adapters = build_adapters([4], [6], "3x3")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, per_level = imitation_loss([s.bfloat16()], [t.bfloat16()], [torch.ones(2, 8, 8, dtype=torch.bool)],
                                         adapters)
    assert loss.dtype == torch.float32 and per_level.dtype == torch.float32
    loss.backward()
    assert adapters[0][0].weight.grad.dtype == torch.float32


def test_loss_shape_mismatch_is_clear():
    _, _, s, t = _student_teacher()
    with pytest.raises(ValueError, match="shapes differ"):
        imitation_loss([s], [t[:, :, :4]], [torch.ones(2, 8, 8, dtype=torch.bool)], build_adapters([4], [6]))


# ----------------------------------------------------------------------------------------- the module

def test_feature_imitation_module():
    fi = FeatureImitation([4, 8, 16], [6, 12, 24], levels=[0, 2], weight=0.5, warmup=3)
    assert set(fi.state_dict()) == set(build_adapters([4, 16], [6, 24]).state_dict())
    fi.load_state_dict(build_adapters([4, 16], [6, 24]).state_dict())  # a checkpoint's 'adapters' loads back
    torch.manual_seed(0)
    sf = [torch.randn(2, c, 64 // s, 64 // s, requires_grad=True) for c, s in zip((4, 8, 16), STRIDES)]
    tf = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip((6, 12, 24), STRIDES)]
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.4, 0.4], [1, 1, 0.3, 0.6, 0.2, 0.3]])
    anchors = [a.clone() for a in ANCHORS]

    loss, stats = fi(sf, tf, targets, anchors, torch.tensor([8.0, 16.0, 32.0]), iteration=0)  # warming up
    assert loss.item() == 0.0 and loss.requires_grad and not stats["active"]
    assert torch.equal(stats["masks"][0], imitation_mask(targets, anchors[0], 8, (8, 8), 2))  # for plot and log
    loss.backward()
    assert sf[0].grad is not None and sf[1].grad is None  # connected to the imitated levels only

    loss, stats = fi(sf, tf, targets, anchors, [8, 16, 32], iteration=3)
    assert loss.item() > 0 and stats["raw"].item() == pytest.approx(loss.item() / 0.5) and stats["active"]
    assert stats["per_level"].shape == (2,) and len(stats["masks"]) == 2
    assert stats["masks"][0].shape == (2, 8, 8) and stats["masks"][1].shape == (2, 2, 2)
    assert torch.equal(stats["masks"][0], imitation_mask(targets, anchors[0], 8, (8, 8), 2))
    assert all(0 < c < 100 for c in mask_coverage(stats["masks"][:1]))
    with pytest.raises(ValueError, match="levels"):
        FeatureImitation([4], [6], levels=[1])


def test_feature_imitation_on_detection_models():
    """Student and teacher DetectionModels: features from return_features, anchors in pixels from Detect."""
    from models.yolo import DetectionModel
    from utils.files import find_file, yaml_load

    cfg = yaml_load(find_file("yolov5n.yaml"))
    student = DetectionModel({**cfg, "width_multiple": 0.0625, "nc": 3})
    teacher = DetectionModel({**cfg, "width_multiple": 0.125, "nc": 3}).eval()
    x = torch.rand(2, 3, 64, 64)
    _, sf = student(x, return_features=True)
    with torch.no_grad():
        _, tf = teacher(x, return_features=True)
    det = student.model[-1]
    anchors_px = [det.anchors[i] * det.stride[i] for i in range(det.nl)]
    fi = FeatureImitation([f.shape[1] for f in sf], [f.shape[1] for f in tf])
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.2, 0.7, 0.1, 0.1]])
    loss, stats = fi(sf, tf, targets, anchors_px, student.stride, iteration=0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("kind", ["3x3", "1x1"])
def test_adapter_at_masked_cells_equals_full_conv(kind):
    """imitation_loss evaluates the adapter only under the mask; value and gradients must equal the
    whole-map conv followed by masking (cells at the border included, where the 3x3 patch is padded)."""
    from utils.distill import adapt_at, build_adapters, imitation_loss
    g = torch.Generator().manual_seed(0)
    ad = build_adapters([8], [16], kind)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    s = torch.randn(2, 8, 5, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 16, 5, 7, generator=g)
    m = torch.rand(2, 5, 7, generator=g) < 0.3
    m[0, 0, 0] = m[1, 4, 6] = True  # corners
    full = ad[0](s)
    b, y, x = m.nonzero(as_tuple=True)
    assert torch.allclose(adapt_at(ad[0], s, b, y, x), full[b, :, y, x], atol=1e-5)
    ref = torch.where(m, (full - t).pow(2).sum(1), 0.0).sum() / (2 * m.sum())
    loss, _ = imitation_loss([s], [t], [m], ad)
    assert torch.allclose(loss, ref, rtol=1e-5)
    params = [s, *ad.parameters()]
    for a, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert torch.allclose(a, r, atol=1e-5)
