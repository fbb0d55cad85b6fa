"""Layers, parameters and GFLOPs at 640x640 of every YOLOv5 size, next to upstream's published numbers.

    python benchmarks/model_summary.py            # P5 and P6 models
    python benchmarks/model_summary.py --no-p6 --imgsz 320

Models are built on the meta device (shapes only), so even yolov5x6 takes well under a second; GFLOPs
come from torch.utils.flop_counter (utils.torch_utils.count_flops), not from a hand-written counter.
"""
import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.yolo import DetectionModel, model_gflops  # noqa: E402
from utils.logging import LOGGER  # noqa: E402

# upstream v7.0 README (params in millions, GFLOPs at 640) for comparison
PUBLISHED = {"yolov5n": (1.9, 4.5), "yolov5s": (7.2, 16.5), "yolov5m": (21.2, 49.0), "yolov5l": (46.5, 109.1),
             "yolov5x": (86.7, 205.7), "yolov5n6": (3.2, 4.6), "yolov5s6": (12.6, 16.8),
             "yolov5m6": (35.7, 50.0), "yolov5l6": (76.8, 111.4), "yolov5x6": (140.7, 209.8)}


def summarise(name, imgsz):
    t = time.perf_counter()
    with torch.device("meta"):
        model = DetectionModel(f"{name}.yaml")
    build = time.perf_counter() - t
    layers, params = len(list(model.modules())), model.num_params()
    t = time.perf_counter()
    gflops = model_gflops(model, imgsz)
    count = time.perf_counter() - t
    fused_layers = len(list(model.fuse().modules()))
    return layers, fused_layers, params, gflops, build, count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--no-p6", action="store_true", help="skip the P6 (yolov5*6) models")
    opt = ap.parse_args()
    LOGGER.setLevel("WARNING")  # no "Fusing layers..." lines inside the table
    names = [f"yolov5{s}" for s in "nsmlx"] + ([] if opt.no_p6 else [f"yolov5{s}6" for s in "nsmlx"])
    print(f"machine: {platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads "
          f"(2-core shared CPU), torch {torch.__version__}; meta-device builds")
    head = (f"{'model':<10}{'layers':>8}{'fused':>7}{'parameters':>13}{'GFLOPs@' + str(opt.imgsz):>12}"
            f"{'published':>18}{'build s':>9}{'count s':>9}")
    print(head)
    print("-" * len(head))
    for name in names:
        layers, fused, params, gflops, build, count = summarise(name, opt.imgsz)
        pub_p, pub_g = PUBLISHED[name]
        print(f"{name:<10}{layers:>8}{fused:>7}{params:>13,}{gflops:>12.1f}{f'{pub_p}M / {pub_g}':>18}"
              f"{build:>9.2f}{count:>9.2f}")
    print("published = upstream README params (M) / GFLOPs at 640 (thop-based; ours: torch.utils.flop_counter,"
          " which skips BN/activation arithmetic)")


if __name__ == "__main__":
    main()
