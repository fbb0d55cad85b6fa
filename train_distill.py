"""Train a YOLOv5 detector; with --teacher, distil a frozen teacher into it by Fine-grained Feature Imitation.

Plain training and distillation are one code path: without --teacher the imitation term is absent and
this is ordinary YOLOv5 training, so a baseline differs from its distilled twin by that term only.

    python train_distill.py                                      # yolov5s on the embedded shapes set
    python train_distill.py --cfg yolov5s.yaml --data coco128.yaml --weights yolov5s.pt
    python train_distill.py --teacher yolov5l.pt --cfg yolov5s.yaml --data coco128.yaml
    python train_distill.py --teacher yolov5l.pt --cfg yolov5s.yaml --data coco128.yaml --distill-method cwd
    torchrun --nproc_per_node 2 train_distill.py --teacher runs/train/exp/weights/best.pt --batch-size 32
"""
import argparse
import glob
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import val as validate
from models.checkpoint import load_checkpoint, load_model, save_checkpoint, strip_optimizer, \
    transfer_weights
from models.yolo import DetectionModel
from utils.augmentations import check_img_size
from utils.autoanchor import check_anchors
from utils.data_config import check_dataset
from utils.dataloaders import create_dataloader
from distill import settings as distill_settings
from distill.step import Distillation, StudentWithImitation
from distill.teacher import load_teacher
from utils.files import ROOT, find_file, increment_path, yaml_load, yaml_save
from utils.logging import LOGGER, UserError, cli_main, colorstr
from utils.loss import ComputeLoss, scale_loss_gains
from utils.metrics import fitness
from utils.plots import plot_labels, plot_results
from utils.torch_utils import LOCAL_RANK, RANK, WORLD_SIZE, ModelEMA, de_parallel, init_seeds, select_device, \
    smart_optimizer, torch_distributed_zero_first, training_memory_format
from utils.train_log import TrainLogger
from val import Metrics

MAX_NONFINITE = 5  # consecutive non-finite losses before the run is stopped
CSV_KEYS = ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "train/kd_loss",
            "metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
            "val/box_loss", "val/obj_loss", "val/cls_loss", "x/lr0", "x/lr1", "x/lr2", "x/kd_factor"]


class EarlyStopping:
    """Stop when fitness has not improved for `patience` epochs."""

    def __init__(self, patience=100):
        self.best_fitness, self.best_epoch = 0.0, 0
        self.patience = patience or float("inf")

    def __call__(self, epoch, fitness_value):
        if fitness_value >= self.best_fitness:
            self.best_epoch, self.best_fitness = epoch, fitness_value
        stop = (epoch - self.best_epoch) >= self.patience
        if stop:
            LOGGER.info(f"Stopping early: no improvement in the last {self.patience} epochs; best was epoch "
                        f"{self.best_epoch}. Set --patience 0 to disable.")
        return stop


class NonFiniteGuard:
    """Skips steps whose loss is not finite (all ranks agree) and stops the run after `limit` in a row."""

    def __init__(self, limit=MAX_NONFINITE):
        self.limit, self.count = limit, 0

    @property
    def stopped(self) -> bool:
        return self.count >= self.limit

    def skip(self, loss, epoch, i) -> bool:
        """True when this batch's step is to be skipped (its loss is not finite on some rank)."""
        finite = torch.isfinite(loss).all().float()
        if RANK != -1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() >= 1:
            self.count = 0
            return False
        self.count += 1
        LOGGER.warning(f"WARNING non-finite loss at epoch {epoch} batch {i} ({self.count} in a row): step skipped")
        if self.stopped:
            LOGGER.error(f"ERROR {self.count} non-finite losses in a row: stopping the run. Try a lower "
                         f"--hyp lr0, --distill-weight, or check the data.")
        return True

    def raise_if_stopped(self):
        if self.stopped:
            raise UserError(f"training stopped after {self.count} non-finite losses in a row (see warnings above); "
                            f"no checkpoint was written from the diverged weights")


@dataclass
class EpochStats:
    losses: torch.Tensor  # mean box, obj, cls and kd loss (per image) over the epoch's batches
    coverage: list  # mean sampled mask coverage (% of cells) per level; empty without a mask


# ------------------------------------------------------------------------------------------------ set-up steps
def load_data(opt) -> tuple[dict, int, list]:
    """-> (the data set's dict, nc, class names); --single-cls makes one class."""
    with torch_distributed_zero_first(LOCAL_RANK):
        data_dict = check_dataset(opt.data)
    nc = 1 if opt.single_cls else int(data_dict["nc"])
    names = ["item"] if opt.single_cls and len(data_dict["names"]) != 1 else data_dict["names"]
    return data_dict, nc, names


def build_student(opt, hyp, nc, device) -> tuple[DetectionModel, dict | None]:
    """The student from --cfg, initialised from --weights where shapes match (exactly, with --resume), in the
    training memory layout, with the --freeze layers frozen; -> (model, the --weights checkpoint or None)."""
    ckpt = None
    if opt.weights:
        ckpt = load_checkpoint(opt.weights)
        cfg = opt.cfg or ckpt["yaml"]
        model = DetectionModel(find_file(cfg) if isinstance(cfg, str) else cfg, ch=3, nc=nc,
                               anchors=hyp.get("anchors")).to(device)
        exclude = ["anchors"] if (opt.cfg or hyp.get("anchors")) and not opt.resume else []
        src = ckpt["model"] if opt.resume else (ckpt.get("ema") or ckpt["model"])
        transfer_weights(model, src, exclude=exclude, source=opt.weights)
    else:
        model = DetectionModel(find_file(opt.cfg), ch=3, nc=nc, anchors=hyp.get("anchors")).to(device)
    model.to(memory_format=training_memory_format(device))  # the EMA copy inherits it; checkpoints are contiguous

    # --freeze N freezes layers 0..N-1; --freeze a b c freezes those layers
    freeze = [f"model.{x}." for x in (opt.freeze if len(opt.freeze) > 1 else range(opt.freeze[0]))]
    for k, v in model.named_parameters():
        v.requires_grad = not any(x in k for x in freeze)
        if not v.requires_grad:
            LOGGER.info(f"freezing {k}")
    return model, ckpt


def setup_distillation(opt, model, ckpt, imgsz, nb, anchor_t, device) -> Distillation:
    """With --teacher: the frozen teacher, the settings resolved once for this run of nb batches per epoch,
    and the method's modules (built before the optimiser, so that they train with the student; resumed from
    the checkpoint). Without: an empty Distillation."""
    if not opt.teacher:
        return Distillation()
    teacher = load_teacher(opt.teacher, model, device, imgsz)
    resumed = ckpt if opt.resume else None
    settings = distill_settings.resolve(opt, teacher, nb, opt.epochs, record=resumed and resumed.get("distill"),
                                        epoch=resumed["epoch"] if resumed else 0)
    method = distill_settings.build_method(settings, model, teacher, anchor_t).to(device)
    if resumed and resumed.get("adapters"):
        method.load_state_dict({k: v.float() for k, v in resumed["adapters"].items()})
        LOGGER.info("resumed the distillation modules from the checkpoint")
    LOGGER.info(f"distill: {settings.method}, target {settings.target}, weight {settings.weight}, "
                f"warm-up {settings.warmup} iterations")
    return Distillation(settings, teacher, method)


def accumulation(opt) -> int:
    """Batches whose gradients add up to one optimiser step of the nominal batch size --nbs."""
    return max(round(opt.nbs / opt.batch_size), 1)


def training_hyp(hyp: dict, opt, nl: int, nc: int, imgsz: int) -> dict:
    """The hyperparameters the run trains with, as a new dict (`hyp` stays as given, for hyp.yaml): weight decay
    scaled to the nominal batch size, loss gains to the levels, classes and image size, --label-smoothing."""
    h = dict(hyp)
    h["weight_decay"] = hyp["weight_decay"] * (opt.batch_size * accumulation(opt) / opt.nbs)
    h = scale_loss_gains(h, nl=nl, nc=nc, imgsz=imgsz)
    h["label_smoothing"] = opt.label_smoothing
    return h


def build_optimizer(opt, model, method, hyp):
    """Three parameter groups (the adapters join them); LR factor lf(epoch) linear, or one-cycle cosine with
    --cos-lr, from 1 to lrf; -> (optimizer, scheduler, lf)."""
    optimizer = smart_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], hyp["weight_decay"],
                                extra_modules=[method] if method is not None else [])
    epochs, lrf = opt.epochs, hyp["lrf"]
    if opt.cos_lr:
        lf = lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1  # noqa: E731
    else:
        lf = lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf), lf


def resume_state(opt, ckpt, optimizer, ema) -> tuple[int, float]:
    """With --resume, the optimiser, EMA and best fitness from the checkpoint; -> (first epoch, best fitness)."""
    if ckpt is None or not opt.resume:
        return 0, 0.0
    if ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if ema and ckpt.get("ema"):
        ema.ema.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()})
        ema.updates = int(ckpt.get("updates", 0))
    start_epoch = int(ckpt["epoch"]) + 1
    if start_epoch >= opt.epochs:
        raise ValueError(f"{opt.weights} already finished {opt.epochs} epochs; nothing to resume")
    LOGGER.info(f"Resuming training from {opt.weights} at epoch {start_epoch} of {opt.epochs}")
    return start_epoch, ckpt.get("best_fitness") or 0.0


def val_batch_size(opt) -> int:
    return max(opt.batch_size // WORLD_SIZE * 2, 1)


def build_loaders(opt, data_dict, hyp, imgsz, gs, nc, main_process):
    """-> (train loader, its dataset, all its labels [n, 5], the val loader on the main process or None)."""
    train_loader, dataset = create_dataloader(data_dict["train"], imgsz, opt.batch_size // WORLD_SIZE, gs,
                                              opt.single_cls, hyp=hyp, augment=True, cache=opt.cache, rect=opt.rect,
                                              rank=LOCAL_RANK, workers=opt.workers, prefix=colorstr("train: "),
                                              shuffle=True, seed=opt.seed, nc=nc)
    labels = np.concatenate(dataset.labels, 0) if len(dataset.labels) else np.zeros((0, 5))
    if len(labels) and int(labels[:, 0].max()) >= nc:
        raise ValueError(f"label class {int(labels[:, 0].max())} exceeds nc={nc} in {opt.data}")
    val_loader = None
    if main_process:
        val_loader = create_dataloader(data_dict["val"], imgsz, val_batch_size(opt), gs, opt.single_cls, hyp=hyp,
                                       cache=None if opt.noval else opt.cache, rect=True, rank=-1,
                                       workers=opt.workers * 2, pad=0.5, prefix=colorstr("val: "), nc=nc)[0]
    return train_loader, dataset, labels, val_loader


def prepare_run_dir(opt, run_args, save_dir, hyp, dataset, labels, model, names, imgsz, distill):
    """The run folder with hyp.yaml (as given) and opt.yaml, AutoAnchor and the labels plot for a new run. Made
    only once data, model, teacher and loaders have loaded: an ERROR before this point leaves nothing behind."""
    (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    yaml_save(save_dir / "hyp.yaml", hyp)
    yaml_save(save_dir / "opt.yaml", run_args)
    if not opt.resume:
        if not opt.noautoanchor:
            if distill.settings and distill.settings.target == "head":
                LOGGER.info(f"{colorstr('AutoAnchor:')} skipped: head imitation needs the teacher's anchors")
            else:
                check_anchors(dataset, model=model, thr=hyp["anchor_t"], imgsz=imgsz)
        if not opt.noplots:
            plot_labels(labels, names, save_dir)
    model.half().float()  # pre-reduce anchor precision, as the saved fp16 checkpoints will hold them


def use_sync_batchnorm(model, device) -> bool:
    """--sync-bn under DDP: the student's BN layers, replaced in place, normalise over all ranks' batches.
    torch computes SyncBatchNorm on accelerators only, so on the CPU each rank keeps its own statistics."""
    if device.type == "cpu":
        LOGGER.warning("WARNING ⚠️ --sync-bn: SyncBatchNorm needs a GPU; "
                       "on the CPU each rank normalises its own batch")
        return False
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    LOGGER.info("using SyncBatchNorm()")
    return True


def build_step_module(opt, model, distill, device) -> nn.Module:
    """What a step runs forward: the student with its imitation term, as one DDP module across ranks."""
    step_module = StudentWithImitation(model, distill.method, distill.settings.target if distill.settings else "neck")
    if RANK == -1:
        return step_module
    cuda = device.type == "cuda"
    if opt.sync_bn:
        use_sync_batchnorm(model, device)
    return nn.parallel.DistributedDataParallel(step_module, device_ids=[LOCAL_RANK] if cuda else None,
                                               output_device=LOCAL_RANK if cuda else None)


# ---------------------------------------------------------------------------------------------- training loop
class Stepper:
    """The optimiser side of a step: the warm-up ramp, gradients accumulated up to the nominal batch size, AMP
    loss scaling, clipping, and the EMA update after each optimiser step."""

    def __init__(self, opt, optimizer, lf, hyp, step_module, model, ema, nb, amp):
        self.optimizer, self.lf, self.hyp, self.model, self.ema = optimizer, lf, hyp, model, ema
        self.params = [p for p in step_module.parameters() if p.requires_grad]  # clipped together
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)
        self.nw = max(round(hyp["warmup_epochs"] * nb), 100)  # warm-up iterations
        self.nominal = opt.nbs / opt.batch_size
        self.accumulate, self.last_opt_step = accumulation(opt), -1

    def warmup(self, ni, epoch):
        """Over the first nw iterations: accumulate fewer batches, ramp the bias LR down from warmup_bias_lr,
        the other groups' up from 0, and momentum up from warmup_momentum."""
        if ni > self.nw:
            return
        xi = [0, self.nw]
        self.accumulate = max(1, int(np.interp(ni, xi, [1, self.nominal]).round()))
        for j, x in enumerate(self.optimizer.param_groups):
            # plain floats: numpy scalars would make the optimizer state unloadable with weights_only
            x["lr"] = float(np.interp(ni, xi, [self.hyp["warmup_bias_lr"] if j == 0 else 0.0,
                                               x["initial_lr"] * self.lf(epoch)]))
            if "momentum" in x:
                x["momentum"] = float(np.interp(ni, xi, [self.hyp["warmup_momentum"], self.hyp["momentum"]]))

    def backward(self, loss, ni):
        """Backpropagate; step the optimiser once `accumulate` iterations have passed since its last step."""
        self.scaler.scale(loss).backward()
        if ni - self.last_opt_step < self.accumulate:
            return
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, max_norm=10.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)
        self.last_opt_step = ni


def random_rescale(imgs, imgsz, gs):
    """--multi-scale: the batch resized to a random multiple of gs between 0.5x and 1.5x imgsz."""
    sz = int(np.random.uniform(imgsz * 0.5, imgsz * 1.5 + gs)) // gs * gs
    sf = sz / max(imgs.shape[2:])
    if sf == 1:
        return imgs
    ns = [math.ceil(x * sf / gs) * gs for x in imgs.shape[2:]]
    return nn.functional.interpolate(imgs, size=ns, mode="bilinear", align_corners=False)


def set_epoch_data(loader, dataset, epoch, opt):
    """--close-mosaic turns mosaic off for the last epochs; under DDP each epoch reshuffles the shards."""
    if opt.close_mosaic and epoch == opt.epochs - opt.close_mosaic and dataset.mosaic:
        LOGGER.info("closing mosaic for the last epochs")
        dataset.mosaic = False  # workers are not persistent: the next epoch's workers see the change
    if RANK != -1:
        loader.sampler.set_epoch(epoch)


def train_one_epoch(step_module, compute_loss, distill, stepper, loader, epoch, device, nonfinite, log=None,
                    rescale=None) -> EpochStats:
    """One pass over the training set; stops at the batch where `nonfinite` stops the run."""
    step_module.train()
    nb, mem_format, amp = len(loader), training_memory_format(device), device.type == "cuda"
    mloss = torch.zeros(4, device=device)  # running means of the box, obj, cls and kd losses
    LOGGER.info(("\n" + "%11s" * 8) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "kd_loss",
                                       "Instances", "Size"))
    batches = enumerate(loader) if log is None else log.progress(enumerate(loader), nb)
    stepper.optimizer.zero_grad()
    for i, (imgs, targets, paths, _) in batches:
        ni = i + nb * epoch  # iterations since the start of training
        imgs = imgs.to(device, non_blocking=True, memory_format=mem_format).float() / 255
        targets = targets.to(device)
        stepper.warmup(ni, epoch)
        if rescale is not None:
            imgs = rescale(imgs)

        # Loss: detection, plus the imitation term when distilling
        with torch.autocast(device_type=device.type, enabled=amp):
            pred, kd = step_module(imgs, targets, distill.teacher_maps(imgs), ni)
            loss, loss_items = compute_loss(pred, targets)
            if kd is not None:
                loss = loss + kd.loss.float() * imgs.shape[0]  # same batch-size convention as the detection loss
            if RANK != -1:
                loss *= WORLD_SIZE  # DDP averages gradients across ranks

        # Step, unless the loss is not finite on some rank
        if nonfinite.skip(loss, epoch, i):
            stepper.optimizer.zero_grad()
            if nonfinite.stopped:
                break
            continue
        distill.observe(loss_items, kd)
        stepper.backward(loss, ni)

        kd_item = kd.loss.detach().float().reshape(1) if kd is not None else torch.zeros(1, device=device)
        mloss = (mloss * i + torch.cat((loss_items, kd_item))) / (i + 1)
        if log is not None:
            log.batch(epoch, i, ni, imgs, targets, paths, mloss, kd)
    return EpochStats(mloss, log.epoch_coverage() if log is not None else [])


# ------------------------------------------------------------------------------------------ epoch end, finish
def ema_is_finite(ema) -> bool:
    return all(torch.isfinite(v).all() for v in ema.ema.state_dict().values() if v.dtype.is_floating_point)


def checkpoint_record(model, ema, optimizer, epoch, best_fitness, run_args, hyp, distill) -> dict:
    """What last.pt / best.pt hold; the distill record and the method's modules are None for plain training."""
    return dict(model=de_parallel(model), ema=ema.ema, updates=ema.updates, optimizer=optimizer, epoch=epoch,
                best_fitness=best_fitness, opt=run_args, hyp=hyp, distill=distill.record(),
                adapters=distill.method.state_dict() if distill.method is not None else None)


def save_checkpoints(weights_dir, record, epoch, best: bool, period: int):
    """last.pt every time; best.pt when this epoch is the best so far; epoch{N}.pt every --save-period epochs."""
    save_checkpoint(weights_dir / "last.pt", **record)
    if best:
        save_checkpoint(weights_dir / "best.pt", **record)
    if period > 0 and epoch % period == 0:
        save_checkpoint(weights_dir / f"epoch{epoch}.pt", **record)


def all_ranks_stop(stop: bool, device) -> bool:
    """Rank 0's decision to stop, on every rank, so that all leave the loop together."""
    if RANK == -1:
        return stop
    flag = torch.tensor([float(stop)], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def finish(save_dir, val, device, plots, metrics) -> Metrics:
    """Drop the optimiser state from the checkpoints, validate best.pt once more with plots, plot results.csv;
    -> best.pt's metrics (`metrics` when there is no best.pt)."""
    for f in save_dir / "weights" / "last.pt", save_dir / "weights" / "best.pt":
        if f.exists():
            strip_optimizer(f)
    best = save_dir / "weights" / "best.pt"
    if best.exists():
        LOGGER.info(f"\nValidating {best}...")
        metrics = val(model=load_model(best, device=device), plots=plots, verbose=True, compute_loss=None).metrics
    if plots and (save_dir / "results.csv").exists():
        plot_results(save_dir / "results.csv")
    return metrics


def train(hyp: dict, opt, device) -> tuple[Metrics, dict]:
    """Train the student (distilling the teacher into it with --teacher); -> (val.Metrics of the final weights,
    the run's arguments as resolved and recorded)."""
    save_dir, epochs, plots, amp = Path(opt.save_dir), opt.epochs, not opt.noplots, device.type == "cuda"
    main_process = RANK in (-1, 0)
    LOGGER.info(colorstr("hyperparameters: ") + ", ".join(f"{k}={v}" for k, v in hyp.items()))
    init_seeds(opt.seed + 1 + RANK)

    # Set-up, in an order that fixes the random state: student, loaders (they draw no random numbers), teacher
    # and the method's modules, optimiser
    data_dict, nc, names = load_data(opt)
    model, ckpt = build_student(opt, hyp, nc, device)
    gs = max(int(model.stride.max()), 32)
    imgsz = check_img_size(opt.imgsz, gs)
    if RANK == -1 and opt.batch_size < 1:
        raise ValueError(f"--batch-size {opt.batch_size} must be positive")
    train_hyp = training_hyp(hyp, opt, nl=model.model[-1].nl, nc=nc, imgsz=imgsz)
    train_loader, dataset, labels, val_loader = build_loaders(opt, data_dict, train_hyp, imgsz, gs, nc, main_process)
    distill = setup_distillation(opt, model, ckpt, imgsz, len(train_loader), hyp["anchor_t"], device)
    run_args = {**vars(opt), **(distill.settings.args() if distill.settings else {})}  # opt.yaml, checkpoints
    optimizer, scheduler, lf = build_optimizer(opt, model, distill.method, train_hyp)
    ema = ModelEMA(model) if main_process else None
    start_epoch, best_fitness = resume_state(opt, ckpt, optimizer, ema)
    del ckpt
    if main_process:
        prepare_run_dir(opt, run_args, save_dir, hyp, dataset, labels, model, names, imgsz, distill)

    # Loss, the module a step runs, optimiser steps, logging
    model.nc, model.hyp, model.names = nc, train_hyp, names
    compute_loss = ComputeLoss(model)
    step_module = build_step_module(opt, model, distill, device)
    stepper = Stepper(opt, optimizer, lf, train_hyp, step_module, model, ema, len(train_loader), amp)
    scheduler.last_epoch = start_epoch - 1
    log = TrainLogger(save_dir, CSV_KEYS, epochs, names, model.stride.tolist(), plots, opt.resume) \
        if main_process else None
    rescale = partial(random_rescale, imgsz=imgsz, gs=gs) if opt.multi_scale else None
    stopper, stop, nonfinite = EarlyStopping(patience=opt.patience), False, NonFiniteGuard()
    metrics = Metrics(*[0.0] * len(Metrics._fields))  # of the last validated epoch

    def val(**kw):  # the val set and settings that each epoch's and the final validation share
        return validate.run(data=data_dict, batch_size=val_batch_size(opt), imgsz=imgsz, single_cls=opt.single_cls,
                            dataloader=val_loader, save_dir=save_dir, **kw)

    LOGGER.info(f"Image sizes {imgsz} train, {imgsz} val\nUsing {train_loader.num_workers} dataloader workers\n"
                f"Logging results to {colorstr('bold', save_dir)}\nStarting training for {epochs} epochs...")

    # Training: an epoch of steps, then the LR schedule's step
    t0, epoch = time.time(), start_epoch
    for epoch in range(start_epoch, epochs):
        set_epoch_data(train_loader, dataset, epoch, opt)
        stats = train_one_epoch(step_module, compute_loss, distill, stepper, train_loader, epoch, device,
                                nonfinite, log, rescale)
        if nonfinite.stopped:
            break
        lr = [x["lr"] for x in optimizer.param_groups]
        kd_factor = distill.factor((epoch + 1) * len(train_loader) - 1)  # the weight schedule's, at the epoch's end
        scheduler.step()

        # Main process: validate the EMA weights, log the epoch, save checkpoints
        if main_process:
            if distill.method is not None:
                log.distill_summary(stats.coverage, stats.losses, distill.method.weight, distill.settings.method,
                                    kd_factor)
            ema.update_attr(model)
            final_epoch = epoch + 1 == epochs or stopper.patience <= epoch - stopper.best_epoch + 1
            validated = not opt.noval or final_epoch
            if validated:
                metrics = val(model=ema.ema, half=amp, plots=False, compute_loss=compute_loss).metrics
            fi, ema_finite = float(fitness(metrics)[0]), ema_is_finite(ema)
            if fi > best_fitness and ema_finite:
                best_fitness = fi
            stop = stopper(epoch=epoch, fitness_value=fi) or stop
            log.epoch(epoch, stats.losses.tolist(), metrics, validated, [*lr, kd_factor])
            if not opt.nosave or final_epoch:
                record = checkpoint_record(model, ema, optimizer, epoch, best_fitness, run_args, train_hyp, distill)
                is_best = best_fitness == fi and ema_finite
                save_checkpoints(save_dir / "weights", record, epoch, is_best, opt.save_period)
        if all_ranks_stop(stop, device):
            break

    # Finish: checkpoints stripped, best.pt validated with plots
    if main_process:
        LOGGER.info(f"\n{epoch - start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
        metrics = finish(save_dir, val, device, plots, metrics)
        log.close()
        LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}")
    nonfinite.raise_if_stopped()
    return metrics, run_args


def parse_opt(known: bool = False, argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=str, default="", help="initial weights path or official name (yolov5s.pt)")
    parser.add_argument("--cfg", type=str, default="", help="model.yaml (default yolov5s.yaml without --weights)")
    parser.add_argument("--data", type=str, default="shapes.yaml", help="dataset.yaml path")
    parser.add_argument("--hyp", type=str, default="hyp.scratch-low.yaml", help="hyperparameters path")
    parser.add_argument("--epochs", type=int, default=100, help="total training epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="total batch size for all GPUs/ranks")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train, val image size (pixels)")
    parser.add_argument("--rect", action="store_true", help="rectangular training")
    parser.add_argument("--resume", nargs="?", const=True, default=False, help="resume most recent training")
    parser.add_argument("--nosave", action="store_true", help="only save final checkpoint")
    parser.add_argument("--noval", action="store_true", help="only validate final epoch")
    parser.add_argument("--noautoanchor", action="store_true", help="disable AutoAnchor")
    parser.add_argument("--noplots", action="store_true", help="save no plot files")
    parser.add_argument("--cache", type=str, nargs="?", const="ram", help="image --cache ram/disk")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--multi-scale", action="store_true", help="vary img-size +/- 50%%")
    parser.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    parser.add_argument("--optimizer", type=str, choices=["SGD", "Adam", "AdamW"], default="SGD", help="optimizer")
    parser.add_argument("--sync-bn", action="store_true", help="use SyncBatchNorm, only available in DDP mode")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers (per RANK in DDP mode)")
    parser.add_argument("--project", default=str(ROOT / "runs/train"), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--cos-lr", action="store_true", help="cosine LR scheduler")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon")
    parser.add_argument("--patience", type=int, default=100, help="EarlyStopping patience (epochs without improvement)")
    parser.add_argument("--freeze", nargs="+", type=int, default=[0], help="freeze layers: backbone=10, first3=0 1 2")
    parser.add_argument("--save-period", type=int, default=-1, help="save checkpoint every x epochs (disabled if < 1)")
    parser.add_argument("--close-mosaic", type=int, default=0, help="turn mosaic off for the last N epochs")
    parser.add_argument("--seed", type=int, default=0, help="global training seed")
    parser.add_argument("--nbs", type=int, default=64, help="nominal batch size: gradients accumulate up to it "
                                                            "(upstream's constant 64; smaller = more steps per epoch)")
    distill_settings.add_args(parser)
    return parser.parse_known_args(argv)[0] if known else parser.parse_args(argv)


def resolve_resume(opt):
    """--resume (latest run) or --resume path/to/last.pt: the original arguments (as this release writes them) and
    run folder, as a new namespace."""
    last = opt.resume if isinstance(opt.resume, str) else None
    if last is None:
        found = glob.glob(str(Path(opt.project) / "**" / "last.pt"), recursive=True)
        if not found:
            raise FileNotFoundError(f"--resume: no previous run with a last.pt under {opt.project}")
        last = max(found, key=os.path.getctime)
    last = Path(last)
    if not last.is_file():
        raise FileNotFoundError(f"--resume {last}: file not found")
    ckpt = load_checkpoint(last)
    if not ckpt.get("opt"):
        raise ValueError(f"--resume {last}: the checkpoint holds no training arguments (not a training run's last.pt)")
    if ckpt.get("optimizer") is None:
        raise ValueError(f"--resume {last}: the optimiser state was stripped (training finished); nothing to resume")
    saved = distill_settings.upgrade_args(ckpt["opt"])
    args = {**vars(parse_opt(True, [])), **saved}
    hyp = dict(args["hyp"]) if isinstance(args["hyp"], dict) else yaml_load(find_file(args["hyp"]))
    return argparse.Namespace(**{**args, "device": opt.device, "workers": opt.workers,
                                 "teacher_changed_ok": opt.teacher_changed_ok, "weights": str(last), "resume": True,
                                 "cfg": "", "save_dir": str(last.parent.parent), "hyp": hyp})


def resolve_new_run(opt):
    """A new run's arguments with the paths found and the hyperparameters read, as a new namespace."""
    cfg = opt.cfg or ("" if opt.weights else "yolov5s.yaml")
    data = str(opt.data) if isinstance(opt.data, dict) else str(find_file(opt.data))
    hyp = yaml_load(find_file(opt.hyp)) if not isinstance(opt.hyp, dict) else dict(opt.hyp)
    return argparse.Namespace(**{**vars(opt), "cfg": str(find_file(cfg)) if cfg else "", "data": data, "hyp": hyp,
                                 "save_dir": str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok))})


def main(opt):
    """-> the run's arguments as resolved, with `results`: val.Metrics (P, R, mAP50, mAP50-95, val losses) of the
    final weights."""
    opt = resolve_resume(opt) if opt.resume else resolve_new_run(opt)
    distill_settings.check_given(opt)  # before anything loads
    device = select_device(opt.device, batch_size=opt.batch_size)
    if LOCAL_RANK != -1:
        if opt.batch_size < WORLD_SIZE or opt.batch_size % WORLD_SIZE:
            raise ValueError(f"--batch-size {opt.batch_size} must be a multiple of the {WORLD_SIZE} ranks")
        if torch.cuda.is_available() and opt.device != "cpu":
            torch.cuda.set_device(LOCAL_RANK)
            device = torch.device("cuda", LOCAL_RANK)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3))
    try:
        metrics, run_args = train(dict(opt.hyp), opt, device)
        return argparse.Namespace(**run_args, results=metrics)
    finally:
        if WORLD_SIZE > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(**kwargs):
    """Programmatic entry: run(data='shapes.yaml', cfg='yolov5n.yaml', epochs=3, imgsz=128, teacher='...')."""
    args, renamed = vars(parse_opt(True, [])), distill_settings.legacy_dests()
    kwargs = {renamed.get(k, k): v for k, v in kwargs.items()}  # the options' older names still work
    unknown = sorted(set(kwargs) - set(args))
    if unknown:
        raise TypeError(f"train_distill.run() got unknown arguments {unknown}")
    return main(argparse.Namespace(**{**args, **kwargs}))


if __name__ == "__main__":
    cli_main(main, parse_opt)
