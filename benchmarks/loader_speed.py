"""Does the training loader keep up with training? Images/s of the mosaic loader vs a plain training step.

For each `--imgsz`: the training loader as train_distill builds it (augment, mosaic, hyp.scratch-low) on
the `--data` train split with each `--workers` count, over `--batches` batches after the first (the first
batch, with the workers' start-up, is reported apart); and the images/s of a plain training step
(benchmarks/step_speed.py's: forward + ComputeLoss + backward + optimiser step) of each `--models` model
at that size and batch. The loader holds training back where its images/s is below the step's.

    python -m benchmarks.loader_speed                                  # 320 px, 0 and 2 workers, yolov5n
    python -m benchmarks.loader_speed --imgsz 320 640 --workers 0 1 2 --models yolov5n.yaml yolov5s.yaml
    python -m benchmarks.loader_speed --imgsz 160 --batch 4 --batches 2 --steps 1   # smoke run
"""
import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.common import add_common_args, measure, quiet_log, report, start
from benchmarks.step_speed import StepBench
from utils.data_config import check_dataset
from utils.dataloaders import create_dataloader

ROOT = Path(__file__).resolve().parents[1]


def batches(path, imgsz, batch, workers, nc):
    """A callable returning the next training batch, cycling through the loader; the first call starts the
    workers."""
    loader = create_dataloader(path, imgsz, batch, 32, hyp="hyp.scratch-low.yaml", augment=True, workers=workers,
                               shuffle=True, seed=0, nc=nc)[0]
    state = {"it": None}

    def get():
        for _ in range(2):
            if state["it"] is None:
                state["it"] = iter(loader)
            try:
                return next(state["it"])
            except StopIteration:
                state["it"] = None
    return get


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shapes.yaml")
    p.add_argument("--imgsz", type=int, nargs="+", default=[320])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=8, help="timed loader batches per setting")
    p.add_argument("--models", nargs="+", default=["yolov5n.yaml"], help="model yamls whose plain step is timed")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per model and size")
    opt = add_common_args(p).parse_args(argv)
    start(opt)

    with quiet_log():
        data = check_dataset(opt.data)
    rows = []
    for s in opt.imgsz:
        with quiet_log():
            loaders = {w: batches(data["train"], s, opt.batch, w, data["nc"]) for w in opt.workers}
            t = {w: measure({"load": get}, opt.batches)["load"] for w, get in loaders.items()}
        for w, x in t.items():
            rows.append(["loader", f"{w} workers", s, round(1e3 * opt.batch / x.median, 1), round(x.median, 1),
                         f"first batch {x.first / 1e3:.2f} s"])
        for cfg in opt.models:
            with quiet_log(), tempfile.TemporaryDirectory() as tmp:
                bench = StepBench(cfg, None, data["nc"], s, opt.batch, 20, tmp)
                x = measure({"step": bench.step()}, opt.steps)["step"]
            rows.append(["plain training step", Path(cfg).stem, s, round(1e3 * opt.batch / x.median, 1),
                         round(x.median, 1), "fwd + ComputeLoss + bwd + SGD step, random batch"])
    header = ["what", "setting", "imgsz", "images/s", "ms / batch (median)", "note"]
    notes = [f"Batch {opt.batch}; loader: median of {opt.batches} batches after the first; steps: median of "
             f"{opt.steps} after a warm-up. Loader workers run in other processes: on a machine with few cores "
             f"they take CPU from the training step, so compare against the step's rate at the same load."]
    report(f"Training loader vs training step on {Path(opt.data).stem}", header, rows, notes, opt.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
