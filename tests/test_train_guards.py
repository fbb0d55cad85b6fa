"""train_distill.py against silent no-ops and careless use: runs too short for the imitation warm-up,
--resume with another teacher, failed runs' folders, --noval tables and plots."""
from pathlib import Path

import pytest
import torch

import train_distill
from tests.conftest import read_csv
from tests.test_train_distill import kd_run, make_teacher


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
    assert train_distill.distill_warmup(warmup, nb, epochs) == expected
    assert bool(logs) == warns
