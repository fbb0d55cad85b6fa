"""CUDA smoke check: one command to run on a machine with a GPU, covering what CPU runs cannot.

  1. imitation_masks on the device: equal to the CPU result but for cells whose IoU is within 1e-6 of the
     threshold, no host sync (a warm call under torch.cuda.set_sync_debug_mode('error')), ms per call
     (batch 16 at 640, 0..20 boxes per image).
  2. One random training batch (benchmarks/step_speed.py's StepBench), yolov5n student, untrained yolov5s
     teacher loaded by the trainer's load_teacher (fp16 on CUDA), AMP as the trainer runs it: (a) plain step, (b) distilled step with the
     defaults, (c) teacher forward alone; medians, the check b <= a + c + 0.1a, and a finite, non-zero
     imitation loss with finite gradients.
  3. train_distill.run for one epoch with that teacher (AMP, fp16 teacher, EMA, val in half precision),
     then val.run --half on its best.pt: finite metrics and a non-zero kd_loss column in results.csv.

    python -m benchmarks.cuda_smoke                 # device 0
    python -m benchmarks.cuda_smoke --device cpu --imgsz 128 --mask-imgsz 320   # dry run of the same code

Prints a Markdown table (--results NAME: also benchmarks/results/NAME.{csv,md}); exits 1 if a check
fails, 2 if the device is missing.
"""
import argparse
import csv
import math
import sys
import tempfile
from pathlib import Path

import torch

import train_distill
import val
from benchmarks.common import add_common_args, measure, quiet_log, report, start
from benchmarks.step_speed import TOL, StepBench, random_targets
from distill.mask_reference import ANCHORS, STRIDES, imitation_mask_loop
from utils.data_config import check_dataset
from distill.masks import imitation_masks

ROOT = Path(__file__).resolve().parents[1]


def mask_checks(dev, imgsz, repeats):
    """Device masks vs CPU masks: cells that differ outside and inside the per-box loop's tolerance band
    (only inside may differ), no-sync check, ms per call."""
    targets = random_targets(16, 20, 0, vary=True)
    hws = [(imgsz // s, imgsz // s) for s in STRIDES]
    a_dev = [a.to(dev) for a in ANCHORS]
    crowded = random_targets(16, 60, 1, vary=True)  # ~500 boxes: two chunks of boxes at P3 at 640
    outside = inside = 0
    for t in (targets, crowded):
        for c, d, a, s, hw in zip(imitation_masks(t, ANCHORS, STRIDES, hws, 16),
                                  imitation_masks(t.to(dev), a_dev, STRIDES, hws, 16), ANCHORS, STRIDES, hws):
            differ = c != d.cpu()
            if differ.any():
                _, doubt = imitation_mask_loop(t.double(), a, s, hw, 16, tol=TOL)
                outside += int((differ & ~doubt).sum())
                inside += int((differ & doubt).sum())
    t_dev = targets.to(dev)
    call = lambda: imitation_masks(t_dev, a_dev, STRIDES, hws, 16)  # noqa: E731
    no_sync = "n/a on CPU"
    if dev.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
            no_sync = True
        except RuntimeError as e:
            no_sync = f"False ({e})"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return (outside, inside), no_sync, measure({"masks": call}, repeats, device=dev)["masks"].median, \
        f"{len(targets)} and {len(crowded)} boxes"


def step_checks(dev, imgsz, batch, repeats):
    """Median ms of (a) plain, (b) distilled, (c) teacher forward, with AMP on CUDA; and sanity of (b)."""
    data = check_dataset("shapes.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="cuda_smoke_"))
    bench = StepBench("yolov5n.yaml", "yolov5s.yaml", data["nc"], imgsz, batch, 20, tmp, dev, amp=True)
    setup = bench.distill()
    seen = {}
    t = measure({"a": bench.step(), "b": bench.step(setup=setup, seen=seen), "c": bench.teacher_forward(setup)},
                repeats, device=dev)
    t = {k: v.median for k, v in t.items()}
    imitation = setup[2]
    grads_finite = all(torch.isfinite(p.grad).all() for p in
                       list(bench.student.parameters()) + list(imitation.parameters()) if p.grad is not None)
    teacher = setup[1].model
    return t, next(teacher.parameters()).dtype, float(seen["kd"].loss), grads_finite, len(bench.targets), bench.teacher_pt


def train_checks(dev_arg, imgsz, batch, teacher_pt, out):
    opt = train_distill.run(data="shapes.yaml", cfg="yolov5n.yaml", teacher=str(teacher_pt), epochs=1, imgsz=imgsz,
                            batch_size=batch, device=dev_arg, workers=2, project=str(out), name="kd",
                            exist_ok=True, distill_warmup=0, noplots=True)
    rows = list(csv.DictReader(open(Path(opt.save_dir) / "results.csv")))
    kd = float(rows[-1]["train/kd_loss"])
    best = Path(opt.save_dir) / "weights" / "best.pt"
    (p, r, map50, map5095, *_), _, _ = val.run(data="shapes.yaml", weights=str(best), imgsz=imgsz, batch_size=32,
                                               device=dev_arg, workers=2, half=dev_arg != "cpu",
                                               project=str(out), name="val", exist_ok=True, plots=False)
    return kd, (p, r, map50, map5095)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="0", help="cuda device index, or cpu for a dry run")
    ap.add_argument("--imgsz", type=int, default=320, help="training step and run image size")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--mask-imgsz", type=int, default=640)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "cuda_smoke"), help="training run folder")
    opt = add_common_args(ap, threads=0).parse_args()
    start(opt)
    if opt.device != "cpu" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu for a dry run of the same code")
        sys.exit(2)
    dev = torch.device("cpu" if opt.device == "cpu" else f"cuda:{opt.device}")
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)

    rows, failed = [], []

    def check(name, ok, value):
        rows.append((name, "ok" if ok else "FAILS", value))
        failed.extend([name] if not ok else [])

    with quiet_log():
        (outside, inside), no_sync, mask_ms, nbox = mask_checks(dev, opt.mask_imgsz, opt.repeats)
        check("imitation_masks on the device equal the CPU masks", not outside,
              f"batch 16 at {opt.mask_imgsz}, {nbox}; cells differing outside / inside the {TOL:g} band: "
              f"{outside} / {inside}")
        check("imitation_masks: no host sync (warm call)", no_sync in (True, "n/a on CPU"), str(no_sync))
        rows.append(("imitation_masks ms per call (median)", "", f"{mask_ms:.2f} ms"))
        # untrained teacher (StepBench): the plumbing is what is checked
        t, t_dtype, kd, grads_finite, ntgt, teacher_pt = step_checks(dev, opt.imgsz, opt.batch, opt.repeats)
        check("teacher dtype (fp16 on CUDA)", t_dtype == (torch.float16 if dev.type == "cuda" else torch.float32),
              str(t_dtype))
        check("distilled step: imitation loss finite and > 0, gradients finite",
              math.isfinite(kd) and kd > 0 and grads_finite, f"kd {kd:.4g}")
        budget = t["a"] + t["c"] + 0.1 * t["a"]
        check("step time b <= a + c + 0.1a", t["b"] <= budget,
              f"a plain {t['a']:.1f} ms, b distilled {t['b']:.1f} ms, c teacher {t['c']:.1f} ms, budget "
              f"{budget:.1f} ms (batch {opt.batch} at {opt.imgsz}, {ntgt} boxes, AMP {dev.type == 'cuda'})")
        kd_col, metrics = train_checks(opt.device, opt.imgsz, opt.batch, teacher_pt, out)
        check("train_distill.run 1 epoch: kd_loss column > 0", math.isfinite(kd_col) and kd_col > 0, f"{kd_col:.4g}")
        check("val.run on its best.pt: finite metrics", all(math.isfinite(float(x)) for x in metrics),
              "P {:.3f} R {:.3f} mAP50 {:.3f} mAP50-95 {:.3f}".format(*map(float, metrics)))

    report(f"CUDA smoke check on {dev}", ["check", "result", "value"], rows, [], opt.results, device=dev)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
