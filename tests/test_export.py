"""export.py: ONNX file, metadata, agreement with PyTorch and upstream, dynamic axes, clear errors."""
import logging
import shutil
import sys

import numpy as np
import pytest
import torch

import export
from detect import Backend
from utils.files import ROOT, find_file, yaml_load
from utils.logging import LOGGER

pytestmark = pytest.mark.slow  # end-to-end runs: skipped by pytest -m "not slow"

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
NAMES = ["circle", "square", "star"]
FIXTURES = ROOT / "tests" / "fixtures"


def make_weights(path, seed=0):
    """Tiny untrained YOLOv5n (width 1/16) saved in the project format."""
    from models.checkpoint import save_checkpoint
    from models.yolo import DetectionModel

    torch.manual_seed(seed)
    cfg = yaml_load(find_file("yolov5n.yaml"))
    cfg.update(nc=len(NAMES), width_multiple=0.0625)
    model = DetectionModel(cfg).eval()
    model.names = list(NAMES)
    save_checkpoint(path, model)
    return path


def torch_out(weights, x):
    from models.checkpoint import load_model

    with torch.no_grad():
        return load_model(str(weights), fuse=True)(torch.from_numpy(x))[0].numpy()


def ort_out(f, x):
    return ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]



@pytest.fixture
def weights(tmp_path):
    return make_weights(tmp_path / "tiny.pt")


def test_static_export(weights):
    lines = []
    h = logging.Handler()
    h.emit = lambda r: lines.append(r.getMessage())
    LOGGER.addHandler(h)
    try:
        f = export.run(weights=weights, imgsz=[96, 128], include=["onnx"])
    finally:
        LOGGER.removeHandler(h)
    assert f == weights.with_suffix(".onnx") and f.exists()
    model = onnx.load(str(f))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["stride"] == "32" and Backend(f).names == NAMES  # names survive the round trip
    session = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 96, 128]
    x = np.random.default_rng(0).random((1, 3, 96, 128), dtype=np.float32)
    y = session.run(None, {"images": x})[0]
    assert y.shape == (1, 3 * (12 * 16 + 6 * 8 + 3 * 4), 5 + len(NAMES))  # [bs, N, 5 + nc], decoded only
    np.testing.assert_allclose(y, torch_out(weights, x), rtol=1e-4, atol=1e-3)
    assert any("max |PyTorch - ONNX|" in x and "latency" in x for x in lines)


def test_dynamic_export(weights):
    f = export.run(weights=weights, imgsz=[64], dynamic=True, opset=13)
    x = np.random.default_rng(1).random((2, 3, 96, 160), dtype=np.float32)  # other batch and shape
    np.testing.assert_allclose(ort_out(f, x), torch_out(weights, x), rtol=1e-4, atol=1e-3)
    assert onnx.load(str(f)).opset_import[0].version == 13


def test_upstream_weights_match_upstream_outputs(tmp_path):
    """The upstream-format fixture exports, and the ONNX graph reproduces upstream's own decoded output."""
    w = tmp_path / "upstream.pt"
    shutil.copy(FIXTURES / "upstream_yolov5n_nc3.pt", w)
    ref = np.load(FIXTURES / "upstream_yolov5n_nc3.npz")
    f = export.run(weights=w, imgsz=list(ref["x"].shape[2:]), batch_size=ref["x"].shape[0])
    y = ort_out(f, ref["x"].astype(np.float32))
    np.testing.assert_allclose(y, ref["y"], rtol=1e-3, atol=1e-2)
    with pytest.raises(ValueError, match="fixed batch size of 2"):
        Backend(f)  # detect.py runs one image at a time


def test_simplify_is_optional(weights):
    f = export.run(weights=weights, imgsz=[64], simplify=True)
    x = np.random.default_rng(2).random((1, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(ort_out(f, x), torch_out(weights, x), rtol=1e-4, atol=1e-3)


def test_names_without_metadata(weights, tmp_path):
    f = export.run(weights=weights, imgsz=[64])
    model = onnx.load(str(f))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    assert Backend(bare).names == ["class0", "class1", "class2"]
    entry = model.metadata_props.add()
    entry.key, entry.value = "names", "__import__('os')"  # never evaluated, only parsed as a literal
    onnx.save(model, str(bare))
    assert Backend(bare).names == ["class0", "class1", "class2"]
    (tmp_path / "d.yaml").write_text("names: {0: a, 1: b, 2: c}\n")
    assert Backend(bare, data=tmp_path / "d.yaml").names == ["a", "b", "c"]


def test_clear_errors(weights, monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            export.run(weights=weights, half=True, device="cpu")
    with pytest.raises(ValueError, match="onnx"):
        export.run(weights=weights, include=["engine"])
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(ImportError, match="pip install onnx"):
        export.run(weights=weights, imgsz=[64])
    assert not weights.with_suffix(".onnx").exists()


def test_cli_defaults():
    opt = export.parse_opt(["--weights", "x.pt"])
    assert (opt.include, opt.opset, opt.imgsz, opt.batch_size, opt.dynamic, opt.simplify, opt.half) == \
        (["onnx"], 17, [640, 640], 1, False, False, False)
