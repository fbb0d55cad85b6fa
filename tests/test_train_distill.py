"""Distillation through train_distill.py: teacher kinds, checkpoint contents, mismatch errors, resume, DDP."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_distill
from models.checkpoint import load_checkpoint, load_model, save_checkpoint
from models.yolo import DetectionModel
from tests.conftest import killed_after_first_epoch, read_csv, resume_recording_loaded_state, tiny_cfg_dict
from distill.fgfi import FGFI
from distill.teacher import load_teacher

pytestmark = pytest.mark.slow  # end-to-end runs: skipped by pytest -m "not slow"

ROOT = Path(__file__).resolve().parents[1]


def make_teacher(path, base="yolov5s.yaml", width=0.25, nc=6, anchors=None):
    """An untrained teacher checkpoint in the project's format (enough to exercise the plumbing)."""
    torch.manual_seed(0)
    cfg = tiny_cfg_dict(base, width=width, nc=nc)
    if anchors is not None:
        cfg["anchors"] = anchors
    model = DetectionModel(cfg)
    model.names = [f"t{i}" for i in range(nc)]
    save_checkpoint(path, model)
    return path


def kd_run(tiny_data, tiny_cfg, tmp_path, teacher, **kw):
    args = dict(cfg=str(tiny_cfg), data=str(tiny_data), imgsz=64, batch_size=8, epochs=1, workers=0, device="cpu",
                project=str(tmp_path / "runs"), name="kd", noplots=True, noautoanchor=True, teacher=str(teacher),
                distill_warmup=0, distill_weight=0.01)  # a fixed weight: 'auto' weights the first iterations 0
    args.update(kw)
    return train_distill.run(**args)


def test_distilled_student_checkpoint_is_a_plain_model(tiny_data, tiny_cfg, tmp_path):
    teacher = make_teacher(tmp_path / "teacher.pt")
    kd = kd_run(tiny_data, tiny_cfg, tmp_path, teacher, noplots=False, distill_target="neck")  # with adapters
    plain = train_distill.run(cfg=str(tiny_cfg), data=str(tiny_data), imgsz=64, batch_size=8, epochs=1, workers=0,
                              device="cpu", project=str(tmp_path / "runs"), name="plain", noplots=True,
                              noautoanchor=True)
    d = Path(kd.save_dir)
    ck_kd = torch.load(d / "weights/best.pt", weights_only=True)
    ck_plain = torch.load(Path(plain.save_dir) / "weights/best.pt", weights_only=True)
    assert ck_kd["model"].keys() == ck_plain["model"].keys()  # no adapter inside the student
    rec = ck_kd["distill"]
    assert rec["teacher"] == str(teacher) and len(rec["teacher_sha256"]) == 64
    assert (rec["method"], rec["target"], rec["mask"], rec["thresh"], rec["norm"]) == ("fgfi", "neck", "fine", 0.5, "kl")
    rows = (d / "results.csv").read_text().splitlines()
    assert "train/kd_loss" in rows[0] and float(rows[1].split(",")[4]) > 0  # its own column, non-zero
    assert (d / "distill_masks.jpg").is_file()


def test_mask_plot_and_coverage_during_the_warm_up(tiny_data, tiny_cfg, tmp_path, logs):
    """With the default --distill-warmup (longer than this run) the imitation term stays zero, but the
    first batch's mask plot is written and the coverage is logged."""
    teacher = make_teacher(tmp_path / "teacher.pt")
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, teacher, noplots=False, distill_warmup=100)
    d = Path(opt.save_dir)
    assert (d / "distill_masks.jpg").is_file()
    assert all(float(r["train/kd_loss"]) == 0 for r in read_csv(d / "results.csv"))
    assert any(m.startswith("distill: mask coverage") for m in logs)


def test_head_mode_and_its_mismatch_error(tiny_data, tiny_cfg, tmp_path):
    anchors = tiny_cfg_dict()["anchors"]
    same = make_teacher(tmp_path / "same.pt", nc=6, anchors=anchors)
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, same, distill_target="head")
    assert torch.load(Path(opt.save_dir) / "weights/last.pt", weights_only=True)["distill"]["target"] == "head"

    other_nc = make_teacher(tmp_path / "nc3.pt", nc=3)
    with pytest.raises(ValueError, match="head"):
        kd_run(tiny_data, tiny_cfg, tmp_path, other_nc, distill_target="head", name="bad")
    assert not (tmp_path / "runs" / "bad" / "results.csv").exists()  # refused before the first step


def test_auto_target_picks_head_when_the_teacher_allows_it_and_skips_autoanchor(tiny_data, tiny_cfg, tmp_path,
                                                                                monkeypatch):
    def no_autoanchor(*a, **k):
        raise AssertionError("AutoAnchor ran in head mode: it could give the student anchors the teacher lacks")

    monkeypatch.setattr(train_distill, "check_anchors", no_autoanchor)
    same = make_teacher(tmp_path / "same.pt", nc=6, anchors=tiny_cfg_dict()["anchors"])
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, same, distill_target="auto", noautoanchor=False)
    assert opt.distill_target == "head"
    assert torch.load(Path(opt.save_dir) / "weights/last.pt", weights_only=True)["distill"]["target"] == "head"

    other_nc = make_teacher(tmp_path / "nc3.pt", nc=3)
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, other_nc, distill_target="auto", name="auto_neck")
    assert opt.distill_target == "neck"
    assert torch.load(Path(opt.save_dir) / "weights/last.pt", weights_only=True)["distill"]["target"] == "neck"


def test_teacher_is_frozen_fused_and_gives_the_same_maps(tmp_path):
    """load_teacher: eval, no gradients, BatchNorm folded into the convs (cheaper forward), same neck maps."""
    path = make_teacher(tmp_path / "t.pt")
    student = DetectionModel(tiny_cfg_dict("yolov5n.yaml", width=0.25, nc=6))
    teacher = load_teacher(path, student, torch.device("cpu"), 64)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.model.modules())
    unfused = load_model(path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got = teacher.maps(x, "neck")
        want = unfused(x, return_features=True)[1]
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(got, want))



@pytest.mark.parametrize("target", ["neck", "head"])
def test_fp16_teacher_takes_float_images_and_gives_float32_maps(tmp_path, target):
    """On CUDA load_teacher halves the teacher; teacher_features then feeds it fp16 images and hands float32
    maps to the loss. Checked here on the CPU (fp16 convs run there too, slowly) against the fp32 teacher."""
    path = make_teacher(tmp_path / "t.pt")
    student = DetectionModel(tiny_cfg_dict("yolov5n.yaml", width=0.25, nc=6))
    teacher = load_teacher(path, student, torch.device("cpu"), 64)
    x = torch.rand(2, 3, 64, 64)
    want = teacher.maps(x, target)
    teacher.model.half()
    got = teacher.maps(x, target)
    assert next(teacher.model.parameters()).dtype == torch.float16
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert (a - b).abs().max() <= 1e-2 * b.abs().max() + 1e-3  # fp16 rounding only


def test_neck_mode_with_teacher_of_other_nc(tiny_data, tiny_cfg, tmp_path):
    teacher = make_teacher(tmp_path / "coco_like.pt", nc=80)
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, teacher)
    assert opt.distill_target == "neck"  # the default
    assert (Path(opt.save_dir) / "weights/best.pt").is_file()


def test_upstream_checkpoint_as_teacher(tiny_data, tiny_cfg, tmp_path):
    """An upstream-format file (a pickle of upstream model objects, read by the restricted unpickler) works
    as --teacher: its nc (3) differs from the data's, so the neck is imitated through adapters."""
    teacher = ROOT / "tests" / "fixtures" / "upstream_yolov5n_nc3.pt"
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, teacher)
    rows = read_csv(Path(opt.save_dir) / "results.csv")
    assert float(rows[-1]["train/kd_loss"]) > 0
    assert load_checkpoint(Path(opt.save_dir) / "weights" / "best.pt")["distill"]["teacher"] == str(teacher)


def test_p6_teacher_imitates_the_matching_levels(tiny_data, tiny_cfg, tmp_path, monkeypatch):
    teacher = make_teacher(tmp_path / "p6.pt", base="yolov5s6.yaml", width=0.125)
    seen = {}
    real = train_distill.load_teacher

    def spy(*a, **k):
        t = real(*a, **k)
        seen["levels"] = t.levels
        return t

    monkeypatch.setattr(train_distill, "load_teacher", spy)
    kd_run(tiny_data, tiny_cfg, tmp_path, teacher, imgsz=128)
    assert seen["levels"] == [0, 1, 2]  # strides 8/16/32 of the teacher's 8/16/32/64


def test_stride_and_image_size_mismatch_errors(tiny_data, tiny_cfg, tmp_path):
    p6_teacher = make_teacher(tmp_path / "p6.pt", base="yolov5s6.yaml", width=0.125)
    with pytest.raises(ValueError, match="stride 64"):  # 96 px suits the student (32) but not the P6 teacher (64)
        kd_run(tiny_data, tiny_cfg, tmp_path, p6_teacher, imgsz=96)
    p5_teacher = make_teacher(tmp_path / "p5.pt")
    p6_student = tmp_path / "p6_student.yaml"
    import yaml
    p6_student.write_text(yaml.safe_dump(tiny_cfg_dict("yolov5n6.yaml", width=0.125)))
    with pytest.raises(ValueError, match="missing \\[64\\]"):
        kd_run(tiny_data, p6_student, tmp_path, p5_teacher, imgsz=128)


def test_resume_of_a_distilling_run_keeps_the_adapters(tiny_data, tiny_cfg, tmp_path, monkeypatch):
    teacher = make_teacher(tmp_path / "teacher.pt")
    neck_run = lambda: kd_run(tiny_data, tiny_cfg, tmp_path, teacher, epochs=2, distill_target="neck")  # noqa: E731
    killed_after_first_epoch(monkeypatch, neck_run)
    last = tmp_path / "runs" / "kd" / "weights" / "last.pt"
    saved = torch.load(last, weights_only=True)["adapters"]
    assert saved, "an unfinished distilling run keeps its adapters in last.pt"

    opt, loaded = resume_recording_loaded_state(monkeypatch, FGFI, last)
    assert opt.teacher == str(teacher) and loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k].float()) for k in saved)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test uses localhost TCP")
def test_ddp_two_process_distillation(tiny_data, tiny_cfg, tmp_path):
    """torchrun with a teacher: each rank loads its own teacher and the adapters train inside the DDP
    wrapper with the student; one run folder, a non-zero imitation loss, and a finished checkpoint that
    records the teacher and is stripped to the plain student."""
    teacher = make_teacher(tmp_path / "t.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
           "train_distill.py", "--cfg", str(tiny_cfg), "--data", str(tiny_data), "--imgsz", "64", "--batch-size", "8",
           "--epochs", "1", "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs"), "--name", "kd",
           "--noplots", "--noautoanchor", "--teacher", str(teacher), "--distill-warmup", "0", "--distill-weight", "0.01"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["kd"]
    d = tmp_path / "runs" / "kd"
    rows = read_csv(d / "results.csv")
    assert len(rows) == 1 and float(rows[0]["train/kd_loss"]) > 0
    ckpt = load_checkpoint(d / "weights" / "last.pt")
    assert ckpt["distill"]["teacher"] == str(teacher)
    assert ckpt.get("adapters") is None  # a finished run's checkpoint is stripped to the plain student
