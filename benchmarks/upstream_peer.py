"""Whole-process speed against upstream YOLOv5 run side by side as a black-box peer (its pip CLI only).

Training: the same plain recipe (no --teacher) by both, in whole processes, alternating who runs first
in each round so that load drift on a shared machine hits both alike:

    python train_distill.py --cfg yolov5n.yaml --weights '' --data <shapes yaml> --imgsz 160 --batch-size 32 \
        --epochs 2 --noplots --workers 2 --device cpu
    yolov5 train <the same flags>

Validation: one set of weights trained by the peer (its best.pt from the last round), validated by the
peer's `yolov5 val` and by this repository's val.py (the peer's pickle is turned into a plain state dict
by the peer's own Python, then into a project checkpoint); both `all` rows are printed with the time ratio.

Val parity (after the timed val rounds, untimed): one more val per side with --save-json; the two
prediction files are compared record by record (image, class, box, score as written), and the `all`
rows side by side. Both sides run with the same thread count, which bit-identical outputs need (CPU
convolutions round differently with another OMP thread count). Results: benchmarks/results/
val_parity[_TAG].{csv,md}.

    python -m benchmarks.upstream_peer --skip-train --val-rounds 0 --data shapes.yaml --epochs 4
    python -m benchmarks.upstream_peer --peer-weights runs/peer/best.pt --val-rounds 0 --data shapes.yaml

Reported per run: wall seconds, CPU seconds (user + sys of the process and its reaped workers) and the
training-loop seconds read off the progress bars; per side the medians; and the ratios peer / ours
(> 1: ours is faster). The machine is shared: quote the ratios, not the seconds.

    python -m benchmarks.upstream_peer                     # 3 rounds
    python -m benchmarks.upstream_peer --rounds 5 --tag after_loader
    python -m benchmarks.upstream_peer --skip-val --rounds 1

Peer set-up (offline): python -m venv --system-site-packages /work/venv-peer;
/work/venv-peer/bin/pip install yolov5==7.0.14 "setuptools<81" "numpy<2.4" (the package imports
pkg_resources and calls np.trapz; the system torch stays). At run time the peer gets a private config dir
(YOLOV5_CONFIG_DIR, YOLO_CONFIG_DIR) holding a TTF font as Arial.ttf, so that it downloads no font, and
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, because it reloads its own checkpoints with torch.load's default,
which refuses them since torch 2.6. yolov5 7.0.14 stops after the first epoch with --noval
(UnboundLocalError 'map50s'), so the recipe validates after every epoch on both sides; --noval adds the
flag for a peer that has it fixed.

Results: benchmarks/results/upstream_peer[_TAG].{csv,md}.
"""
import argparse
import csv
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import command, commit, cpu_name, machine

ROOT = Path(__file__).resolve().parents[1]

NAMES = ["circle", "ellipse", "square", "rectangle", "hexagon", "star"]
ALL_ROW = re.compile(r"^\s*all\s+(\d+)\s+(\d+)\s+([\d.e+-]+)\s+([\d.e+-]+)\s+([\d.e+-]+)\s+([\d.e+-]+)\s*$",
                     re.M)
BAR = re.compile(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d\d)<")  # tqdm: n/total [elapsed<remaining


def run_info() -> dict:
    """The commit and machine fields of the CSV rows, from the stamp helpers every benchmark shares."""
    import torch
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "commit": commit()}


def shapes_data(n_train: int, n_val: int, size: int) -> Path:
    """The shapes set at this size under datasets/ (generated once, reused after) and a yaml naming it."""
    out = ROOT / "datasets" / f"shapes{size}_{n_train}"
    imgs = [out / "images" / s for s in ("train", "val")]
    if [len(list(p.glob("*.jpg"))) if p.is_dir() else -1 for p in imgs] != [n_train, n_val]:
        from data.shapes_generator import generate
        generate(out, n_train, n_val, seed=0, size=size, overwrite=True)
    yaml_file = out.parent / f"{out.name}.yaml"
    from utils.files import yaml_save
    yaml_save(yaml_file, {"path": str(out), "train": "images/train", "val": "images/val",
                          "names": dict(enumerate(NAMES))})
    return yaml_file


def resolved_data(data: str, out: Path) -> Path:
    """A data yaml both sides read alike: split paths made absolute by check_dataset (which also generates
    the shapes set on first use)."""
    from utils.data_config import check_dataset
    from utils.files import yaml_save
    d = check_dataset(data)
    yaml_save(out, {"path": str(d["path"]), "train": d["train"], "val": d["val"],
                    "names": dict(enumerate(d["names"]))})
    return out


def compare_predictions(peer_json: Path, ours_json: Path) -> dict:
    """Record-by-record agreement of two COCO prediction files (same order: same images, same sort)."""
    a, b = (json.loads(Path(f).read_text()) for f in (peer_json, ours_json))
    equal = sum(x == y for x, y in zip(a, b))
    images = {r["image_id"] for r in a} | {r["image_id"] for r in b}
    differ = {x["image_id"] for x, y in zip(a, b) if x != y} | {r["image_id"] for r in (a[len(b):] + b[len(a):])}
    return {"peer": len(a), "ours": len(b), "equal": equal, "images": len(images), "images_differing": len(differ)}


def peer_env(cfg_dir: Path, threads: int) -> dict:
    """Environment for the peer: private config dir with a local font, its own checkpoints loadable."""
    import matplotlib
    cfg_dir.mkdir(parents=True, exist_ok=True)
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (cfg_dir / name).exists():
            shutil.copy(font, cfg_dir / name)
    env = ours_env(threads)
    env.update(YOLOV5_CONFIG_DIR=str(cfg_dir), YOLO_CONFIG_DIR=str(cfg_dir), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    return env


def ours_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def timed(cmd, cwd, env, log: Path) -> dict:
    """Run one whole process; wall and CPU seconds (its reaped children included), its log kept."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = log.read_text(errors="replace")
    if rc:
        raise RuntimeError(f"exit {rc}: {' '.join(map(str, cmd))}\n{text[-3000:]}")
    return {"wall_s": wall, "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), "log": text}


def loop_seconds(log: str, nb: int) -> float | None:
    """Training-loop seconds: the sum over epochs of the final elapsed time of the nb-batch progress bar."""
    epochs, cur = [], None
    for m in BAR.finditer(log):
        n, total = int(m[1]), int(m[2])
        if total != nb:
            continue
        if n < nb and cur is not None:
            epochs.append(cur)
            cur = None
        elif n == nb:
            cur = max(cur or 0, int(m[3] or 0) * 3600 + int(m[4]) * 60 + int(m[5]))
    if cur is not None:
        epochs.append(cur)
    return float(sum(epochs)) if epochs else None


def all_row(log: str) -> tuple:
    rows = ALL_ROW.findall(log)
    if not rows:
        raise RuntimeError(f"no 'all' row in the log:\n{log[-2000:]}")
    return tuple(rows[-1])


def peer_to_project(peer_python: str, peer_pt: Path, out: Path, env: dict) -> Path:
    """The peer's best.pt as a project checkpoint with the same weights (its pickle needs its classes)."""
    import torch
    from models.checkpoint import save_checkpoint
    from models.yolo import DetectionModel
    plain = out.with_suffix(".state.pt")
    dump = ("import sys, torch\n"
            "c = torch.load(sys.argv[1], map_location='cpu', weights_only=False)\n"
            "m = c.get('ema') or c['model']\n"
            "n = m.names\n"
            "n = [n[k] for k in sorted(n)] if isinstance(n, dict) else list(n)\n"
            "torch.save({'state': m.state_dict(), 'yaml': m.yaml, 'names': [str(x) for x in n]}, sys.argv[2])\n")
    subprocess.run([peer_python, "-c", dump, str(peer_pt), str(plain)], env=env, check=True)
    d = torch.load(plain, map_location="cpu", weights_only=True)
    model = DetectionModel(d["yaml"], nc=len(d["names"]))
    model.load_state_dict({k: v.float() for k, v in d["state"].items()}, strict=True)
    model.names = d["names"]
    return save_checkpoint(out, model)


def write_parity(opt, argv, info, train_flags, vflags, peer_best, parity, agree):
    """benchmarks/results/val_parity[_TAG].{csv,md}: both `all` rows and the json record agreement."""
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "val_parity" + (f"_{opt.tag}" if opt.tag else "")
    head = ["Images", "Instances", "P", "R", "mAP50", "mAP50-95"]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["side", *head, "detections", "records_equal_to_peer", "commit", "cpu", "cores", "torch",
                    "threads"])
        for side in ("peer", "ours"):
            w.writerow([side, *parity[side][0], agree[side], agree["equal"], info["commit"], info["cpu"],
                        info["cores"], info["torch"], opt.threads or "unset"])
    same = parity["peer"][0] == parity["ours"][0]
    # Both sides run in child processes: their OMP thread count stands where this process's would.
    threads = f"OMP threads {opt.threads or 'unset'} on both sides"
    lines = ["# val.py vs upstream YOLOv5's val (pip yolov5 7.0.14, black-box CLI) on the same weights", "",
             f"- command: `{command(argv, __file__)}`", f"- commit: {info['commit']}",
             f"- machine: {machine(detail=threads)}",
             (f"- weights: best.pt of `yolov5 train {shlex.join(map(str, train_flags))}`" if train_flags else
              f"- weights: `{peer_best}` (the peer's)"),
             f"- val flags (both sides, plus --save-json): `{shlex.join(map(str, vflags[2:]))}`; "
             f"data: `{opt.data or 'generated shapes set'}` (split paths made absolute)", "",
             "| side | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]
    lines += [f"| {side} | " + " | ".join(parity[side][0]) + " |" for side in ("peer", "ours")]
    lines += ["", f"- `all` rows identical: {'yes' if same else 'NO'}",
              f"- detections (json records): peer {agree['peer']}, ours {agree['ours']}; equal record by record "
              f"(image, class, box, score as written): {agree['equal']}; images with any difference: "
              f"{agree['images_differing']} of {agree['images']}"]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(peer, ours):
    return peer / ours if peer and ours else None


def fmt(x, d=1):
    return "-" if x is None else f"{x:.{d}f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="training rounds (each: one run per side)")
    p.add_argument("--val-rounds", type=int, default=3, help="val.py rounds (each: one run per side)")
    p.add_argument("--peer", default="/work/venv-peer/bin/yolov5", help="the peer's CLI (yolov5 train / val)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--data", default="", help="a data yaml for both sides instead of the generated shapes set "
                                              "(--n-train, --n-val), e.g. shapes.yaml")
    p.add_argument("--peer-weights", default="", help="the peer's best.pt to validate (no training)")
    p.add_argument("--no-parity", action="store_true", help="skip the val parity run (--save-json, compared)")
    p.add_argument("--noval", action="store_true", help="add --noval to both (yolov5 7.0.14 crashes with it)")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every run (0: leave unset)")
    p.add_argument("--skip-train", action="store_true", help="val.py rounds only (one peer run for the weights)")
    p.add_argument("--skip-val", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the results files")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    opt = p.parse_args(argv)

    peer_cli = Path(opt.peer)
    if not peer_cli.is_file():
        sys.exit(f"peer CLI {peer_cli} not found: see this script's docstring for the set-up")
    peer_python = str(peer_cli.parent / "python")
    info = run_info()
    work = Path(tempfile.mkdtemp(prefix="upstream_peer_"))
    data = resolved_data(opt.data, work / "data.yaml") if opt.data else shapes_data(opt.n_train, opt.n_val, opt.imgsz)
    nb = -(-opt.n_train // opt.batch_size)  # the progress bar length (for the generated set)
    env_ours, env_peer = ours_env(opt.threads), peer_env(work / "peer_config", opt.threads)
    flags = ["--cfg", "yolov5n.yaml", "--weights", "", "--data", str(data), "--imgsz", opt.imgsz,
             "--batch-size", opt.batch_size, "--epochs", opt.epochs, "--noplots", "--workers", opt.workers,
             "--device", "cpu", *(["--noval"] if opt.noval else [])]
    sides = {
        "ours": ([sys.executable, ROOT / "train_distill.py", *flags], ROOT, env_ours),
        "peer": ([peer_cli, "train", *flags], work, env_peer),
    }
    print(f"machine: {info}\ndata: {data}\nruns in {work}", flush=True)

    runs = []  # dicts: phase, round, side, wall_s, cpu_s, loop_s
    peer_best = Path(opt.peer_weights) if opt.peer_weights else None
    train_rounds = 0 if (opt.skip_train or peer_best) else opt.rounds
    for r in range(train_rounds or (0 if (opt.skip_val or peer_best) else 1)):
        order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
        if not train_rounds:
            order = ("peer",)
        for side in order:
            cmd, cwd, env = sides[side]
            proj = work / side
            res = timed([*cmd, "--project", proj, "--name", f"r{r}", "--exist-ok"], cwd, env,
                        work / f"train_{side}_r{r}.log")
            res.update(phase="train", round=r, side=side, loop_s=loop_seconds(res["log"], nb))
            if side == "peer":
                peer_best = proj / f"r{r}" / "weights" / "best.pt"
            if train_rounds:
                runs.append(res)
                print(f"train round {r} {side}: wall {res['wall_s']:.1f}s cpu {res['cpu_s']:.1f}s "
                      f"loop {fmt(res['loop_s'], 0)}s", flush=True)

    val_rows = {}
    if not opt.skip_val:
        ours_pt = peer_to_project(peer_python, peer_best, work / "peer_best_as_project.pt", env_peer)
        vflags = ["--data", str(data), "--imgsz", opt.imgsz, "--batch-size", opt.batch_size, "--device", "cpu",
                  "--workers", opt.workers, "--exist-ok"]
        vsides = {
            "ours": ([sys.executable, ROOT / "val.py", "--weights", ours_pt, *vflags, "--project", work / "val_ours"],
                     ROOT, env_ours),
            "peer": ([peer_cli, "val", "--weights", peer_best, *vflags, "--project", work / "val_peer"], work,
                     env_peer),
        }
        for r in range(opt.val_rounds):
            for side in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
                cmd, cwd, env = vsides[side]
                res = timed(cmd, cwd, env, work / f"val_{side}_r{r}.log")
                val_rows[side] = all_row(res["log"])
                res.update(phase="val", round=r, side=side, loop_s=None)
                runs.append(res)
                print(f"val round {r} {side}: wall {res['wall_s']:.1f}s cpu {res['cpu_s']:.1f}s "
                      f"all {' '.join(val_rows[side])}", flush=True)
        if not opt.no_parity:
            parity = {}
            for side in ("peer", "ours"):
                cmd, cwd, env = vsides[side]
                all_r = all_row(timed([*cmd, "--save-json", "--name", "parity"], cwd, env,
                                      work / f"val_{side}_parity.log")["log"])
                js = sorted((work / f"val_{side}" / "parity").glob("*_predictions.json"))
                if len(js) != 1:
                    raise RuntimeError(f"{side}: expected one *_predictions.json, found {js}")
                parity[side] = (all_r, js[0])
            agree = compare_predictions(parity["peer"][1], parity["ours"][1])
            write_parity(opt, argv, info, None if opt.peer_weights else flags, vflags, peer_best, parity, agree)

    summary = {}
    for phase in ("train", "val"):
        for key in ("wall_s", "cpu_s", "loop_s"):
            med = {s: median([x[key] for x in runs if x["phase"] == phase and x["side"] == s]) for s in sides}
            summary[phase, key] = (med["ours"], med["peer"], ratio(med["peer"], med["ours"]))

    if runs:
        write_speed(opt, argv, info, flags, runs, summary, val_rows)
    if opt.keep:
        print(f"run folders kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def write_speed(opt, argv, info, flags, runs, summary, val_rows):
    """benchmarks/results/upstream_peer[_TAG].{csv,md}: per-run and median seconds, the ratios."""
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "upstream_peer" + (f"_{opt.tag}" if opt.tag else "")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["phase", "round", "side", "wall_s", "cpu_s", "loop_s", "commit", "cpu", "cores", "torch"])
        for x in runs:
            w.writerow([x["phase"], x["round"], x["side"], f"{x['wall_s']:.2f}", f"{x['cpu_s']:.2f}",
                        fmt(x["loop_s"], 0), info["commit"], info["cpu"], info["cores"], info["torch"]])
    # The runs are child processes: their OMP thread count stands where this process's would.
    threads = f"OMP threads {opt.threads or 'unset'}"
    lines = [f"# Whole-process speed vs upstream YOLOv5 (pip yolov5 7.0.14, black-box CLI){' - ' + opt.tag if opt.tag else ''}",
             "", f"- command: `{command(argv, __file__)}`", f"- commit: {info['commit']}",
             f"- machine: {machine(detail=threads)}; shared with other jobs (load varies: compare ratios)",
             f"- train recipe (both): `{shlex.join(map(str, flags))}`",
             (f"- data: {opt.data}" if opt.data else
              f"- data: shapes, {opt.n_train} train / {opt.n_val} val images, nominal {opt.imgsz} px"), "",
             "| phase | median | ours | peer | peer / ours |", "| --- | --- | --- | --- | --- |"]
    for (phase, key), (o, pv, rt) in summary.items():
        if o is not None:
            lines.append(f"| {phase} | {key} | {fmt(o)} | {fmt(pv)} | {fmt(rt, 3)} |")
    if val_rows:
        lines += ["", "val.py `all` rows on the peer's best.pt (Images Instances P R mAP50 mAP50-95):", "",
                  f"- ours: `{' '.join(val_rows['ours'])}`", f"- peer: `{' '.join(val_rows['peer'])}`"]
    lines += ["", "| phase | round | side | wall_s | cpu_s | loop_s |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {x['phase']} | {x['round']} | {x['side']} | {x['wall_s']:.1f} | {x['cpu_s']:.1f} | "
              f"{fmt(x['loop_s'], 0)} |" for x in runs]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
