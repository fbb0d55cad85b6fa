"""The training loop's parts on their own: the run's hyperparameters, optimiser steps with warm-up and gradient
accumulation, and the results.csv rows the logger writes."""
import pytest
import torch
import torch.nn as nn

import train_distill
from tests.conftest import read_csv
from utils.files import find_file, yaml_load
from utils.train_log import TrainLogger
from val import Metrics


def hyp_and_opt(**kw):
    hyp = yaml_load(find_file("hyp.scratch-low.yaml"))
    opt = train_distill.parse_opt(True, [])
    for k, v in kw.items():
        setattr(opt, k, v)
    return hyp, opt


def test_training_hyp_is_a_new_dict_with_the_run_scalings():
    hyp, opt = hyp_and_opt(batch_size=24, nbs=64, label_smoothing=0.1)
    given = dict(hyp)
    h = train_distill.training_hyp(hyp, opt, nl=4, nc=20, imgsz=320)
    assert hyp == given and h is not hyp  # hyp.yaml records the hyperparameters as given
    # 24 x 3 accumulated batches (round(64 / 24)) = 72 images a step, against the nominal 64
    assert h["weight_decay"] == pytest.approx(given["weight_decay"] * 72 / 64)
    assert h["box"] == pytest.approx(given["box"] * 3 / 4)
    assert h["cls"] == pytest.approx(given["cls"] * 20 / 80 * 3 / 4)
    assert h["obj"] == pytest.approx(given["obj"] * (320 / 640) ** 2 * 3 / 4)
    assert h["label_smoothing"] == 0.1
    assert {k: v for k, v in h.items() if k not in ("weight_decay", "box", "cls", "obj", "label_smoothing")} == \
        {k: v for k, v in given.items() if k not in ("weight_decay", "box", "cls", "obj")}


def tiny_stepper(batch_size, nbs, nb=10):
    hyp, opt = hyp_and_opt(batch_size=batch_size, nbs=nbs, epochs=3, optimizer="SGD")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer, _, lf = train_distill.build_optimizer(opt, model, None, hyp)
    return train_distill.Stepper(opt, optimizer, lf, hyp, model, model, None, nb, amp=False), model, hyp


def test_stepper_warms_up_then_accumulates_to_the_nominal_batch():
    stepper, model, hyp = tiny_stepper(batch_size=16, nbs=64)
    assert stepper.nw == 100  # 3 warm-up epochs of 10 batches are fewer than the 100-iteration minimum
    stepper.warmup(0, epoch=0)
    bias, *others = stepper.optimizer.param_groups
    assert bias["lr"] == pytest.approx(hyp["warmup_bias_lr"]) and all(g["lr"] == 0 for g in others)
    assert stepper.accumulate == 1
    stepper.warmup(100, epoch=0)
    assert [g["lr"] for g in stepper.optimizer.param_groups] == pytest.approx([hyp["lr0"]] * 3)
    assert stepper.accumulate == 4  # 64 / 16

    stepped, x = [], torch.randn(2, 3, 8, 8)
    for ni in range(200, 212):
        before = [p.detach().clone() for p in model.parameters()]
        stepper.backward(model(x).square().mean(), ni)
        if any(not torch.equal(b, p) for b, p in zip(before, model.parameters())):
            stepped.append(ni)
    assert stepped == [200, 204, 208]


def test_logger_leaves_unvalidated_cells_empty_and_a_resumed_run_keeps_its_table(tmp_path):
    keys = train_distill.CSV_KEYS
    metrics = Metrics(0.5, 0.25, 0.125, 0.0625, 1.0, 2.0, 3.0)
    log = TrainLogger(tmp_path, keys, 2, ["a"], [8.0, 16.0, 32.0], plots=False, resume=False)
    log.epoch(0, [0.1, 0.2, 0.3, 0.0], metrics, True, [0.01, 0.02, 0.03])
    log.epoch(1, [0.1, 0.2, 0.3, 0.0], metrics, False, [0.01, 0.02, 0.03])
    log.close()
    log = TrainLogger(tmp_path, keys, 3, ["a"], [8.0, 16.0, 32.0], plots=False, resume=True)
    log.epoch(2, [0.1, 0.2, 0.3, 0.0], metrics, True, [0.01, 0.02, 0.03])
    log.close()
    rows = read_csv(tmp_path / "results.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert float(rows[0]["metrics/mAP_0.5"]) == 0.125 and float(rows[0]["val/cls_loss"]) == 3.0
    assert rows[1]["metrics/mAP_0.5"] == "" and rows[1]["val/box_loss"] == "" and rows[1]["x/lr2"] == "0.03"
