"""val.py throughput on the shapes set: images/s end to end (loading, inference, NMS, metrics) and the
per-image pre-process / inference / NMS split, for yolov5n at 160 and 320 px.

    python benchmarks/val_speed.py                       # untrained yolov5n (nc=6), 64 generated images
    python benchmarks/val_speed.py --weights best.pt --n-val 200 --sizes 160 320 640

Untrained weights give almost no boxes above conf 0.001, so their NMS time is a lower bound; pass
trained weights for a representative NMS column.
"""
import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import val  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402
from models.yolo import DetectionModel  # noqa: E402
from utils.files import yaml_save  # noqa: E402
from utils.logging import LOGGER  # noqa: E402

NAMES = ["circle", "ellipse", "square", "rectangle", "hexagon", "star"]


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core CPU ({cpu}), {torch.get_num_threads()} torch threads"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=None, help="weights to time (default: an untrained yolov5n, nc=6)")
    p.add_argument("--sizes", nargs="+", type=int, default=[160, 320])
    p.add_argument("--n-val", type=int, default=64, help="generated validation images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="")
    p.add_argument("--repeat", type=int, default=2, help="runs per size; the best is reported")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    opt = p.parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)

    tmp = Path(tempfile.mkdtemp(prefix="val_speed_"))
    subprocess.run([sys.executable, "-m", "data.shapes_generator", "--out", str(tmp / "shapes"), "--n-train", "0",
                    "--n-val", str(opt.n_val), "--seed", "0"], cwd=ROOT, check=True, capture_output=True)
    data = tmp / "shapes.yaml"
    yaml_save(data, {"path": str(tmp / "shapes"), "train": "images/val", "val": "images/val", "names": NAMES})
    weights = opt.weights
    if weights is None:
        torch.manual_seed(0)
        weights = tmp / "yolov5n_untrained.pt"
        save_checkpoint(weights, DetectionModel("yolov5n.yaml", nc=len(NAMES)))

    LOGGER.setLevel(logging.WARNING)  # keep val.py's tables out of the benchmark table
    rows = []
    for s in opt.sizes:
        best = None
        for _ in range(opt.repeat):
            t0 = time.perf_counter()
            (_, _, _, map_, *_), _, t = val.run(data=str(data), weights=str(weights), batch_size=opt.batch_size,
                                                imgsz=s, workers=opt.workers, device=opt.device, plots=False,
                                                project=tmp / "runs", name="exp")
            wall = time.perf_counter() - t0
            if best is None or wall < best[0]:
                best = (wall, t, map_)
        wall, t, map_ = best
        rows.append((s, opt.n_val, wall, opt.n_val / wall, 1e3 / sum(t), *t, map_))

    print(f"\nval.py speed on shapes ({machine()}); weights: {Path(weights).name}"
          f"{' (untrained)' if opt.weights is None else ''}; batch {opt.batch_size}, best of {opt.repeat}")
    head = ("imgsz", "images", "wall s", "img/s e2e", "img/s model", "pre ms", "infer ms", "NMS ms", "mAP50-95")
    print(("%8s" + "%12s" * (len(head) - 1)) % head)
    for r in rows:
        print(("%8d%12d" + "%12.2f" * 6 + "%12.4f") % r)
    print("img/s e2e: whole val.run (data loading, model, NMS, metrics, model load); "
          "img/s model: 1000 / (pre + inference + NMS ms per image)")


if __name__ == "__main__":
    main()
