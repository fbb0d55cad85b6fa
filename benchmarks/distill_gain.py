"""Distillation gain on the embedded shapes set: teacher vs baseline student vs distilled student.

Every student run uses the same data, epochs, seed list and hyperparameters; a distilled run differs
from its baseline twin by the imitation term only. Reports mAP50 and mAP50-95 per run, the mean and
spread over seeds, and the share of the teacher-baseline mAP50-95 gap that distillation closes.
Ablations (--ablations) vary one distillation setting at a time around the defaults.

    python -m benchmarks.distill_gain                      # default settings, seeds 0 1
    python -m benchmarks.distill_gain --ablations          # + target, adapter, mask kind, psi, assignment, lambda
    python -m benchmarks.distill_gain --jobs 2             # two student runs at a time, one thread each
    python -m benchmarks.distill_gain --ablation-names target=head adapter=3x3   # chosen ablations only
    python -m benchmarks.distill_gain --methods fgfi,cwd,mgd   # one row per distillation method
    python -m benchmarks.distill_gain --recipe standard --methods fgfi,cwd,mgd --jobs 2   # SGD, 40-epoch students
    python -m benchmarks.distill_gain --recipe standard --teacher-weights benchmarks/weights/standard_teacher.pt  # its committed teacher
Results: runs/benchmarks/distill_gain/{results.csv,summary.md} (standard recipe: runs/benchmarks/standard/).
Runs already finished are reused, so a long matrix can be run in parts (stop it, start it again later); a finished
run whose seed, epochs or distillation settings differ from what its configuration resolves to today is refused.
"""
import argparse
import csv
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

import train_distill
import val as validate
from benchmarks.common import command, commit, machine
from distill import METHODS
from distill.settings import option_dests, resolve, upgrade_args

ROOT = Path(__file__).resolve().parents[1]

# One setting changed at a time; everything else stays at train_distill.py's defaults (neck imitation
# through 1x1 adapters, fine mask, psi 0.5, norm kl with lambda 1, warm-up 100). 'mse-*': the paper's
# squared error (--distill-norm none) with one setting changed.
ABLATIONS = {
    "target=head": ["--distill-target", "head"],  # the benchmark's teacher has the student's nc and anchors
    "adapter=3x3": ["--distill-adapter", "3x3"],
    "mask=gt": ["--distill-mask", "gt"],
    "mask=full": ["--distill-mask", "full"],
    "psi=0.3": ["--distill-thresh", "0.3"],
    "psi=0.7": ["--distill-thresh", "0.7"],
    "assign=on": ["--distill-assign"],
    "warmup=0": ["--distill-warmup", "0"],
    "norm=kl-auto": ["--distill-weight", "auto"],  # kl with its lambda set from the losses
    "norm=none": ["--distill-norm", "none"],  # the squared error, lambda auto
    "norm=pkd": ["--distill-norm", "pkd", "--distill-weight", "0.15"],  # standardised maps: ~0.15 matches cwd's ratio
    "norm=channel": ["--distill-norm", "channel", "--distill-weight", "1"],  # a fixed weight: auto would undo the /C
    "mse-lambda=0.01": ["--distill-norm", "none", "--distill-weight", "0.01"],  # the paper's lambda
    "mse-auto-ratio=3": ["--distill-norm", "none", "--distill-auto-ratio", "3"],  # auto term at 3x the detection loss
    "mse-auto-ratio=10": ["--distill-norm", "none", "--distill-auto-ratio", "10"],
    "mse-mask=full": ["--distill-norm", "none", "--distill-mask", "full"],
    "cwd-weight=3": ["--distill-method", "cwd", "--distill-weight", "3"],
    "cwd-weight=0.5": ["--distill-method", "cwd", "--distill-weight", "0.5"],
    "cwd-tau=4": ["--distill-method", "cwd", "--cwd-tau", "4"],
    "mgd-alpha=auto": ["--distill-method", "mgd", "--distill-weight", "auto"],
    # cwd on standardised maps (mmyolo's and DAMO-YOLO's form) and DAMO-YOLO's decaying weight
    "cwd-norm=std": ["--distill-method", "cwd", "--distill-norm", "std"],  # its weight 0.15: ~3x at the start
    "cwd-std-weight=1": ["--distill-method", "cwd", "--distill-norm", "std", "--distill-weight", "1"],  # ~18x
    "cwd-schedule=cosine": ["--distill-method", "cwd", "--distill-schedule", "cosine"],  # weight 1 -> 0.1
    # around mgd's standardised default (weight 0.05)
    "mgd-weight=1": ["--distill-method", "mgd", "--distill-weight", "1"],  # ~17x at the start
    "mgd-weight=0.15": ["--distill-method", "mgd", "--distill-weight", "0.15"],  # ~2.5x at the start
    "mgd-norm=none": ["--distill-method", "mgd", "--distill-norm", "none"],  # the paper's sum, alpha 2e-5
    "schedule=cosine": ["--distill-schedule", "cosine"],  # the default fgfi term, its weight 1 -> 0.1
    "sl2-weight=6": ["--distill-method", "sl2", "--distill-weight", "6"],  # the reference's weight: ~78x here
    "lambda=x0.1": None,  # filled from --weight below
    "lambda=x3": None,
    "lambda=x10": None,
}

# Settings of each recipe; every flag of the same name overrides one of them.
RECIPES = {
    "short": dict(imgsz=128, teacher_epochs=15, epochs=10, optimizer="Adam", hyp="hyp.shapes.yaml", batch_size=16,
                  nbs=16, out=str(ROOT / "runs/benchmarks/distill_gain")),
    "standard": dict(imgsz=160, teacher_epochs=80, epochs=40, optimizer="SGD", hyp="hyp.scratch-low.yaml",
                     batch_size=32, nbs=64, out=str(ROOT / "runs/benchmarks/standard")),
}


def finished(out, name, epochs):
    """Whether the run folder holds a finished run: best.pt and a header plus one row per epoch in results.csv."""
    csv_file = out / name / "results.csv"
    return (out / name / "weights" / "best.pt").is_file() and csv_file.is_file() and \
        len(csv_file.read_text().splitlines()) > epochs


class _AnyTarget:
    """Stands in for the teacher when resolving settings: the target is compared only where it was given."""
    resolve_target = staticmethod(lambda target: target)


def changed_settings(run_dir, argv):
    """{setting: (as the finished run trained, as these train_distill.py flags resolve today)} for the settings
    that differ: the run's seed and epochs, and its distillation settings (a method's default that changed since
    the run was trained shows here even though the flags are the same). The warm-up depends on the batches per
    epoch and an 'auto' target on the teacher, so those two are compared only where the flags give them."""
    saved = upgrade_args(yaml.safe_load((run_dir / "opt.yaml").read_text()))
    opt = train_distill.parse_opt(True, argv)
    want = {"seed": opt.seed, "epochs": opt.epochs}
    if opt.teacher:
        want.update(resolve(opt, _AnyTarget(), nb=10 ** 6, epochs=opt.epochs).args())
        want = {k: v for k, v in want.items() if k not in ("distill_warmup", "distill_target")
                or getattr(opt, k) is not None}
    else:
        want.update(dict.fromkeys(option_dests()))
    return {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}


def check_reuse(runs, common, out):
    """Refuse to reuse a finished run whose settings differ from what its configuration resolves to now, before
    any training starts: reusing it would put an old run under a configuration's name."""
    stale = []
    for _, _, name, args in runs:
        if finished(out, name, int(args[args.index("--epochs") + 1])):
            diff = changed_settings(out / name, [*common, *args])
            if diff:
                stale.append(f"  {out / name}: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    if stale:
        raise SystemExit("finished runs trained with other settings than their configuration's today (as "
                         "trained -> now); delete or rename them to train them again:\n" + "\n".join(stale))


def train(name, args, common, out, threads=None):
    """Train one configuration unless it already finished (all its epochs in results.csv); return (best.pt, seconds).

    threads: torch/OpenMP threads of the child (for runs side by side); None keeps the environment's.
    """
    best = out / name / "weights" / "best.pt"
    if finished(out, name, int(args[args.index("--epochs") + 1])):
        return best, 0.0
    if (out / name).exists():  # an interrupted run: start it again from scratch
        print(f"{name}: unfinished run found, training it again", flush=True)
        shutil.rmtree(out / name)
    cmd = [sys.executable, str(ROOT / "train_distill.py"), *common, *args, "--project", str(out), "--name", name,
           "--exist-ok", "--noplots"]
    print(f"\n>>> {name}: {' '.join(cmd[2:])}", flush=True)
    t = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    return best, time.time() - t


def evaluate(weights, data, imgsz, out, name):
    m = validate.run(data=data, weights=str(weights), imgsz=imgsz, batch_size=32, workers=2, plots=False,
                     project=str(out / "val"), name=name, exist_ok=True).metrics
    return m.map50, m.map


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="short",
                    help="short: Adam, hyp.shapes.yaml, 10-epoch students at 128 px (as demo.sh); standard: "
                         "YOLOv5's SGD recipe (hyp.scratch-low, nbs 64, batch 32, 160 px), 80-epoch teacher, "
                         "40-epoch students. The flags below override single settings")
    ap.add_argument("--data", default="shapes.yaml")
    ap.add_argument("--imgsz", type=int, default=None)
    ap.add_argument("--teacher-cfg", default="yolov5s.yaml")
    ap.add_argument("--student-cfg", default="yolov5n.yaml")
    ap.add_argument("--teacher-epochs", type=int, default=None)
    ap.add_argument("--teacher-weights", default=None, metavar="PT",
                    help="use this trained teacher (e.g. benchmarks/weights/standard_teacher.pt) instead of training one")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs (baseline and distilled alike)")
    ap.add_argument("--optimizer", default=None, help="every run's optimiser")
    ap.add_argument("--hyp", default=None, help="every run's hyperparameters")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--nbs", type=int, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--ablations", action="store_true", help="also run the one-at-a-time ablations")
    ap.add_argument("--ablation-names", nargs="+", default=None, metavar="NAME",
                    help=f"run only these ablations (default: all of {', '.join(ABLATIONS)})")
    ap.add_argument("--ablation-seeds", type=int, nargs="+", default=None, help="seeds for ablations (default: all)")
    ap.add_argument("--weight", type=float, default=None, help="lambda for the default run (else the trainer's)")
    ap.add_argument("--methods", default="fgfi", help="comma-separated --distill-method values, one row each "
                                                      "(fgfi's row is 'distilled')")
    ap.add_argument("--jobs", type=int, default=1, help="student runs trained side by side (threads split evenly)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train_distill.py flags for every run")
    ap.add_argument("--out", default=None, help="run folder (default runs/benchmarks/distill_gain for the short "
                                                "recipe, runs/benchmarks/standard for the standard one)")
    ap.add_argument("--results", default=None, metavar="NAME",
                    help="also write benchmarks/results/NAME.csv and NAME.md (with the commit, command and machine)")
    opt = ap.parse_args()
    for k, v in RECIPES[opt.recipe].items():  # recipe values for the settings not given on the command line
        if getattr(opt, k) is None:
            setattr(opt, k, v)

    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data", opt.data, "--imgsz", str(opt.imgsz), "--batch-size", str(opt.batch_size), "--nbs", str(opt.nbs),
              "--optimizer", opt.optimizer, "--hyp", opt.hyp, "--workers", "2", "--noautoanchor", "--device", "cpu", *opt.extra]
    # AutoAnchor off: teacher and students keep the same anchors, which head imitation requires
    if opt.teacher_weights:
        teacher, t_sec = Path(opt.teacher_weights).resolve(), 0.0
        if not teacher.is_file():
            raise SystemExit(f"--teacher-weights {opt.teacher_weights}: file not found")
    else:
        teacher, t_sec = train("teacher", ["--cfg", opt.teacher_cfg, "--epochs", str(opt.teacher_epochs), "--seed", "0"],
                               common, out)
    default_kd = ["--teacher", str(teacher)] + (["--distill-weight", str(opt.weight)] if opt.weight else [])
    lam = opt.weight
    if lam is None:
        fgfi = METHODS["fgfi"]
        lam = fgfi.default_weight(fgfi.Params())  # the trainer's default lambda
    ablations = dict(ABLATIONS)
    if lam == "auto":  # x0.1 / x10: the weighted term starts at 0.1 / 10 times the detection loss
        ablations["lambda=x0.1"] = ["--distill-auto-ratio", "0.1"]
        ablations["lambda=x3"] = ["--distill-auto-ratio", "3"]
        ablations["lambda=x10"] = ["--distill-auto-ratio", "10"]
    else:
        ablations["lambda=x0.1"] = ["--distill-weight", f"{lam * 0.1:g}"]
        ablations["lambda=x3"] = ["--distill-weight", f"{lam * 3:g}"]
        ablations["lambda=x10"] = ["--distill-weight", f"{lam * 10:g}"]

    methods = [m.strip() for m in opt.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise SystemExit(f"--methods {opt.methods}: choose from {', '.join(METHODS)}")
    configs = {"baseline": []}
    configs.update({"distilled" if m == "fgfi" else m: [*default_kd, "--distill-method", m] for m in methods})
    main_configs = set(configs)
    if opt.ablations or opt.ablation_names:
        unknown = set(opt.ablation_names or []) - set(ablations)
        if unknown:
            raise SystemExit(f"unknown ablation(s) {sorted(unknown)}; choose from {', '.join(ablations)}")
        configs.update({f"kd {k}": [*default_kd, *v] for k, v in ablations.items()
                        if not opt.ablation_names or k in opt.ablation_names})
    abl_seeds = opt.ablation_seeds or opt.seeds

    runs = []  # (config, seed, run name, train_distill.py flags)
    for cfg_name, args in configs.items():
        for seed in opt.seeds if cfg_name in main_configs else abl_seeds:
            runs.append((cfg_name, seed, f"{cfg_name.replace(' ', '_').replace('=', '-')}_s{seed}",
                         ["--cfg", opt.student_cfg, "--epochs", str(opt.epochs), "--seed", str(seed), *args]))
    check_reuse(runs, common, out)
    threads = max(1, (os.cpu_count() or 1) // opt.jobs) if opt.jobs > 1 else None
    with ThreadPoolExecutor(opt.jobs) as pool:  # threads only wait on child processes
        trained = list(pool.map(lambda r: train(r[2], r[3], common, out, threads), runs))

    t50, t = evaluate(teacher, opt.data, opt.imgsz, out, "teacher")
    rows = [{"config": "teacher", "seed": 0, "mAP50": t50, "mAP50-95": t, "train_s": round(t_sec)}]
    for (cfg_name, seed, name, _), (best, sec) in zip(runs, trained):
        m50, m = evaluate(best, opt.data, opt.imgsz, out, name)
        rows.append({"config": cfg_name, "seed": seed, "mAP50": m50, "mAP50-95": m, "train_s": round(sec),
                     **loss_ratios(best.parents[1] / "results.csv")})
        print(f"{cfg_name:>16} seed {seed}: mAP50 {m50:.4f}  mAP50-95 {m:.4f}", flush=True)

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)

    def stats(cfg, key):
        v = [r[key] for r in rows if r["config"] == cfg]
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)

    t50, t = rows[0]["mAP50"], rows[0]["mAP50-95"]
    base = stats("baseline", "mAP50-95")[0]
    base_by_seed = {r["seed"]: r["mAP50-95"] for r in rows if r["config"] == "baseline"}

    def paired(cfg):
        """Gap closed against the baseline of the same seed, averaged over the config's seeds."""
        v = [(r["mAP50-95"] - base_by_seed[r["seed"]]) / (t - base_by_seed[r["seed"]])
             for r in rows if r["config"] == cfg and r["seed"] in base_by_seed and t != base_by_seed[r["seed"]]]
        return f"{100 * statistics.mean(v):+.0f}%" + (f" ± {100 * statistics.stdev(v):.0f}%" if len(v) > 1 else "") \
            if v else ""

    def ratio(cfg):
        """Weighted imitation / detection loss per image: first imitating epoch -> last (mean over seeds)."""
        v = [(r["ratio_first"], r["ratio_last"]) for r in rows if r["config"] == cfg and r.get("ratio_first") != ""]
        return f"{statistics.mean(a for a, _ in v):.2f}x -> {statistics.mean(b for _, b in v):.2f}x" if v else ""

    lines = [f"Recipe {opt.recipe}: shapes, imgsz {opt.imgsz}, teacher "
             f"{opt.teacher_weights or f'{opt.teacher_cfg} ({opt.teacher_epochs} epochs)'}, students "
             f"{opt.student_cfg} ({opt.epochs} epochs, seeds {opt.seeds}), batch {opt.batch_size}, nbs {opt.nbs}, "
             f"{opt.optimizer}, {opt.hyp}, extra flags: {' '.join(opt.extra) or 'none'}; {opt.jobs} run(s) at a time; "
             f"machine: {platform.processor() or platform.machine()}, CPU only.",
             "Gap closed = (run - baseline) / (teacher - baseline) in mAP50-95: against the mean baseline, and "
             "paired (each seed against the baseline of the same seed; mean ± sd over seeds).", "",
             "Loss ratio: the weighted imitation term over the detection loss (box + obj + cls), per image, in the "
             "first imitating epoch -> the last (train/ columns of results.csv; mean over seeds).", "",
             "| run | seeds | mAP50 (mean ± sd) | mAP50-95 (mean ± sd) | gap closed | gap closed, paired | loss ratio |",
             "|---|---|---|---|---|---|---|",
             f"| teacher | 0 | {t50:.4f} | {t:.4f} | | | |"]
    for cfg in dict.fromkeys(r["config"] for r in rows[1:]):
        m50, s50, _ = stats(cfg, "mAP50")
        m, s, _ = stats(cfg, "mAP50-95")
        seeds = ",".join(str(r["seed"]) for r in rows if r["config"] == cfg)
        closed = "" if cfg == "baseline" or t == base else f"{100 * (m - base) / (t - base):+.0f}%"
        lines.append(f"| {cfg} | {seeds} | {m50:.4f} ± {s50:.4f} | {m:.4f} ± {s:.4f} | {closed} | "
                     f"{'' if cfg == 'baseline' else paired(cfg)} | {ratio(cfg)} |")
    summary = "\n".join(lines)
    (out / "summary.md").write_text(summary + "\n")
    print("\n" + summary)
    if opt.results:
        write_results(opt.results, rows, summary)


def loss_ratios(results_csv) -> dict:
    """Imitation / detection loss of the first epoch with a non-zero imitation term and of the last epoch."""
    with open(results_csv) as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    def r(row):
        det = sum(float(row[f"train/{k}_loss"]) for k in ("box", "obj", "cls"))
        return round(float(row["train/kd_loss"]) / det, 3) if det else ""
    kd = [row for row in rows if float(row.get("train/kd_loss") or 0) > 0]
    return {"ratio_first": r(kd[0]), "ratio_last": r(rows[-1])} if kd else {"ratio_first": "", "ratio_last": ""}


def write_results(name, rows, summary):
    """benchmarks/results/NAME.csv and NAME.md, stamped with the commit, the command line and the machine."""
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    # The stamp every results file carries (benchmarks/common.py); the runs train on the CPU in child
    # processes, so "CPU only" stands where this process's thread count would.
    stamp = (f"commit {commit()}; command: `{command(script=__file__)}`; "
             f"machine: {machine(detail='CPU only')}")
    with open(res / f"{name}.csv", "w", newline="") as f:
        f.write(f"# {stamp}\n")
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    (res / f"{name}.md").write_text(f"# Distillation gain: {name}\n\n{stamp}\n\n{summary}\n")
    print(f"results written to {res / name}.csv and .md")


if __name__ == "__main__":
    main()
