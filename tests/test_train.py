"""Plain training (train_distill.py without --teacher): artefacts, resume, bad input, non-finite guard, DDP."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_distill
from tests.conftest import killed_after_first_epoch, read_csv
from models.checkpoint import load_model
from utils.augmentations import check_img_size
from utils.files import ROOT

pytestmark = pytest.mark.slow  # end-to-end runs: skipped by pytest -m "not slow"


def tiny_run(tiny_data, tiny_cfg, tmp_path, **kw):
    args = dict(cfg=str(tiny_cfg), data=str(tiny_data), imgsz=64, batch_size=8, epochs=2, workers=0, device="cpu",
                project=str(tmp_path / "runs"), name="exp", noplots=True, noautoanchor=True)
    args.update(kw)
    return train_distill.run(**args)


def test_two_epochs_write_every_artefact(tiny_data, tiny_cfg, tmp_path):
    opt = tiny_run(tiny_data, tiny_cfg, tmp_path, noplots=False, noautoanchor=False)
    d = Path(opt.save_dir)
    for name in ["weights/last.pt", "weights/best.pt", "results.csv", "results.png", "opt.yaml", "hyp.yaml",
                 "labels.jpg", "train_batch0.jpg", "PR_curve.png", "confusion_matrix.png"]:
        assert (d / name).is_file(), name
    assert list(d.glob("events.out.tfevents*")), "TensorBoard scalars"
    rows = read_csv(d / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(float(r["train/kd_loss"]) == 0 for r in rows)  # plain run: no imitation term
    ckpt = torch.load(d / "weights/last.pt", weights_only=True)  # the project's format needs no pickle
    assert ckpt["optimizer"] is None and ckpt["distill"] is None  # stripped at the end
    assert ckpt["epoch"] == -1 and ckpt["names"][0] == "circle"  # finished weights, as upstream marks them
    model = load_model(d / "weights/best.pt")
    assert model.nc == 6 and not model.training


def test_noplots_run_never_imports_matplotlib(tiny_data, tiny_cfg, tmp_path):
    code = ("import sys, train_distill\n"
            f"train_distill.run(cfg={str(tiny_cfg)!r}, data={str(tiny_data)!r}, imgsz=64, batch_size=8, epochs=1, "
            f"workers=0, device='cpu', project={str(tmp_path / 'runs')!r}, name='exp', noplots=True)\n"
            "print('matplotlib' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False"  # its import alone is ~0.5 s of every start-up
    assert (tmp_path / "runs" / "exp" / "weights" / "best.pt").is_file()


def test_resume_continues_the_same_run(tiny_data, tiny_cfg, tmp_path, monkeypatch):
    killed_after_first_epoch(monkeypatch, lambda: tiny_run(tiny_data, tiny_cfg, tmp_path, epochs=3))
    run_dir = tmp_path / "runs" / "exp"
    last = run_dir / "weights/last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["optimizer"] is not None

    opt = train_distill.run(resume=str(last))
    assert Path(opt.save_dir) == run_dir and opt.epochs == 3 and opt.imgsz == 64  # the original arguments
    rows = read_csv(run_dir / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert torch.load(last, weights_only=True)["optimizer"] is None  # finished and stripped
    assert not (tmp_path / "runs" / "exp2").exists()


def test_new_run_in_a_reused_folder_starts_its_own_results(tiny_data, tiny_cfg, tmp_path):
    """--exist-ok reuses the run folder; the new run's results.csv must not continue the old run's rows."""
    first = tiny_run(tiny_data, tiny_cfg, tmp_path, epochs=1, exist_ok=True)
    second = tiny_run(tiny_data, tiny_cfg, tmp_path, epochs=1, exist_ok=True)
    assert first.save_dir == second.save_dir
    assert [int(r["epoch"]) for r in read_csv(Path(second.save_dir) / "results.csv")] == [0]


def test_bare_resume_without_previous_run_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no previous run"):
        train_distill.run(resume=True, project=str(tmp_path / "nothing"))


@pytest.mark.parametrize("kw, match", [
    (dict(cfg="yolov5nope.yaml"), "yolov5nope.yaml"),
    (dict(data="nodata.yaml"), "nodata.yaml"),
])
def test_unknown_cfg_or_data_is_clear(tiny_data, tiny_cfg, tmp_path, kw, match):
    with pytest.raises(FileNotFoundError, match=match):
        tiny_run(tiny_data, tiny_cfg, tmp_path, **kw)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_weights_that_are_not_a_checkpoint(tiny_data, tiny_cfg, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="bad.pt"):
        tiny_run(tiny_data, tiny_cfg, tmp_path, weights=str(bad))


def test_image_size_rounded_up_to_stride(tiny_data, tiny_cfg, tmp_path):
    opt = tiny_run(tiny_data, tiny_cfg, tmp_path, imgsz=50, epochs=1)
    ckpt = torch.load(Path(opt.save_dir) / "weights/last.pt", weights_only=True)
    assert ckpt["opt"]["imgsz"] == 50  # the user's value is recorded; training ran at 64
    assert check_img_size(50, 32) == 64 and check_img_size(64, 32) == 64


def test_cli_bad_input_exits_with_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "train_distill.py", "--data", "missing_data.yaml", "--project", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert "ERROR" in r.stdout + r.stderr and "missing_data.yaml" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_nonfinite_loss_skips_steps_and_stops(tiny_data, tiny_cfg, tmp_path, monkeypatch):
    from utils import loss as loss_module

    real_call = loss_module.ComputeLoss.__call__

    def nan_loss(self, p, targets):
        loss, items = real_call(self, p, targets)
        return loss * float("nan"), items

    monkeypatch.setattr(loss_module.ComputeLoss, "__call__", nan_loss)
    # 16 images at batch 2 = 8 batches per epoch: the guard must stop within the first epoch
    with pytest.raises(RuntimeError, match="non-finite"):
        tiny_run(tiny_data, tiny_cfg, tmp_path, batch_size=2, epochs=2)
    weights = tmp_path / "runs" / "exp" / "weights"
    assert not (weights / "best.pt").exists() and not (weights / "last.pt").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test uses localhost TCP")
def test_ddp_two_process_gloo(tiny_data, tiny_cfg, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "train_distill.py", "--cfg", str(tiny_cfg), "--data", str(tiny_data), "--imgsz", "64", "--batch-size", "8",
           "--epochs", "1", "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs"), "--name", "ddp",
           "--noplots", "--noautoanchor", "--sync-bn"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SyncBatchNorm needs a GPU" in r.stdout + r.stderr  # --sync-bn on CPU ranks: warned, not a crash
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["ddp"]  # rank 1 made no run folder of its own
    d = tmp_path / "runs" / "ddp"
    assert (d / "weights/last.pt").is_file()
    assert len(list(d.glob("events.out.tfevents*"))) == 1  # one writer: rank 0
    assert len(read_csv(d / "results.csv")) == 1


def test_sync_batchnorm_converts_on_gpu_only(tiny_cfg):
    """--sync-bn swaps every BN layer of the student for SyncBatchNorm on a GPU; torch's SyncBatchNorm raises
    on CPU tensors under DDP, so on the CPU the model keeps its BatchNorm2d layers."""
    from models.yolo import DetectionModel

    def bn_kinds(m):
        return {type(x) for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)}

    model = DetectionModel(str(tiny_cfg), nc=2)
    assert not train_distill.use_sync_batchnorm(model, torch.device("cpu"))
    assert bn_kinds(model) == {torch.nn.BatchNorm2d}
    assert train_distill.use_sync_batchnorm(model, torch.device("cuda"))  # conversion itself needs no GPU
    assert bn_kinds(model) == {torch.nn.SyncBatchNorm}
