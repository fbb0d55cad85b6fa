"""Imitation terms besides FGFI (CWD, MGD), the PKD normalisation of FGFI and the automatic weight:
values against plain numpy, gradients, and runs of train_distill.py with them (resume, checkpoints, DDP)."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import train_distill
from models.checkpoint import load_checkpoint
from tests.conftest import killed_after_first_epoch, read_csv, resume_recording_loaded_state
from tests.test_train_distill import kd_run, make_teacher
from utils import distill_setup
from utils.distill import FeatureImitation, build_adapters, imitation_loss, standardize_channels
from utils.distill_methods import (AutoWeight, ChannelWiseDistillation, MaskedGenerativeDistillation, build_method,
                                   fallback_weight, fgfi_weight, weight_arg)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- numpy references

def np_standardize(x):
    """Per channel over (images, cells): mean 0, variance 1 (population variance), x [N, C, H, W]."""
    out = np.empty_like(x)
    for c in range(x.shape[1]):
        v = x[:, c]
        out[:, c] = (v - v.mean()) / np.sqrt(v.var() + 1e-5)
    return out


def np_cwd(s, t, tau):
    """tau^2 / (C * N) * sum over images and channels of KL(p_t || p_s), p = softmax over the cells of map / tau."""
    n, c = t.shape[:2]
    total = 0.0
    for i in range(n):
        for j in range(c):
            ps = np.exp(s[i, j].ravel() / tau)
            pt = np.exp(t[i, j].ravel() / tau)
            ps, pt = ps / ps.sum(), pt / pt.sum()
            total += float(np.sum(pt * np.log(pt / ps)))
    return tau * tau * total / (c * n)


def np_conv3x3(x, w, b):
    """'same' 3x3 convolution with zero padding: x [C_in, H, W], w [C_out, C_in, 3, 3], b [C_out]."""
    c_in, h, wd = x.shape
    xp = np.zeros((c_in, h + 2, wd + 2))
    xp[:, 1:-1, 1:-1] = x
    out = np.zeros((w.shape[0], h, wd))
    for o in range(w.shape[0]):
        for y in range(h):
            for x_ in range(wd):
                out[o, y, x_] = np.sum(xp[:, y:y + 3, x_:x_ + 3] * w[o]) + b[o]
    return out


def _maps(seed=0, n=2, cs=(4, 8), ct=(6, 12), hw=((8, 8), (4, 4))):
    """Student maps from a student conv (so its weights get gradients) and teacher maps from a teacher conv
    run with gradients on (so a leak into the teacher would show)."""
    torch.manual_seed(seed)
    student = nn.ModuleList(nn.Conv2d(3, c, 1) for c in cs)
    teacher = nn.ModuleList(nn.Conv2d(3, c, 1) for c in ct)
    xs = [torch.randn(n, 3, h, w) for h, w in hw]
    return student, teacher, [m(x) for m, x in zip(student, xs)], [m(x) for m, x in zip(teacher, xs)]


# ------------------------------------------------------------------------------------------------- PKD

def test_pkd_value_by_hand_and_independent_of_the_teachers_scale():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 3, 2, 3, generator=g) * 4 + 1
    assert np.allclose(standardize_channels(s).numpy(), np_standardize(s.numpy().astype(np.float64)), atol=1e-5)
    m = torch.rand(2, 2, 3, generator=g) > 0.4
    m[0, 0, 0] = True
    loss, _ = imitation_loss([s], [t], [m], build_adapters([3], [3], "none"), normalize="pkd")
    zs, zt = np_standardize(s.numpy().astype(np.float64)), np_standardize(t.numpy().astype(np.float64))
    b, y, x = np.nonzero(m.numpy())
    want = sum(np.sum((zs[i, :, j, k] - zt[i, :, j, k]) ** 2) for i, j, k in zip(b, y, x)) / (2 * len(b)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # a teacher 50x larger and shifted gives the same term; the plain term grows with the scale
    big = [t * 50 - 7]
    assert imitation_loss([s], big, [m], build_adapters([3], [3], "none"), "pkd")[0].item() == pytest.approx(want,
                                                                                                            rel=1e-4)
    assert imitation_loss([s], big, [m], build_adapters([3], [3], "none"))[0].item() > 100 * want


def test_pkd_gradients_reach_student_and_adapter_not_teacher():
    student, teacher, s, t = _maps()
    adapters = build_adapters([4, 8], [6, 12], "1x1")
    masks = [torch.rand(2, 8, 8) > 0.5, torch.rand(2, 4, 4) > 0.5]
    loss, _ = imitation_loss(s, t, masks, adapters, normalize="pkd")
    loss.backward()
    assert all(m.weight.grad.abs().sum() > 0 for m in student) and all(a.weight.grad.abs().sum() > 0 for a in adapters)
    assert all(m.weight.grad is None for m in teacher)


# ---------------------------------------------------------------------------------- FGFI with norm 'kl'

def test_kl_norm_value_by_hand_softmax_over_masked_cells_only():
    """Per image and channel, softmax over that image's masked cells; an image without masked cells does not
    count in N. A softmax over all cells (CWD's) gives another value."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 2, 2, 3, generator=g), torch.randn(3, 2, 2, 3, generator=g) * 3
    m = torch.zeros(3, 2, 3, dtype=torch.bool)
    m[0, 0, 0] = m[0, 1, 2] = m[0, 1, 1] = True
    m[2] = True  # image 1: no masked cell
    loss, per_level = imitation_loss([s], [t], [m], build_adapters([2], [2], "none"), normalize="kl")
    sd, td = s.double().numpy(), t.double().numpy()
    want = 0.0
    for i in (0, 2):
        cells = np.nonzero(m[i].numpy().ravel())[0]
        want += np_cwd(sd[i:i + 1].reshape(1, 2, -1)[:, :, cells], td[i:i + 1].reshape(1, 2, -1)[:, :, cells], 1.0)
    want /= 2  # np_cwd divides by C * 1 per image; two images count
    assert loss.item() == pytest.approx(want, rel=1e-5) and per_level.tolist() == pytest.approx([want], rel=1e-5)
    assert loss.item() != pytest.approx(np_cwd(sd[[0, 2]], td[[0, 2]], 1.0), rel=1e-3)
    # a constant offset of the teacher changes nothing; no masked cell anywhere: 0, still connected
    assert imitation_loss([s], [t + 4], [m], build_adapters([2], [2], "none"), "kl")[0].item() == pytest.approx(
        want, rel=1e-4)
    leaf = s.clone().requires_grad_()
    zero, _ = imitation_loss([leaf], [t], [torch.zeros_like(m)], build_adapters([2], [2], "none"), "kl")
    zero.backward()
    assert zero.item() == 0 and leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_kl_norm_gradients_only_at_masked_cells_and_never_the_teacher():
    student, teacher, s, t = _maps()
    adapters = build_adapters([4, 8], [6, 12], "1x1")
    masks = [torch.rand(2, 8, 8) > 0.5, torch.rand(2, 4, 4) > 0.5]
    masks[1][1] = False  # image 1 of level 1 has no masked cell
    leaves = [x.detach().requires_grad_() for x in s]
    loss, _ = imitation_loss(leaves, t, masks, adapters, normalize="kl")
    loss.backward()
    for leaf, m in zip(leaves, masks):
        g = leaf.grad.abs().sum(1)  # [N, H, W]
        assert torch.isfinite(leaf.grad).all() and (g[~m] == 0).all() and (g[m] > 0).any()
    assert all(a.weight.grad.abs().sum() > 0 for a in adapters)
    assert all(m.weight.grad is None for m in teacher)
    imitation_loss(s, t, masks, adapters, normalize="kl")[0].backward()
    assert all(m.weight.grad.abs().sum() > 0 for m in student)


# ------------------------------------------------------------------------------------------------- CWD

def test_cwd_value_by_hand():
    """Equal channels and no adapter: the term is the numpy formula per level, summed, times the weight."""
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 2, 1, 3, generator=g), torch.randn(2, 2, 2, 2, generator=g)]
    t = [torch.randn(2, 2, 1, 3, generator=g) * 2, torch.randn(2, 2, 2, 2, generator=g)]
    tau, weight = 2.0, 0.3
    cwd = ChannelWiseDistillation([2, 2], [2, 2], adapter="none", tau=tau, weight=weight)
    loss, stats = cwd(s, t, iteration=0)
    want = [np_cwd(a.double().numpy(), b.double().numpy(), tau) for a, b in zip(s, t)]
    assert stats["per_level"].tolist() == pytest.approx(want, rel=1e-5)
    assert stats["raw"].item() == pytest.approx(sum(want), rel=1e-5)
    assert loss.item() == pytest.approx(weight * sum(want), rel=1e-5)
    same, _ = cwd(t, t, iteration=0)
    assert abs(same.item()) < 1e-6  # identical distributions: no divergence
    shifted, _ = cwd([x + 5.0 for x in t], t, iteration=0)
    assert abs(shifted.item()) < 1e-5  # softmax over cells ignores a constant offset of a channel


def test_cwd_gradients_reach_student_and_adapters_not_teacher():
    student, teacher, s, t = _maps()
    cwd = ChannelWiseDistillation([4, 8], [6, 12], adapter="1x1", tau=1.0, weight=1.0)
    loss, stats = cwd(s, t, iteration=0)
    loss.backward()
    assert loss.item() > 0 and stats["active"] and stats["masks"] == []
    assert all(m.weight.grad.abs().sum() > 0 for m in student)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cwd.parameters())
    assert all(m.weight.grad is None for m in teacher)
    assert set(cwd.state_dict()) == set(build_adapters([4, 8], [6, 12]).state_dict())  # keys '0.*', '1.*'


# ------------------------------------------------------------------------------------------------- MGD

def test_mgd_value_by_hand(monkeypatch):
    """1 student channel aligned to 2 teacher channels by a 1x1 conv, a fixed cell mask, hand-set generation
    weights: the term is the numpy computation (align, zero the cells, conv3x3, ReLU, conv3x3, squared error
    summed and divided by the images), times alpha."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 1, 3, 4, generator=g), torch.randn(2, 2, 3, 4, generator=g)
    alpha = 0.5
    mgd = MaskedGenerativeDistillation([1], [2], ratio=0.65, weight=alpha)
    with torch.no_grad():
        for p in mgd.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    keep = (torch.rand(2, 1, 3, 4, generator=g) > 0.5).float()
    monkeypatch.setattr(mgd, "keep_mask", lambda x: keep)
    loss, stats = mgd([s], [t], iteration=0)

    P = {k: v.double().numpy() for k, v in mgd.state_dict().items()}
    total = 0.0
    for i in range(2):
        a = P["align.0.weight"][:, 0, 0, 0][:, None, None] * s[i, 0].double().numpy() + P["align.0.bias"][:, None, None]
        a = a * keep[i].double().numpy()  # [1, H, W] mask over both channels
        h = np.maximum(np_conv3x3(a, P["gen.0.0.weight"], P["gen.0.0.bias"]), 0)
        out = np_conv3x3(h, P["gen.0.2.weight"], P["gen.0.2.bias"])
        total += np.sum((out - t[i].double().numpy()) ** 2)
    want = total / 2
    assert stats["raw"].item() == pytest.approx(want, rel=1e-5)
    assert loss.item() == pytest.approx(alpha * want, rel=1e-5)


def test_mgd_mask_zeroes_the_given_share_of_cells_per_image():
    mgd = MaskedGenerativeDistillation([4], [4], ratio=0.65)
    assert isinstance(mgd.align[0], nn.Identity)  # equal channels: no align conv
    torch.manual_seed(0)
    keep = mgd.keep_mask(torch.zeros(4, 4, 50, 50))
    assert keep.shape == (4, 1, 50, 50) and set(keep.unique().tolist()) == {0.0, 1.0}
    zeroed = 1 - keep.mean((1, 2, 3))
    assert ((zeroed - 0.65).abs() < 0.05).all()  # 2500 cells per image
    assert not torch.equal(keep[0], keep[1])  # one mask per image
    assert MaskedGenerativeDistillation([4], [4], ratio=0.0).keep_mask(torch.zeros(1, 4, 5, 5)).all()


def test_mgd_gradients_reach_student_align_and_generator_not_teacher():
    student, teacher, s, t = _maps()
    torch.manual_seed(0)
    mgd = MaskedGenerativeDistillation([4, 8], [6, 12], weight=1.0)
    loss, _ = mgd(s, t, iteration=0)
    loss.backward()
    assert loss.item() > 0
    assert all(m.weight.grad.abs().sum() > 0 for m in student)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mgd.parameters())
    assert all(m.weight.grad is None for m in teacher)
    assert {k.split(".")[0] for k in mgd.state_dict()} == {"align", "gen"}


# ------------------------------------------------------------------------------------ shared behaviour

@pytest.mark.parametrize("method", ["cwd", "mgd"])
def test_methods_warm_up_levels_autocast_and_errors(method):
    _, _, s, t = _maps()
    term = build_method(method, [4, 8], [6, 12], adapter="1x1", weight=0.5, warmup=2)
    zero, stats = term(s, t, iteration=1)
    assert zero.item() == 0.0 and zero.requires_grad and not stats["active"] and stats["per_level"].shape == (2,)
    zero.backward(retain_graph=True)
    assert all(p.grad is not None for p in term.parameters())  # DDP needs every parameter in the graph

    torch.manual_seed(5)
    ref, _ = term(s, t, iteration=2)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp, _ = term([x.bfloat16() for x in s], t, iteration=2)
    assert amp.dtype == torch.float32 and amp.item() == pytest.approx(ref.item(), rel=0.05)  # bf16 inputs only

    with pytest.raises(ValueError, match="shapes differ"):
        term([s[0][:, :, :4], s[1]], t, iteration=2)
    with pytest.raises(ValueError, match="levels"):
        type(term)([4], [6], levels=[1])
    with pytest.raises(ValueError):
        build_method(method, [4], [6], adapter="1x1", weight=1.0, warmup=0, cwd_tau=0.0, mgd_ratio=1.0)
    with pytest.raises(ValueError, match="not one of"):
        build_method("kd", [4], [6], adapter="1x1", weight=1.0, warmup=0)


def test_fgfi_weight_default_follows_the_norm_with_a_numeric_fallback_for_every_method():
    """FGFI's default weight is 1.0 for the kl term and set from the losses for the squared error; an 'auto'
    weight of any method that gets no ratio falls back to a number, never to the flag's own default ('auto')."""
    from train_distill import parse_opt
    from utils.distill_methods import FALLBACK_WEIGHTS, METHODS
    opt = parse_opt(True, [])
    assert opt.distill_norm == "kl" and opt.cwd_weight == 1.0 and opt.mgd_alpha == 2e-5
    # FGFI's lambda: 1.0 for the scale-free kl term, auto for the squared error, as given otherwise
    assert opt.distill_weight is None and fgfi_weight(None, "kl") == 1.0 and fgfi_weight(None, "none") == "auto"
    assert fgfi_weight(0.02, "kl") == 0.02 and fgfi_weight("auto", "kl") == "auto"
    assert set(FALLBACK_WEIGHTS) == set(METHODS) and all(w > 0 for w in FALLBACK_WEIGHTS.values())
    assert fallback_weight("fgfi", "kl") == 1.0 and fallback_weight("fgfi", "none") == FALLBACK_WEIGHTS["fgfi"]


def test_auto_weight_is_the_loss_ratio_of_the_first_iterations(logs):
    aw = AutoWeight(fallback=0.01, ratio=2.0, iters=3)
    det = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.2, 0.1, 0.1]), torch.tensor([0.3, 0.0, 0.0])]
    raw = [torch.tensor(10.0), torch.tensor(20.0), torch.tensor(30.0)]
    assert aw.observe(det[0], raw[0]) is None and aw.observe(det[1], raw[1]) is None
    assert aw.observe(det[2], raw[2]) == pytest.approx(2.0 * 1.3 / 60.0)
    bad = AutoWeight(fallback=0.01, iters=1)
    assert bad.observe(torch.tensor([0.5]), torch.tensor(0.0)) == 0.01
    assert any("auto imitation weight" in m for m in logs)
    with pytest.raises(ValueError):
        AutoWeight(0.01, ratio=0.0)
    assert weight_arg("AUTO") == "auto" and weight_arg("2e-5") == 2e-5
    for bad_value in ("-1", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            weight_arg(bad_value)


# ----------------------------------------------------------------------------------- train_distill.py

@pytest.fixture(scope="module")
def plain_keys(tiny_data, tiny_cfg, tmp_path_factory):
    """The model keys of a plain run's best.pt (no teacher)."""
    out = tmp_path_factory.mktemp("plain")
    opt = train_distill.run(cfg=str(tiny_cfg), data=str(tiny_data), imgsz=64, batch_size=8, epochs=1, workers=0,
                            device="cpu", project=str(out), name="plain", noplots=True, noautoanchor=True)
    return torch.load(Path(opt.save_dir) / "weights" / "best.pt", weights_only=True)["model"].keys()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cwd", "mgd"])
def test_method_run_with_p6_teacher_of_other_nc_resumes_and_leaves_a_plain_student(method, tiny_data, tiny_cfg,
                                                                                   tmp_path, monkeypatch, plain_keys,
                                                                                   logs):
    """A P6 teacher (strides 8..64) with 80 classes: the method imitates the student's three levels; a run
    killed after epoch 0 resumes with the method's modules; the finished checkpoints hold the plain student.
    No mask plot is attempted (these methods have no mask), and the epoch's log line names both losses."""
    teacher = make_teacher(tmp_path / "p6_nc80.pt", base="yolov5s6.yaml", width=0.125, nc=80)
    killed_after_first_epoch(monkeypatch, lambda: kd_run(tiny_data, tiny_cfg, tmp_path, teacher, epochs=2, imgsz=128,
                                                         distill_method=method, noplots=False))
    assert not (tmp_path / "runs" / "kd" / "distill_masks.jpg").exists()
    assert not any("plot_distill_masks" in m for m in logs)
    assert any(m.startswith(f"distill: {method}; mean weighted imitation loss") and "vs detection loss" in m
               for m in logs)
    last = tmp_path / "runs" / "kd" / "weights" / "last.pt"
    saved = torch.load(last, weights_only=True)
    assert saved["distill"]["method"] == method and saved["adapters"]
    cls = ChannelWiseDistillation if method == "cwd" else MaskedGenerativeDistillation
    modules = {k.rsplit(".", 1)[0] for k in saved["adapters"]}  # the parameters' modules
    want = {"0", "1", "2"} if method == "cwd" else {"gen.0.0", "gen.0.2", "gen.1.0", "gen.1.2", "gen.2.0", "gen.2.2"}
    assert want <= modules and all(m.startswith("align.") for m in modules - want)
    opt, loaded = resume_recording_loaded_state(monkeypatch, cls, last)
    assert opt.distill_method == method and loaded.keys() == saved["adapters"].keys()
    assert all(torch.equal(loaded[k], v.float()) for k, v in saved["adapters"].items())
    d = Path(opt.save_dir)
    assert [float(r["train/kd_loss"]) > 0 for r in read_csv(d / "results.csv")] == [True, True]
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(d / "weights" / name)
        assert ckpt["model"].keys() == plain_keys and ckpt["adapters"] is None


@pytest.mark.slow
def test_default_fgfi_term_is_kl_with_lambda_1_and_the_squared_error_gets_auto(tiny_data, tiny_cfg, tmp_path, logs):
    teacher = make_teacher(tmp_path / "teacher.pt")
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, teacher, distill_weight=None, name="kl")
    ckpt = torch.load(Path(opt.save_dir) / "weights" / "last.pt", weights_only=True)
    assert ckpt["opt"]["distill_weight"] == 1.0 and ckpt["distill"]["normalize"] == "kl"
    assert float(read_csv(Path(opt.save_dir) / "results.csv")[-1]["train/kd_loss"]) > 0
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, teacher, distill_weight=None, distill_norm="none",
                 distill_auto_iters=1, name="mse")
    ckpt = torch.load(Path(opt.save_dir) / "weights" / "last.pt", weights_only=True)
    assert ckpt["distill"]["normalize"] == "none" and ckpt["opt"]["distill_weight"] not in (None, 1.0, "auto")
    assert sum("--distill-weight auto set to" in m for m in logs) == 1


@pytest.mark.slow
def test_auto_weight_and_pkd_through_the_trainer_and_resume(tiny_data, tiny_cfg, tmp_path, monkeypatch, logs):
    """--distill-weight auto: set after --distill-auto-iters imitating iterations, recorded in the checkpoint's
    arguments, and kept (not measured again) by --resume; --distill-norm pkd runs alongside."""
    teacher = make_teacher(tmp_path / "teacher.pt")
    killed_after_first_epoch(monkeypatch, lambda: kd_run(tiny_data, tiny_cfg, tmp_path, teacher, epochs=2,
                                                         distill_weight="auto", distill_auto_iters=1,
                                                         distill_norm="pkd"))
    saved = torch.load(tmp_path / "runs" / "kd" / "weights" / "last.pt", weights_only=True)
    lam = saved["opt"]["distill_weight"]
    assert isinstance(lam, float) and lam > 0 and saved["distill"]["weight"] == lam
    assert saved["distill"]["normalize"] == "pkd"
    assert sum("--distill-weight auto set to" in m for m in logs) == 1

    observed = []
    real = AutoWeight.observe
    monkeypatch.setattr(AutoWeight, "observe", lambda self, *a: observed.append(1) or real(self, *a))
    opt = train_distill.run(resume=str(tmp_path / "runs" / "kd" / "weights" / "last.pt"))
    assert opt.distill_weight == lam and not observed
    assert float(read_csv(Path(opt.save_dir) / "results.csv")[-1]["train/kd_loss"]) > 0
    assert any(m.startswith("distill: mask coverage") and f"lambda {lam:.4g}" in m for m in logs)


def test_method_flags_reach_the_terms(tmp_path):
    """The CLI flags set the terms' settings; --distill-target head uses no adapter or align conv."""
    from models.yolo import DetectionModel
    from tests.conftest import tiny_cfg_dict

    path = make_teacher(tmp_path / "t.pt")
    student = DetectionModel(tiny_cfg_dict())
    for argv, check in (
            (["--distill-method", "cwd", "--cwd-tau", "3", "--cwd-weight", "0.7"],
             lambda m: isinstance(m, ChannelWiseDistillation) and (m.tau, m.weight) == (3.0, 0.7)),
            (["--distill-method", "mgd", "--mgd-ratio", "0.5", "--mgd-alpha", "auto"],
             lambda m: isinstance(m, MaskedGenerativeDistillation) and (m.ratio, m.weight) == (0.5, 0.0)),
            (["--distill-norm", "kl"], lambda m: isinstance(m, FeatureImitation) and m.normalize == "kl"),
            (["--distill-method", "mgd", "--distill-target", "head"],
             lambda m: all(isinstance(a, nn.Identity) for a in m.align) and m.weight == 2e-5)):
        opt = train_distill.parse_opt(argv=["--teacher", str(path), "--imgsz", "64", *argv])
        teacher, levels = distill_setup.load_teacher(opt, student, torch.device("cpu"))
        assert check(distill_setup.build_imitation(opt, student, teacher, levels, 4.0)), argv
    with pytest.raises(SystemExit):
        train_distill.parse_opt(argv=["--distill-method", "kd"])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test uses localhost TCP")
def test_ddp_mgd_with_auto_weight(tiny_data, tiny_cfg, tmp_path):
    """torchrun, two ranks: MGD's align and generation modules train inside the DDP wrapper, the auto weight
    is set on both ranks at the same iteration (its sums are all-reduced), the finished checkpoint is the
    plain student."""
    teacher = make_teacher(tmp_path / "t.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "train_distill.py", "--cfg", str(tiny_cfg), "--data", str(tiny_data), "--imgsz", "64", "--batch-size", "8",
           "--epochs", "1", "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs"), "--name", "kd",
           "--noplots", "--noautoanchor", "--teacher", str(teacher), "--distill-warmup", "0",
           "--distill-method", "mgd", "--mgd-alpha", "auto", "--distill-auto-iters", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    set_lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "--mgd-alpha auto set to" in ln]
    assert len(set_lines) == 1  # rank 0 logs; rank 1 would hang in the all_reduce if it did not set it too
    d = tmp_path / "runs" / "kd"
    assert float(read_csv(d / "results.csv")[0]["train/kd_loss"]) > 0
    ckpt = load_checkpoint(d / "weights" / "last.pt")
    assert ckpt["distill"]["method"] == "mgd" and isinstance(ckpt["opt"]["mgd_alpha"], float)
    assert ckpt.get("adapters") is None
