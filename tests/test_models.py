"""Model layer: architecture sizes, Detect output/decoding, feature access, fuse, summary."""
import logging
import math
import re

import pytest
import torch

from models.common import Conv, fuse_conv_and_bn
from models.yolo import Detect, DetectionModel
from utils.files import ROOT, yaml_load
from utils.logging import LOGGER

# upstream YOLOv5 v7.0 numbers at nc=80: parameters and len(list(model.modules())) unfused / fused
UPSTREAM = {"n": (1_872_157, 214, 157), "s": (7_235_389, 214, 157), "m": (21_190_557, 291, 212),
            "l": (46_563_709, 368, 267), "x": (86_749_405, 445, 322)}
P6_PUBLISHED_M = {"n": 3.2, "s": 12.6, "m": 35.7, "l": 76.8, "x": 140.7}  # README, millions (1 decimal)


def small_cfg(name="yolov5n.yaml", width=0.125, nc=3):
    d = yaml_load(ROOT / "models" / name)
    d.update(width_multiple=width, nc=nc)
    return d


@pytest.fixture
def log_lines():
    """Messages of the project logger during the test (it does not propagate to pytest's caplog)."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    LOGGER.addHandler(handler)
    yield lines
    LOGGER.removeHandler(handler)


@pytest.mark.parametrize("size", list(UPSTREAM))
def test_parameter_and_layer_counts_match_upstream(size):
    n_params, n_layers, n_fused = UPSTREAM[size]
    with torch.device("meta"):  # shapes only: yolov5x builds in well under a second
        model = DetectionModel(f"yolov5{size}.yaml")
    assert model.num_params() == n_params
    assert len(list(model.modules())) == n_layers
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    model.fuse()
    assert len(list(model.modules())) == n_fused


@pytest.mark.parametrize("size", list(P6_PUBLISHED_M))
def test_p6_sizes(size):
    with torch.device("meta"):
        model = DetectionModel(f"yolov5{size}6.yaml")
    assert abs(model.num_params() / 1e6 - P6_PUBLISHED_M[size]) <= 0.1
    assert model.stride.tolist() == [8.0, 16.0, 32.0, 64.0]
    assert model.model[-1].anchors.shape == (4, 3, 2)


def test_p6_forward_gives_four_levels():
    model = DetectionModel(small_cfg("yolov5n6.yaml", width=0.0625)).eval()
    with torch.no_grad():
        y, raw = model(torch.rand(1, 3, 128, 128))
    assert [tuple(p.shape) for p in raw] == [(1, 3, s, s, 8) for s in (16, 8, 4, 2)]
    assert y.shape == (1, 3 * (256 + 64 + 16 + 4), 8)


def test_upstream_parameter_names():
    with torch.device("meta"):
        keys = list(DetectionModel("yolov5s.yaml").state_dict())
    for k in ("model.0.conv.weight", "model.0.bn.running_var", "model.2.m.0.cv1.conv.weight",
              "model.9.cv2.bn.bias", "model.24.anchors", "model.24.m.0.weight", "model.24.m.2.bias"):
        assert k in keys
    assert not any("stride" in k for k in keys)  # Detect.stride is not persistent, like upstream


def test_anchors_in_stride_units_and_bias_priors(log_lines):
    model = DetectionModel("yolov5n.yaml", nc=3, anchors=None)
    assert any("Overriding model.yaml nc=80 with nc=3" in m for m in log_lines)
    det = model.model[-1]
    assert det.nc == 3 and det.no == 8 and model.names == ["class0", "class1", "class2"]
    pixels = torch.tensor(yaml_load(ROOT / "models/yolov5n.yaml")["anchors"], dtype=torch.float32).view(3, 3, 2)
    assert torch.allclose(det.anchors * det.stride.view(-1, 1, 1), pixels)
    for conv, s in zip(det.m, (8, 16, 32)):
        b = conv.bias.detach().view(3, -1)
        bound = 1 / math.sqrt(conv.in_channels)  # default uniform init of a conv bias, before the priors
        assert (b[:, 4] - math.log(8 / (640 / s) ** 2)).abs().max() <= bound + 1e-6
        assert (b[:, 5:] - math.log(0.6 / (3 - 0.99))).abs().max() <= bound + 1e-6


def test_anchor_override(log_lines):
    anchors = [[10, 14, 23, 27, 37, 58], [81, 82, 135, 169, 344, 319], [400, 400, 500, 500, 600, 600]]
    model = DetectionModel(small_cfg(), anchors=anchors)
    assert any("Overriding model.yaml anchors" in m for m in log_lines)
    det = model.model[-1]
    assert torch.allclose(det.anchors[1, 0] * 16, torch.tensor([81.0, 82.0]))


def test_detect_training_and_eval_outputs_and_decoding():
    torch.manual_seed(0)
    model = DetectionModel(small_cfg(nc=2))
    x = torch.rand(2, 3, 96, 128)
    model.train()
    raw = model(x)
    assert isinstance(raw, list) and [tuple(p.shape) for p in raw] == [(2, 3, 12, 16, 7), (2, 3, 6, 8, 7),
                                                                      (2, 3, 3, 4, 7)]
    model.eval()
    with torch.no_grad():
        y, raw = model(x)
    assert y.shape == (2, 3 * (192 + 48 + 12), 7)
    det = model.model[-1]
    # decode a few cells by hand: xy = (2*sig - 0.5 + cell) * stride, wh = (2*sig)^2 * anchor_pixels
    offset = 0
    for lvl, p in enumerate(raw):
        _, na, ny, nx, no = p.shape
        s = det.stride[lvl].item()
        for a, j, i in ((0, 0, 0), (2, ny - 1, nx - 1), (1, ny // 2, 1)):
            t = p[1, a, j, i]
            row = y[1, offset + (a * ny + j) * nx + i]
            sig = t.sigmoid()
            exp_xy = torch.stack(((2 * sig[0] - 0.5 + i) * s, (2 * sig[1] - 0.5 + j) * s))
            exp_wh = (2 * sig[2:4]) ** 2 * det.anchors[lvl, a] * s
            assert torch.allclose(row[:2], exp_xy, atol=1e-4) and torch.allclose(row[2:4], exp_wh, atol=1e-4)
            assert torch.allclose(row[4:], sig[4:])
        offset += na * ny * nx
    det.export = True
    try:
        with torch.no_grad():
            assert torch.equal(model(x), y)
    finally:
        det.export = False


def test_grid_cache_follows_shape():
    model = DetectionModel(small_cfg()).eval()
    with torch.no_grad():
        a = model(torch.rand(1, 3, 64, 64))[0]
        b = model(torch.rand(1, 3, 128, 64))[0]
    assert a.shape[1] * 2 == b.shape[1]
    assert model.model[-1]._grid[0].shape[2:4] == (16, 8)


def test_return_features_are_the_tensors_detect_consumed():
    model = DetectionModel(small_cfg())
    seen = []
    model.model[-1].register_forward_pre_hook(lambda m, args: seen.append(list(args[0])))
    for train in (True, False):
        model.train(train)
        seen.clear()
        out, feats = model(torch.rand(2, 3, 64, 96), return_features=True)
        assert len(seen) == 1 and len(feats) == 3
        assert all(f is s for f, s in zip(feats, seen[0]))  # same objects, same pass
        chans = [m.in_channels for m in model.model[-1].m]
        assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 96 // s) for c, s in zip(chans, (8, 16, 32))]
        raw = out if train else out[1]
        assert raw[0].shape[2:4] == feats[0].shape[2:4]


def test_features_only_skips_detect():
    """model.features(x): the same maps as return_features, and Detect never runs."""
    model = DetectionModel(small_cfg()).eval()
    calls = []
    model.model[-1].register_forward_pre_hook(lambda m, args: calls.append(1))
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        want = model(x, return_features=True)[1]
        calls.clear()
        got = model.features(x)
    assert not calls and len(got) == 3
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_fuse_keeps_outputs():
    torch.manual_seed(1)
    model = DetectionModel(small_cfg())
    for m in model.modules():  # non-trivial BN statistics, so folding really matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        y0 = model(x)[0]
        model.fuse()
        y1 = model(x)[0]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(m.bn is None for m in model.modules() if isinstance(m, Conv))
    rel = ((y1 - y0).abs() / y0.abs().clamp_min(1e-3)).max().item()
    assert rel < 1e-5, rel


def test_info_summary_line_and_table(log_lines):
    with torch.device("meta"):
        model = DetectionModel("yolov5s.yaml")
    n_l, n_p, n_g, gflops = model.info()
    assert (n_l, n_p, n_g) == (214, 7235389, 7235389)
    assert re.fullmatch(r"YOLOv5s summary: 214 layers, 7235389 parameters, 7235389 gradients, 16\.\d GFLOPs",
                        log_lines[-1]), log_lines[-1]
    log_lines.clear()
    model.info(verbose=True)
    assert sum("models.common.C3" in m for m in log_lines) == 8  # one table row per C3 layer
    assert any("models.yolo.Detect" in m for m in log_lines)


def test_gflops_on_a_real_model_equal_meta():
    model = DetectionModel(small_cfg())
    _, _, _, g_real = model.info(imgsz=128)
    with torch.device("meta"):
        _, _, _, g_meta = DetectionModel(small_cfg()).info(imgsz=128)
    assert g_real is not None and g_real == pytest.approx(g_meta)
    assert next(model.parameters()).device.type == "cpu"  # the model itself was not moved


def test_bad_yaml_is_a_clear_error():
    cfg = small_cfg()
    cfg["backbone"][1][2] = "Focus2"
    with pytest.raises(ValueError, match="layer 1: unsupported module 'Focus2'"):
        DetectionModel(cfg)
    with pytest.raises(ValueError, match="lacks"):
        DetectionModel({"nc": 3})
    with pytest.raises(FileNotFoundError, match="yolov5q.yaml"):
        DetectionModel("yolov5q.yaml")
    assert isinstance(DetectionModel(small_cfg()).model[-1], Detect)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_values_are_float32_products_in_a_fixed_order(bias):
    """Folded weights are the float32 values w * s and b * s + (beta - gamma * mean / std), s = gamma / std,
    the values upstream YOLOv5 folds to; a float64 fold rounds differently."""
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(8, 16, 3, bias=bias), torch.nn.BatchNorm2d(16, eps=1e-3)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.01, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
    fused = fuse_conv_and_bn(conv, bn)
    std = (bn.running_var + 1e-3).sqrt()
    s = bn.weight / std
    b = conv.bias if bias else torch.zeros(16)
    assert torch.equal(fused.weight, conv.weight * s.view(-1, 1, 1, 1))
    assert torch.equal(fused.bias, b * s + (bn.bias - bn.weight * bn.running_mean / std))
