"""Speed of the imitation masks (utils/distill_mask.py): dense vs the per-box loop, and share of a training step.

A batch of `--batch` images at `--imgsz` with 0..`--max-boxes` random boxes each, the three yolov5s levels
(strides 8/16/32, yolov5s anchors in pixels). Timed in one process at one thread count: imitation_masks
(all levels, kinds 'fine' and 'gt', as FeatureImitation calls it) and the per-image, per-box loop of
tests/mask_reference.py (kind 'fine', level by level), interleaved for `--rounds` rounds, best time of each
(on a shared machine the minimum is the least disturbed); and one plain yolov5s training step on the
same batch (forward, ComputeLoss, backward, SGD step; best of `--step-repeat` after a warm-up). Also checks
that the dense masks agree with the loop outside the tolerance band (IoU within 1e-6 of the threshold).

    python benchmarks/mask_speed.py                    # batch 16 at 640, as in the README
    python benchmarks/mask_speed.py --step-repeat 0    # masks only
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mask_reference import ANCHORS, STRIDES, imitation_mask_loop  # noqa: E402
from utils.distill_mask import imitation_masks  # noqa: E402

TOL = 1e-6


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


def elapsed_ms(fn):
    """Wall-clock ms of one call of fn."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def plain_step_ms(targets, bs, imgsz, repeat, cfg="yolov5s.yaml"):
    """Best of `repeat` plain training steps of `cfg` (forward, ComputeLoss, backward, SGD step) on random
    images with `targets`, after one warm-up step."""
    from models.yolo import DetectionModel
    from utils.files import find_file, yaml_load
    from utils.loss import ComputeLoss, scale_loss_gains

    model = DetectionModel(cfg).train()
    model.hyp = scale_loss_gains(yaml_load(find_file("hyp.scratch-low.yaml")), nl=model.model[-1].nl, nc=model.nc,
                                 imgsz=imgsz)
    compute_loss = ComputeLoss(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937)
    imgs = torch.rand(bs, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))

    def step():
        opt.zero_grad(set_to_none=True)
        compute_loss(model(imgs), targets)[0].backward()
        opt.step()

    step()
    return min(elapsed_ms(step) for _ in range(repeat))


def mask_times(targets, bs, imgsz, rounds):
    """Best ms of the dense masks ('fine', 'gt') and of the per-box loop ('fine') on one batch, interleaved,
    and the agreement of the dense 'fine' masks with the loop: (times dict, cells differing outside the
    tolerance band, cells differing inside it, cells in the band)."""
    hws = [(imgsz // s, imgsz // s) for s in STRIDES]
    fns = {"loop": lambda: [imitation_mask_loop(targets, a, s, hw, bs) for a, s, hw in zip(ANCHORS, STRIDES, hws)],
           "fine": lambda: imitation_masks(targets, ANCHORS, STRIDES, hws, bs),
           "gt": lambda: imitation_masks(targets, ANCHORS, STRIDES, hws, bs, kind="gt")}
    outside = inside = band = 0
    for m, a, s, hw in zip(fns["fine"](), ANCHORS, STRIDES, hws):
        ref, doubt = imitation_mask_loop(targets.double(), a, s, hw, bs, tol=TOL)
        outside += int(((m != ref) & ~doubt).sum())
        inside += int(((m != ref) & doubt).sum())
        band += int(doubt.sum())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min([best[name]] + [elapsed_ms(fn) for _ in range(1 if name == "loop" else 5)])
    return best, outside, inside, band


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--max-boxes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds (loop once, dense masks 5x each)")
    ap.add_argument("--step-repeat", type=int, default=2, help="timed plain training steps (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for everything (0: torch default)")
    opt = ap.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)

    targets = random_targets(opt.batch, opt.max_boxes, opt.seed)
    # the training step first: its large tensors leave the allocator as a training process has it
    step = plain_step_ms(targets, opt.batch, opt.imgsz, opt.step_repeat) if opt.step_repeat else float("nan")
    t, outside, inside, band = mask_times(targets, opt.batch, opt.imgsz, opt.rounds)

    print(f"\nimitation masks, yolov5s levels P3-P5 | batch {opt.batch} at {opt.imgsz}, {len(targets)} boxes "
          f"(0..{opt.max_boxes} per image) | {torch.get_num_threads()} torch thread(s) | best of {opt.rounds} "
          f"interleaved rounds, wall clock")
    print(f"{'':44}{'ms':>10}{'loop / this':>13}{'% of step':>11}")
    rows = [("per-box loop, 'fine' (tests/mask_reference.py)", t["loop"]), ("dense imitation_masks, 'fine'", t["fine"]),
            ("dense imitation_masks, 'gt'", t["gt"]), (f"plain yolov5s training step (best of {opt.step_repeat})", step)]
    for name, ms in rows:
        print(f"{name:44}{ms:10.2f}{t['loop'] / ms:13.1f}{100 * ms / step:11.3f}")
    print(f"dense 'fine' masks: {t['loop'] / t['fine']:.1f}x faster than the loop, {100 * t['fine'] / step:.3f}% of a "
          f"plain training step; vs the loop: {outside} cells differ outside the {TOL:g} band, {inside} inside "
          f"it ({band} cells in the band)")
    if outside:
        sys.exit(1)


if __name__ == "__main__":
    main()
