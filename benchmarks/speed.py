"""One speed table from one run: imitation masks, plain vs distilled training step, loader, val.py, detect.py.

Rows (CPU, untrained weights: speed does not depend on their values):
  1. the imitation masks (3 levels) vs the per-image, per-box loop, random boxes (0..20 per image), and as
     % of a plain yolov5s training step: benchmarks/mask_speed.py's measurement.
  2. a training step at --imgsz/--batch on a real mosaic batch of shapes.yaml, yolov5n student, yolov5s
     teacher, nc=6, through train_distill's own pieces (StudentWithImitation, teacher_features,
     load_teacher, build_imitation with the trainer's defaults and warm-up 0): (a) plain = forward +
     ComputeLoss + backward; (b) distilled with the defaults (neck imitation, 1x1 adapters) = (a) +
     teacher forward + imitation term; (c) teacher forward alone; (d) = (b) with the paper's 3x3 + ReLU
     adapters; (e) head imitation (this teacher has the student's nc and anchors; no adapter);
     (f) = (b) with the teacher's maps computed once beforehand; (g) the imitation term alone (masks,
     adapters, loss, backward to the student's features) with the batch's mask coverage. Interleaved
     a, b, ..., g, a, ... after a warm-up; medians. Check: b <= a + c + 0.1 a (also for d and e).
  3. training loader images/s (mosaic, hyp.scratch-low) with 0 and 2 workers.
  4. val.py ms per image (whole val.run / images, and val's pre + inference + NMS) at 160 on the val split.
  5. detect.py ms per image on 16 val images (--nosave), same untrained yolov5n checkpoint.

    python benchmarks/speed.py                     # full: batch 16 at 320 (rows 2-3), masks at 640
    python benchmarks/speed.py --quick             # smoke run: smaller sizes, fewer repeats

The machine is shared: compare the ratios more than the absolute times. With every core busy, torch's
intra-op threads can stall for ~1 s per call (seen here at 2 threads on 2 loaded cores, not at 1): if
the rows look erratic (e.g. b < a), rerun with --threads 1. Prints a Markdown table and
saves it to runs/benchmarks/speed.md (speed_quick.md with --quick, so a smoke run never replaces it).
"""
import argparse
import logging
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import detect  # noqa: E402
import train_distill  # noqa: E402
import val  # noqa: E402
from benchmarks.loader_speed import loader_rate  # noqa: E402
from benchmarks.mask_speed import elapsed_ms, mask_times, plain_step_ms, random_targets  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402
from models.yolo import DetectionModel  # noqa: E402
from utils.data_config import check_dataset  # noqa: E402
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.distill import mask_coverage  # noqa: E402
from utils import distill_setup  # noqa: E402
from utils.files import find_file, yaml_load  # noqa: E402
from utils.logging import LOGGER  # noqa: E402
from utils.loss import ComputeLoss, scale_loss_gains  # noqa: E402
from utils.sources import list_files  # noqa: E402
from utils.torch_utils import init_seeds  # noqa: E402

NAN = float("nan")


@contextmanager
def quiet_log():
    """Keep the project logger's INFO lines off the console (collected and yielded); warnings still print."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
            if record.levelno >= logging.WARNING:
                print(record.getMessage(), file=sys.stderr)

    handlers, level = LOGGER.handlers[:], LOGGER.level
    LOGGER.handlers[:] = [Keep()]
    LOGGER.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        LOGGER.handlers[:] = handlers
        LOGGER.setLevel(level)


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median ms of each callable, timed round-robin (one warm-up call each first)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(elapsed_ms(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def mask_row(batch, imgsz, rounds, step_repeat, seed=0):
    """(dense ms, loop ms, plain yolov5s step ms, number of boxes), as benchmarks/mask_speed.py measures them."""
    targets = random_targets(batch, 20, seed)
    step = plain_step_ms(targets, batch, imgsz, step_repeat)  # first: leaves the allocator as training does
    t, _, outside, _, _ = mask_times(targets, batch, imgsz, rounds)
    if outside:
        raise AssertionError(f"imitation_masks differs from the per-box loop at {outside} cells outside the band")
    return t["fine"], t["loop"], step, len(targets)


def step_setup(data, imgsz, batch, tmp, device=torch.device("cpu")):
    """The benchmark's training batch and models, built as train_distill builds them, on `device`:
    (imgs, targets, student with its loss, variant). The batch is the same mosaic on every run; the
    teacher is an untrained yolov5s with the student's nc and default anchors (so head mode works).
    variant(*flags) -> (opt, teacher, levels, imitation) for the trainer's defaults plus flags, warm-up 0
    so the imitation term is on from the first step."""
    nc = data["nc"]
    init_seeds(0)
    loader = create_dataloader(data["train"], imgsz, batch, 32, hyp="hyp.scratch-low.yaml", augment=True,
                               workers=0, shuffle=True, seed=0, nc=nc)[0]
    imgs, targets, *_ = next(iter(loader))
    imgs, targets = imgs.to(device).float() / 255, targets.to(device)

    torch.manual_seed(0)
    teacher_pt = tmp / "teacher_yolov5s.pt"
    save_checkpoint(teacher_pt, DetectionModel("yolov5s.yaml", nc=nc))
    student = DetectionModel("yolov5n.yaml", nc=nc).to(device).train()
    raw_hyp = yaml_load(find_file("hyp.scratch-low.yaml"))
    hyp = scale_loss_gains(raw_hyp, nl=student.model[-1].nl, nc=nc, imgsz=imgsz)
    hyp["label_smoothing"] = 0.0
    student.nc, student.hyp = nc, hyp

    def variant(*flags):
        opt = train_distill.parse_opt(argv=["--teacher", str(teacher_pt), "--imgsz", str(imgsz),
                                            "--distill-warmup", "0", *flags])
        teacher, levels = distill_setup.load_teacher(opt, student, device)
        imitation = distill_setup.build_imitation(opt, student, teacher, levels, raw_hyp["anchor_t"])
        return opt, teacher, levels, imitation.to(device)

    return imgs, targets, student, ComputeLoss(student), variant, teacher_pt


def step_rows(data, imgsz, batch, repeats, tmp):
    """Median ms of the training-step variants (keys a..g, see the module docstring), built as train_distill
    builds them, and the mask coverage (% of cells per level) of the benchmark batch."""
    imgs, targets, student, compute_loss, variant, _ = step_setup(data, imgsz, batch, tmp)
    s_det = student.model[-1]
    plain = distill_setup.StudentWithImitation(student, None)

    def distilled_step(opt, teacher, levels, imitation, fixed_teacher_maps=None):
        module = distill_setup.StudentWithImitation(student, imitation, opt.distill_target)

        def step():
            student.zero_grad(set_to_none=True)
            imitation.zero_grad(set_to_none=True)
            t_feats = fixed_teacher_maps or distill_setup.teacher_features(teacher, imgs, levels, opt.distill_target)
            pred, kd_loss, stats = module(imgs, targets, t_feats, 0)
            assert stats["active"], "the imitation term is still in warm-up"
            (compute_loss(pred, targets)[0] + kd_loss.float() * imgs.shape[0]).backward()
        return step

    def step_a():
        student.zero_grad(set_to_none=True)
        pred, _, _ = plain(imgs, targets)
        compute_loss(pred, targets)[0].backward()

    default = variant()  # neck imitation through 1x1 adapters
    opt, teacher, levels, imitation = default
    t_fixed = distill_setup.teacher_features(teacher, imgs, levels, opt.distill_target)
    with torch.no_grad():
        _, s_fixed = student(imgs, return_features=True)
    s_leaf = [f.detach().requires_grad_() for f in s_fixed]
    strides = student.stride.tolist()
    anchors_px = [s_det.anchors[i] * s for i, s in enumerate(strides)]
    coverage = mask_coverage(imitation(s_leaf, t_fixed, targets, anchors_px, strides, 0)[1]["masks"])

    def imitation_alone():  # masks, adapters, loss, and its backward to the student's features
        imitation.zero_grad(set_to_none=True)
        imitation(s_leaf, t_fixed, targets, anchors_px, strides, 0)[0].backward()

    fns = {"a": step_a,
           "b": distilled_step(*default),
           "c": lambda: distill_setup.teacher_features(teacher, imgs, levels, opt.distill_target),
           "d": distilled_step(*variant("--distill-adapter", "3x3")),
           "e": distilled_step(*variant("--distill-target", "head")),
           "f": distilled_step(*default, fixed_teacher_maps=t_fixed),
           "g": imitation_alone}
    return interleaved_medians(fns, repeats), coverage, len(targets)


def eval_rows(data, imgsz, n_detect, tmp):
    """val.run and detect.run on an untrained yolov5n checkpoint: (val e2e ms/img, val model ms/img,
    val images, detect e2e ms/img, detect model ms/img)."""
    torch.manual_seed(0)
    ckpt = tmp / "yolov5n_untrained.pt"
    model = DetectionModel("yolov5n.yaml", nc=data["nc"])
    model.names = data["names"]
    save_checkpoint(ckpt, model)
    n_val = len(list_files(data["val"]))
    with quiet_log():
        t0 = time.perf_counter()
        *_, t = val.run(data="shapes.yaml", weights=str(ckpt), batch_size=16, imgsz=imgsz, workers=2,
                        plots=False, project=tmp / "runs", name="val")
        val_e2e = (time.perf_counter() - t0) * 1e3 / n_val
    sources = tmp / "detect_sources.txt"
    sources.write_text("\n".join(list_files(data["val"])[:n_detect]) + "\n")
    with quiet_log() as lines:
        t0 = time.perf_counter()
        _, results = detect.run(weights=str(ckpt), source=str(sources), data="shapes.yaml", imgsz=(imgsz, imgsz),
                                nosave=True, project=tmp / "runs", name="detect")
        det_e2e = (time.perf_counter() - t0) * 1e3 / max(len(results), 1)
    speed = [re.search(r"Speed: ([\d.]+)ms pre-process, ([\d.]+)ms inference, ([\d.]+)ms NMS", x) for x in lines]
    speed = [m for m in speed if m]
    det_model = sum(float(x) for x in speed[-1].groups()) if speed else NAN
    return val_e2e, sum(t), n_val, det_e2e, det_model, len(results)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--imgsz", type=int, default=320, help="training step and loader image size")
    p.add_argument("--batch", type=int, default=16, help="training step and loader batch size")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats (medians reported)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="smoke run: smaller sizes, fewer repeats")
    p.add_argument("--out", default=None, help="Markdown output (default runs/benchmarks/speed[_quick].md)")
    opt = p.parse_args()
    torch.set_num_threads(opt.threads)
    q = opt.quick
    mask_bs, mask_sz = (4, 320) if q else (16, 640)
    imgsz, batch = (160, 4) if q else (opt.imgsz, opt.batch)
    repeats = 2 if q else opt.repeats
    loader_batches, eval_sz, n_detect = (2 if q else 8), 160, 16
    out = Path(opt.out or ROOT / "runs" / "benchmarks" / ("speed_quick.md" if q else "speed.md"))

    with quiet_log():
        data = check_dataset("shapes.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="speed_"))
    rows = []  # (row, what, setting, value, ratio / check)

    fast, loop, step, nbox = mask_row(mask_bs, mask_sz, 3 * repeats, 1 if q else 2)
    setting = f"batch {mask_bs} at {mask_sz}, {nbox} boxes, 3 levels"
    rows += [("1", "imitation mask, per-image per-box loop (tests/mask_reference.py)", setting, f"{loop:.2f} ms", ""),
             ("1", "imitation_masks, dense", setting, f"{fast:.2f} ms",
              f"{loop / fast:.0f}x faster than the loop; {100 * fast / step:.3f}% of a plain yolov5s training step "
              f"({step:.0f} ms, best of {1 if q else 2})")]

    with quiet_log():
        t, cover, ntgt = step_rows(data, imgsz, batch, repeats, tmp)
    a, b, c = t["a"], t["b"], t["c"]
    setting = f"batch {batch} at {imgsz}, {ntgt} boxes (mosaic)"

    def budget(x):
        ok = x <= a + c + 0.1 * a
        return (f"{x / a:.2f}x plain; {1e3 * batch / x:.1f} img/s; b <= a + c + 0.1a: {'holds' if ok else 'FAILS'} "
                f"({x:.0f} vs {a + c + 0.1 * a:.0f} ms)" + ("; below plain: timings disturbed, rerun" if x < a else ""))
    cover_txt = "mask coverage " + " / ".join(f"{x:.0f}%" for x in cover) + " (P3/P4/P5)"
    rows += [("2a", "plain step: yolov5n fwd + ComputeLoss + bwd", setting, f"{a:.0f} ms",
              f"{1e3 * batch / a:.1f} img/s"),
             ("2b", "distilled step, defaults (neck, 1x1 adapters): 2a + yolov5s teacher + imitation", setting,
              f"{b:.0f} ms", budget(b)),
             ("2c", "teacher forward alone (no_grad)", setting, f"{c:.0f} ms", f"{c / a:.2f}x plain"),
             ("2d", "distilled step, --distill-adapter 3x3 (the paper's)", setting, f"{t['d']:.0f} ms",
              budget(t["d"])),
             ("2e", "distilled step, --distill-target head (no adapter)", setting, f"{t['e']:.0f} ms", budget(t["e"])),
             ("2f", "2b with the teacher's maps precomputed", setting, f"{t['f']:.0f} ms",
              f"f - a = {t['f'] - a:.0f} ms: imitation inside the step; b - f = {b - t['f']:.0f} ms: "
              f"teacher inside the step"),
             ("2g", "imitation term alone (masks, 1x1 adapters, loss; fwd + bwd)", setting, f"{t['g']:.1f} ms",
              f"{100 * t['g'] / a:.1f}% of 2a; {cover_txt}; the adapters' cost grows with the coverage")]

    with quiet_log():
        rates = {w: loader_rate(data["train"], imgsz, batch, w, loader_batches, data["nc"]) for w in (0, 2)}
    for w, (rate, start) in rates.items():
        note = f"{rate / (1e3 * batch / b):.2f}x the distilled step's img/s; first batch {start:.1f} s"
        if w:
            note = f"{rate / rates[0][0]:.2f}x 0 workers; " + note
        rows.append(("3", f"train loader, mosaic, {w} workers", f"batch {batch} at {imgsz}, {loader_batches} batches",
                     f"{rate:.1f} img/s", note))

    val_e2e, val_model, n_val, det_e2e, det_model, n_det = eval_rows(data, eval_sz, n_detect, tmp)
    shutil.rmtree(tmp, ignore_errors=True)  # checkpoints and the val/detect run folders
    rows += [("4", "val.py (val.run), untrained yolov5n", f"{n_val} val images at {eval_sz}, batch 16",
              f"{val_e2e:.1f} ms/img", f"whole call; pre + inference + NMS {val_model:.1f} ms/img"),
             ("5", "detect.py (detect.run --nosave), same weights", f"{n_det} val images at {eval_sz}, batch 1",
              f"{det_e2e:.1f} ms/img", f"whole call; pre + inference + NMS {det_model:.1f} ms/img; "
                                       f"{det_e2e / val_e2e:.1f}x val's")]

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared), "
               f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    lines = [f"## Speed{' (--quick smoke run)' if q else ''}: {machine}", "",
             f"Medians of {repeats} interleaved repeats after a warm-up (row 1: best of {3 * repeats} interleaved "
             f"rounds); untrained weights.",
             "", "| row | what | setting | time | ratio / check |", "|---|---|---|---:|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
