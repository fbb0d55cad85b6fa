"""What every registered distillation method must do, one parametrised test per promise: a new method is
tested by registering it (and adding its row to README's method table)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_distill
from distill import METHODS
from distill.settings import build_method, resolve
from distill.step import StudentWithImitation
from distill.teacher import load_teacher
from models.checkpoint import load_checkpoint
from models.yolo import DetectionModel
from tests.conftest import killed_after_first_epoch, read_csv, resume_recording_loaded_state, tiny_cfg_dict
from tests.test_train_distill import kd_run, make_teacher

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def built(method, tmp_path, warmup=2, **teacher_kw):
    """(student, teacher, method module) for a tiny student and an untrained teacher, as the trainer builds them."""
    torch.manual_seed(0)
    student = DetectionModel(tiny_cfg_dict())
    path = make_teacher(tmp_path / "t.pt", **teacher_kw)
    teacher = load_teacher(path, student, torch.device("cpu"), 128)
    opt = train_distill.parse_opt(argv=["--teacher", str(path), "--distill-method", method, "--distill-warmup",
                                        str(warmup), "--distill-weight", "1"])
    return student, teacher, build_method(resolve(opt, teacher, nb=10, epochs=1), student, teacher, 4.0)


@pytest.mark.parametrize("method", list(METHODS))
def test_term_is_zero_in_the_warm_up_then_positive_and_trains_student_and_method_only(method, tmp_path):
    student, teacher, term = built(method, tmp_path, nc=80)  # a teacher of other nc: neck maps via the method
    step = StudentWithImitation(student, term).train()
    imgs = torch.rand(2, 3, 128, 128)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [1, 2, 0.3, 0.6, 0.2, 0.2]])
    maps = teacher.maps(imgs, "neck")
    _, early = step(imgs, targets, maps, iteration=1)
    assert not early.active and early.loss.item() == 0 and early.loss.requires_grad
    early.loss.backward()  # connected to every parameter, as DDP needs
    assert all(p.grad is not None for p in term.parameters())
    step.zero_grad()
    _, r = step(imgs, targets, maps, iteration=2)
    assert r.active and r.loss.item() > 0 and r.per_level.shape == (3,) and r.raw.item() == pytest.approx(r.loss.item())
    r.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    assert all(p.grad is None for p in teacher.model.parameters())


@pytest.mark.parametrize("method", list(METHODS))
def test_method_has_a_readme_row_and_help(method):
    assert f"| `{method}`" in README and METHODS[method].summary
    import argparse
    parser = argparse.ArgumentParser()
    from distill.settings import add_args
    add_args(parser)
    assert METHODS[method].summary in parser.format_help().replace("\n", " ").replace("  ", " ") or \
        f"{method}:" in parser.format_help()  # the --distill-method help lists the method
    with pytest.raises(SystemExit):
        train_distill.parse_opt(argv=["--distill-method", "no-such-method"])
    assert train_distill.parse_opt(argv=["--teacher", "t.pt", "--distill-method", method]).distill_method == method


@pytest.fixture(scope="module")
def plain_keys(tiny_data, tiny_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    opt = train_distill.run(cfg=str(tiny_cfg), data=str(tiny_data), imgsz=64, batch_size=8, epochs=1, workers=0,
                            device="cpu", project=str(out), name="plain", noplots=True, noautoanchor=True)
    return torch.load(Path(opt.save_dir) / "weights" / "best.pt", weights_only=True)["model"].keys()


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_p6_teacher_of_other_nc_resume_bit_for_bit_and_plain_checkpoints(method, tiny_data, tiny_cfg, tmp_path,
                                                                         monkeypatch, plain_keys):
    """A P6 teacher (strides 8..64) with 80 classes; a run killed after epoch 0 resumes with the method's modules
    exactly as saved; the finished checkpoints hold the plain student only."""
    teacher = make_teacher(tmp_path / "p6_nc80.pt", base="yolov5s6.yaml", width=0.125, nc=80)
    killed_after_first_epoch(monkeypatch, lambda: kd_run(tiny_data, tiny_cfg, tmp_path, teacher, epochs=2, imgsz=128,
                                                         distill_method=method, distill_weight=None, noplots=False))
    assert (tmp_path / "runs" / "kd" / "distill_masks.jpg").is_file() == METHODS[method].uses_mask
    last = tmp_path / "runs" / "kd" / "weights" / "last.pt"
    saved = torch.load(last, weights_only=True)
    assert saved["distill"]["method"] == method and saved["adapters"]
    opt, loaded = resume_recording_loaded_state(monkeypatch, METHODS[method], last)
    assert opt.distill_method == method and loaded.keys() == saved["adapters"].keys()
    assert all(torch.equal(loaded[k], v.float()) for k, v in saved["adapters"].items())
    assert [float(r["train/kd_loss"]) > 0 for r in read_csv(Path(opt.save_dir) / "results.csv")] == [True, True]
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(Path(opt.save_dir) / "weights" / name)
        assert ckpt["model"].keys() == plain_keys and ckpt["adapters"] is None


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test uses localhost TCP")
@pytest.mark.parametrize("method", list(METHODS))
def test_ddp_two_gloo_ranks(method, tiny_data, tiny_cfg, tmp_path):
    """torchrun, two ranks: the method's modules train inside the DDP wrapper with the student; an 'auto' weight
    is set on both ranks at the same iteration (rank 1 would hang in its all_reduce otherwise)."""
    teacher = make_teacher(tmp_path / "t.pt")
    port = 29550 + list(METHODS).index(method)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "train_distill.py", "--cfg", str(tiny_cfg), "--data", str(tiny_data), "--imgsz", "64", "--batch-size", "8",
           "--epochs", "1", "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs"), "--name", "kd",
           "--noplots", "--noautoanchor", "--teacher", str(teacher), "--distill-warmup", "0",
           "--distill-method", method, "--distill-weight", "auto", "--distill-auto-iters", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sum("--distill-weight auto set to" in ln for ln in (r.stdout + r.stderr).splitlines()) == 1
    d = tmp_path / "runs" / "kd"
    assert float(read_csv(d / "results.csv")[0]["train/kd_loss"]) > 0
    ckpt = load_checkpoint(d / "weights" / "last.pt")
    assert ckpt["distill"]["method"] == method and isinstance(ckpt["distill"]["weight"], float)
    assert ckpt.get("adapters") is None
