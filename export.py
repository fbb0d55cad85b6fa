"""Export a .pt detector to ONNX, then check and time it against PyTorch.

    python export.py --weights runs/train/exp/weights/best.pt --include onnx [--dynamic] [--simplify]

Writes best.onnx next to the weights: input 'images' [bs, 3, H, W] float 0-1 RGB, output 'output0'
[bs, N, 5 + nc] (decoded xywh in input pixels, objectness, class probabilities), with 'stride' and
'names' in its metadata so detect.py needs nothing else. onnx/onnxruntime are optional dependencies.
"""
import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.augmentations import check_img_size
from utils.logging import LOGGER, cli_main, colorstr
from utils.torch_utils import select_device

FORMATS = ("onnx",)
PREFIX = colorstr("ONNX:")


def require_onnx():
    """Import onnx and onnxruntime lazily with an actionable message when absent."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"ONNX export needs the optional packages onnx and onnxruntime ({e}); "
                          f"pip install onnx onnxruntime   (or pip install -r requirements-dev.txt)") from e
    return onnx, onnxruntime


class DecodedOutput(nn.Module):
    """Model whose forward returns only the decoded [bs, N, 5 + nc] tensor (drops the raw maps)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        for m in model.modules():
            if hasattr(m, "export") and hasattr(m, "anchors"):  # Detect head
                m.export = True  # Detect then builds its grids from the traced (symbolic) shapes

    def forward(self, x):
        y = self.model(x)
        return y[0] if isinstance(y, (tuple, list)) else y


def simplify_onnx(model_onnx):
    """onnxslim, else onnxsim, else a warning and the model unchanged."""
    try:
        import onnxslim

        LOGGER.info(f"{PREFIX} slimming with onnxslim {getattr(onnxslim, '__version__', '')}...")
        return onnxslim.slim(model_onnx)
    except ImportError:
        pass
    try:
        import onnxsim

        LOGGER.info(f"{PREFIX} simplifying with onnx-simplifier {getattr(onnxsim, '__version__', '')}...")
        simplified, ok = onnxsim.simplify(model_onnx)
        if not ok:
            LOGGER.warning(f"WARNING ⚠️ {PREFIX} onnxsim check failed; keeping the unsimplified model")
            return model_onnx
        return simplified
    except ImportError:
        LOGGER.warning(f"WARNING ⚠️ {PREFIX} --simplify needs onnxslim or onnxsim (pip install onnxslim); skipped")
        return model_onnx


def time_ms(fn, n=5) -> float:
    """Mean wall time of fn() in ms over n calls after one warm-up call."""
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def verify(f: Path, model, im: torch.Tensor, cuda: bool):
    """Run the ONNX file with onnxruntime on im; log the largest difference from PyTorch and both latencies."""
    _, ort = require_onnx()
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(f), providers=providers)
    x = im.cpu().numpy()
    y_ort = session.run(None, {"images": x})[0]

    def torch_run():
        y = model(im)
        if cuda:
            torch.cuda.synchronize()
        return y

    with torch.no_grad():
        y_pt = torch_run().float().cpu().numpy()
        t_pt = time_ms(torch_run)
    t_ort = time_ms(lambda: session.run(None, {"images": x}))
    diff = float(np.abs(y_pt - y_ort.astype(np.float32)).max())
    scale = float(np.abs(y_pt).max()) or 1.0
    LOGGER.info(f"{PREFIX} onnxruntime check on a {tuple(im.shape)} batch: max |PyTorch - ONNX| = {diff:.3g} "
                f"(relative {diff / scale:.2g}); latency PyTorch {t_pt:.1f} ms, onnxruntime {t_ort:.1f} ms "
                f"({providers[0]})")
    return diff, t_pt, t_ort


def export_onnx(model, im, f: Path, opset=17, dynamic=False, simplify=False, metadata=None):
    """Trace with the TorchScript-based exporter (dynamo=False: fast, and grids built from traced shapes stay
    symbolic), validate with onnx.checker, add metadata_props."""
    onnx, _ = require_onnx()
    LOGGER.info(f"{PREFIX} starting export with torch {torch.__version__}, onnx {onnx.__version__}, opset {opset}...")
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and TracerWarnings about shape constants
        torch.onnx.export(model, (im,), str(f), dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=["images"], output_names=["output0"], dynamic_axes=axes)
    model_onnx = onnx.load(str(f))
    onnx.checker.check_model(model_onnx)
    if simplify:
        model_onnx = simplify_onnx(model_onnx)
    for k, v in (metadata or {}).items():
        entry = model_onnx.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.checker.check_model(model_onnx)
    onnx.save(model_onnx, str(f))
    return f


def run(
    weights="yolov5s.pt",
    imgsz=(640, 640),
    batch_size=1,
    device="cpu",
    include=("onnx",),
    half=False,
    dynamic=False,
    simplify=False,
    opset=17,
):
    """Export weights to each format in include (ONNX only); returns the path of the .onnx file."""
    from models.checkpoint import load_model

    t0 = time.time()
    include = [x.lower().lstrip(".") for x in ([include] if isinstance(include, str) else include)]
    bad = [x for x in include if x not in FORMATS]
    if bad or not include:
        raise ValueError(f"--include {include}: supported formats are {list(FORMATS)}")
    device = select_device(device)
    if half and device.type != "cuda":
        raise ValueError("--half export needs a CUDA device (e.g. --device 0); FP16 is not exported on CPU")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    require_onnx()  # fail before loading anything

    model = load_model(str(weights), device=device, fuse=True)
    stride, names = int(max(model.stride)), list(model.names)
    imgsz = check_img_size(imgsz, stride, as_hw=True)
    for p in model.parameters():
        p.requires_grad = False
    im = torch.rand(batch_size, 3, *imgsz, generator=torch.Generator().manual_seed(0)).to(device)
    if half:
        im, model = im.half(), model.half()
    model = DecodedOutput(model).eval()
    with torch.no_grad():
        shape = tuple(model(im).shape)  # dry run (also builds shapes for the log)
    LOGGER.info(f"PyTorch: loaded {weights} with output shape {shape}")

    f = Path(str(weights)).with_suffix(".onnx")
    export_onnx(model, im, f, opset=opset, dynamic=dynamic, simplify=simplify,
                metadata={"stride": stride, "names": dict(enumerate(names))})
    LOGGER.info(f"{PREFIX} export success {time.time() - t0:.1f}s, saved as {f} ({f.stat().st_size / 1e6:.1f} MB)")
    try:
        verify(f, model, im, device.type == "cuda")
    except Exception as e:  # e.g. an FP16 graph on a CPU-only onnxruntime: the file itself is fine
        LOGGER.warning(f"WARNING ⚠️ {PREFIX} saved, but the onnxruntime check could not run: {e}")
    LOGGER.info(f"Export complete ({time.time() - t0:.1f}s)\nResults saved to {f.parent.resolve()}\n"
                f"Detect: python detect.py --weights {f}")
    return f


def parse_opt(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=str, default="yolov5s.pt", help="model.pt path")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640, 640], help="image (h, w)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size")
    p.add_argument("--device", default="cpu", help="cuda device, i.e. 0 or cpu")
    p.add_argument("--half", action="store_true", help="FP16 half-precision export (CUDA only)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width axes")
    p.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim/onnxsim")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--include", nargs="+", default=["onnx"], help=f"formats: {', '.join(FORMATS)}")
    return p.parse_args(argv)


def main(opt):
    return run(**vars(opt))


if __name__ == "__main__":
    cli_main(main, parse_opt)
