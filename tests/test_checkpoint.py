"""Checkpoints: upstream files through the restricted unpickler, the project format, transfer, strip."""
import argparse
import builtins
import copy
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import models.checkpoint as ckpt_mod
from models.checkpoint import (CheckpointError, load_checkpoint, load_model, model_from_checkpoint,
                               save_checkpoint, strip_optimizer, transfer_weights)
from models.yolo import DetectionModel
from utils.files import ROOT, yaml_load

FIXTURE = ROOT / "tests/fixtures/upstream_yolov5n_nc3.pt"
FIXTURE_IO = ROOT / "tests/fixtures/upstream_yolov5n_nc3.npz"


def tiny_model(nc=3, seed=0, fp16_exact=True):
    """Tiny yolov5n-layout model; weights rounded to fp16 values so a save/load round trip is exact."""
    torch.manual_seed(seed)
    d = yaml_load(ROOT / "models/yolov5n.yaml")
    d.update(width_multiple=0.125, nc=nc)
    model = DetectionModel(d)
    return round_fp16(model) if fp16_exact else model


def round_fp16(model):
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(v.half().float())
    return model


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------- upstream files
def test_upstream_fixture_reproduces_reference_outputs():
    model = load_model(FIXTURE)
    ref = np.load(FIXTURE_IO)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.names == ["class0", "class1", "class2"] and model.nc == 3
    assert model.stride.tolist() == [8.0, 16.0, 32.0] and model.yaml["nc"] == 3
    y, raw = outputs(model, torch.from_numpy(ref["x"]))
    errors = {}
    for name, got in [("y", y), *((f"p{i}", r) for i, r in enumerate(raw))]:
        want = torch.from_numpy(ref[name])
        assert got.shape == want.shape
        errors[name] = ((got - want).abs().max() / want.abs().max()).item()
    print("max relative error vs upstream:", errors)
    assert max(errors.values()) < 1e-4, errors


def test_upstream_fixture_as_project_dict():
    ckpt = load_checkpoint(FIXTURE)
    assert ckpt["format"] == "yolov5kd-v1" and ckpt["names"] == ["class0", "class1", "class2"]
    assert ckpt["model"]["model.0.conv.weight"].dtype == torch.float16
    assert ckpt["ema"] is None and ckpt["epoch"] == -1 and ckpt["distill"] is None
    assert ckpt["opt"] == {"cfg": "models/yolov5n.yaml", "imgsz": 640}


def test_full_object_pickle_like_an_upstream_training_checkpoint(tmp_path):
    """Upstream last.pt files pickle model objects, an EMA, numpy best_fitness and names as a dict."""
    model = tiny_model(seed=2)
    model.names = {0: "a", 1: "b", 2: "c"}
    path = tmp_path / "last.pt"
    torch.save({"epoch": 5, "best_fitness": np.array([0.3]), "model": copy.deepcopy(model).half(),
                "ema": copy.deepcopy(model).half(), "updates": 3, "optimizer": None,
                "opt": {"epochs": 10, "f": np.float64(2.5)}, "git": None, "date": "today"}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["best_fitness"] == pytest.approx(0.3) and ckpt["names"] == ["a", "b", "c"]
    assert ckpt["epoch"] == 5 and ckpt["updates"] == 3 and ckpt["ema"] is not None
    assert type(ckpt["opt"]["f"]) is float
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(outputs(model_from_checkpoint(ckpt), x)[0], outputs(model, x)[0])
    save_checkpoint(tmp_path / "converted.pt", model_from_checkpoint(ckpt), opt=ckpt["opt"])
    assert torch.load(tmp_path / "converted.pt", weights_only=True)["opt"]["f"] == 2.5


def test_unbuildable_or_mismatched_weights_name_the_file(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "a.pt", model)
    ck = torch.load(path, weights_only=True)
    ck["yaml"]["backbone"][0][2] = "Focus"  # pre-v6 layer, not supported
    torch.save(ck, tmp_path / "focus.pt")
    with pytest.raises(CheckpointError, match=r"focus\.pt: cannot build .*unsupported module 'Focus'"):
        load_model(tmp_path / "focus.pt")
    ck = torch.load(path, weights_only=True)
    del ck["model"]["model.0.conv.weight"]
    torch.save(ck, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"(?s)missing\.pt: checkpoint weights do not match.*model.0.conv.weight"):
        load_model(tmp_path / "missing.pt")


def _write_pickle_file(path, obj, zip_format=True):
    if zip_format:
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)


class _Evil:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("how", ["os.system", "subprocess.call", "builtins.exec", "inside-model"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    payload = {"os.system": _Evil(os.system, (cmd,)),
               "subprocess.call": _Evil(subprocess.call, (["touch", str(marker)],)),
               "builtins.exec": _Evil(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
               "inside-model": _Evil(os.system, (cmd,))}[how]
    obj = {"model": payload, "epoch": -1} if how == "inside-model" else {"epoch": 1, "x": payload}
    bad = tmp_path / "evil.pt"
    _write_pickle_file(bad, obj)
    expected = {"os.system": os.system.__module__ + ".system", "subprocess.call": "subprocess.call",
                "builtins.exec": "builtins.exec", "inside-model": os.system.__module__ + ".system"}[how]
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    assert expected in str(e.value) and str(bad) in str(e.value)
    assert not marker.exists()


def test_plain_pickle_with_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    _write_pickle_file(bad, _Evil(os.system, (f"touch {marker}",)), zip_format=False)
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_truncated_garbage_and_wrong_files(tmp_path):
    data = FIXTURE.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "garbage.pt": os.urandom(4096),
        "empty.pt": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint") as e:
            load_checkpoint(tmp_path / name)
        assert name in str(e.value)
    with zipfile.ZipFile(tmp_path / "other.zip.pt", "w") as z:  # a zip, but not a torch file
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="other.zip.pt: unreadable checkpoint"):
        load_checkpoint(tmp_path / "other.zip.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="not a YOLOv5 checkpoint"):
        load_checkpoint(tmp_path / "dict.pt")
    torch.save({"format": "yolov5kd-v1", "model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="lacks.*'ema'"):
        load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_model(tmp_path / "nothere.pt")


# ---------------------------------------------------------------- project format
def test_round_trip_own_format(tmp_path):
    model, ema_model = tiny_model(seed=0), tiny_model(seed=1)
    model.names = ["a", "b", "c"]
    opt = argparse.Namespace(weights=Path("w.pt"), epochs=3, imgsz=[64, 64], np_value=np.float32(0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.rand(1, 3, 64, 64))[0].sum().backward()
    optimizer.step()  # gives the optimizer a momentum state
    round_fp16(model)  # the step and BN statistics moved off fp16 values
    adapters = torch.nn.ModuleList([torch.nn.Conv2d(8, 16, 3)])
    path = save_checkpoint(tmp_path / "w" / "last.pt", model, ema=ema_model, updates=7, optimizer=optimizer,
                           epoch=2, best_fitness=np.array([0.25]), opt=opt, hyp={"lr0": 0.01},
                           distill={"teacher": "t.pt", "levels": [0, 1, 2]}, adapters=adapters)
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["format"] == "yolov5kd-v1" and raw["epoch"] == 2 and raw["updates"] == 7
    assert raw["best_fitness"] == 0.25 and raw["opt"]["weights"] == "w.pt" and raw["opt"]["np_value"] == 0.5
    assert raw["model"]["model.0.conv.weight"].dtype == torch.float16
    assert set(raw["adapters"]) == {"0.weight", "0.bias"} and raw["distill"]["levels"] == [0, 1, 2]
    assert raw["optimizer"]["state"] and raw["stride"].tolist() == [8.0, 16.0, 32.0]

    x = torch.rand(2, 3, 64, 64)
    loaded = load_model(path)  # prefers the EMA weights
    assert loaded.names == ["a", "b", "c"] and not loaded.training
    for a, b in zip(outputs(loaded, x)[1], outputs(ema_model, x)[1]):
        assert torch.equal(a, b)
    plain = model_from_checkpoint(load_checkpoint(path), which="model")
    assert torch.equal(outputs(plain, x)[0], outputs(model, x)[0])


def test_channels_last_model_saves_the_usual_layout(tmp_path):
    from utils.torch_utils import training_memory_format
    fmt = training_memory_format(torch.device("cpu"))
    assert fmt == torch.channels_last  # the CPU trainer holds its model (and so its EMA) in this layout
    model = tiny_model()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(memory_format=fmt)
    assert not model.state_dict()["model.0.conv.weight"].is_contiguous()
    raw = torch.load(save_checkpoint(tmp_path / "w.pt", model, ema=model), weights_only=True)
    for part in ("model", "ema"):
        assert all(v.is_contiguous() for v in raw[part].values())
        assert all(torch.equal(raw[part][k].float(), ref[k].float()) for k in ref if ref[k].is_floating_point())


def test_load_model_fuse_matches(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "a.pt", model)
    x = torch.rand(1, 3, 64, 64)
    a = outputs(load_model(path), x)[0]
    b = outputs(load_model(path, fuse=True), x)[0]
    assert ((a - b).abs() / a.abs().clamp_min(1e-3)).max() < 1e-5
    with pytest.raises(ValueError, match="fused"):
        save_checkpoint(tmp_path / "b.pt", load_model(path, fuse=True))


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, tiny_model(seed=0), epoch=1)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tiny_model(seed=1), epoch=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


@pytest.mark.slow
def test_killed_process_never_leaves_a_truncated_file(tmp_path):
    path = tmp_path / "last.pt"
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from models.yolo import DetectionModel\n"
        "from models.checkpoint import save_checkpoint\n"
        "m = DetectionModel('yolov5n.yaml')\n"
        "for e in range(10000):\n"
        "    save_checkpoint(%r, m, epoch=e)\n" % (str(ROOT), str(path))
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.7)  # mid-way through later saves
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = load_checkpoint(path)  # complete: loads and holds every key
    assert ckpt["epoch"] >= 0 and "model.24.anchors" in ckpt["model"]


# ---------------------------------------------------------------- transfer / strip / download
def test_transfer_skips_exactly_the_detect_output_convs(tmp_path):
    src = tiny_model(nc=80, seed=0)
    dst = tiny_model(nc=3, seed=1)
    total = len(dst.state_dict())
    out_convs = {f"model.24.m.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    n, n_total = transfer_weights(dst, src.state_dict())
    assert (n, n_total) == (total - len(out_convs) - 1, total)  # the anchors are excluded by default
    after, s = dst.state_dict(), src.state_dict()
    unchanged = {k for k in after if not torch.equal(after[k], s[k])}
    assert unchanged == out_convs | {"model.24.anchors"} or unchanged == out_convs  # anchors equal here
    assert all(torch.equal(after[k], before[k]) for k in out_convs)
    n2, _ = transfer_weights(dst, src.state_dict(), exclude=())
    assert n2 == total - len(out_convs)
    path = save_checkpoint(tmp_path / "coco.pt", src)
    assert transfer_weights(tiny_model(nc=3), path)[0] == n  # a checkpoint path works too


def test_strip_optimizer(tmp_path):
    model, ema_model = tiny_model(seed=0), tiny_model(seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    path = save_checkpoint(tmp_path / "best.pt", model, ema=ema_model, optimizer=optimizer, epoch=4,
                           adapters=torch.nn.Conv2d(2, 2, 1))
    out = strip_optimizer(path, tmp_path / "final.pt")
    ck = torch.load(out, weights_only=True)
    assert ck["optimizer"] is None and ck["ema"] is None and ck["adapters"] is None and ck["epoch"] == -1
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(outputs(load_model(out), x)[0], outputs(ema_model, x)[0])
    assert out.stat().st_size < path.stat().st_size
    strip_optimizer(path)  # in place
    assert torch.load(path, weights_only=True)["optimizer"] is None


def test_official_name_offline_says_where_to_put_it(tmp_path, monkeypatch):
    calls = []

    def offline(url, timeout=None):
        calls.append(url)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(ckpt_mod.urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_model("yolov5s.pt")
    assert calls == ["https://github.com/ultralytics/yolov5/releases/download/v7.0/yolov5s.pt"]
    assert str(tmp_path / "yolov5s.pt") in str(e.value) and "offline" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model("yolov5q.pt")  # not an official name: no download attempt
    assert len(calls) == 1
