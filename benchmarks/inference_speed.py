"""Inference latency (ms per image, batch 1) of PyTorch vs onnxruntime for YOLOv5 models on this machine.

    python benchmarks/inference_speed.py                              # yolov5n/s at 320 and 640, 1 thread
    python benchmarks/inference_speed.py --models yolov5n --sizes 320 --threads 2 --runs 20

Untrained weights (latency does not depend on their values). Both runtimes get the same number of
intra-op threads; the model is BN-fused and in eval mode, the ONNX graph is exported by export.py's path
(static shape, opset 17). The time is the forward pass only (no letterbox, no NMS): median of --runs
after --warmup calls. On a shared machine compare the ratio column rather than the absolute numbers.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export import DecodedOutput, export_onnx, require_onnx  # noqa: E402
from models.yolo import DetectionModel  # noqa: E402
from utils.logging import LOGGER  # noqa: E402


def median_ms(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench(name, imgsz, threads, runs, warmup, tmp):
    _, ort = require_onnx()
    torch.manual_seed(0)
    model = DecodedOutput(DetectionModel(f"{name}.yaml").fuse()).eval()
    x = torch.rand(1, 3, imgsz, imgsz)
    with torch.no_grad():
        t_pt = median_ms(lambda: model(x), runs, warmup)
        f = export_onnx(model, x, Path(tmp) / f"{name}_{imgsz}.onnx", metadata={"stride": 32})
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    t_ort = median_ms(lambda: session.run(None, {"images": xn}), runs, warmup)
    with torch.no_grad():
        diff = float(np.abs(model(x).numpy() - session.run(None, {"images": xn})[0]).max())
    return t_pt, t_ort, diff


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["yolov5n", "yolov5s"])
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 640])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for both runtimes")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    opt = p.parse_args()

    torch.set_num_threads(opt.threads)
    warnings.filterwarnings("ignore")
    LOGGER.setLevel("WARNING")  # keep export's progress lines out of the table
    _, ort = require_onnx()
    machine = f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    print(f"Inference latency, batch 1, {opt.threads} thread(s), median of {opt.runs} runs - {machine}")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}")
    print(f"{'model':<10}{'imgsz':>6}{'PyTorch ms':>12}{'ORT ms':>10}{'PT/ORT':>8}{'max |diff|':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in opt.models:
            for s in opt.sizes:
                t_pt, t_ort, diff = bench(name, s, opt.threads, opt.runs, opt.warmup, tmp)
                print(f"{name:<10}{s:>6}{t_pt:>12.1f}{t_ort:>10.1f}{t_pt / t_ort:>8.2f}{diff:>12.2g}", flush=True)


if __name__ == "__main__":
    main()
