"""How fast are validation and detection: val.py and detect.py per image, the forward pass, and NMS?

On the shapes set's val split, for each `--models` model (an untrained checkpoint with the set's nc, or
`--weights`) at each `--imgsz`:

- val.py: the whole val.run call per image (checkpoint load, data loading, model, NMS, metrics) and val's
  own pre-process + inference + NMS per image, batch `--batch`;
- detect.py: the whole detect.run call (--nosave) per image on `--detect-images` val images, batch 1, and
  its pre-process + inference + NMS per image;
- the forward pass alone, batch 1, BN-fused, eval mode: PyTorch, and with `--onnx` onnxruntime on the
  graph export.py writes (static shape, opset 17), with the largest difference between their outputs;
- non_max_suppression on a synthetic batch of `--batch` predictions (objectness mostly low, as a trained
  model gives) at val's settings (conf 0.001, iou 0.6, single and multi-label) and detect's (conf 0.25).

Untrained weights give almost no boxes above conf 0.001, so their val/detect NMS time is a lower bound;
the synthetic NMS rows and trained --weights give representative ones. Medians over `--repeats` timed
calls (whole calls) or `--runs` (forward, NMS) after a warm-up.

    python -m benchmarks.inference_speed                                      # yolov5n at 160 and 320
    python -m benchmarks.inference_speed --models yolov5n yolov5s --imgsz 640 --onnx --results inference_speed
    python -m benchmarks.inference_speed --imgsz 160 --repeats 1 --runs 3 --detect-images 4   # smoke run
"""
import argparse
import contextlib
import io
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import detect
import val
from benchmarks.common import add_common_args, call_ms, measure, quiet_log, report, start
from models.checkpoint import save_checkpoint
from models.yolo import DetectionModel
from utils.boxes import non_max_suppression
from utils.data_config import check_dataset
from utils.sources import list_files

ROOT = Path(__file__).resolve().parents[1]

SPEED = re.compile(r"Speed: ([\d.]+)ms pre-process, ([\d.]+)ms inference, ([\d.]+)ms NMS")


def synthetic_predictions(batch, imgsz, nc, seed=0):
    """Decoded [batch, N, 5 + nc] predictions for `imgsz` (N: 3 anchors on the P3-P5 cells); objectness
    mostly low, as a trained model gives."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * sum((imgsz // s) ** 2 for s in (8, 16, 32))
    pred = torch.rand(batch, n, 5 + nc, generator=g)
    pred[..., :2] *= imgsz
    pred[..., 2:4] = pred[..., 2:4] * imgsz / 4 + 2
    pred[..., 4] = pred[..., 4] ** 30
    return pred


def forward_rows(cfg, nc, imgsz, runs, onnx, tmp):
    """{name: Times} of the batch-1 forward pass in PyTorch (and onnxruntime), and their largest output
    difference (nan without --onnx)."""
    from export import DecodedOutput, export_onnx, require_onnx

    torch.manual_seed(0)
    model = DecodedOutput(DetectionModel(cfg, nc=nc).fuse()).eval()
    x = torch.rand(1, 3, imgsz, imgsz)
    fns = {"torch": lambda: model(x)}
    diff = float("nan")
    if onnx:
        _, ort = require_onnx()
        f = export_onnx(model, x, Path(tmp) / f"{Path(cfg).stem}_{imgsz}.onnx", metadata={"stride": 32})
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = torch.get_num_threads(), 1
        session = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        fns["onnxruntime"] = lambda: session.run(None, {"images": xn})
        with torch.no_grad():
            diff = float(np.abs(model(x).numpy() - fns["onnxruntime"]()[0]).max())
    with torch.no_grad():
        return measure(fns, runs, warmup=2), diff


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shapes.yaml")
    p.add_argument("--models", nargs="+", default=["yolov5n"], help="model yamls (untrained, the data's nc)")
    p.add_argument("--weights", default=None, help="a trained checkpoint instead of --models (val and detect rows)")
    p.add_argument("--imgsz", type=int, nargs="+", default=[160, 320])
    p.add_argument("--batch", type=int, default=16, help="val.py batch and the NMS batch")
    p.add_argument("--workers", type=int, default=2, help="val.py loader workers")
    p.add_argument("--detect-images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed whole val/detect calls (after one warm-up call)")
    p.add_argument("--runs", type=int, default=10, help="timed forward passes and NMS calls")
    p.add_argument("--onnx", action="store_true", help="also time onnxruntime (needs onnx and onnxruntime)")
    opt = add_common_args(p).parse_args(argv)
    start(opt)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

    with quiet_log():
        data = check_dataset(opt.data)
    images = list_files(data["val"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="inference_speed_") as tmp, quiet_log(), \
            contextlib.redirect_stderr(io.StringIO()):  # val's progress bars and the export's messages
        tmp = Path(tmp)
        sources = tmp / "detect_sources.txt"
        sources.write_text("\n".join(images[:opt.detect_images]) + "\n")
        for cfg in [None] if opt.weights else opt.models:
            name = Path(opt.weights).name if opt.weights else Path(cfg).stem
            weights = opt.weights
            if cfg:
                torch.manual_seed(0)
                model = DetectionModel(f"{Path(cfg).stem}.yaml", nc=data["nc"])
                model.names = data["names"]
                weights = save_checkpoint(tmp / f"{name}_untrained.pt", model)
            for s in opt.imgsz:
                split = {}

                def val_call():
                    *_, split["val"] = val.run(data=opt.data, weights=str(weights), batch_size=opt.batch, imgsz=s,
                                               workers=opt.workers, plots=False, project=tmp / "runs", name="val",
                                               exist_ok=True)

                def detect_call():
                    with quiet_log() as lines:
                        split["detect_n"] = len(detect.run(weights=str(weights), source=str(sources), data=opt.data,
                                                           imgsz=(s, s), nosave=True, project=tmp / "runs",
                                                           name="detect", exist_ok=True)[1])
                    found = [m for m in map(SPEED.search, lines) if m]
                    split["detect"] = [float(x) for x in found[-1].groups()] if found else [float("nan")] * 3

                t = measure({"val": val_call, "detect": detect_call}, opt.repeats)
                n_det = split["detect_n"]
                rows += [["val.py, whole call", name, s, f"{len(images)} images, batch {opt.batch}",
                          t["val"].median / len(images), t["val"].cpu_median / len(images)],
                         ["val.py, pre + inference + NMS", name, s, "val's own split: "
                          + " / ".join(f"{x:.2f}" for x in split["val"]) + " ms", sum(split["val"]), None],
                         ["detect.py, whole call", name, s, f"{n_det} images, batch 1, --nosave",
                          t["detect"].median / n_det, t["detect"].cpu_median / n_det],
                         ["detect.py, pre + inference + NMS", name, s, "detect's own split: "
                          + " / ".join(f"{x:.2f}" for x in split["detect"]) + " ms", sum(split["detect"]), None]]
                if cfg:
                    fwd, diff = forward_rows(f"{Path(cfg).stem}.yaml", data["nc"], s, opt.runs, opt.onnx, tmp)
                    for k, v in fwd.items():
                        note = f"batch 1, fused; {v.median / fwd['torch'].median:.2f}x PyTorch" if k != "torch" \
                            else "batch 1, fused"
                        if k != "torch":
                            note += f"; max abs difference {diff:.2g}"
                        rows.append([f"forward, {k}", name, s, note, v.median, v.cpu_median])
        for s in opt.imgsz:
            pred = synthetic_predictions(opt.batch, s, data["nc"])
            settings = {"val (conf 0.001, iou 0.6)": dict(conf_thres=0.001, iou_thres=0.6),
                        "val, multi-label": dict(conf_thres=0.001, iou_thres=0.6, multi_label=True),
                        "detect (conf 0.25, iou 0.45)": dict(conf_thres=0.25, iou_thres=0.45)}
            t = measure({k: (lambda kw=kw: non_max_suppression(pred, **kw)) for k, kw in settings.items()}, opt.runs)
            kept = {k: sum(len(x) for x in call_ms(lambda kw=kw: non_max_suppression(pred, **kw))[0]) / opt.batch
                    for k, kw in settings.items()}
            rows += [[f"NMS, {k}", "synthetic", s, f"batch {opt.batch}, nc {data['nc']}; {kept[k]:.0f} boxes kept "
                      f"per image", t[k].median / opt.batch, t[k].cpu_median / opt.batch] for k in settings]

    header = ["what", "model", "imgsz", "setting", "ms / image", "CPU ms / image"]
    rows = [[*r[:4], round(r[4], 3), None if r[5] is None else round(r[5], 3)] for r in rows]
    notes = [f"Whole calls: median of {opt.repeats} after one warm-up call; forward and NMS: median of {opt.runs} "
             f"after a warm-up. Per-image split columns are val's and detect's own timers of the last call. "
             f"Untrained weights keep almost no boxes at val's conf 0.001, so their NMS share is a lower bound."]
    report(f"Inference speed on {Path(opt.data).stem}", header, rows, notes, opt.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
