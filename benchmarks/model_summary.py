"""How large is each YOLOv5 model? Layers, parameters and GFLOPs, next to upstream's published numbers.

Every size (P5, and P6 unless --no-p6) is built from its yaml on the meta device (shapes only, so even
yolov5x6 takes well under a second); GFLOPs at --imgsz come from torch.utils.flop_counter
(models.yolo.model_gflops), which leaves out BN and activation arithmetic; upstream's published numbers
(its v7.0 README, parameters in millions and GFLOPs at 640) come from thop, which counts them.

    python -m benchmarks.model_summary                        # P5 and P6 at 640
    python -m benchmarks.model_summary --no-p6 --imgsz 320 --results model_summary
"""
import argparse
import sys
from pathlib import Path

import torch

from benchmarks.common import add_common_args, call_ms, quiet_log, report, start
from models.yolo import DetectionModel, model_gflops

ROOT = Path(__file__).resolve().parents[1]

PUBLISHED = {"yolov5n": (1.9, 4.5), "yolov5s": (7.2, 16.5), "yolov5m": (21.2, 49.0), "yolov5l": (46.5, 109.1),
             "yolov5x": (86.7, 205.7), "yolov5n6": (3.2, 4.6), "yolov5s6": (12.6, 16.8),
             "yolov5m6": (35.7, 50.0), "yolov5l6": (76.8, 111.4), "yolov5x6": (140.7, 209.8)}


def summarise(name, imgsz):
    """[layers, layers after BN fusion, parameters, GFLOPs at imgsz, build ms, count ms] of one model."""
    def build():
        with torch.device("meta"):
            return DetectionModel(f"{name}.yaml")

    model, build_ms, _ = call_ms(build)
    layers, params = len(list(model.modules())), model.num_params()
    gflops, count_ms, _ = call_ms(lambda: model_gflops(model, imgsz))
    with quiet_log():
        fused = len(list(model.fuse().modules()))
    return [layers, fused, params, round(gflops, 1), round(build_ms), round(count_ms)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--no-p6", action="store_true", help="skip the P6 (yolov5*6) models")
    opt = add_common_args(p, threads=0).parse_args(argv)
    start(opt)
    names = [f"yolov5{s}" for s in "nsmlx"] + ([] if opt.no_p6 else [f"yolov5{s}6" for s in "nsmlx"])
    rows = [[n, *summarise(n, opt.imgsz), PUBLISHED[n][0], PUBLISHED[n][1]] for n in names]
    header = ["model", "layers", "fused layers", "parameters", f"GFLOPs at {opt.imgsz}", "build ms", "count ms",
              "published params (M)", "published GFLOPs at 640"]
    report("Model summary", header, rows, [], opt.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
