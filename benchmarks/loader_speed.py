"""Does the training loader keep up with training? Images/s of the mosaic loader vs model train steps.

For each image size: the training loader (augment=True, mosaic on, hyp.scratch-low) on the shapes set
with 0/1/2/... workers, and forward + backward + optimiser step with ComputeLoss of each --models
model (yolov5n and yolov5s by default) on batches of that size: the training throughput of this machine.
The loader bottlenecks training where its images/s is below the train step's.

    python benchmarks/loader_speed.py --imgsz 320 640 --workers 0 1 2 --batches 8 --steps 2
    python benchmarks/loader_speed.py --imgsz 320 --workers 2 --models yolov5n.yaml yolov5s.yaml --steps 4
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.yolo import DetectionModel  # noqa: E402
from utils.data_config import check_dataset  # noqa: E402
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.files import find_file, yaml_load  # noqa: E402
from utils.logging import LOGGER  # noqa: E402
from utils.loss import ComputeLoss, scale_loss_gains  # noqa: E402


def loader_rate(path, imgsz, batch, workers, batches, nc):
    """Images/s over `batches` batches after the first (worker start-up reported separately)."""
    loader, _ = create_dataloader(path, imgsz, batch, 32, hyp="hyp.scratch-low.yaml", augment=True,
                                  workers=workers, shuffle=True, seed=0, nc=nc)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            ims, *_ = next(it)
        except StopIteration:
            it = iter(loader)
            ims, *_ = next(it)
        n += ims.shape[0]
    return n / (time.perf_counter() - t1), t1 - t0


def train_step_rate(cfg, imgsz, batch, steps, nc, device):
    """Images/s of forward + backward + SGD step of the model on uint8 batches (as the loader gives them)."""
    model = DetectionModel(cfg, nc=nc).to(device).train()
    hyp = yaml_load(find_file("hyp.scratch-low.yaml"))
    model.hyp = scale_loss_gains(hyp, model.model[-1].nl, nc, imgsz)
    loss_fn = ComputeLoss(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    ims = torch.randint(0, 255, (batch, 3, imgsz, imgsz), dtype=torch.uint8)
    targets = torch.cat([torch.tensor([[i, i % nc, 0.5, 0.5, 0.2, 0.3]]) for i in range(batch)])

    def step():
        p = model(ims.to(device).float() / 255)
        loss = loss_fn(p, targets.to(device))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="shapes.yaml")
    p.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=8, help="timed loader batches per setting")
    p.add_argument("--steps", type=int, default=2, help="timed train steps per image size")
    p.add_argument("--models", nargs="+", default=["yolov5n.yaml", "yolov5s.yaml"], help="model yamls to time")
    p.add_argument("--device", default="cpu")
    opt = p.parse_args(argv)

    data = check_dataset(opt.data)
    device = torch.device(opt.device)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores" + \
              (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    rows = []
    for imgsz in opt.imgsz:
        for w in opt.workers:
            rate, start = loader_rate(data["train"], imgsz, opt.batch, w, opt.batches, data["nc"])
            rows.append((imgsz, f"loader, {w} workers", rate, f"first batch {start:.2f}s"))
        for cfg in opt.models:
            rate = train_step_rate(cfg, imgsz, opt.batch, opt.steps, data["nc"], device)
            rows.append((imgsz, f"{Path(cfg).stem} train step ({opt.device})", rate, "fwd+bwd+SGD, ComputeLoss"))

    LOGGER.info(f"\nLoader vs training throughput on {data['yaml_file']} train, batch {opt.batch} ({machine}; "
                f"torch threads {torch.get_num_threads()})")
    LOGGER.info(f"{'imgsz':>5}  {'what':<28} {'images/s':>9}  note")
    for imgsz, what, rate, note in rows:
        LOGGER.info(f"{imgsz:>5}  {what:<28} {rate:>9.1f}  {note}")


if __name__ == "__main__":
    main()
