"""Learning curve on the embedded shapes set: mAP after each epoch for one or more models.

Trains each --cfg with the same data, schedule and seed through train_distill.py (plain training, no
teacher) and tabulates the per-epoch mAP50 and mAP50-95 that training's own validation wrote to
results.csv, with the wall time of each run. Extra train_distill.py flags go after --extra.

    python -m benchmarks.learning_curve --cfg yolov5n.yaml yolov5s.yaml --epochs 20 \\
        --extra --optimizer Adam --hyp hyp.shapes.yaml
    python -m benchmarks.learning_curve --from-runs runs/demo/teacher runs/demo/baseline  # tabulate only
Prints a Markdown table (--results NAME: also benchmarks/results/NAME.{csv,md}). Runs go to --out
(runs/benchmarks/learning_curve); finished runs are reused (delete them to retrain).
"""
import argparse
import csv
from pathlib import Path

from benchmarks.common import add_common_args, report
from benchmarks.distill_gain import train  # train one run unless its best.pt exists

ROOT = Path(__file__).resolve().parents[1]


def read_curve(results_csv):
    """[(epoch, mAP50, mAP50-95)] of the validated epochs in a run's results.csv (column names as the trainer
    writes them; an epoch left unvalidated by --noval has empty metric cells)."""
    with open(results_csv, newline="") as f:
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(f)]
    return [(int(r["epoch"]), float(r["metrics/mAP_0.5"]), float(r["metrics/mAP_0.5:0.95"])) for r in rows
            if r["metrics/mAP_0.5"] and r["metrics/mAP_0.5:0.95"]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", nargs="+", default=["yolov5n.yaml", "yolov5s.yaml"])
    ap.add_argument("--data", default="shapes.yaml")
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--nbs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from-runs", nargs="+", default=None, help="tabulate these finished run folders, train nothing")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train_distill.py flags for every run")
    ap.add_argument("--out", default=str(ROOT / "runs/benchmarks/learning_curve"))
    opt = add_common_args(ap, threads=None).parse_args(argv)

    out = Path(opt.out)
    curves, seconds = {}, {}
    for run in opt.from_runs or []:
        curves[Path(run).name] = read_curve(Path(run) / "results.csv")
    for cfg in [] if opt.from_runs else opt.cfg:
        name = Path(cfg).stem
        _, sec = train(name, ["--cfg", cfg, "--data", opt.data, "--imgsz", str(opt.imgsz), "--epochs",
                              str(opt.epochs), "--batch-size", str(opt.batch_size), "--nbs", str(opt.nbs), "--seed",
                              str(opt.seed), "--device", "cpu", "--workers", "2", "--noautoanchor", *opt.extra],
                       [], out)
        if sec:  # 0.0: an earlier run was reused
            seconds[name] = sec
        curves[name] = read_curve(out / name / "results.csv")

    names = list(curves)
    what = (f"runs {' '.join(opt.from_runs)} (settings in each opt.yaml)" if opt.from_runs else
            f"imgsz {opt.imgsz}, batch {opt.batch_size}, nbs {opt.nbs}, seed {opt.seed}, "
            f"extra flags: {' '.join(opt.extra) or 'none'}")
    header = ["epoch", *[f"{n} {m}" for n in names for m in ("mAP50", "mAP50-95")]]
    rows = []
    for e in range(max(len(c) for c in curves.values())):
        cells = []
        for n in names:
            c = curves[n]
            cells += [round(c[e][1], 3), round(c[e][2], 3)] if e < len(c) else [None, None]
        rows.append([e + 1, *cells])
    rows.append(["train min", *[x for n in names for x in
                                ((round(seconds[n] / 60, 1), None) if n in seconds else (None, None))]])
    report(f"Learning curve on {Path(opt.data).stem}", header, rows,
           [f"{what}. train min: wall minutes of each run trained by this call (empty: reused)."], opt.results)


if __name__ == "__main__":
    main()
