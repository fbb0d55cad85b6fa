"""AutoAnchor: BPR of fitting anchors, re-fitting poor anchors, k-means, determinism."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from utils.autoanchor import anchor_stats, check_anchors, kmean_anchors, kmeans, label_wh

ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def fake_model(strides=(8, 16, 32), anchors_px=ANCHORS_PX):
    stride = torch.tensor(strides, dtype=torch.float32)
    anchors = torch.tensor(anchors_px, dtype=torch.float32).view(len(strides), -1, 2) / stride.view(-1, 1, 1)
    det = SimpleNamespace(nl=len(strides), na=anchors.shape[1], nc=1, anchors=anchors, stride=stride)
    return SimpleNamespace(model=[det])


def fake_dataset(wh_px, n_img=40, img=(640, 480), seed=0):
    """Labels with the given pixel sizes (at 640 long side) spread over n_img images of size img (w, h)."""
    rng = np.random.default_rng(seed)
    wh_px = np.asarray(wh_px, dtype=np.float64)
    w, h = img
    labels = [[] for _ in range(n_img)]
    for k, (bw, bh) in enumerate(wh_px):
        labels[k % n_img].append([0, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), bw / 640, bh * w / h / 640])
    labels = [np.array(lb, dtype=np.float32).reshape(-1, 5) for lb in labels]
    return SimpleNamespace(labels=labels, shapes=np.array([[w, h]] * n_img, dtype=np.float64))


def test_label_wh_scales_to_long_side():
    ds = SimpleNamespace(labels=[np.array([[0, 0.5, 0.5, 0.5, 0.25]]), np.zeros((0, 5))],
                         shapes=np.array([[1280, 640], [100, 100]]))
    np.testing.assert_allclose(label_wh(ds, 640), [[320, 80]])
    with pytest.raises(ValueError, match="shapes"):
        label_wh(SimpleNamespace(labels=[np.zeros((0, 5))], shapes=np.zeros((2, 2))))


def test_fitting_labels_bpr_one_and_anchors_untouched():
    rng = np.random.default_rng(0)
    anchors = np.array(ANCHORS_PX, dtype=np.float64).reshape(-1, 2)
    wh = anchors[rng.integers(0, 9, 400)] * rng.uniform(0.7, 1.4, (400, 1))
    ds, model = fake_dataset(wh), fake_model()
    before = model.model[-1].anchors.clone()
    bpr = check_anchors(ds, model, thr=4.0, imgsz=640)
    assert bpr == pytest.approx(1.0, abs=0.01)
    assert torch.equal(model.model[-1].anchors, before)


@pytest.mark.parametrize("strides", [(8, 16, 32), (32, 16, 8)])
def test_poor_anchors_are_refitted_and_written(strides):
    rng = np.random.default_rng(1)
    # long thin objects (1:30) that no default anchor matches within a ratio of 4
    w = rng.uniform(3, 6, 300)
    wh = np.stack((w, w * 30), 1)
    anchors_px = ANCHORS_PX if strides[0] == 8 else ANCHORS_PX[::-1]
    ds, model = fake_dataset(wh, n_img=30), fake_model(strides, anchors_px)
    m = model.model[-1]
    stride = m.stride.view(-1, 1, 1)
    old_bpr, _ = anchor_stats((m.anchors * stride).view(-1, 2).double().numpy(), label_wh(ds, 640), 4.0)
    assert old_bpr < 0.1
    anchors_buffer = m.anchors
    bpr = check_anchors(ds, model, thr=4.0, imgsz=640, gen=200)
    assert bpr > 0.98 > old_bpr
    assert m.anchors is anchors_buffer  # written in place into the same buffer
    px = m.anchors * stride
    new_bpr, _ = anchor_stats(px.view(-1, 2).double().numpy(), label_wh(ds, 640), 4.0)
    assert new_bpr > 0.98
    # sorted by area within a level, and levels ordered like the strides
    area = px.prod(-1)
    assert (area[:, 1:] >= area[:, :-1]).all()
    by_stride = area[torch.argsort(m.stride)].flatten()
    assert (by_stride[1:] >= by_stride[:-1]).all()


def test_kmean_anchors_deterministic_sorted_and_fit():
    rng = np.random.default_rng(2)
    centres = np.array([[12, 12], [40, 25], [90, 160], [300, 200]])
    wh = np.concatenate([c * rng.uniform(0.85, 1.15, (100, 2)) for c in centres])
    k1 = kmean_anchors(wh, n=4, img_size=640, gen=100, seed=3)
    k2 = kmean_anchors(wh, n=4, img_size=640, gen=100, seed=3)
    assert k1.shape == (4, 2) and k1.dtype == np.float32 and np.array_equal(k1, k2)
    assert (np.diff(k1.prod(1)) >= 0).all()
    np.testing.assert_allclose(k1, centres, rtol=0.2)  # one anchor per cluster
    assert anchor_stats(k1.astype(np.float64), wh)[0] == 1.0
    ds = fake_dataset(wh)  # dataset input gives the same sizes
    got = label_wh(ds, 640)
    np.testing.assert_allclose(got[np.lexsort(got.T)], wh[np.lexsort(wh.T)], rtol=1e-5)


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(4)
    truth = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([t + rng.normal(0, 0.3, (50, 2)) for t in truth])
    c = kmeans(x, 3, np.random.default_rng(0))
    c = c[np.lexsort((c[:, 1], c[:, 0]))]
    np.testing.assert_allclose(c, truth[np.lexsort((truth[:, 1], truth[:, 0]))], atol=0.2)


def test_too_few_labels_and_no_labels():
    k = kmean_anchors(np.array([[30.0, 40.0], [50.0, 20.0]]), n=9, gen=50)  # fewer labels than anchors
    assert k.shape == (9, 2) and np.isfinite(k).all() and (k >= 2).all()
    model = fake_model()
    before = model.model[-1].anchors.clone()
    empty = SimpleNamespace(labels=[np.zeros((0, 5))] * 3, shapes=np.array([[640, 480]] * 3))
    assert check_anchors(empty, model) == 0.0
    assert torch.equal(model.model[-1].anchors, before)


def test_placeholder_anchors_with_detection_model():
    yolo = pytest.importorskip("models.yolo")
    cfg = {"nc": 1, "depth_multiple": 0.33, "width_multiple": 0.125, "anchors": 3,  # anchors to be fitted
           "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 1, "Conv", [256, 3, 2]],
                        [-1, 1, "Conv", [512, 3, 2]]],
           "head": [[[1, 2, 3], 1, "Detect", ["nc", "anchors"]]]}
    model = yolo.DetectionModel(cfg)
    rng = np.random.default_rng(5)
    ds = fake_dataset(rng.uniform(8, 200, (200, 2)))
    bpr = check_anchors(ds, model, imgsz=640, gen=100)
    m = model.model[-1]
    assert bpr > 0.98 and torch.isfinite(m.anchors).all()
    assert m.anchors.shape == (3, 3, 2)
    out = model.eval()(torch.zeros(1, 3, 64, 64))
    assert torch.isfinite(out[0]).all()
