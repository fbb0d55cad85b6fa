"""Devices, seeding, EMA, optimiser groups, DDP helpers and FLOP counting."""
import math
import os
import random
import time
from contextlib import contextmanager
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from utils.logging import LOGGER

LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))  # https://pytorch.org/docs/stable/elastic/run.html
RANK = int(os.getenv("RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))


def select_device(device: str = "", batch_size: int = 0) -> torch.device:
    """'' (first CUDA GPU else CPU), 'cpu', '0' or '0,1,2'. Errors clearly when CUDA is asked for but absent."""
    device = str(device).strip().lower().replace("cuda:", "").replace("none", "")
    if device == "cpu":
        return torch.device("cpu")
    if device:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested but CUDA is not available; use --device cpu")
        ids = [int(i) for i in device.split(",") if i != ""]
        bad = [i for i in ids if i >= torch.cuda.device_count()]
        if bad:
            raise ValueError(f"--device {device}: no CUDA device {bad} (found {torch.cuda.device_count()})")
        if batch_size and len(ids) > 1 and batch_size % len(ids):
            raise ValueError(f"batch size {batch_size} is not a multiple of the GPU count {len(ids)}")
        return torch.device(f"cuda:{ids[0]}")
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"


def is_parallel(model: nn.Module) -> bool:
    return isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel))


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model under a DP/DDP wrapper."""
    return model.module if is_parallel(model) else model


@contextmanager
def torch_distributed_zero_first(local_rank: int):
    """Let local rank 0 do a job (e.g. build a label cache) while the other ranks wait for it."""
    if local_rank not in (-1, 0):
        dist.barrier()
    yield
    if local_rank == 0:
        dist.barrier()


def time_sync() -> float:
    """time.time() after waiting for queued CUDA work, so timings measure the work, not the launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


def training_memory_format(device: torch.device) -> torch.memory_format:
    """Layout for the trained model's weights and its input batches: channels-last on the CPU, where
    oneDNN runs the convolutions' forward and backward about 30% faster in it (yolov5n, batch 32 at
    160 px, one thread), with the same results up to float rounding; the default layout elsewhere."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


class ModelEMA:
    """Exponential moving average of the model's state (parameters and buffers).

    The decay ramps up as decay * (1 - exp(-updates / tau)) so early, noisy weights fade quickly.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay = lambda x: decay * (1 - math.exp(-x / tau))
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay(self.updates)
        msd = de_parallel(model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)

    def update_attr(self, model: nn.Module, include=("yaml", "nc", "hyp", "names", "stride")) -> None:
        for k in include:
            if hasattr(model, k):
                setattr(self.ema, k, getattr(model, k))


def smart_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.01, momentum: float = 0.9,
                    decay: float = 1e-5, extra_modules=()) -> torch.optim.Optimizer:
    """Three parameter groups, as YOLOv5 trains: normalisation weights (no decay), other weights
    (decay), biases (no decay). `extra_modules` (e.g. distillation adapters) join the same groups.
    """
    g_bn, g_w, g_b = [], [], []
    norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    for module in [model, *extra_modules]:
        for m in module.modules():
            for pname, p in m.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                if pname == "bias":
                    g_b.append(p)
                elif pname == "weight" and isinstance(m, norm_types):
                    g_bn.append(p)
                else:
                    g_w.append(p)
    if name == "Adam":
        optimizer = torch.optim.Adam(g_b, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(g_b, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    elif name == "SGD":
        optimizer = torch.optim.SGD(g_b, lr=lr, momentum=momentum, nesterov=True)
    else:
        raise ValueError(f"optimizer '{name}' not supported (SGD, Adam, AdamW)")
    optimizer.add_param_group({"params": g_w, "weight_decay": decay})
    optimizer.add_param_group({"params": g_bn, "weight_decay": 0.0})
    LOGGER.info(f"optimizer: {name}(lr={lr}) with parameter groups {len(g_bn)} weight(decay=0.0), "
                f"{len(g_w)} weight(decay={decay}), {len(g_b)} bias")
    return optimizer


def count_flops(model: nn.Module, imgsz=640, ch: int = 3) -> float:
    """GFLOPs of one forward pass on a [1, ch, imgsz, imgsz] input, measured by torch.utils.flop_counter.

    The counter reports multiply-accumulates x2 for convolutions/matmuls (one MAC = 2 FLOPs), which is
    the convention of YOLOv5's published GFLOPs figures.
    """
    from torch.utils.flop_counter import FlopCounterMode

    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    p = next(model.parameters())
    x = torch.zeros(1, ch, h, w, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
