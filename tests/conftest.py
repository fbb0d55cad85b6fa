"""Shared fixtures: a tiny generated shapes set and a tiny model config, made once per test session."""
import csv
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("NO_COLOR", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op torch thread per test process: with pytest -n 2 on 2 cores, or beside other jobs, two
    spinning OpenMP threads per process oversubscribe the CPU and run 10-100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


NAMES = ["circle", "ellipse", "square", "rectangle", "hexagon", "star"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """16 train + 8 val shapes images of ~64 px, and their data yaml."""
    from data.shapes_generator import main as generate

    root = tmp_path_factory.mktemp("tiny_shapes")
    generate(["--out", str(root), "--n-train", "16", "--n-val", "8", "--seed", "3", "--size", "64"])
    f = root / "tiny.yaml"
    f.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val", "names": NAMES}))
    return f


def tiny_cfg_dict(base="yolov5n.yaml", width=0.125, nc=6) -> dict:
    from utils.files import find_file, yaml_load

    d = yaml_load(find_file(base))
    d.update(width_multiple=width, nc=nc)
    return d


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory) -> Path:
    """yolov5n's layout at width 0.125: the same graph as a real student, a few thousand parameters."""
    f = tmp_path_factory.mktemp("cfg") / "yolov5-tiny.yaml"
    f.write_text(yaml.safe_dump(tiny_cfg_dict()))
    return f


def killed_after_first_epoch(monkeypatch, train_call):
    """Run train_call() with validation raising KeyboardInterrupt on its 2nd call: the run dies during
    epoch 1, after epoch 0's last.pt was written, like a run killed mid-training."""
    import val as validate

    calls = {"n": 0}
    real_val = validate.run

    def val_then_die(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_val(*a, **k)

    monkeypatch.setattr(validate, "run", val_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_call()
    monkeypatch.setattr(validate, "run", real_val)


def resume_recording_loaded_state(monkeypatch, cls, last):
    """Resume train_distill from checkpoint `last`, recording the state dict loaded into the imitation term
    of class `cls`; -> (the run's opt, that state dict)."""
    import train_distill

    loaded = {}
    real_load = cls.load_state_dict

    def spy(self, state, *a, **k):
        loaded.update(state)
        return real_load(self, state, *a, **k)

    monkeypatch.setattr(cls, "load_state_dict", spy)
    return train_distill.run(resume=str(last)), loaded


def read_csv(path) -> list[dict]:
    """Rows of a csv file (e.g. a run's results.csv) as dicts."""
    with open(path) as f:
        return list(csv.DictReader(f))


@contextmanager
def log_lines():
    """Collect the project LOGGER's messages (it writes to stdout without propagating, so caplog misses them)."""
    from utils.logging import LOGGER

    lines = []

    class Grab(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    h = Grab(level=logging.DEBUG)
    LOGGER.addHandler(h)
    try:
        yield lines
    finally:
        LOGGER.removeHandler(h)


def distill_settings(method="fgfi", weight=1.0, warmup=0, target="neck", **params):
    """Frozen DistillSettings of a method, without a teacher file: params are the method's own (FGFI's norm,
    CWD's tau, ...), the rest as a run resolves them by default."""
    from distill import METHODS
    from distill.settings import DistillSettings

    return DistillSettings(method=method, teacher="", teacher_sha256=None, target=target, weight=weight,
                           warmup=warmup, auto_ratio=1.0, auto_iters=20, total=1000,
                           params=METHODS[method].Params(**params))


def fgfi_term(student_feats, teacher_feats, masks, adapters, norm="none"):
    """FGFI's imitation term on given masks and adapters: -> (loss, per_level) of an FGFI (weight 1, no warm-up)
    whose adapters are `adapters` (a ModuleList) and whose masks are `masks`, at iteration 0."""
    from distill.fgfi import FGFI

    method = FGFI(distill_settings(norm=norm), [s.shape[1] for s in student_feats],
                  [t.shape[1] for t in teacher_feats])
    method.add_adapters(adapters)  # replaces the built ones (the list and the registered modules)
    method.masks = lambda *args: masks
    result = method(student_feats, teacher_feats, iteration=0)
    return result.loss, result.per_level


@pytest.fixture
def logs():
    """The LOGGER messages of the test (log_lines as a fixture)."""
    with log_lines() as lines:
        yield lines
