"""Distillation settings: flags refused where the run would not use them, old spellings, the settings resolved
once and written to the run's arguments, and --resume of checkpoints written by an earlier release."""
import argparse
import math
import shutil
from pathlib import Path

import pytest
import torch

import train_distill
from distill import METHODS
from distill.base import AUTO
from distill.settings import build_method, check_given, resolve, upgrade_args
from distill.teacher import load_teacher
from models.yolo import DetectionModel
from tests.conftest import read_csv, resume_recording_loaded_state, tiny_cfg_dict
from tests.test_train_distill import make_teacher

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def opt_of(*argv):
    return train_distill.parse_opt(argv=list(argv))


@pytest.mark.parametrize("argv, message", [
    (["--teacher", "t.pt", "--cwd-tau", "2"], "--cwd-tau is a flag of --distill-method cwd; --distill-method fgfi"),
    (["--teacher", "t.pt", "--distill-method", "mgd", "--distill-adapter", "3x3"], "--distill-adapter is a flag of "
                                                                                  "--distill-method fgfi / cwd"),
    (["--teacher", "t.pt", "--distill-method", "cwd", "--distill-mask", "gt"], "--fgfi-mask is a flag"),
    (["--teacher", "t.pt", "--mgd-alpha", "0.1"], "--mgd-alpha is a flag of --distill-method mgd"),
    (["--teacher", "t.pt", "--distill-method", "cwd", "--cwd-weight", "2", "--distill-weight", "1"],
     "both given"),
    (["--distill-weight", "0.5"], "--distill-weight needs --teacher"),
    (["--fgfi-thresh", "0.3"], "--fgfi-thresh needs --teacher")])
def test_flags_the_run_would_not_use_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        check_given(opt_of(*argv))


def test_old_spellings_and_method_aliases(tmp_path):
    student = DetectionModel(tiny_cfg_dict())
    teacher = load_teacher(make_teacher(tmp_path / "t.pt"), student, torch.device("cpu"), 64)
    s = resolve(opt_of("--teacher", "t.pt", "--distill-mask", "gt", "--distill-thresh", "0.3", "--distill-assign"),
                teacher, nb=10, epochs=1)
    assert (s.params.mask, s.params.thresh, s.params.assign, s.weight) == ("gt", 0.3, True, 1.0)
    s = resolve(opt_of("--teacher", "t.pt", "--distill-method", "cwd", "--cwd-weight", "3", "--cwd-tau", "2"),
                teacher, nb=10, epochs=1)
    assert (s.method, s.weight, s.params.tau) == ("cwd", 3.0, 2.0)
    assert resolve(opt_of("--teacher", "t.pt", "--distill-norm", "none"), teacher, 10, 1).weight == AUTO
    assert resolve(opt_of("--teacher", "t.pt", "--distill-method", "mgd"), teacher, 10, 1).weight == 0.05
    assert resolve(opt_of("--teacher", "t.pt", "--distill-method", "mgd", "--distill-norm", "none"),
                   teacher, 10, 1).weight == 2e-5  # the paper's alpha for the paper's sum of squared errors
    with pytest.raises(TypeError, match="unknown arguments"):
        train_distill.run(no_such_option=1)


def test_settings_are_frozen_and_their_arguments_resolve_to_the_same_settings(tmp_path):
    """What a run writes (opt.yaml, checkpoint 'opt') resolves on --resume to the same settings."""
    student = DetectionModel(tiny_cfg_dict())
    teacher = load_teacher(make_teacher(tmp_path / "t.pt", nc=80), student, torch.device("cpu"), 64)
    for method in METHODS:
        s = resolve(opt_of("--teacher", str(tmp_path / "t.pt"), "--distill-method", method, "--distill-target", "auto"),
                    teacher, nb=3, epochs=2)
        with pytest.raises(AttributeError):
            s.weight = 0.5
        again = resolve(argparse.Namespace(**{**vars(opt_of()), **s.args(), "teacher": s.teacher}), teacher, 3, 2)
        assert again == s and s.warmup == 3 and s.target == "neck"  # other nc: auto -> neck
        assert build_method(s, student, teacher).weight == (0.0 if s.weight == AUTO else s.weight)


def legacy_copy(name, tmp_path, tiny_data):
    """A checkpoint an earlier release wrote (tests/fixtures/legacy), its paths pointed at this test's files."""
    teacher = tmp_path / "legacy_teacher.pt"
    shutil.copy(LEGACY / "legacy_teacher.pt", teacher)
    ckpt = torch.load(LEGACY / f"legacy_{name}_last.pt", weights_only=True)
    ckpt["opt"].update(data=str(tiny_data), teacher=str(teacher), project=str(tmp_path / "runs"))
    ckpt["distill"]["teacher"] = str(teacher)
    last = tmp_path / "runs" / name / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save(ckpt, last)
    return last, ckpt


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fgfi", "cwd"])
def test_resume_of_a_checkpoint_written_by_the_earlier_release(name, tiny_data, tmp_path, monkeypatch):
    """Written at 3a66e80 with --distill-weight auto (fgfi) and --cwd-weight auto (cwd), killed after epoch 0:
    the measured weight stays, the modules load as saved, the run finishes with its teacher recorded."""
    last, old = legacy_copy(name, tmp_path, tiny_data)
    assert "distill_mask" in old["opt"]  # the earlier argument names
    lam = old["opt"]["distill_weight" if name == "fgfi" else "cwd_weight"]
    opt, loaded = resume_recording_loaded_state(monkeypatch, METHODS[name], last)
    assert opt.distill_method == name and opt.distill_weight == lam and opt.fgfi_mask == ("fine" if name == "fgfi"
                                                                                            else None)
    assert all(torch.equal(loaded[k], v.float()) for k, v in old["adapters"].items())
    rows = read_csv(Path(opt.save_dir) / "results.csv")
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[-1]["train/kd_loss"]) > 0  # epoch 1 of 0..1
    rec = torch.load(Path(opt.save_dir) / "weights" / "last.pt", weights_only=True)["distill"]
    assert rec["method"] == name and rec["weight"] == lam and rec["teacher_sha256"] == old["distill"]["teacher_sha256"]


def test_upgrade_of_the_earlier_arguments():
    old = torch.load(LEGACY / "legacy_cwd_last.pt", weights_only=True)["opt"]
    new = upgrade_args(old)
    assert new["distill_weight"] == old["cwd_weight"] and new["cwd_weight"] is None and new["cwd_tau"] == 1.0
    assert new["fgfi_mask"] is None and "distill_mask" not in new
    assert new["distill_norm"] == "none"  # cwd compared the raw maps then: a resumed run goes on doing so
    plain = upgrade_args({**old, "teacher": ""})
    assert all(plain[k] is None for k in ("distill_weight", "distill_method", "cwd_tau", "distill_target"))
    check_given(argparse.Namespace(**plain))  # a plain run's old arguments resume as a plain run
    assert upgrade_args(new) == new


def test_resume_keeps_the_raw_maps_of_a_cwd_or_mgd_run_written_before_they_had_a_norm(tmp_path):
    """Arguments written before cwd and mgd read --distill-norm hold None there; the resumed run compares the
    raw maps as it did (norm none, its weight), not the standardised ones (mgd's default, cwd's default when
    those runs were written); a run that recorded std (cwd's default for a while) resumes on std."""
    student = DetectionModel(tiny_cfg_dict())
    teacher = load_teacher(make_teacher(tmp_path / "t.pt"), student, torch.device("cpu"), 64)
    for method, weight, argv in (("cwd", 1.0, ["--distill-norm", "std"]), ("mgd", 2e-5, [])):
        new = resolve(opt_of("--teacher", "t.pt", "--distill-method", method, *argv), teacher, 10, 2)
        assert new.params.norm == "std" and new.args()["distill_norm"] == "std"  # written out, kept on resume
        written = {**new.args(), "teacher": "t.pt", "distill_norm": None, "distill_weight": weight}
        args = upgrade_args(written)
        assert args["distill_norm"] == "none" and upgrade_args(new.args() | {"teacher": "t.pt"})["distill_norm"] == "std"
        s = resolve(argparse.Namespace(**{**vars(opt_of()), **args}), teacher, 10, 2)
        assert (s.params.norm, s.weight) == ("none", weight)
    fgfi = upgrade_args({**resolve(opt_of("--teacher", "t.pt"), teacher, 10, 2).args(), "teacher": "t.pt"})
    assert fgfi["distill_norm"] == "kl" and fgfi["cwd_tau"] is None  # other methods' settings stay unused


def test_weight_schedules_by_hand(tmp_path):
    """nb 10 x epochs 5, warm-up 10: linear and cosine go from 1 at iteration 10 to --distill-final at the end
    (or at --distill-stop, after which the factor is 0); constant stays 1."""
    student = DetectionModel(tiny_cfg_dict())
    teacher = load_teacher(make_teacher(tmp_path / "t.pt"), student, torch.device("cpu"), 64)

    def factors(*flags):
        s = resolve(opt_of("--teacher", "t.pt", "--distill-warmup", "10", *flags), teacher, nb=10, epochs=5)
        return [round(s.factor(i), 6) for i in (0, 10, 30, 40, 49, 50)]

    assert factors() == [1, 1, 1, 1, 1, 1]
    assert factors("--distill-schedule", "linear") == [1, 1, 0.55, 0.325, 0.1225, 0.1]  # 1 - 0.9 (i - 10) / 40
    cos = [0.2 + 0.8 * (1 + math.cos(math.pi * p)) / 2 for p in (0.5, 0.75, 39 / 40)]  # p = (i - 10) / 40
    assert factors("--distill-schedule", "cosine", "--distill-final", "0.2") == pytest.approx([1, 1, *cos, 0.2])
    assert factors("--distill-schedule", "linear", "--distill-stop", "1") == [1, 1, 0.4, 0, 0, 0]  # ends at 40
    with pytest.raises(ValueError, match="--distill-stop 5"):
        factors("--distill-stop", "5")


@pytest.mark.slow
def test_distill_stop_trains_the_last_epoch_on_the_detection_loss_alone(tiny_data, tiny_cfg, tmp_path):
    from tests.test_train_distill import kd_run
    teacher = make_teacher(tmp_path / "t.pt")
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, teacher, epochs=2, distill_stop=1, distill_schedule="linear")
    rows = read_csv(Path(opt.save_dir) / "results.csv")
    assert float(rows[0]["train/kd_loss"]) > 0 and float(rows[1]["train/kd_loss"]) == 0
    assert [float(r["x/kd_factor"]) for r in rows] == [pytest.approx(0.1 + 0.9 * 0.5), 0.0]  # iteration 1 of 0..2
    rec = torch.load(Path(opt.save_dir) / "weights" / "last.pt", weights_only=True)["distill"]
    assert (rec["schedule"], rec["stop"], opt.distill_stop) == ("linear", 1, 1)
