"""Files written by upstream YOLOv5's train.py: paths in `opt`, numpy best_fitness, and crafted records built
to exhaust the loader. Each loads (keeping what is plainly usable) or is refused with a CheckpointError."""
import copy
import io
import pathlib
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import detect
import train_distill
import val
from models.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from models.safe_pickle import RestrictedUnpickler
from models.yolo import DetectionModel
from tests.conftest import NAMES, read_csv, tiny_cfg_dict


class WindowsPathAsPickled:
    """Pickles exactly as pathlib.WindowsPath('C:\\runs\\train\\exp') does on Windows with Python 3.11
    (the class and its parts), which cannot be instantiated here."""

    def __reduce__(self):
        return pathlib.WindowsPath, ("C:\\", "runs", "train", "exp")


def upstream_file(path, opt):
    """An upstream training checkpoint: pickled model objects (model and EMA), numpy best_fitness, names as
    a dict, and `opt` as upstream's train.py stores it."""
    torch.manual_seed(0)
    model = DetectionModel(tiny_cfg_dict(nc=len(NAMES)))
    model.names = dict(enumerate(NAMES))
    torch.save({"epoch": 79, "best_fitness": np.array([0.42]), "model": copy.deepcopy(model).half(),
                "ema": copy.deepcopy(model).half(), "updates": 2000, "optimizer": None, "opt": opt,
                "git": {"remote": None}, "date": "2026-01-01T00:00:00"}, path)
    return path


UPSTREAM_OPT = {"epochs": 80, "evolve_population": pathlib.Path("data/hyps"),
                "project": pathlib.PurePosixPath("/home/u/yolov5/runs/train"),
                "save_dir": WindowsPathAsPickled(), "imgsz": 160}


def unpickle(data: bytes):
    return RestrictedUnpickler(io.BytesIO(data)).load()


def path_pickle(module, name, *parts):
    """Protocol-2 bytes of `module.name(*parts)` as pickle writes a path: GLOBAL, a tuple of str, REDUCE."""
    body = b"".join(b"X" + struct.pack("<I", len(p.encode())) + p.encode() for p in parts)
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(" + body + b"tR."


# ---------------------------------------------------------------- path globals
@pytest.mark.parametrize("module", ["pathlib", "pathlib._local"])
def test_path_globals_become_text_in_both_spellings(module):
    """Python <= 3.12 pickles PosixPath('/x/y') as its parts ('/', 'x', 'y'), 3.13+ as the raw string under
    pathlib._local; both give '/x/y' (a plain join of the parts would give '//x/y'). Windows parts join
    with a backslash on every OS."""
    assert unpickle(path_pickle(module, "PosixPath", "/", "x", "y")) == "/x/y"
    assert unpickle(path_pickle(module, "PosixPath", "/x/y")) == "/x/y"
    assert unpickle(path_pickle(module, "PurePosixPath", "a", "b")) == "a/b"
    assert unpickle(path_pickle(module, "WindowsPath", "C:\\", "a", "b")) == "C:\\a\\b"
    assert unpickle(path_pickle(module, "PureWindowsPath", "C:\\a\\b")) == "C:\\a\\b"
    assert unpickle(path_pickle(module, "Path", "runs", "train")) == str(pathlib.PurePath("runs", "train"))


def test_real_pickles_of_paths_load_as_text():
    import pickle

    for proto in (2, 4, 5):
        got = unpickle(pickle.dumps({"p": pathlib.Path("/x/y"), "w": WindowsPathAsPickled()}, protocol=proto))
        assert got == {"p": "/x/y", "w": "C:\\runs\\train\\exp"}


@pytest.mark.parametrize("module,name", [("pathlib", "Path.write_text"), ("pathlib", "Path.unlink"),
                                         ("pathlib._local", "Path.open"), ("pathlib", "os"),
                                         ("os", "system"), ("subprocess", "Popen"), ("builtins", "eval")])
def test_nothing_else_is_widened(module, name):
    with pytest.raises(CheckpointError, match=f"refused global '{module}.{name}'"):
        unpickle(path_pickle(module, name, "/tmp/x"))


def test_path_parts_must_be_text():
    # a path global called with a non-string argument (e.g. an object that would do something on str())
    data = b"\x80\x02cpathlib\nPosixPath\nK\x05\x85R."
    with pytest.raises(CheckpointError, match="path parts must be text"):
        unpickle(data)


# ---------------------------------------------------------------- the file everywhere a .pt is accepted
@pytest.fixture(scope="module")
def upstream_best(tmp_path_factory):
    return upstream_file(tmp_path_factory.mktemp("upstream") / "best.pt", UPSTREAM_OPT)


def test_upstream_training_file_loads_with_paths_as_text(upstream_best):
    ckpt = load_checkpoint(upstream_best)
    assert ckpt["opt"]["evolve_population"] == str(pathlib.PurePath("data/hyps"))
    assert ckpt["opt"]["project"] == "/home/u/yolov5/runs/train"
    assert ckpt["opt"]["save_dir"] == "C:\\runs\\train\\exp"
    assert ckpt["best_fitness"] == pytest.approx(0.42) and type(ckpt["best_fitness"]) is float
    assert ckpt["names"] == NAMES and ckpt["epoch"] == 79
    model_from_checkpoint(ckpt)


@pytest.mark.slow
def test_upstream_training_file_as_weights_and_teacher(upstream_best, tiny_data, tiny_cfg, tmp_path):
    common = dict(data=str(tiny_data), imgsz=64, batch_size=8, epochs=1, workers=0, device="cpu",
                  project=str(tmp_path / "runs"), noplots=True, noautoanchor=True)
    opt = train_distill.run(weights=str(upstream_best), name="init", **common)  # --weights: its architecture
    assert (Path(opt.save_dir) / "weights" / "last.pt").is_file()
    opt = train_distill.run(cfg=str(tiny_cfg), teacher=str(upstream_best), distill_warmup=0, distill_weight=0.01, name="kd", **common)
    assert float(read_csv(Path(opt.save_dir) / "results.csv")[-1]["train/kd_loss"]) > 0
    assert load_checkpoint(Path(opt.save_dir) / "weights" / "last.pt")["distill"]["teacher"] == str(upstream_best)


def test_upstream_training_file_in_val_and_detect(upstream_best, tiny_data, tmp_path):
    results, maps, _ = val.run(data=str(tiny_data), weights=str(upstream_best), imgsz=64, batch_size=8,
                               device="cpu", workers=0, project=tmp_path, name="val", plots=False)
    assert len(results) == 7 and maps.shape == (len(NAMES),)
    source = tiny_data.parent / "images" / "val"
    save_dir, res = detect.run(weights=str(upstream_best), source=str(source), imgsz=[64], device="cpu",
                               project=tmp_path, name="det")
    assert len(res) == len(list(source.iterdir()))


# ---------------------------------------------------------------- records built to exhaust the loader
def _bomb():
    """[0] wrapped 64 times as [L, L]: a few hundred bytes of pickle, 2**64 references when copied naively."""
    x = [0]
    for _ in range(64):
        x = [x, x]
    return x


def _self_referencing():
    x = [1, 2]
    x.append(x)
    return x


def _deep(n=5000):
    x = [0]
    for _ in range(n):
        x = [x]
    return x


@pytest.mark.parametrize("make", [_bomb, _self_referencing, _deep])
def test_exhausting_opt_entry_is_dropped_with_a_warning(make, tmp_path, logs):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))  # only to write the 5000-deep list; loading needs no more
    try:
        path = upstream_file(tmp_path / "crafted.pt", {"epochs": 3, "evil": make(), "imgsz": 64})
    finally:
        sys.setrecursionlimit(limit)
    t = time.perf_counter()
    ckpt = load_checkpoint(path)
    assert time.perf_counter() - t < 30  # bounded work (unbounded: minutes then MemoryError)
    assert ckpt["opt"] == {"epochs": 3, "imgsz": 64}  # the rest of the record is kept
    assert any("opt.evil dropped" in m for m in logs)
    model_from_checkpoint(ckpt)


def test_exhausting_model_yaml_is_refused(tmp_path):
    torch.manual_seed(0)
    model = DetectionModel(tiny_cfg_dict(nc=len(NAMES)))
    model.yaml["evil"] = _self_referencing()
    torch.save({"epoch": 1, "model": model, "ema": None, "opt": {}, "best_fitness": None}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match=r"y\.pt: model yaml refused \(yaml.evil contains itself\)"):
        load_checkpoint(tmp_path / "y.pt")
