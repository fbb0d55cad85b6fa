"""Speed of the imitation masks (utils/distill.py) against the loop reference and a student training step.

A batch of `--batch` images at `--imgsz` with 0..`--max-boxes` random boxes each, the three YOLOv5s levels
(strides 8/16/32, yolov5s anchors in pixels). Timed, in one process at one thread count: imitation_masks
(all levels at once, as FeatureImitation calls it; also with the first box only: the fixed cost of a
call; and its first call after each loop call, when the caches hold other data as after a forward
pass), imitation_mask level by level, kinds 'gt' and 'full', imitation_mask_reference ('fine', the
per-image, per-box loops), the same definition in its most direct form (box_iou of each box with every
anchor box on every cell, as the original code did), and yolov5s forward + backward on the same batch
(timed first, see main). The fast masks and the reference run interleaved, `--rounds` times; each time
is the best seen (on a shared machine the minimum is the least disturbed). Prints a table and the torch
ops per call.

    python benchmarks/mask_speed.py                          # batch 16 at 640, as in the issue
    python benchmarks/mask_speed.py --fb-repeat 0 --rounds 10  # masks only
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.boxes import box_iou  # noqa: E402
from utils.distill import imitation_mask, imitation_mask_reference, imitation_masks  # noqa: E402

ANCHORS = ([10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326])
STRIDES = (8, 16, 32)


def random_targets(bs, max_boxes, seed):
    """[n, 6] targets with n_i ~ U{0..max_boxes} boxes per image; sizes skewed to small, like COCO."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(bs):
        n = int(torch.randint(0, max_boxes + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g)
        wh = 0.01 + 0.7 * torch.rand(n, 2, generator=g) ** 2
        rows.append(torch.cat((torch.full((n, 1), float(i)), torch.zeros(n, 1), xy, wh), 1))
    return torch.cat(rows)


def box_iou_loop_mask(targets, anchors, stride, feature_hw, batch_size, thresh=0.5):
    """The definition in its most direct form, as the original code wrote it: per image and per box, the IoU
    of the box with every anchor box placed on every cell (utils.boxes.box_iou), threshold, union. Not
    bit-identical to imitation_mask_reference (box_iou rounds differently; main reports the agreement)."""
    (h, w), na = feature_hw, len(anchors)
    cy, cx = torch.meshgrid((torch.arange(h) + 0.5) * stride, (torch.arange(w) + 0.5) * stride, indexing="ij")
    centres = torch.stack((cx, cy), -1)[None]  # [1, h, w, 2] pixels
    half = (anchors / 2).view(na, 1, 1, 2)
    anchor_boxes = torch.cat((centres - half, centres + half), -1).view(-1, 4)  # [na * h * w, 4] xyxy
    scale = torch.tensor([w * stride, h * stride] * 2, dtype=torch.float32)
    mask = torch.zeros(batch_size, h, w, dtype=torch.bool)
    for i in range(batch_size):
        for x, y, bw, bh in targets[targets[:, 0] == i, 2:].tolist():
            box = torch.tensor([[x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2]]) * scale
            iou = box_iou(box, anchor_boxes)[0].view(na, h, w)
            mask[i] |= (iou > thresh * iou.max()).any(0)
    return mask


def elapsed_ms(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def student_step_ms(bs, imgsz, repeat):
    """Best of `repeat` yolov5s forward + backward steps (after one warm-up step)."""
    from models.yolo import DetectionModel

    model = DetectionModel("yolov5s.yaml").train()
    x = torch.rand(bs, 3, imgsz, imgsz)

    def step():
        model.zero_grad(set_to_none=True)
        sum(p.sum() for p in model(x)).backward()

    step()
    return min(elapsed_ms(step) for _ in range(repeat))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--max-boxes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (reference once, fast masks 5x each)")
    ap.add_argument("--plain-rounds", type=int, default=2, help="timed calls of the box_iou loop (0: skip)")
    ap.add_argument("--fb-repeat", type=int, default=2, help="timed student forward+backward steps (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for everything (0: torch default)")
    opt = ap.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)

    targets = random_targets(opt.batch, opt.max_boxes, opt.seed)
    anchors = [torch.tensor(a, dtype=torch.float32).view(-1, 2) for a in ANCHORS]
    hws = [(opt.imgsz // s, opt.imgsz // s) for s in STRIDES]

    def per_level(fn, kind="fine"):
        return [fn(targets, a, s, hw, opt.batch, kind=kind) for a, s, hw in zip(anchors, STRIDES, hws)]

    def joint(kind="fine"):
        return imitation_masks(targets, anchors, STRIDES, hws, opt.batch, kind=kind)

    # The student step runs first: besides giving the reference time, its large tensors set the process's
    # allocator state as in training (after them, glibc serves the masks' few-hundred-kB temporaries from its
    # heap instead of fresh mmap pages, whose page faults inflated the masks' time here).
    fb = student_step_ms(opt.batch, opt.imgsz, opt.fb_repeat) if opt.fb_repeat else float("nan")
    ref_masks = {}
    for kind in ("fine", "gt"):  # the timed functions agree with the reference on this batch
        ref_masks[kind] = per_level(imitation_mask_reference, kind)
        fast = zip(ref_masks[kind], joint(kind), per_level(imitation_mask, kind))
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in fast)
    one_box = targets[:1]
    cases = {
        "imitation_masks fine (3 levels at once)": joint,
        "imitation_masks fine, first box only": lambda: imitation_masks(one_box, anchors, STRIDES, hws, opt.batch),
        "imitation_mask fine (level by level)": lambda: per_level(imitation_mask),
        "imitation_masks gt": lambda: joint("gt"),
        "imitation_masks full": lambda: joint("full"),
    }
    cold = "imitation_masks fine, first call after the loop"
    best = dict.fromkeys([*cases, cold, "imitation_mask_reference fine"], float("inf"))
    for _ in range(opt.rounds):
        best["imitation_mask_reference fine"] = min(best["imitation_mask_reference fine"],
                                                    elapsed_ms(lambda: per_level(imitation_mask_reference)))
        best[cold] = min(best[cold], elapsed_ms(joint))  # caches hold the loop's data, as after a forward pass
        for name, fn in cases.items():
            best[name] = min([best[name]] + [elapsed_ms(fn) for _ in range(5)])
    plain = "box_iou loop, per image and box (original form)"
    if opt.plain_rounds:
        box_iou_loop = lambda: per_level(lambda *a, kind: box_iou_loop_mask(*a))  # noqa: E731
        agree = (sum(int((p == r).sum()) for p, r in zip(box_iou_loop(), ref_masks["fine"])) /
                 sum(r.numel() for r in ref_masks["fine"]))
        best[plain] = min(elapsed_ms(box_iou_loop) for _ in range(opt.plain_rounds))
    best["yolov5s forward+backward"] = fb

    ref = best["imitation_mask_reference fine"]
    print(f"\nimitation masks, 3 levels | 2-core CPU (shared), {torch.get_num_threads()} torch thread(s) | batch "
          f"{opt.batch} at {opt.imgsz}, {len(targets)} boxes (0..{opt.max_boxes} per image) | best of "
          f"{opt.rounds} interleaved rounds, wall clock")
    print(f"{'':52}{'ms':>10}{'ref / this':>12}{'% of f+b':>10}")
    for name, ms in best.items():
        print(f"{name:52}{ms:10.2f}{ref / ms:12.1f}{100 * ms / fb:10.3f}")
    fine = best["imitation_masks fine (3 levels at once)"]
    print(f"fine masks: {ref / fine:.0f}x faster than the loop reference, {100 * fine / fb:.3f}% of a yolov5s "
          f"forward+backward; equal to the reference: yes; {count_ops(joint)} torch ops per call, of which the "
          f"fixed part (first box only) takes {100 * best['imitation_masks fine, first box only'] / fine:.0f}% "
          f"of the time; {ref / best[cold]:.0f}x on the first call after the loop (cold caches)")
    if opt.plain_rounds:
        print(f"against the box_iou loop: {best[plain] / fine:.0f}x ({best[plain] / best[cold]:.0f}x cold); that loop "
              f"agrees with the reference on {100 * agree:.4f}% of the cells")


def count_ops(fn):
    """Number of aten ops one call of fn dispatches (views included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


if __name__ == "__main__":
    main()
