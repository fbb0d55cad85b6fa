"""Validate detection weights on a data set: P, R, mAP50, mAP50-95, speed, plots, COCO json.

    python val.py --data shapes.yaml --weights runs/train/exp/weights/best.pt
    python val.py --data shapes.yaml --weights teacher.pt base.pt kd.pt --table compare.md   # comparison
    python val.py --data shapes.yaml --weights best.pt --task speed

The trainer calls run(model=ema, dataloader=val_loader, ...) in memory; the model is not reloaded.
"""
import argparse
import csv
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from utils.augmentations import check_img_size
from utils.boxes import non_max_suppression, scale_boxes, xywh2xyxy, xyxy2xywh
from utils.data_config import names_list
from utils.files import ROOT, increment_path
from utils.logging import LOGGER, cli_main, colorstr
from utils.metrics import IOU_THRESHOLDS, ConfusionMatrix, ap_per_class, match_predictions
from utils.torch_utils import count_flops, select_device, time_sync

ROW = "%22s" + "%11i" * 2 + "%11.3g" * 4  # class, images, instances, P, R, mAP50, mAP50-95
HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
COCO91_MISSING = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # COCO category ids that have no images


class Metrics(NamedTuple):
    """The all-classes row and the val losses (0 when no compute_loss), in results.csv's column order."""
    precision: float
    recall: float
    map50: float
    map: float  # mAP50-95
    box_loss: float
    obj_loss: float
    cls_loss: float


class ValResult(NamedTuple):
    """What run() returns; a tuple too, so `(p, r, map50, map, *losses), maps, times = run(...)` works."""
    metrics: Metrics
    maps: np.ndarray  # per-class mAP50-95 [nc]; classes without labels get the mean
    times: tuple  # ms per image: pre-process, inference, NMS


def coco80_to_coco91_class():
    """The 80 detection classes' ids in COCO's 1..90 numbering (ten ids are unused there)."""
    return [i for i in range(1, 91) if i not in COCO91_MISSING]


def is_coco(data) -> bool:
    names = names_list(data.get("names", []))
    return len(names) == 80 and names[0] == "person" and names[-1] == "toothbrush"


def image_id_fn(files):
    """image_id from a file: its stem, an int when every stem in the split is numeric (COCO style)."""
    numeric = all(Path(f).stem.isnumeric() for f in files) if files else False
    return (lambda f: int(Path(f).stem)) if numeric else (lambda f: Path(f).stem)


def json_records(predn, image_id, class_map):
    """COCO detection records for one image: predn [k, 6] xyxy in original pixels -> [x, y, w, h] top-left."""
    box = xyxy2xywh(predn[:, :4])
    box[:, :2] -= box[:, 2:] / 2
    return [{"image_id": image_id, "category_id": class_map[int(c)], "bbox": [round(float(x), 3) for x in b],
             "score": round(float(s), 5)} for b, s, c in zip(box.tolist(), predn[:, 4].tolist(), predn[:, 5].tolist())]


def coco_gt_from_labels(dataset, names, class_map, single_cls, file):
    """COCO annotation json built from the YOLO labels (original pixels, iscrowd 0, area w*h)."""
    to_id = image_id_fn(dataset.im_files)
    images, anns = [], []
    for f, (w, h), lb in zip(dataset.im_files, np.asarray(dataset.shapes), dataset.labels):
        images.append({"id": to_id(f), "file_name": Path(f).name, "width": int(w), "height": int(h)})
        for c, x, y, bw, bh in np.asarray(lb).reshape(-1, 5):
            box = [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]
            cat = class_map[0 if single_cls else int(c)]
            anns.append({"id": len(anns) + 1, "image_id": to_id(f), "category_id": cat,
                         "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
    cats = [{"id": class_map[i], "name": n} for i, n in enumerate(names)]
    with open(file, "w") as fh:
        json.dump({"images": images, "annotations": anns, "categories": cats}, fh)
    return file


def coco_evaluate(anno_json, pred_json, image_ids):
    """COCOeval bbox summary (printed) -> (mAP50-95, mAP50), or None when pycocotools is missing."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        LOGGER.info("pycocotools not installed (optional): skipping COCO evaluation of the json")
        return None
    anno = COCO(str(anno_json))
    ev = COCOeval(anno, anno.loadRes(str(pred_json)), "bbox")
    if image_ids:
        ev.params.imgIds = sorted(set(image_ids))  # only the images evaluated, e.g. a subset of val2017
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def annotation_file(data, task):
    """The data set's own COCO annotation json: data key 'coco_json' (relative to 'path'), or the upstream
    layout annotations/instances_val2017.json for COCO; None when there is none."""
    root = Path(data.get("path", "."))
    candidates = [data.get("coco_json")]
    if is_coco(data) and task == "val":
        candidates.append("annotations/instances_val2017.json")
    for c in filter(None, candidates):
        p = Path(c) if Path(c).is_absolute() else root / c
        if p.is_file():
            return p
    return None


def load_for_val(weights, data, device, single_cls, fuse=True):
    """Load weights and check them against the data: clear errors before any work is done."""
    from models.checkpoint import load_model

    model = load_model(weights, device=device, fuse=fuse)
    check_nc(model, data, single_cls, weights)
    return model


def check_nc(model, data, single_cls, what="model"):
    ncm, nc = model_nc(model), int(data["nc"])
    if ncm != nc and not single_cls:
        raise ValueError(f"{what} predicts {ncm} classes but the data has {nc} ({data.get('yaml_file', '')}): "
                         f"pass --weights and --data that were trained together (or --single-cls)")


def model_nc(model):
    return int(getattr(model, "nc", None) or model.model[-1].nc)


def resolve_data(data, task):
    """Checked data dict with the requested split present (raises naming the file otherwise)."""
    from utils.data_config import check_dataset

    d = check_dataset(data)
    if not d.get(task):
        raise ValueError(f"data '{data if not isinstance(data, dict) else d.get('yaml_file', 'dict')}' has no "
                         f"'{task}' split")
    return d


@torch.no_grad()
def run(data, weights=None, batch_size=32, imgsz=640, conf_thres=0.001, iou_thres=0.6, max_det=300, task="val",
        device="", workers=8, single_cls=False, verbose=False, save_txt=False, save_conf=False, save_json=False,
        project=ROOT / "runs/val", name="exp", exist_ok=False, half=False, model=None, dataloader=None,
        save_dir=Path(""), plots=True, compute_loss=None):
    """Validate -> ValResult(metrics (P, R, mAP50, mAP50-95, box, obj, cls losses), per-class mAP50-95 [nc],
    ms/img (pre-process, inference, NMS)).

    In memory (model given, as the trainer does) the model is used as is on its device and put in eval();
    half then runs it under CUDA autocast, so the caller's fp32 weights (an EMA) are never rounded to
    fp16. Otherwise `weights` are loaded (half: converted to fp16) and checked against `data`.
    """
    training = model is not None
    split = "val" if task == "speed" else task  # speed runs on the val split
    if training:
        device = next(model.parameters()).device
        half &= device.type != "cpu"
        if not isinstance(data, dict) or dataloader is None:
            data = resolve_data(data, split)
    else:
        data = resolve_data(data, split)
        device = select_device(device, batch_size)
        if half and device.type == "cpu":
            LOGGER.warning("WARNING ⚠️ --half needs CUDA; validating in float32 on CPU")
        half &= device.type != "cpu"
        model = load_for_val(weights, data, device, single_cls)
        model.half() if half else model.float()
        save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)  # made once the data loads
    model.eval()
    nc = 1 if single_cls else int(data["nc"])
    check_nc(model, data, single_cls)
    names = ["item"] if single_cls and len(data["names"]) != 1 else names_list(data["names"])
    iouv = torch.tensor(IOU_THRESHOLDS)  # float64: 0.50:0.05:0.95
    gs = max(int(model.stride.max()), 32)

    if dataloader is None:
        from utils.dataloaders import create_dataloader

        imgsz = check_img_size(imgsz, gs)
        pad, rect = (0.0, False) if task == "speed" else (0.5, True)  # rectangular batches, as upstream
        dataloader = create_dataloader(data[split], imgsz, batch_size, gs, single_cls, pad=pad, rect=rect,
                                       workers=workers, prefix=colorstr(f"{split}: "), nc=int(data["nc"]))[0]
        model(torch.zeros(1, 3, imgsz, imgsz, device=device, dtype=torch.half if half else torch.float))  # warm-up:
        # the first call pays one-off allocations/kernel selection, which would skew a compared ms/img
    dataset = getattr(dataloader, "dataset", None)
    if dataset is not None and len(dataset) == 0:
        raise ValueError(f"the {split} split {data.get(split, '')} has no images")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)

    confusion = ConfusionMatrix(nc=nc)
    class_map = coco80_to_coco91_class() if is_coco(data) else list(range(1000))
    to_id = image_id_fn(getattr(dataset, "im_files", []))
    seen, dt, jdict, stats = 0, [0.0, 0.0, 0.0], [], []
    loss = torch.zeros(3, device=device)
    for batch_i, (im, targets, paths, shapes) in enumerate(tqdm(dataloader, desc=split, leave=False)):
        t1 = time_sync()
        im = im.to(device, non_blocking=True)
        im = (im.half() if half and not training else im.float()) / 255  # uint8 0-255 -> 0.0-1.0
        targets = targets.to(device)
        nb, _, height, width = im.shape
        t2 = time_sync()
        with torch.autocast("cuda", dtype=torch.float16, enabled=half and training):
            out = model(im)
        preds, train_out = (out[0], out[1]) if isinstance(out, (list, tuple)) else (out, None)
        t3 = time_sync()
        if compute_loss is not None and train_out is not None:
            loss += compute_loss([x.float() for x in train_out], targets)[1]  # box, obj, cls
        targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)  # to input pixels
        preds = non_max_suppression(preds, conf_thres, iou_thres, multi_label=True, agnostic=single_cls,
                                    max_det=max_det, time_limit=None)  # metrics must not depend on CPU speed
        t4 = time_sync()
        dt[0], dt[1], dt[2] = dt[0] + t2 - t1, dt[1] + t3 - t2, dt[2] + t4 - t3

        for si, pred in enumerate(preds):
            seen += 1
            labels = targets[targets[:, 0] == si, 1:].float()  # [nl, 5] cls, xywh input pixels
            shape0, ratio_pad = shapes[si][0], shapes[si][1]
            predn = pred.float().clone()
            if single_cls:
                predn[:, 5] = 0
                labels[:, 0] = 0
            scale_boxes(im[si].shape[1:], predn[:, :4], shape0, ratio_pad)  # to original image pixels
            tbox = scale_boxes(im[si].shape[1:], xywh2xyxy(labels[:, 1:5]), shape0, ratio_pad)
            labelsn = torch.cat((labels[:, 0:1], tbox), 1).cpu()
            predn = predn.cpu()
            correct = match_predictions(predn.numpy(), labelsn.numpy(), iouv)
            stats.append((correct, predn[:, 4].numpy(), predn[:, 5].numpy(), labelsn[:, 0].numpy()))
            if plots:
                confusion.process_batch(predn.numpy(), labelsn.numpy())
            if save_txt:
                save_one_txt(predn, save_conf, shape0, save_dir / "labels" / f"{Path(paths[si]).stem}.txt")
            if save_json:
                jdict += json_records(predn, to_id(paths[si]), class_map)

        if plots and batch_i < 3:
            from utils.plots import plot_images

            plot_images(im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", names)
            plot_images(im, output_to_target(preds, max_det), paths, save_dir / f"val_batch{batch_i}_pred.jpg", names)

    if seen == 0:
        raise ValueError(f"the {split} split {data.get(split, '')} gave no images")
    tp, conf, pcls, tcls = (np.concatenate(x, 0) for x in zip(*stats))
    if len(tcls) and tcls.max() >= nc:
        LOGGER.warning(f"WARNING ⚠️ labels with class >= nc={nc} in the {split} set are counted but have no name")
    nt = np.bincount(tcls.astype(int), minlength=nc)
    mp = mr = map50 = map_ = 0.0
    ap_class = np.zeros(0, dtype=int)
    if nt.sum():
        _, _, p, r, _, ap, ap_class = ap_per_class(tp, conf, pcls, tcls, plot=plots, save_dir=save_dir, names=names)
        ap50, ap = ap[:, 0], ap.mean(1)
        mp, mr, map50, map_ = p.mean(), r.mean(), ap50.mean(), ap.mean()
    else:
        LOGGER.warning(f"WARNING ⚠️ no labels found in the {split} set, can not compute metrics without labels")

    LOGGER.info(HEADER)
    LOGGER.info(ROW % ("all", seen, nt.sum(), mp, mr, map50, map_))
    if (verbose or (nc < 50 and not training)) and nc > 1:
        for i, c in enumerate(ap_class):
            LOGGER.info(ROW % (names[c] if c < nc else str(c), seen, nt[c], p[i], r[i], ap50[i], ap[i]))
    t = tuple(x / seen * 1e3 for x in dt)  # ms per image
    if not training:
        shape = (batch_size, 3, imgsz, imgsz)
        LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {shape}" % t)
    if plots:
        confusion.plot(save_dir, names)

    if save_json and jdict:
        w = Path(weights[0] if isinstance(weights, (list, tuple)) else weights).stem if weights else "model"
        pred_json = Path(save_dir) / f"{w}_predictions.json"
        with open(pred_json, "w") as f:
            json.dump(jdict, f)
        LOGGER.info(f"Saved {len(jdict)} detections to {pred_json}")
        coco = coco_stats(data, split, dataset, names, class_map, single_cls, save_dir, pred_json)
        if coco is not None:
            LOGGER.info(f"pycocotools: mAP50-95 {coco[0]:.4f}, mAP50 {coco[1]:.4f} "
                        f"(val.py: {map_:.4f}, {map50:.4f})")
            map_, map50 = coco

    if not training:
        model.float()
        LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}"
                    + (f"\n{len(list((save_dir / 'labels').glob('*.txt')))} labels saved to {save_dir / 'labels'}"
                       if save_txt else ""))
    maps = np.zeros(nc) + map_
    for i, c in enumerate(ap_class):
        if c < nc:
            maps[c] = ap[i]
    losses = (loss.cpu() / max(len(dataloader), 1)).tolist()
    return ValResult(Metrics(float(mp), float(mr), float(map50), float(map_), *losses), maps, t)


def coco_stats(data, task, dataset, names, class_map, single_cls, save_dir, pred_json):
    """COCOeval of the predictions json against the data set's annotations, or ones built from its labels."""
    anno = annotation_file(data, task)
    if anno is None:
        if dataset is None or not all(hasattr(dataset, a) for a in ("labels", "shapes", "im_files")):
            LOGGER.warning("WARNING ⚠️ no COCO annotation file and no dataset labels: skipping COCO evaluation")
            return None
        anno = coco_gt_from_labels(dataset, names, class_map, single_cls, Path(save_dir) / f"{task}_annotations.json")
    ids = [image_id_fn(dataset.im_files)(f) for f in dataset.im_files] if dataset is not None else []
    try:
        return coco_evaluate(anno, pred_json, ids)
    except Exception as e:  # a malformed annotation file must not lose the rest of the results
        LOGGER.warning(f"WARNING ⚠️ pycocotools evaluation of {pred_json} against {anno} failed: {e}")
        return None


def save_one_txt(predn, save_conf, shape0, file):
    """Rows `cls x y w h [conf]`, normalised to the original image (no file for an image without any)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    if not len(predn):
        return
    gn = torch.tensor(shape0)[[1, 0, 1, 0]]  # w, h, w, h
    with open(file, "a") as f:
        for *xyxy, conf, cls in predn.tolist():
            xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gn).view(-1).tolist()
            line = (cls, *xywh, conf) if save_conf else (cls, *xywh)
            f.write(("%g " * len(line)).rstrip() % line + "\n")


def output_to_target(preds, max_det=300):
    """NMS output (list of [k, 6] xyxy, conf, cls) -> [n, 7] (batch index, cls, x, y, w, h, conf) for plotting."""
    rows = []
    for i, p in enumerate(preds):
        p = p[:max_det].float().cpu()
        rows.append(torch.cat((torch.full((len(p), 1), i), p[:, 5:6], xyxy2xywh(p[:, :4]), p[:, 4:5]), 1))
    return torch.cat(rows, 0) if rows else torch.zeros((0, 7))


def check_weights(weights, data, split, single_cls, imgsz):
    """Load every weights file once before any evaluation: errors surface first; -> [(params, GFLOPs)]."""
    from models.checkpoint import load_model

    data, out = resolve_data(data, split), []
    for w in weights:
        model = load_model(w, device="cpu")  # unfused: the published parameter count
        check_nc(model, data, single_cls, w)
        out.append((sum(p.numel() for p in model.parameters()), count_flops(model, imgsz)))
    return out


def short_labels(weights):
    """Shortest path tails that tell the files apart: runs/a/weights/best.pt, runs/b/weights/best.pt ->
    a/weights/best.pt, b/weights/best.pt (file names alone when they already differ)."""
    parts = [Path(w).parts for w in weights]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = [str(Path(*p[-n:])) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(w) for w in weights]


def comparison_rows(weights, summaries, results, imgsz):
    """One dict per weights file; d* columns are the difference from the first row."""
    rows = []
    for w, (params, gflops), res in zip(short_labels(weights), summaries, results):
        m = res.metrics
        rows.append({"weights": w, "params": params, f"GFLOPs@{imgsz}": gflops, "P": m.precision,
                     "R": m.recall, "mAP50": m.map50, "mAP50-95": m.map, "ms/img": sum(res.times)})
    keys = ["P", "R", "mAP50", "mAP50-95", "ms/img"]
    for r in rows:
        r.update({f"d{k}": r[k] - rows[0][k] for k in keys})
    return rows


def format_table(rows, markdown=False):
    """Printable table: metric values with their difference from the first row in brackets."""
    if not rows:
        return ""
    base = [k for k in rows[0] if not k.startswith("d")]
    cells = [base] + [[_cell(r, k, i > 0) for k in base] for i, r in enumerate(rows)]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in base) + "|")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(base))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(base))) for c in cells)


def _cell(r, k, diff):
    v = r[k]
    if k == "weights":
        return str(v)
    if k == "params":
        return f"{v:,}"
    if k.startswith("GFLOPs"):
        return f"{v:.3g}"
    fmt = ".1f" if k == "ms/img" else ".3f"
    d = r.get(f"d{k}")
    return f"{v:{fmt}}" + (f" ({d:+{fmt}})" if diff and d is not None else "")


def write_table(rows, file):
    """--table FILE: Markdown for .md, CSV (raw numbers, difference columns) for .csv."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    if file.suffix.lower() == ".csv":
        with open(file, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    elif file.suffix.lower() == ".md":
        file.write_text(format_table(rows, markdown=True) + "\n")
    else:
        raise ValueError(f"--table {file}: use a .md or .csv file name")
    LOGGER.info(f"Comparison table saved to {file}")


def parse_opt(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=str, default=str(ROOT / "data/shapes.yaml"), help="dataset.yaml path")
    p.add_argument("--weights", nargs="+", type=str, default=["yolov5s.pt"],
                   help="one or several weights files (several: a comparison table)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    p.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    p.add_argument("--task", default="val", choices=("train", "val", "test", "speed"), help="split, or speed")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or cpu")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    p.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    p.add_argument("--verbose", action="store_true", help="report mAP by class")
    p.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    p.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    p.add_argument("--save-json", action="store_true", help="save a COCO-format json results file")
    p.add_argument("--project", default=str(ROOT / "runs/val"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--half", action="store_true", help="use FP16 half-precision inference (CUDA only)")
    p.add_argument("--table", type=str, default=None, help="write the comparison table to FILE (.md or .csv)")
    opt = p.parse_args(argv)
    if opt.table and Path(opt.table).suffix.lower() not in (".md", ".csv"):
        p.error(f"--table {opt.table}: use a .md or .csv file name")
    return opt


def main(opt):
    """Validate each weights file on the same data; with several (or --table), print the comparison."""
    kw = {k: v for k, v in vars(opt).items() if k not in ("weights", "table")}
    if opt.task == "speed":
        kw.update(conf_thres=0.25, iou_thres=0.45, save_json=False, plots=False)
    weights = opt.weights if isinstance(opt.weights, (list, tuple)) else [opt.weights]
    compare = len(weights) > 1 or bool(opt.table)
    split = "val" if opt.task == "speed" else opt.task
    summaries = check_weights(weights, opt.data, split, opt.single_cls, opt.imgsz) if compare else None
    results = []
    for w in weights:
        LOGGER.info(f"\n{colorstr('bold', w)}")
        results.append(run(weights=w, **kw))
    if compare:
        rows = comparison_rows(weights, summaries, results, opt.imgsz)
        LOGGER.info(f"\nComparison on {opt.data} ({split}), GFLOPs at {opt.imgsz}x{opt.imgsz}, "
                    f"ms/img = pre-process + inference + NMS; brackets: difference from the first row\n"
                    + format_table(rows))
        if opt.table:
            write_table(rows, opt.table)
    return results


if __name__ == "__main__":
    cli_main(main, parse_opt)
