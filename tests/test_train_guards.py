"""train_distill.py against silent no-ops and careless use: runs too short for the imitation warm-up,
--resume with another teacher, failed runs' folders, --noval tables and plots."""
from pathlib import Path

import pytest
import torch
import yaml

import train_distill
from tests.conftest import killed_after_first_epoch, read_csv
from tests.test_train_distill import kd_run, make_teacher
from tests.test_train import tiny_run
from distill.settings import distill_warmup
from distill.teacher import file_sha256
from utils.logging import UserError

pytestmark = pytest.mark.slow  # end-to-end runs: skipped by pytest -m "not slow"


def test_default_warm_up_fits_a_short_run(tiny_data, tiny_cfg, tmp_path, logs):
    """2 batches x 1 epoch: the default warm-up (100) is cut to half the run, so the run still distils."""
    teacher = make_teacher(tmp_path / "teacher.pt")
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, teacher, distill_warmup=None)
    rows = read_csv(Path(opt.save_dir) / "results.csv")
    assert float(rows[0]["train/kd_loss"]) > 0
    assert any("warm-up shortened to 1 iterations, half of this run's 2" in m for m in logs)
    ckpt = torch.load(Path(opt.save_dir) / "weights/last.pt", weights_only=True)
    assert ckpt["distill"]["warmup"] == 1 and ckpt["opt"]["distill_warmup"] == 1  # --resume keeps the value


def test_warm_up_longer_than_the_run_warns(tiny_data, tiny_cfg, tmp_path, logs):
    teacher = make_teacher(tmp_path / "teacher.pt")
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, teacher, distill_warmup=2)
    assert float(read_csv(Path(opt.save_dir) / "results.csv")[0]["train/kd_loss"]) == 0
    assert any("--distill-warmup 2 >= this run's 2 iterations" in m and "stays 0 for the whole run" in m
               for m in logs)


@pytest.mark.parametrize("warmup, nb, epochs, expected, warns", [
    (None, 50, 10, 100, False),  # the full-length demo: unchanged
    (None, 50, 1, 25, True),  # TEACHER_EPOCHS=1 STUDENT_EPOCHS=1 bash demo.sh
    (None, 1, 1, 0, True),
    (300, 50, 1, 300, True),  # an explicit value is kept, with a warning when it outlasts the run
    (49, 50, 1, 49, False),
    (0, 3, 1, 0, False)])
def test_distill_warmup_values(warmup, nb, epochs, expected, warns, logs):
    assert distill_warmup(warmup, nb, epochs) == expected
    assert bool(logs) == warns


def test_resume_with_a_changed_teacher(tiny_data, tiny_cfg, tmp_path, monkeypatch, logs):
    """The teacher file is replaced between the kill and --resume: refused, unless --teacher-changed-ok,
    and then the record names both teachers."""
    teacher = make_teacher(tmp_path / "teacher.pt")
    killed_after_first_epoch(monkeypatch, lambda: kd_run(tiny_data, tiny_cfg, tmp_path, teacher, epochs=2))
    last = tmp_path / "runs" / "kd" / "weights" / "last.pt"
    started = torch.load(last, weights_only=True)["distill"]["teacher_sha256"]
    assert started == file_sha256(teacher)
    ck = torch.load(teacher, weights_only=True)  # same architecture (the adapters still fit), other weights
    ck["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in ck["model"].items()}
    torch.save(ck, teacher)
    now = file_sha256(teacher)

    with pytest.raises(ValueError, match=rf"teacher {teacher} has changed .*{started[:12]}.*{now[:12]}.*"
                                         r"--teacher-changed-ok"):
        train_distill.run(resume=str(last))
    opt = train_distill.run(resume=str(last), teacher_changed_ok=True)
    rec = torch.load(Path(opt.save_dir) / "weights" / "last.pt", weights_only=True)["distill"]
    assert rec["teacher_sha256"] == now
    assert rec["previous_teachers"] == [{"teacher": str(teacher), "teacher_sha256": started, "last_epoch": 0}]
    assert any("resuming with a changed teacher" in m for m in logs)


def test_a_run_that_fails_before_training_leaves_no_run_folder(tiny_data, tiny_cfg, tmp_path):
    """Every early ERROR (data, weights, teacher, loaders) leaves the project folder empty; a run that
    starts makes its folder as before."""
    not_ckpt = tmp_path / "bad.pt"
    not_ckpt.write_bytes(b"not a checkpoint")
    d = yaml.safe_load(tiny_data.read_text())
    no_images = tmp_path / "no_images.yaml"
    (tmp_path / "empty" / "images").mkdir(parents=True)
    no_images.write_text(yaml.safe_dump({**d, "val": str(tmp_path / "empty" / "images")}))
    p6_teacher = make_teacher(tmp_path / "p6.pt", base="yolov5s6.yaml", width=0.125)
    failures = [dict(data=str(tmp_path / "missing.yaml")), dict(weights=str(not_ckpt)), dict(batch_size=0),
                dict(teacher=str(tmp_path / "no_teacher.pt")), dict(teacher=str(p6_teacher), imgsz=96),
                dict(data=str(no_images))]  # the val loader: the last step before the folder is made
    for kw in failures:
        with pytest.raises((ValueError, OSError, UserError)):
            tiny_run(tiny_data, tiny_cfg, tmp_path, epochs=1, **kw)
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), kw
    opt = tiny_run(tiny_data, tiny_cfg, tmp_path, epochs=1)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["exp"] and Path(opt.save_dir, "opt.yaml").is_file()


def test_noval_leaves_unvalidated_metrics_empty_and_unplotted(tiny_data, tiny_cfg, tmp_path, monkeypatch):
    """--noval: epochs before the last have empty metric and val-loss cells in results.csv, and
    results.png draws those panels from the validated epoch only."""
    from matplotlib.axes import Axes

    drawn = {}
    real_plot, real_title = Axes.plot, Axes.set_title

    def plot(self, x, y, *a, **k):
        self._drawn = (list(x), list(y))
        return real_plot(self, x, y, *a, **k)

    def set_title(self, title, *a, **k):
        drawn[title] = getattr(self, "_drawn", None)
        return real_title(self, title, *a, **k)

    monkeypatch.setattr(Axes, "plot", plot)
    monkeypatch.setattr(Axes, "set_title", set_title)
    opt = tiny_run(tiny_data, tiny_cfg, tmp_path, epochs=3, noval=True, noplots=False)
    rows = read_csv(Path(opt.save_dir) / "results.csv")
    unvalidated = [k for k in rows[0] if k.startswith(("metrics/", "val/"))]
    assert len(unvalidated) == 7
    for r in rows[:2]:
        assert all(r[k] == "" for k in unvalidated) and float(r["train/box_loss"]) > 0
    assert all(rows[2][k] != "" for k in unvalidated)
    assert (Path(opt.save_dir) / "results.png").is_file()
    assert drawn["metrics/mAP_0.5"] == ([2.0], [float(rows[2]["metrics/mAP_0.5"])])
    assert drawn["train/box_loss"][0] == [0.0, 1.0, 2.0]


def test_learning_curve_reads_only_validated_epochs(tmp_path):
    from benchmarks.learning_curve import read_curve

    f = tmp_path / "results.csv"
    f.write_text("epoch,train/box_loss,metrics/mAP_0.5,metrics/mAP_0.5:0.95\n0,0.1,,\n1,0.09,,\n2,0.08,0.5,0.25\n")
    assert read_curve(f) == [(2, 0.5, 0.25)]
