"""Fine-grained Feature Imitation: adapters, loss, the FGFI method (the masks: test_distill_mask.py)."""
import math

import pytest
import torch
import torch.nn as nn

from distill.adapters import adapt_at, build_adapters
from distill.fgfi import FGFI
from distill.mask_reference import ANCHORS, STRIDES
from distill.masks import imitation_mask, mask_coverage
from tests.conftest import distill_settings, fgfi_term


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
    loss, per_level = fgfi_term([s0, s1], [t0, t1], [m0, m1], adapters)
    expected = [(9 + 4) / (2 * 3), 4 / (2 * 4)]
    assert per_level.tolist() == pytest.approx(expected) and not per_level.requires_grad
    assert loss.item() == pytest.approx(sum(expected))
    two = [torch.cat((s0, s0), 1)], [torch.cat((t0, t0), 1)]  # 2 channels: twice the sum, halved by 'channel'
    raw, _ = fgfi_term(*two, [m0], build_adapters([2], [2], "none"))
    norm, _ = fgfi_term(*two, [m0], build_adapters([2], [2], "none"), norm="channel")
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
    loss, _ = fgfi_term([s], [t], masks, adapters)
    loss.backward()
    assert loss.item() > 0 and math.isfinite(loss.item())
    assert student.weight.grad.abs().sum() > 0 and adapters[0][0].weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None


@pytest.mark.parametrize("kind", ["1x1", "3x3"])
def test_loss_zero_mask_is_zero_and_connected(kind):
    student, _, s, t = _student_teacher()
    adapters = build_adapters([4], [6], kind)
    loss, per_level = fgfi_term([s], [t], [torch.zeros(2, 8, 8, dtype=torch.bool)], adapters)
    assert loss.item() == 0.0 and torch.isfinite(per_level).all() and loss.requires_grad
    loss.backward()
    conv = adapters[0] if kind == "1x1" else adapters[0][0]
    assert student.weight.grad is not None and conv.weight.grad is not None


def test_loss_float32_under_autocast():
    student, _, s, t = _student_teacher()
    adapters = build_adapters([4], [6], "3x3")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, per_level = fgfi_term([s.bfloat16()], [t.bfloat16()], [torch.ones(2, 8, 8, dtype=torch.bool)],
                                    adapters)
    assert loss.dtype == torch.float32 and per_level.dtype == torch.float32
    loss.backward()
    assert adapters[0][0].weight.grad.dtype == torch.float32


def test_loss_shape_mismatch_is_clear():
    _, _, s, t = _student_teacher()
    with pytest.raises(ValueError, match="shapes differ"):
        fgfi_term([s], [t[:, :, :4]], [torch.ones(2, 8, 8, dtype=torch.bool)], build_adapters([4], [6]))


# ----------------------------------------------------------------------------------------- the module

def test_fgfi_module_imitates_every_level():
    """Every level is imitated (the old levels= sub-selection is gone): one adapter per level, keys '<k>.*';
    the warm-up gives a connected zero (and the masks, for the plot and the log); then weight x raw."""
    fi = FGFI(distill_settings(weight=0.5, warmup=3, norm="none"), [4, 8, 16], [6, 12, 24])
    assert set(fi.state_dict()) == set(build_adapters([4, 8, 16], [6, 12, 24]).state_dict())
    fi.load_state_dict(build_adapters([4, 8, 16], [6, 12, 24]).state_dict())  # a checkpoint's 'adapters' loads back
    torch.manual_seed(0)
    sf = [torch.randn(2, c, 64 // s, 64 // s, requires_grad=True) for c, s in zip((4, 8, 16), STRIDES)]
    tf = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip((6, 12, 24), STRIDES)]
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.4, 0.4], [1, 1, 0.3, 0.6, 0.2, 0.3]])
    anchors = [a.clone() for a in ANCHORS]

    r = fi(sf, tf, targets, anchors, torch.tensor([8.0, 16.0, 32.0]), iteration=0)  # warming up
    assert r.loss.item() == 0.0 and r.loss.requires_grad and not r.active
    assert torch.equal(r.masks[0], imitation_mask(targets, anchors[0], 8, (8, 8), 2))  # for plot and log
    r.loss.backward()
    assert all(x.grad is not None for x in sf)  # connected to every (imitated) level
    assert all(p.grad is not None for p in fi.parameters())  # and every adapter (DDP needs them all)

    r = fi(sf, tf, targets, anchors, [8, 16, 32], iteration=3)
    assert r.loss.item() > 0 and r.raw.item() == pytest.approx(r.loss.item() / 0.5) and r.active
    assert r.per_level.shape == (3,) and len(r.masks) == 3
    assert [tuple(m.shape) for m in r.masks] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
    assert torch.equal(r.masks[0], imitation_mask(targets, anchors[0], 8, (8, 8), 2))
    assert all(0 < c < 100 for c in mask_coverage(r.masks[:1]))
    with pytest.raises(ValueError, match="levels"):
        FGFI(distill_settings(), [4], [6, 12])
    with pytest.raises(ValueError, match="levels"):
        fi(sf[:2], tf[:2], targets, anchors[:2], [8, 16], iteration=3)


def test_fgfi_on_detection_models():
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
    fi = FGFI(distill_settings(weight=0.01, norm="none"), [f.shape[1] for f in sf], [f.shape[1] for f in tf])
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.2, 0.7, 0.1, 0.1]])
    loss = fi(sf, tf, targets, anchors_px, student.stride, iteration=0).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("kind", ["3x3", "1x1"])
def test_adapter_at_masked_cells_equals_full_conv(kind):
    """FGFI evaluates the adapter only under the mask; value and gradients must equal the
    whole-map conv followed by masking (cells at the border included, where the 3x3 patch is padded)."""
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
    loss, _ = fgfi_term([s], [t], [m], ad)
    assert torch.allclose(loss, ref, rtol=1e-5)
    params = [s, *ad.parameters()]
    for a, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert torch.allclose(a, r, atol=1e-5)
