"""Time NMS, the YOLOv5 loss, and vectorised vs per-target-loop target matching.

    python benchmarks/bench_loss_nms.py [--imgsz 320] [--bs 8] [--nt 100 1000] [--runs 5]

Prints a table of median milliseconds; on a shared CPU compare ratios rather than absolutes.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.boxes import _classwise_nms, non_max_suppression  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402

ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
STRIDES = (8, 16, 32)


def median_ms(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def loop_matching(targets, anchors, ny, nx, anchor_t=4.0):
    """The same matching rules written as a per-target Python loop (the baseline being avoided)."""
    out = []
    for b, c, x, y, w, h in targets.tolist():
        gx, gy, gw, gh = x * nx, y * ny, w * nx, h * ny
        for a, (aw, ah) in enumerate(anchors.tolist()):
            if max(gw / aw, aw / gw, gh / ah, ah / gh) >= anchor_t:
                continue
            cells = [(int(gx), int(gy))]
            if gx % 1 < 0.5 and gx > 1:
                cells.append((int(gx) - 1, int(gy)))
            if gy % 1 < 0.5 and gy > 1:
                cells.append((int(gx), int(gy) - 1))
            if (nx - gx) % 1 < 0.5 and nx - gx > 1:
                cells.append((int(gx) + 1, int(gy)))
            if (ny - gy) % 1 < 0.5 and ny - gy > 1:
                cells.append((int(gx), int(gy) + 1))
            out += [(int(b), a, gj, gi, int(c), gx - gi, gy - gj, gw, gh) for gi, gj in cells]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--nc", type=int, default=80)
    ap.add_argument("--nt", type=int, nargs="+", default=[100, 1000], help="targets per batch (several: a row each)")
    ap.add_argument("--runs", type=int, default=5)
    opt = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the 2 cores are shared: avoid oversubscription noise
    bs, nc, img = opt.bs, opt.nc, opt.imgsz

    stride = torch.tensor(STRIDES, dtype=torch.float32)
    det = SimpleNamespace(nc=nc, na=3, nl=3, stride=stride,
                          anchors=torch.tensor(ANCHORS_PX, dtype=torch.float32).view(3, 3, 2) / stride.view(-1, 1, 1))
    model = SimpleNamespace(model=[det], hyp={"box": 0.05, "obj": 1.0, "cls": 0.5, "anchor_t": 4.0})
    loss = ComputeLoss(model)
    p = [torch.randn(bs, 3, img // s, img // s, 5 + nc, requires_grad=True) for s in STRIDES]
    rows, ratios = [], []
    for nt in opt.nt:
        t = torch.cat((torch.randint(0, bs, (nt, 1)).float(), torch.randint(0, nc, (nt, 1)).float(),
                       torch.rand(nt, 2), torch.rand(nt, 2) * 0.5 + 0.02), 1)

        def fwd_bwd():
            total, _ = loss(p, t)
            total.backward()

        vec = median_ms(lambda: loss.build_targets(p, t), opt.runs)
        loop = median_ms(lambda: [loop_matching(t, det.anchors[i], *p[i].shape[2:4]) for i in range(3)], opt.runs)
        ratios.append((nt, loop / vec))
        rows += [(f"build_targets vectorised, {nt} targets", vec),
                 (f"build_targets per-target loop, {nt} targets", loop),
                 (f"loss forward, {nt} targets", median_ms(lambda: loss(p, t), opt.runs)),
                 (f"loss forward+backward, {nt} targets", median_ms(fwd_bwd, opt.runs))]

    n = 3 * sum((img // s) ** 2 for s in STRIDES)
    pred = torch.rand(bs, n, 5 + nc)
    pred[..., :2] *= img
    pred[..., 2:4] = pred[..., 2:4] * img / 4 + 2
    pred[..., 4] = pred[..., 4] ** 30  # most cells have low objectness, as in a trained model
    for conf, ml in ((0.25, False), (0.001, False), (0.001, True)):
        rows.append((f"NMS conf={conf} multi_label={ml}",
                     median_ms(lambda: non_max_suppression(pred, conf, 0.6 if conf < 0.01 else 0.45,
                                                           multi_label=ml), opt.runs)))

    # one image's worth of capped multi-label candidates: offset trick vs per-class loop (CPU path)
    m = 30000
    xy = torch.rand(m, 2) * img
    boxes = torch.cat((xy, xy + torch.rand(m, 2) * img / 4 + 2), 1)
    scores, cls = torch.rand(m), torch.randint(0, nc, (m,))
    rows.append((f"nms {m} boxes, {nc} classes, offset trick",
                 median_ms(lambda: torchvision.ops.nms(boxes + cls[:, None] * 7680.0, scores, 0.6), 3)))
    rows.append((f"nms {m} boxes, {nc} classes, per-class",
                 median_ms(lambda: _classwise_nms(boxes, scores, cls.float(), 0.6), 3)))

    print(f"machine: 2-core CPU share ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"1 thread, bs={bs} imgsz={img} nc={nc} predictions/img={n}")
    print(f"{'case':<46}{'median ms':>12}")
    for name, ms in rows:
        print(f"{name:<46}{ms:>12.2f}")
    for nt, r in ratios:
        print(f"{f'loop / vectorised matching, {nt} targets':<46}{r:>11.1f}x")


if __name__ == "__main__":
    main()
