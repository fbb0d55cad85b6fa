"""What does distillation add to a training step, and what share of a step are the imitation masks?

One batch of `--batch` random images at `--imgsz` with `--boxes` random boxes per image (sizes skewed to
small, random classes of `--nc`), used by every row; untrained weights (speed does not depend on them).
The steps are the trainer's own (distill's load_teacher, resolve, build_method, StudentWithImitation;
train_distill's build_optimizer and Stepper with AMP scaling, clipping, the optimiser step and the EMA
update; channels-last on the CPU) with the trainer's defaults and imitation warm-up 0:

- plain step: student forward + ComputeLoss + backward + clipping + optimiser step + EMA update;
- distilled step: the plain step + the teacher's forward + the imitation term (defaults: neck maps,
  1x1 adapters, fine masks), and one row per `--variants` (3x3 adapters, head imitation, pkd norm, the cwd
  and mgd methods);
- teacher forward alone (frozen, BN-fused, no_grad);
- plain step of `--reference` (yolov5s): the step whose share the masks are given as;
- parts of the distilled step, each on fixed inputs: the imitation term alone (masks, adapters, loss,
  backward to the student's maps), ComputeLoss forward + backward on the student's predictions, and
  build_targets alone;
- the imitation masks (distill.masks.imitation_masks, all three levels, kinds 'fine' and 'gt')
  against the per-image, per-box loop of distill/mask_reference.py.

The steps run round-robin (`--repeats` rounds after a warm-up), the parts and masks likewise with more
rounds; medians. Checks (exit 1 if one fails): the dense 'fine' masks agree with the loop outside the
band where an IoU is within 1e-6 of the threshold, and the masks cost at most 1% of the reference step.
The budget distilled <= plain + teacher + 0.1 plain and the masks' speed-up over the loop (>= 20x) are
shown, not enforced (a shared machine's noise can break them on one run).

    OMP_NUM_THREADS=1 python -m benchmarks.step_speed --results step_speed     # batch 16 at 640, ~4 min
    python -m benchmarks.step_speed --imgsz 160 --batch 4 --repeats 1           # smoke run
    python -m benchmarks.step_speed --variants 3x3 head pkd cwd mgd             # + the other imitation set-ups
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

import train_distill
from benchmarks.common import add_common_args, measure, quiet_log, report, start
from distill.mask_reference import ANCHORS, STRIDES, imitation_mask_loop
from models.checkpoint import save_checkpoint
from models.yolo import DetectionModel
from distill.settings import build_method, resolve
from distill.step import Distillation, StudentWithImitation
from distill.teacher import load_teacher
from distill.masks import imitation_masks, mask_coverage
from utils.files import find_file, yaml_load
from utils.loss import ComputeLoss, scale_loss_gains
from utils.torch_utils import ModelEMA, training_memory_format

ROOT = Path(__file__).resolve().parents[1]

TOL = 1e-6  # IoU band around the mask threshold where float32 and the float64 loop may disagree
VARIANTS = {"3x3": ["--distill-adapter", "3x3"], "head": ["--distill-target", "head"],
            "mse": ["--distill-norm", "none"], "pkd": ["--distill-norm", "pkd"],
            "cwd": ["--distill-method", "cwd"], "mgd": ["--distill-method", "mgd"]}


def random_targets(batch, boxes, seed, nc=1, vary=False):
    """[n, 6] targets (image, class, x, y, w, h normalised): `boxes` per image, or U{0..boxes} with vary;
    sizes skewed to small, as in COCO."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        n = int(torch.randint(0, boxes + 1, (1,), generator=g)) if vary else boxes
        cls = torch.randint(0, nc, (n, 1), generator=g).float()
        xy = torch.rand(n, 2, generator=g)
        wh = 0.01 + 0.7 * torch.rand(n, 2, generator=g) ** 2
        rows.append(torch.cat((torch.full((n, 1), float(i)), cls, xy, wh), 1))
    return torch.cat(rows)


class StepBench:
    """The benchmark batch and the training steps, built as train_distill builds them, on `device`.

    The teacher is an untrained `teacher_cfg` with the student's nc and default anchors (so head imitation
    works), saved to `tmp` and loaded by load_teacher (fp16 on CUDA). The optimisers run with lr 0: every
    timed call does the same arithmetic on the same weights. amp: autocast and a GradScaler, as the
    trainer runs on CUDA.
    """

    def __init__(self, student_cfg, teacher_cfg, nc, imgsz, batch, boxes, tmp, device=torch.device("cpu"),
                 amp=False, seed=0):
        self.device, self.imgsz, self.amp = device, imgsz, amp and device.type == "cuda"
        self.mem_format = training_memory_format(device)
        g = torch.Generator().manual_seed(seed)
        self.imgs = torch.rand(batch, 3, imgsz, imgsz, generator=g).to(device, memory_format=self.mem_format)
        self.targets = random_targets(batch, boxes, seed, nc).to(device)
        self.raw_hyp = yaml_load(find_file("hyp.scratch-low.yaml"))
        torch.manual_seed(seed)
        self.teacher_pt = None  # no teacher_cfg: plain steps only
        if teacher_cfg:
            self.teacher_pt = save_checkpoint(Path(tmp) / f"teacher_{Path(teacher_cfg).stem}.pt",
                                              DetectionModel(teacher_cfg, nc=nc))
        self.student, self.compute_loss = self.model(student_cfg, nc)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def model(self, cfg, nc):
        """(model in training mode with the trainer's loss gains, its ComputeLoss)."""
        model = DetectionModel(cfg, nc=nc).to(self.device, memory_format=self.mem_format).train()
        hyp = scale_loss_gains(self.raw_hyp, nl=model.model[-1].nl, nc=nc, imgsz=self.imgsz)
        hyp["label_smoothing"] = 0.0
        model.nc, model.hyp = nc, hyp
        return model, ComputeLoss(model)

    def distill(self, *flags):
        """(settings, teacher, method) for train_distill's defaults plus `flags`, warm-up 0."""
        opt = train_distill.parse_opt(argv=["--teacher", str(self.teacher_pt), "--imgsz", str(self.imgsz),
                                            "--distill-warmup", "0", *flags])
        teacher = load_teacher(opt.teacher, self.student, self.device, self.imgsz)
        settings = resolve(opt, teacher, nb=1000, epochs=1)
        return settings, teacher, build_method(settings, self.student, teacher, self.raw_hyp["anchor_t"]).to(self.device)

    def step(self, model=None, compute_loss=None, setup=None, seen=None):
        """One training step as a callable, as train_one_epoch runs it: the teacher's maps, the student with its
        imitation term, ComputeLoss, and the trainer's Stepper (AMP scaling, clipping, optimiser step, EMA; its
        warm-up ramp at an iteration past the imitation warm-up). Plain (setup None) or distilled with setup =
        distill(...). seen: a dict that receives the last imitation Result (read after timing)."""
        model, compute_loss = model or self.student, compute_loss or self.compute_loss
        settings, teacher, method = setup or (None, None, None)
        distill = Distillation(settings, teacher, method)
        module = StudentWithImitation(model, method, settings.target if settings else "neck")
        batch = str(self.imgs.shape[0])
        opt = train_distill.parse_opt(argv=["--batch-size", batch, "--nbs", batch])  # one optimiser step per call
        hyp = {**model.hyp, **{k: self.raw_hyp[k] for k in ("lr0", "lrf", "momentum", "weight_decay")}}
        optimizer, _, lf = train_distill.build_optimizer(opt, model, method, hyp)
        stepper = train_distill.Stepper(opt, optimizer, lf, hyp, module, model, ModelEMA(model), 1000, self.amp)
        imgs, targets, calls = self.imgs, self.targets, [0]

        def run():
            ni = calls[0] = calls[0] + 1
            stepper.warmup(ni, 0)
            with torch.autocast(device_type=self.device.type, enabled=self.amp):
                pred, kd = module(imgs, targets, distill.teacher_maps(imgs), ni)
                loss, items = compute_loss(pred, targets)
                if kd is not None:
                    assert kd.active, "the imitation term is still in warm-up"
                    loss = loss + kd.loss.float() * imgs.shape[0]
                    if seen is not None:
                        seen.update(kd=kd)
            distill.observe(items, kd)
            stepper.backward(loss, ni)
        return run

    def teacher_forward(self, setup):
        settings, teacher, _ = setup

        def run():
            with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=self.amp):
                teacher.maps(self.imgs, settings.target)
        return run

    def parts(self, setup):
        """({name: callable} of the distilled step's parts on fixed inputs, mask coverage % per level)."""
        settings, teacher, imitation = setup
        det, strides = self.student.model[-1], self.student.stride.tolist()
        anchors_px = [det.anchors[i] * s for i, s in enumerate(strides)]
        t_feats = teacher.maps(self.imgs, settings.target)
        with torch.no_grad():
            pred, s_feats = self.student(self.imgs, return_features=True)
        s_leaf = [f.detach().requires_grad_() for f in s_feats]
        p_leaf = [p.detach().requires_grad_() for p in pred]
        coverage = mask_coverage(imitation(s_leaf, t_feats, self.targets, anchors_px, strides, 0).masks)

        def imitation_alone():
            imitation.zero_grad(set_to_none=True)
            imitation(s_leaf, t_feats, self.targets, anchors_px, strides, 0).loss.backward()

        def loss_fwd_bwd():
            self.compute_loss(p_leaf, self.targets)[0].backward()

        def build_targets():
            with torch.no_grad():
                self.compute_loss.build_targets(p_leaf, self.targets)
        return {"imitation": imitation_alone, "loss": loss_fwd_bwd, "build_targets": build_targets}, coverage


def mask_fns(targets, batch, imgsz):
    """{name: callable}: the dense masks ('fine', 'gt') and the per-box loop ('fine'), all three levels."""
    hws = [(imgsz // s, imgsz // s) for s in STRIDES]
    return {"loop": lambda: [imitation_mask_loop(targets, a, s, hw, batch) for a, s, hw in zip(ANCHORS, STRIDES, hws)],
            "fine": lambda: imitation_masks(targets, ANCHORS, STRIDES, hws, batch),
            "gt": lambda: imitation_masks(targets, ANCHORS, STRIDES, hws, batch, kind="gt")}


def mask_disagreement(targets, batch, imgsz):
    """(cells where the dense 'fine' masks differ from the float64 loop outside the tolerance band,
    cells differing inside it, cells in the band)."""
    hws = [(imgsz // s, imgsz // s) for s in STRIDES]
    outside = inside = band = 0
    for m, a, s, hw in zip(imitation_masks(targets, ANCHORS, STRIDES, hws, batch), ANCHORS, STRIDES, hws):
        ref, doubt = imitation_mask_loop(targets.double(), a, s, hw, batch, tol=TOL)
        outside += int(((m != ref) & ~doubt).sum())
        inside += int(((m != ref) & doubt).sum())
        band += int(doubt.sum())
    return outside, inside, band


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="yolov5n.yaml")
    p.add_argument("--teacher", default="yolov5s.yaml", help="teacher model yaml (untrained)")
    p.add_argument("--reference", default="yolov5s.yaml", help="model whose plain step the masks are a share of")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--boxes", type=int, default=20, help="boxes per image")
    p.add_argument("--nc", type=int, default=80)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of the whole steps (medians)")
    p.add_argument("--part-repeats", type=int, default=10, help="timed rounds of the parts and the masks")
    p.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS), help="more distilled steps")
    opt = add_common_args(p).parse_args(argv)
    start(opt)

    with quiet_log(), tempfile.TemporaryDirectory(prefix="step_speed_") as tmp:
        bench = StepBench(opt.student, opt.teacher, opt.nc, opt.imgsz, opt.batch, opt.boxes, tmp)
        default = bench.distill()
        ref_model, ref_loss = bench.model(opt.reference, opt.nc)
        steps = {"plain": bench.step(), "distilled": bench.step(setup=default),
                 "teacher": bench.teacher_forward(default),
                 **{v: bench.step(setup=bench.distill(*VARIANTS[v])) for v in opt.variants},
                 "reference": bench.step(ref_model, ref_loss)}
        t = measure(steps, opt.repeats)
        parts, coverage = bench.parts(default)
        t.update(measure(parts, opt.part_repeats))
    targets = bench.targets
    outside, inside, band = mask_disagreement(targets, opt.batch, opt.imgsz)
    t.update(measure(mask_fns(targets, opt.batch, opt.imgsz), opt.part_repeats))

    plain, ref = t["plain"].median, t["reference"].median
    student, teacher, reference = (Path(x).stem for x in (opt.student, opt.teacher, opt.reference))

    def budget(name):
        limit = plain + t["teacher"].median + 0.1 * plain
        ok = t[name].median <= limit
        return f"<= plain + teacher + 0.1 plain ({limit:,.0f} ms): {'holds' if ok else 'FAILS'}"

    mask_share = 100 * t["fine"].median / ref
    speedup = t["loop"].median / t["fine"].median
    rows = [("plain step", student, "fwd + ComputeLoss + bwd + clip + SGD step + EMA (Stepper)", "plain", ""),
            ("distilled step", f"{student} + {teacher} teacher", "plain + teacher fwd + imitation (neck, 1x1)",
             "distilled", budget("distilled")),
            ("teacher forward", teacher, "frozen, BN-fused, no_grad", "teacher", ""),
            *[(f"distilled step, {v}", f"{student} + {teacher} teacher", " ".join(VARIANTS[v]), v, budget(v))
              for v in opt.variants],
            ("plain step", reference, "the masks' reference step", "reference", ""),
            ("imitation term alone", student, "masks + 1x1 adapters + loss, fwd + bwd; coverage "
             + " / ".join(f"{c:.0f}%" for c in coverage) + " (P3/P4/P5)", "imitation", ""),
            ("ComputeLoss fwd + bwd", student, "on the student's predictions", "loss", ""),
            ("build_targets", student, "matching targets to anchors and cells", "build_targets", ""),
            ("imitation masks, fine (the default)", "3 levels", "distill/masks.py, dense", "fine",
             f"<= 1% of the {reference} step: {'holds' if mask_share <= 1 else 'FAILS'}"),
            ("imitation masks, gt", "3 levels", "distill/masks.py, dense", "gt", ""),
            ("imitation masks, per-box loop", "3 levels", "distill/mask_reference.py, fine", "loop",
             f"{speedup:.1f}x the dense fine masks' time (>= 20x: {'holds' if speedup >= 20 else 'FAILS'})")]
    header = ["what", "model", "detail", "median ms", "CPU ms", "/ plain step", "/ plain step, CPU",
              f"% of {reference} step", "check"]
    plain_cpu = t["plain"].cpu_median
    table = [[what, model, detail, round(t[k].median, 2), round(t[k].cpu_median, 2), round(t[k].median / plain, 5),
              round(t[k].cpu_median / plain_cpu, 5), round(100 * t[k].median / ref, 5), check]
             for what, model, detail, k, check in rows]
    notes = [f"Batch {opt.batch} at {opt.imgsz}, {len(targets)} boxes ({opt.boxes} per image), nc {opt.nc}; "
             f"whole steps: median of {opt.repeats} round-robin rounds after a warm-up; parts and masks: median of "
             f"{opt.part_repeats} rounds. CPU ms counts all threads of the process.",
             f"Dense fine masks vs the per-box loop: {outside} cells differ outside the {TOL:g} band, {inside} "
             f"inside it ({band} cells in the band)."]
    report(f"Training step speed: {student} student, {teacher} teacher", header, table, notes, opt.results)
    failed = outside > 0 or mask_share > 1
    if failed:
        print("FAILED: " + ("masks differ from the loop outside the band; " if outside else "")
              + ("masks above 1% of the reference step" if mask_share > 1 else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
