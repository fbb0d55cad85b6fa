"""Speed of the imitation masks (utils/distill_mask.py): dense vs the per-box loop, share of a training step.

A batch of `--batch` images at `--imgsz` with 0..`--max-boxes` random boxes each, the three yolov5s levels
(strides 8/16/32, yolov5s anchors in pixels). Timed in one process at one thread count: imitation_masks
(all levels, kinds 'fine' and 'gt', as FeatureImitation calls it) and the per-image, per-box loop of
tests/mask_reference.py (kind 'fine', level by level), interleaved for `--rounds` rounds, best time of each
(on a shared machine the minimum is the least disturbed); and one plain yolov5s training step on the
same batch (forward, ComputeLoss, backward, SGD step; best of `--step-repeat` after a warm-up). Also checks
that the dense masks agree with the loop outside the tolerance band (IoU within 1e-6 of the threshold).
Then, under these masks, the adapters' forward + backward on random yolov5n neck maps (to yolov5s
channels): at the masked cells (utils.distill.adapt_at, as imitation_loss runs them) vs the conv over the
whole map, then picked (best of `--adapter-repeat`).

    python benchmarks/mask_speed.py                    # batch 16 at 640, as in the README
    python benchmarks/mask_speed.py --step-repeat 0 --adapter-repeat 0   # masks only
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
    return timed_ms(fn)[0]


def timed_ms(fn):
    """(wall-clock ms, CPU ms of this process) of one call of fn. On a shared machine the wall clock of a
    long call also counts time the scheduler gave to other processes, the CPU time does not."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


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
    and the agreement of the dense 'fine' masks with the loop: (wall-clock ms dict, CPU ms dict, cells
    differing outside the tolerance band, cells differing inside it, cells in the band)."""
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
    wall, cpu = dict.fromkeys(fns, float("inf")), dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            for w, c in [timed_ms(fn) for _ in range(1 if name == "loop" else 5)]:
                wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
    return wall, cpu, outside, inside, band


def adapter_times(masks, repeat, student_ch=(64, 128, 256), teacher_ch=(128, 256, 512)):
    """{kind: (ms at the masked cells, ms whole map)}: best of `repeat` forward + backward passes of the
    squared error between the adapted student and the teacher at the masked cells, all levels."""
    from utils.distill import adapt_at, build_adapters

    g = torch.Generator().manual_seed(0)
    cells = [m.nonzero(as_tuple=True) for m in masks]
    s = [torch.randn(*m.shape[:1], c, *m.shape[1:], generator=g, requires_grad=True) for c, m in zip(student_ch, masks)]
    t = [torch.randn(*m.shape[:1], c, *m.shape[1:], generator=g) for c, m in zip(teacher_ch, masks)]
    out = {}
    for kind in ("1x1", "3x3"):
        adapters = build_adapters(student_ch, teacher_ch, kind)

        def run(at_cells):
            loss = 0.0
            for a, si, ti, (b, y, x) in zip(adapters, s, t, cells):
                adapted = adapt_at(a, si, b, y, x) if at_cells else a(si)[b, :, y, x]
                loss = loss + (adapted - ti[b, :, y, x]).pow(2).sum()
            loss.backward()

        run(True), run(False)  # warm-up
        times = [[elapsed_ms(lambda: run(at_cells)) for at_cells in (True, False)] for _ in range(repeat)]
        out[kind] = tuple(min(x) for x in zip(*times))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--max-boxes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds (loop once, dense masks 5x each)")
    ap.add_argument("--step-repeat", type=int, default=2, help="timed plain training steps (0: skip)")
    ap.add_argument("--adapter-repeat", type=int, default=2, help="timed adapter passes (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for everything (0: torch default)")
    opt = ap.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)

    targets = random_targets(opt.batch, opt.max_boxes, opt.seed)
    # the training step first: its large tensors leave the allocator as a training process has it
    step = plain_step_ms(targets, opt.batch, opt.imgsz, opt.step_repeat) if opt.step_repeat else float("nan")
    t, cpu, outside, inside, band = mask_times(targets, opt.batch, opt.imgsz, opt.rounds)

    print(f"\nimitation masks, yolov5s levels P3-P5 | batch {opt.batch} at {opt.imgsz}, {len(targets)} boxes "
          f"(0..{opt.max_boxes} per image) | {torch.get_num_threads()} torch thread(s) | best of {opt.rounds} "
          f"interleaved rounds, wall clock")
    print(f"{'':48}{'ms':>10}{'loop / this':>13}{'% of step':>11}{'CPU ms':>10}{'loop / this':>13}")
    for key, name in (("loop", "per-box loop, 'fine' (tests/mask_reference.py)"),
                      ("fine", "dense imitation_masks, 'fine'"), ("gt", "dense imitation_masks, 'gt'")):
        print(f"{name:48}{t[key]:10.2f}{t['loop'] / t[key]:13.1f}{100 * t[key] / step:11.3f}{cpu[key]:10.2f}"
              f"{cpu['loop'] / cpu[key]:13.1f}")
    if opt.step_repeat:
        print(f"{f'plain yolov5s training step (best of {opt.step_repeat})':48}{step:10.0f}")
    print(f"dense 'fine' masks: {t['loop'] / t['fine']:.1f}x faster than the loop ({cpu['loop'] / cpu['fine']:.1f}x in "
          f"CPU time), {100 * t['fine'] / step:.3f}% of a plain training step; vs the loop: {outside} cells differ "
          f"outside the {TOL:g} band, {inside} inside it ({band} cells in the band)")
    if opt.adapter_repeat:
        hws = [(opt.imgsz // s, opt.imgsz // s) for s in STRIDES]
        masks = imitation_masks(targets, ANCHORS, STRIDES, hws, opt.batch)
        cover = " / ".join(f"{100 * m.float().mean():.0f}%" for m in masks)
        print(f"\nadapters, yolov5n -> yolov5s neck channels, forward + backward under these masks (coverage {cover} "
              f"P3/P4/P5) | best of {opt.adapter_repeat}")
        print(f"{'':10}{'at masked cells ms':>20}{'whole map ms':>15}{'whole / cells':>15}")
        for kind, (cells, whole) in adapter_times(masks, opt.adapter_repeat).items():
            print(f"{kind:10}{cells:20.1f}{whole:15.1f}{whole / cells:15.2f}")
    if outside:
        sys.exit(1)


if __name__ == "__main__":
    main()
