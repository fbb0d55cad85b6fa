"""Imitation terms besides FGFI (CWD, MGD), the PKD normalisation of FGFI and the automatic weight:
values against plain numpy, gradients, and runs of train_distill.py with them (resume, checkpoints, DDP)."""
import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import train_distill
from distill import METHODS
from distill.adapters import build_adapters
from distill.base import AUTO, AutoWeight, weight_arg
from distill.cwd import CWD, CWDParams
from distill.fgfi import FGFI, FGFIParams
from distill.kernels import standardize_channels
from distill.mgd import MGD, STD_WEIGHT, MGDParams
from models.checkpoint import load_checkpoint
from tests.conftest import distill_settings, fgfi_term, killed_after_first_epoch, read_csv
from tests.test_train_distill import kd_run, make_teacher


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
    loss, _ = fgfi_term([s], [t], [m], build_adapters([3], [3], "none"), norm="pkd")
    zs, zt = np_standardize(s.numpy().astype(np.float64)), np_standardize(t.numpy().astype(np.float64))
    b, y, x = np.nonzero(m.numpy())
    want = sum(np.sum((zs[i, :, j, k] - zt[i, :, j, k]) ** 2) for i, j, k in zip(b, y, x)) / (2 * len(b)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # a teacher 50x larger and shifted gives the same term; the plain term grows with the scale
    big = [t * 50 - 7]
    assert fgfi_term([s], big, [m], build_adapters([3], [3], "none"), "pkd")[0].item() == pytest.approx(want, rel=1e-4)
    assert fgfi_term([s], big, [m], build_adapters([3], [3], "none"))[0].item() > 100 * want


def test_pkd_gradients_reach_student_and_adapter_not_teacher():
    student, teacher, s, t = _maps()
    adapters = build_adapters([4, 8], [6, 12], "1x1")
    masks = [torch.rand(2, 8, 8) > 0.5, torch.rand(2, 4, 4) > 0.5]
    loss, _ = fgfi_term(s, t, masks, adapters, norm="pkd")
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
    loss, per_level = fgfi_term([s], [t], [m], build_adapters([2], [2], "none"), norm="kl")
    sd, td = s.double().numpy(), t.double().numpy()
    want = 0.0
    for i in (0, 2):
        cells = np.nonzero(m[i].numpy().ravel())[0]
        want += np_cwd(sd[i:i + 1].reshape(1, 2, -1)[:, :, cells], td[i:i + 1].reshape(1, 2, -1)[:, :, cells], 1.0)
    want /= 2  # np_cwd divides by C * 1 per image; two images count
    assert loss.item() == pytest.approx(want, rel=1e-5) and per_level.tolist() == pytest.approx([want], rel=1e-5)
    assert loss.item() != pytest.approx(np_cwd(sd[[0, 2]], td[[0, 2]], 1.0), rel=1e-3)
    # a constant offset of the teacher changes nothing; no masked cell anywhere: 0, still connected
    assert fgfi_term([s], [t + 4], [m], build_adapters([2], [2], "none"), "kl")[0].item() == pytest.approx(
        want, rel=1e-4)
    leaf = s.clone().requires_grad_()
    zero, _ = fgfi_term([leaf], [t], [torch.zeros_like(m)], build_adapters([2], [2], "none"), "kl")
    zero.backward()
    assert zero.item() == 0 and leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_kl_norm_gradients_only_at_masked_cells_and_never_the_teacher():
    student, teacher, s, t = _maps()
    adapters = build_adapters([4, 8], [6, 12], "1x1")
    masks = [torch.rand(2, 8, 8) > 0.5, torch.rand(2, 4, 4) > 0.5]
    masks[1][1] = False  # image 1 of level 1 has no masked cell
    leaves = [x.detach().requires_grad_() for x in s]
    loss, _ = fgfi_term(leaves, t, masks, adapters, norm="kl")
    loss.backward()
    for leaf, m in zip(leaves, masks):
        g = leaf.grad.abs().sum(1)  # [N, H, W]
        assert torch.isfinite(leaf.grad).all() and (g[~m] == 0).all() and (g[m] > 0).any()
    assert all(a.weight.grad.abs().sum() > 0 for a in adapters)
    assert all(m.weight.grad is None for m in teacher)
    fgfi_term(s, t, masks, adapters, norm="kl")[0].backward()
    assert all(m.weight.grad.abs().sum() > 0 for m in student)


# ------------------------------------------------------------------------------------------------- CWD

def test_cwd_value_by_hand():
    """Equal channels and no adapter (target head), --distill-norm none: the term is the numpy formula per level,
    summed, times the weight."""
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 2, 1, 3, generator=g), torch.randn(2, 2, 2, 2, generator=g)]
    t = [torch.randn(2, 2, 1, 3, generator=g) * 2, torch.randn(2, 2, 2, 2, generator=g)]
    tau, weight = 2.0, 0.3
    cwd = CWD(distill_settings("cwd", weight=weight, target="head", tau=tau, norm="none"), [2, 2], [2, 2])
    assert all(isinstance(a, nn.Identity) for a in cwd.adapters) and not list(cwd.parameters())
    r = cwd(s, t, iteration=0)
    want = [np_cwd(a.double().numpy(), b.double().numpy(), tau) for a, b in zip(s, t)]
    assert r.per_level.tolist() == pytest.approx(want, rel=1e-5)
    assert r.raw.item() == pytest.approx(sum(want), rel=1e-5)
    assert r.loss.item() == pytest.approx(weight * sum(want), rel=1e-5)
    same = cwd(t, t, iteration=0).loss
    assert abs(same.item()) < 1e-6  # identical distributions: no divergence
    shifted = cwd([x + 5.0 for x in t], t, iteration=0).loss
    assert abs(shifted.item()) < 1e-5  # softmax over cells ignores a constant offset of a channel


def test_cwd_std_standardises_both_maps_per_channel_over_the_batch_before_the_softmax():
    """norm std: the numpy formula on both maps standardised per channel over images and cells
    (not per image, and not the raw maps); so the term ignores a per-channel scale of the teacher's features,
    which the raw softmax does not."""
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 2, 2, 3, generator=g) * 3 + 1]
    t = [torch.randn(3, 2, 2, 3, generator=g) * torch.tensor([0.2, 5.0]).view(1, 2, 1, 1)]
    assert CWDParams().norm == "none"  # the raw maps pay more on the standard recipe
    cwd = CWD(distill_settings("cwd", weight=1.0, target="head", norm="std"), [2], [2])
    got = cwd(s, t, iteration=0).raw.item()
    sd, td = s[0].double().numpy(), t[0].double().numpy()
    assert got == pytest.approx(np_cwd(np_standardize(sd), np_standardize(td), 1.0), rel=1e-5)
    per_image = np.concatenate([np_standardize(x[None]) for x in td])  # a plausible alternative
    assert got != pytest.approx(np_cwd(np_standardize(sd), per_image, 1.0), rel=1e-3)
    assert got != pytest.approx(np_cwd(sd, td, 1.0), rel=1e-3)
    scale = torch.tensor([7.0, 0.5]).view(1, 2, 1, 1)  # the teacher's channels on other scales
    assert cwd(s, [t[0] * scale + 2.0], iteration=0).raw.item() == pytest.approx(got, rel=1e-3)  # up to eps
    raw = CWD(distill_settings("cwd", weight=1.0, target="head", norm="none"), [2], [2])
    assert raw(s, [t[0] * scale], iteration=0).raw.item() != pytest.approx(raw(s, t, iteration=0).raw.item(),
                                                                            rel=1e-2)


def test_cwd_gradients_reach_student_and_adapters_not_teacher():
    student, teacher, s, t = _maps()
    cwd = CWD(distill_settings("cwd", weight=1.0, tau=1.0, adapter="1x1"), [4, 8], [6, 12])
    r = cwd(s, t, iteration=0)
    r.loss.backward()
    assert r.loss.item() > 0 and r.active and r.masks == []
    assert all(m.weight.grad.abs().sum() > 0 for m in student)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cwd.parameters())
    assert all(m.weight.grad is None for m in teacher)
    assert set(cwd.state_dict()) == set(build_adapters([4, 8], [6, 12]).state_dict())  # keys '0.*', '1.*'


# ------------------------------------------------------------------------------------------------- MGD

def test_mgd_value_by_hand(monkeypatch):
    """1 student channel aligned to 2 teacher channels by a 1x1 conv, a fixed cell mask, hand-set generation
    weights: the term is the numpy computation (align, zero the cells, conv3x3, ReLU, conv3x3, squared error
    summed and divided by the images), times alpha; with norm std, the same on both maps standardised per
    channel over the batch and the cells, and the squared error's mean over every element instead."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 1, 3, 4, generator=g) * 2 + 1, torch.randn(2, 2, 3, 4, generator=g) * 3
    alpha = 0.5
    for norm in ("none", "std"):
        mgd = MGD(distill_settings("mgd", weight=alpha, ratio=0.65, norm=norm), [1], [2])
        _check_mgd_by_hand(mgd, s, t, alpha, norm, g, monkeypatch)


def _check_mgd_by_hand(mgd, s, t, alpha, norm, g, monkeypatch):
    with torch.no_grad():
        for p in mgd.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    keep = (torch.rand(2, 1, 3, 4, generator=g) > 0.5).float()
    monkeypatch.setattr(mgd, "keep_mask", lambda x: keep)
    r = mgd([s], [t], iteration=0)

    P = {k: v.double().numpy() for k, v in mgd.state_dict().items()}
    sd, td = s.double().numpy(), t.double().numpy()
    if norm == "std":
        sd, td = np_standardize(sd), np_standardize(td)
    total = 0.0
    for i in range(2):
        a = P["align.0.weight"][:, 0, 0, 0][:, None, None] * sd[i, 0] + P["align.0.bias"][:, None, None]
        a = a * keep[i].double().numpy()  # [1, H, W] mask over both channels
        h = np.maximum(np_conv3x3(a, P["gen.0.0.weight"], P["gen.0.0.bias"]), 0)
        out = np_conv3x3(h, P["gen.0.2.weight"], P["gen.0.2.bias"])
        total += np.sum((out - td[i]) ** 2)
    want = total / (td.size if norm == "std" else 2)  # std: mean over 2 x 2 x 3 x 4 elements; none: / images
    assert r.raw.item() == pytest.approx(want, rel=1e-5), norm
    assert r.loss.item() == pytest.approx(alpha * want, rel=1e-5)


def test_mgd_mask_zeroes_the_given_share_of_cells_per_image():
    mgd = MGD(distill_settings("mgd", ratio=0.65), [4], [4])
    assert isinstance(mgd.align[0], nn.Identity)  # equal channels: no align conv
    torch.manual_seed(0)
    keep = mgd.keep_mask(torch.zeros(4, 4, 50, 50))
    assert keep.shape == (4, 1, 50, 50) and set(keep.unique().tolist()) == {0.0, 1.0}
    zeroed = 1 - keep.mean((1, 2, 3))
    assert ((zeroed - 0.65).abs() < 0.05).all()  # 2500 cells per image
    assert not torch.equal(keep[0], keep[1])  # one mask per image
    assert MGD(distill_settings("mgd", ratio=0.0), [4], [4]).keep_mask(torch.zeros(1, 4, 5, 5)).all()


def test_mgd_gradients_reach_student_align_and_generator_not_teacher():
    student, teacher, s, t = _maps()
    torch.manual_seed(0)
    mgd = MGD(distill_settings("mgd", weight=1.0), [4, 8], [6, 12])
    loss = mgd(s, t, iteration=0).loss
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
    cls = METHODS[method]
    params = {"adapter": "1x1"} if method == "cwd" else {}
    term = cls(distill_settings(method, weight=0.5, warmup=2, **params), [4, 8], [6, 12])
    r = term(s, t, iteration=1)
    zero = r.loss
    assert zero.item() == 0.0 and zero.requires_grad and not r.active and r.per_level.shape == (2,)
    zero.backward(retain_graph=True)
    assert all(p.grad is not None for p in term.parameters())  # DDP needs every parameter in the graph

    torch.manual_seed(5)
    ref = term(s, t, iteration=2).loss
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = term([x.bfloat16() for x in s], t, iteration=2).loss
    assert amp.dtype == torch.float32 and amp.item() == pytest.approx(ref.item(), rel=0.05)  # bf16 inputs only

    with pytest.raises(ValueError, match="shapes differ"):
        term([s[0][:, :, :4], s[1]], t, iteration=2)
    with pytest.raises(ValueError, match="levels"):  # every level is imitated: the channels pair level by level
        cls(distill_settings(method), [4], [6, 12])
    with pytest.raises(ValueError, match="levels"):
        term(s[:1], t[:1], iteration=2)
    with pytest.raises(ValueError, match="--cwd-tau" if method == "cwd" else "--mgd-ratio"):
        distill_settings(method, **({"tau": 0.0} if method == "cwd" else {"ratio": 1.0}))
    # the registry of --distill-method: these three, and no other name
    assert {"fgfi", "cwd", "mgd"} <= set(METHODS) and "kd" not in METHODS
    assert all(METHODS[m.name] is m for m in (FGFI, CWD, MGD))


def test_fgfi_weight_default_follows_the_norm_with_a_numeric_fallback_for_every_method():
    """FGFI's default weight is 1.0 for the kl term and set from the losses for the squared error; an 'auto'
    weight of any method that gets no ratio falls back to a number, never to the flag's own default ('auto')."""
    from types import SimpleNamespace

    from distill.settings import resolve
    from train_distill import parse_opt
    opt = parse_opt(True, [])
    assert opt.distill_norm is None and opt.distill_weight is None  # not given: the method's defaults apply
    assert FGFIParams().norm == "kl"
    assert CWDParams().norm == "none" and MGDParams().norm == "std"
    assert CWD.default_weight(CWDParams()) == 1.0 and CWD.default_weight(CWDParams(norm="std")) == 0.15
    assert MGD.default_weight(MGDParams()) == STD_WEIGHT and MGD.default_weight(MGDParams(norm="none")) == 2e-5
    # FGFI's lambda: 1.0 for the scale-free kl term, auto for the squared error, as given otherwise
    assert FGFI.default_weight(FGFIParams()) == 1.0
    assert all(FGFI.default_weight(FGFIParams(norm=n)) == AUTO for n in ("none", "channel", "pkd"))
    teacher = SimpleNamespace(resolve_target=lambda target: target)  # resolve reads no more of it here

    def weight(*argv):
        return resolve(parse_opt(True, ["--teacher", "t.pt", "--distill-warmup", "0", *argv]), teacher, 10, 1).weight

    assert weight() == 1.0 and weight("--distill-norm", "none") == AUTO
    assert weight("--distill-weight", "0.02") == 0.02 and weight("--distill-weight", "auto") == AUTO
    assert weight("--distill-weight", "0.02", "--distill-norm", "none") == 0.02
    assert all(m.fallback_weight(m.Params()) > 0 for m in METHODS.values())
    assert FGFI.fallback_weight(FGFIParams()) == 1.0 and FGFI.fallback_weight(FGFIParams(norm="none")) == 0.01
    auto = FGFI(distill_settings(weight=AUTO, norm="none"), [4], [6])
    assert auto.weight == 0.0 and auto.auto.fallback == 0.01  # weighted 0 while measuring; a number to fall back on


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

@pytest.mark.slow
def test_default_fgfi_term_is_kl_with_lambda_1_and_the_squared_error_gets_auto(tiny_data, tiny_cfg, tmp_path, logs):
    teacher = make_teacher(tmp_path / "teacher.pt")
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, teacher, distill_weight=None, name="kl")
    ckpt = torch.load(Path(opt.save_dir) / "weights" / "last.pt", weights_only=True)
    assert ckpt["opt"]["distill_weight"] == 1.0 and ckpt["distill"]["weight"] == 1.0
    assert ckpt["distill"]["norm"] == "kl" and ckpt["opt"]["distill_norm"] == "kl"
    assert float(read_csv(Path(opt.save_dir) / "results.csv")[-1]["train/kd_loss"]) > 0
    opt = kd_run(tiny_data, tiny_cfg, tmp_path, teacher, distill_weight=None, distill_norm="none",
                 distill_auto_iters=1, name="mse")
    ckpt = torch.load(Path(opt.save_dir) / "weights" / "last.pt", weights_only=True)
    assert ckpt["distill"]["norm"] == "none" and ckpt["opt"]["distill_weight"] == "auto"  # the arguments as given
    lam = ckpt["distill"]["weight"]  # the measured weight
    assert isinstance(lam, float) and lam not in (0.0, 1.0)
    assert sum("distill: --distill-weight auto set to" in m for m in logs) == 1


@pytest.mark.slow
def test_auto_weight_and_pkd_through_the_trainer_and_resume(tiny_data, tiny_cfg, tmp_path, monkeypatch, logs):
    """--distill-weight auto: set after --distill-auto-iters imitating iterations, recorded in the checkpoint's
    distill record (its arguments keep 'auto'), and kept (not measured again) by --resume; --distill-norm pkd runs
    alongside."""
    teacher = make_teacher(tmp_path / "teacher.pt")
    killed_after_first_epoch(monkeypatch, lambda: kd_run(tiny_data, tiny_cfg, tmp_path, teacher, epochs=2,
                                                         distill_weight="auto", distill_auto_iters=1,
                                                         distill_norm="pkd"))
    saved = torch.load(tmp_path / "runs" / "kd" / "weights" / "last.pt", weights_only=True)
    lam = saved["distill"]["weight"]
    assert isinstance(lam, float) and lam > 0 and saved["opt"]["distill_weight"] == "auto"
    assert saved["distill"]["norm"] == "pkd"
    assert sum("distill: --distill-weight auto set to" in m for m in logs) == 1

    observed = []
    real = AutoWeight.observe
    monkeypatch.setattr(AutoWeight, "observe", lambda self, *a: observed.append(1) or real(self, *a))
    opt = train_distill.run(resume=str(tmp_path / "runs" / "kd" / "weights" / "last.pt"))
    assert opt.distill_weight == lam and not observed
    assert sum("distill: --distill-weight auto set to" in m for m in logs) == 1
    assert load_checkpoint(Path(opt.save_dir) / "weights" / "last.pt")["distill"]["weight"] == lam
    assert float(read_csv(Path(opt.save_dir) / "results.csv")[-1]["train/kd_loss"]) > 0
    assert any(m.startswith("distill: mask coverage") and f"lambda {lam:.4g}" in m for m in logs)


def test_method_flags_reach_the_terms(tmp_path):
    """The CLI flags set the terms' settings; --distill-target head uses no adapter or align conv; a flag of
    another method is refused."""
    from distill.settings import build_method, resolve
    from distill.teacher import load_teacher
    from models.yolo import DetectionModel
    from tests.conftest import tiny_cfg_dict

    path = make_teacher(tmp_path / "t.pt")
    student = DetectionModel(tiny_cfg_dict())

    def method(argv):
        opt = train_distill.parse_opt(argv=["--teacher", str(path), "--imgsz", "64", *argv])
        teacher = load_teacher(opt.teacher, student, torch.device("cpu"), 64)
        return build_method(resolve(opt, teacher, nb=10, epochs=1), student, teacher, 4.0)

    for argv, check in (
            (["--distill-method", "cwd", "--cwd-tau", "3", "--cwd-weight", "0.7"],
             lambda m: isinstance(m, CWD) and (m.params.tau, m.weight) == (3.0, 0.7)),
            (["--distill-method", "mgd", "--mgd-ratio", "0.5", "--mgd-alpha", "auto"],
             lambda m: isinstance(m, MGD) and (m.params.ratio, m.weight) == (0.5, 0.0) and m.auto is not None),
            (["--distill-norm", "kl"], lambda m: isinstance(m, FGFI) and m.params.norm == "kl"),
            (["--distill-method", "mgd", "--distill-target", "head"],
             lambda m: all(isinstance(a, nn.Identity) for a in m.align) and m.weight == STD_WEIGHT),
            (["--distill-method", "mgd", "--distill-norm", "none"],
             lambda m: (m.params.norm, m.weight) == ("none", 2e-5)),
            (["--distill-method", "cwd"], lambda m: (m.params.norm, m.weight) == ("none", 1.0)),
            (["--distill-method", "cwd", "--distill-norm", "std"],
             lambda m: (m.params.norm, m.weight) == ("std", 0.15))):
        assert check(method(argv)), argv
    with pytest.raises(ValueError, match="--cwd-tau"):
        method(["--cwd-tau", "2"])  # fgfi (the default method) has no temperature
    # --distill-norm is one flag for three methods, each with its own values
    with pytest.raises(ValueError, match="--distill-method cwd: --distill-norm must be one of std, none, got 'kl'"):
        method(["--distill-method", "cwd", "--distill-norm", "kl"])
    with pytest.raises(ValueError, match="fgfi: bad .* norm 'std'"):
        method(["--distill-norm", "std"])
    from distill.settings import add_args
    usage = " ".join(add_args(argparse.ArgumentParser()).format_help().split())
    assert "(used by fgfi, cwd, mgd; default fgfi kl, cwd none, mgd std)" in usage
    with pytest.raises(SystemExit):
        train_distill.parse_opt(argv=["--distill-method", "kd"])


# ------------------------------------------------------------------------------------------------- SL2

def test_sl2_value_by_hand_weighted_by_the_teachers_confidence(tmp_path):
    """Per cell: squared error of the projected student summed over channels, weighted by max over anchors of
    sigmoid(obj) x max sigmoid(cls) of the teacher's own head at that cell; / (sum of weights x channels)."""
    from distill.settings import build_method, resolve
    from distill.sl2 import SL2
    from distill.teacher import load_teacher
    from models.yolo import DetectionModel
    from tests.conftest import tiny_cfg_dict

    student = DetectionModel(tiny_cfg_dict())
    teacher = load_teacher(make_teacher(tmp_path / "t.pt", nc=3), student, torch.device("cpu"), 64)
    opt = train_distill.parse_opt(argv=["--teacher", str(tmp_path / "t.pt"), "--distill-method", "sl2",
                                        "--distill-warmup", "0"])
    sl2 = build_method(resolve(opt, teacher, nb=10, epochs=1), student, teacher)
    assert isinstance(sl2, SL2) and sl2.weight == 0.25
    assert not any(k.startswith("_") for k in sl2.state_dict())  # the teacher's head is not part of it
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 64, 64, generator=g)
    t_maps = teacher.maps(imgs, "neck")
    s_maps = [torch.randn(2, c, *t.shape[2:], generator=g) for c, t in zip(teacher.channels(student, "neck")[0],
                                                                            t_maps)]
    r = sl2(s_maps, t_maps, iteration=0)
    det = teacher.model.model[-1]
    want = []
    for k, (s, t) in enumerate(zip(s_maps, t_maps)):
        raw = det.m[teacher.levels[k]](t).detach().double().numpy().reshape(2, det.na, det.no, *t.shape[2:])
        p = 1 / (1 + np.exp(-raw))
        w = (p[:, :, 4] * p[:, :, 5:].max(2)).max(1)  # [2, h, w]
        a = sl2.adapters[k](s).detach().double().numpy()
        se = ((a - t.double().numpy()) ** 2).sum(1)
        want.append((w * se).sum() / (w.sum() * t.shape[1]))
    assert r.per_level.tolist() == pytest.approx(want, rel=1e-4)
    assert r.loss.item() == pytest.approx(0.25 * sum(want), rel=1e-4)
