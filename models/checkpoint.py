"""Checkpoints: the project's weights_only-loadable format, upstream YOLOv5 files, weight transfer.

Project format (a plain dict, every value loadable with torch.load(weights_only=True)):
    {'format': 'yolov5kd-v1', 'model', 'ema' (fp16 state_dicts), 'updates', 'yaml', 'names', 'nc',
     'stride', 'epoch', 'best_fitness', 'optimizer', 'opt', 'hyp', 'date', 'distill', 'adapters'}
"""
import argparse
import os
import pickle
import shutil
import urllib.request
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from models.common import Conv
from models.safe_pickle import CheckpointError, is_standin, load_restricted, standin_state_dict
from models.yolo import DetectionModel
from utils.data_config import names_list
from utils.logging import LOGGER

__all__ = ("CheckpointError", "save_checkpoint", "load_checkpoint", "load_model", "model_from_checkpoint",
           "transfer_weights", "strip_optimizer", "attempt_download")

FORMAT = "yolov5kd-v1"
KEYS = ("format", "model", "ema", "updates", "yaml", "names", "nc", "stride", "epoch", "best_fitness",
        "optimizer", "opt", "hyp", "date", "distill", "adapters")
RELEASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0"
OFFICIAL = {f"yolov5{s}{p6}.pt" for s in "nsmlx" for p6 in ("", "6")}


# ---------------------------------------------------------------- plain values
MAX_DEPTH = 64  # nesting of a record's containers; upstream opt/hyp/yaml nest 4 deep at most
MAX_ITEMS = 200_000  # values visited for one record (shared references count every time they are reached)


class _NotPlain(ValueError):
    """A value too deep, too large or self-referencing to turn into plain types."""


def _plain(x, where="value", _budget=None, _depth=0, _open=frozenset()):
    """Plain python/tensor types only, so the checkpoint loads with weights_only=True.

    Bounded: more than MAX_DEPTH levels, more than MAX_ITEMS values or a container that contains itself
    raise _NotPlain (a crafted file can hold a list that reaches itself, or 2**64 shared references)."""
    budget = [MAX_ITEMS] if _budget is None else _budget
    budget[0] -= 1
    if budget[0] < 0:
        raise _NotPlain(f"{where} holds more than {MAX_ITEMS} values")
    if x is None or type(x) in (bool, int, float, str):
        return x
    if isinstance(x, np.generic):  # before the float check: np.float64 subclasses float
        return x.item()
    for t in (bool, int, float, str):  # subclasses (enums, np.float64 ...) become the plain type
        if isinstance(x, t):
            return t(x)
    if isinstance(x, argparse.Namespace):
        x = vars(x)
    if isinstance(x, (dict, list, tuple)):
        if id(x) in _open:
            raise _NotPlain(f"{where} contains itself")
        if _depth >= MAX_DEPTH:
            raise _NotPlain(f"{where} is nested deeper than {MAX_DEPTH} levels")
        inner = dict(_budget=budget, _depth=_depth + 1, _open=_open | {id(x)})
        if isinstance(x, dict):
            return {(_plain(k, where, **inner) if isinstance(k, (int, str, np.generic)) else str(k)):
                    _plain(v, f"{where}.{k}", **inner) for k, v in x.items()}
        v = [_plain(v, where, **inner) for v in x]
        return tuple(v) if type(x) is tuple else v
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.ndarray):
        if x.size > budget[0]:
            raise _NotPlain(f"{where} holds more than {MAX_ITEMS} values")
        budget[0] -= x.size
        return x.tolist()
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    LOGGER.warning(f"WARNING ⚠️ checkpoint: {where} of type {type(x).__name__} stored as text")
    return str(x)


def _plain_record(x, where, path):
    """A dict record read from a file (opt, hyp, distill, ...) as plain types, keeping what is usable: an
    entry too deep, too large or self-referencing is dropped with a warning; a record that is not a dict
    is kept if plain, else dropped. One budget of MAX_ITEMS values covers the whole record."""
    budget = [MAX_ITEMS]
    if isinstance(x, argparse.Namespace):
        x = vars(x)
    if not isinstance(x, dict):
        try:
            return _plain(x, where, budget)
        except _NotPlain as e:
            LOGGER.warning(f"WARNING ⚠️ {path}: {where} dropped ({e})")
            return None
    out = {}
    for k, v in x.items():
        key = k if isinstance(k, (int, str)) else str(k) if isinstance(k, (float, bool)) else None
        if key is None:
            LOGGER.warning(f"WARNING ⚠️ {path}: {where} entry with a {type(k).__name__} key dropped")
            continue
        try:
            out[key] = _plain(v, f"{where}.{key}", budget)
        except _NotPlain as e:
            LOGGER.warning(f"WARNING ⚠️ {path}: {where}.{key} dropped ({e})")
            if budget[0] < 0:
                LOGGER.warning(f"WARNING ⚠️ {path}: the rest of {where} dropped ({MAX_ITEMS} values read)")
                break
    return out


# ---------------------------------------------------------------- saving
def _to_float(x):
    """best_fitness may arrive as a float, a numpy scalar or array, or a tensor of one value; anything else
    (or an empty array) gives None."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, (int, float, np.generic, np.ndarray)) and np.size(x) and np.asarray(x).dtype.kind in "biuf":
        return float(np.asarray(x, dtype=np.float64).reshape(-1)[0])
    return None


def _half_state(module_or_state):
    """fp16 CPU copy of a state_dict (integer buffers such as num_batches_tracked unchanged)."""
    sd = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    # contiguous: a model trained channels-last (utils.torch_utils.training_memory_format) saves the usual layout
    return {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in sd.items()}


def _bare(model):
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def atomic_save(obj, path) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash or kill at any
    moment leaves either the previous file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # persist the rename itself (POSIX); best effort
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def save_checkpoint(path, model, *, ema=None, updates=0, optimizer=None, epoch=-1, best_fitness=None,
                    opt=None, hyp=None, distill=None, adapters=None) -> Path:
    """Write the project checkpoint dict atomically. `ema` may be a ModelEMA (its .ema and .updates are
    used) or a model; `optimizer` an optimizer or its state_dict; `adapters` a module or a state_dict."""
    model = _bare(model)
    if any(isinstance(m, Conv) and m.bn is None for m in model.modules()):
        raise ValueError("save_checkpoint: the model is fused (fuse()); save the unfused model")
    if ema is not None and hasattr(ema, "ema") and hasattr(ema, "updates"):  # ModelEMA
        ema, updates = ema.ema, ema.updates
    if isinstance(adapters, nn.Module):
        adapters = _bare(adapters)
    ckpt = {
        "format": FORMAT,
        "model": _half_state(model),
        "ema": _half_state(_bare(ema)) if ema is not None else None,
        "updates": int(updates or 0),
        "yaml": _plain(model.yaml, "yaml"),
        "names": [str(n) for n in model.names],
        "nc": int(model.nc),
        "stride": model.stride.detach().cpu().float().clone(),
        "epoch": int(epoch),
        "best_fitness": _to_float(best_fitness),
        "optimizer": optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer,
        "opt": _plain(opt, "opt"),
        "hyp": _plain(hyp, "hyp"),
        "date": datetime.now().isoformat(),
        "distill": _plain(distill, "distill"),
        "adapters": _half_state(adapters) if adapters is not None else None,
    }
    return atomic_save(ckpt, path)


# ---------------------------------------------------------------- loading
def _names_list(names, nc, path):
    """Upstream names may be a list or {index: name}; return a list of nc strings."""
    if names is None:
        return [f"class{i}" for i in range(nc)]
    try:
        names = names_list(names, str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if len(names) != nc:
        raise CheckpointError(f"{path}: {len(names)} class names for nc={nc}")
    return names


def _from_upstream(obj, path) -> dict:
    """An upstream checkpoint (stand-in objects) -> the project dict."""
    if not isinstance(obj, dict) or "model" not in obj:
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a YOLOv5 checkpoint (no 'model' entry; found {keys})")
    model = obj["model"]
    if not is_standin(model, "models.yolo.DetectionModel", "models.yolo.Model"):
        raise CheckpointError(f"{path}: 'model' is {model!r}, expected an upstream YOLOv5 DetectionModel")
    yaml = getattr(model, "yaml", None)
    if not isinstance(yaml, dict) or "nc" not in yaml:
        raise CheckpointError(f"{path}: upstream model has no usable 'yaml' dict")
    try:
        yaml = _plain(yaml, "yaml")
    except _NotPlain as e:
        raise CheckpointError(f"{path}: model yaml refused ({e})") from None
    if isinstance(getattr(model, "yaml_file", None), str):
        yaml.setdefault("yaml_file", model.yaml_file)
    ema = obj.get("ema")
    stride = getattr(model, "stride", None)
    try:
        state, ema_state = standin_state_dict(model), (standin_state_dict(ema) if is_standin(ema) else None)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return {
        "format": FORMAT,
        "model": state,
        "ema": ema_state,
        "updates": int(obj.get("updates") or 0),
        "yaml": yaml,
        "names": _names_list(getattr(model, "names", None), int(yaml["nc"]), path),
        "nc": int(yaml["nc"]),
        "stride": stride.float() if isinstance(stride, torch.Tensor) else None,
        "epoch": int(obj["epoch"]) if obj.get("epoch") is not None else -1,
        "best_fitness": _to_float(obj.get("best_fitness")),
        "optimizer": obj.get("optimizer"),
        "opt": _plain_record(obj.get("opt"), "opt", path),
        "hyp": _plain_record(getattr(model, "hyp", None), "hyp", path),
        "date": obj.get("date") if isinstance(obj.get("date"), str) else None,
        "distill": None,
        "adapters": None,
    }


def load_checkpoint(path) -> dict:
    """The project dict from a project checkpoint or an upstream YOLOv5 file (converted on the fly).

    Project files load with weights_only=True; anything that needs more goes through the restricted
    unpickler of models.safe_pickle, which refuses every global that is not a model class or a tensor
    reconstructor. Raises CheckpointError naming the file and the problem (FileNotFoundError if absent).
    """
    path = attempt_download(path)  # an existing file as is; a missing official name is fetched once
    if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (empty, truncated, corrupted or "
                              f"another format)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = None  # holds objects (upstream file, or worse): try the restricted unpickler
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if obj is None:
        try:
            obj = load_restricted(path)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
        return _from_upstream(obj, path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        missing = [k for k in KEYS if k not in obj]
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks {missing}")
        for k in ("opt", "hyp", "distill"):  # records (weights_only allows any nesting of lists and dicts)
            obj[k] = _plain_record(obj[k], k, path) if obj[k] is not None else None
        try:
            obj["yaml"] = _plain(obj["yaml"], "yaml")
        except _NotPlain as e:
            raise CheckpointError(f"{path}: model yaml refused ({e})") from None
        return obj
    if isinstance(obj, dict) and "model" in obj and not isinstance(obj.get("model"), dict):
        return _from_upstream(obj, path)
    found = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: not a YOLOv5 checkpoint (expected format '{FORMAT}' or an upstream file; "
                          f"found {found})")


def model_from_checkpoint(ckpt: dict, which: str = "ema") -> DetectionModel:
    """Rebuild the DetectionModel of a project dict (float32, eval). which='ema' falls back to 'model'."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', not {which!r}")
    state = ckpt.get("ema") if which == "ema" and ckpt.get("ema") is not None else ckpt.get("model")
    if not isinstance(state, dict) or not isinstance(ckpt.get("yaml"), dict):
        raise CheckpointError("checkpoint has no model state_dict or no model yaml")
    try:
        model = DetectionModel(ckpt["yaml"])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"cannot build a model from the checkpoint's yaml ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match its model yaml: {e}") from None
    model.names = list(ckpt.get("names") or model.names)
    return model.float().eval()


def attempt_download(name, timeout: float = 10.0) -> Path:
    """Path of a weights file; an official name (yolov5s.pt ...) missing on disk is fetched once from the
    v7.0 GitHub release. Offline: FileNotFoundError saying where to put the file."""
    p = Path(str(name).strip())
    if p.is_file():
        return p
    if p.name not in OFFICIAL or str(p) != p.name:
        raise FileNotFoundError(f"weights not found: {p}")
    url = f"{RELEASE_URL}/{p.name}"
    tmp = p.with_name(f".{p.name}.part")
    LOGGER.info(f"Downloading {url} to {p.resolve()}...")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        if tmp.stat().st_size < 100_000:
            raise OSError(f"downloaded only {tmp.stat().st_size} bytes")
        os.replace(tmp, p)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(f"{p.name} is not on disk and downloading {url} failed ({e}). Fetch it on a "
                                f"machine with internet access and put it at {p.resolve()} "
                                f"(or pass its path).") from None
    return p


def load_model(path_or_name, device="cpu", fuse=False) -> DetectionModel:
    """A ready-to-run model (eval, float32, .names/.stride/.yaml) from a project or upstream checkpoint,
    EMA weights preferred; bare official names are downloaded when missing."""
    ckpt = load_checkpoint(path_or_name)
    try:
        model = model_from_checkpoint(ckpt, "ema").to(device)
    except CheckpointError as e:
        raise CheckpointError(f"{path_or_name}: {e}") from None
    return model.fuse() if fuse else model


# ---------------------------------------------------------------- weights transfer / stripping
def transfer_weights(model, state_dict, exclude=("anchors",), source=None):
    """Load every tensor of state_dict whose name exists in model with the same shape (and whose name
    contains no `exclude` string); e.g. COCO weights into a 3-class model skip Detect's output convs.

    state_dict may also be a checkpoint path (its EMA, else model, weights). Returns (transferred, total).
    """
    if isinstance(state_dict, (str, Path)):
        source = source or str(state_dict)
        ckpt = load_checkpoint(state_dict)
        state_dict = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    model = _bare(model)
    msd = model.state_dict()
    keep = {k: v for k, v in state_dict.items()
            if k in msd and v.shape == msd[k].shape and not any(x in k for x in exclude)}
    model.load_state_dict(keep, strict=False)
    LOGGER.info(f"Transferred {len(keep)}/{len(msd)} items from {source or 'weights'}")
    return len(keep), len(msd)


def strip_optimizer(path, out=None) -> Path:
    """Final weights: EMA becomes 'model'; optimizer, EMA and adapters are dropped (as upstream: epoch -1,
    best_fitness None). Written atomically to `out` (default: in place)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("ema") is not None:
        ckpt["model"] = ckpt["ema"]
    ckpt.update(ema=None, optimizer=None, adapters=None, updates=0, epoch=-1, best_fitness=None)
    ckpt["model"] = _half_state(ckpt["model"])
    out = atomic_save(ckpt, out or path)
    LOGGER.info(f"Optimizer stripped from {path}{f', saved as {out}' if str(out) != str(path) else ''}, "
                f"{out.stat().st_size / 1e6:.1f}MB")
    return out
