"""Read upstream YOLOv5 .pt files (pickled model objects) without executing anything from them.

Upstream files pickle whole nn.Module objects. Instead of importing their classes, the restricted
unpickler below turns every model/torch.nn class into an inert stand-in (a plain attribute bag), lets
through only an explicit list of tensor/container reconstructors, and refuses every other global
(os.system, subprocess.*, builtins.eval, ...) with a CheckpointError that names it. The one value
class let through is pathlib's paths (upstream's train.py stores them in `opt`): they arrive as plain
text, built with the pure path class of their flavour, so no path object and no file access is made.
"""
import _compat_pickle
import collections
import pathlib
import pickle
import types

import numpy as np
import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint (truncated, garbage, refused content, missing keys)."""


class StandIn:
    """Inert placeholder for a pickled object of an upstream or torch.nn class.

    Pickle fills its __dict__ (default BUILD); no method of the original class ever runs.
    """

    upstream_name = "?"

    def __repr__(self):
        return f"<stand-in for {self.upstream_name}>"


_STANDINS = {}


def _standin(qualname: str) -> type:
    cls = _STANDINS.get(qualname)
    if cls is None:
        cls = _STANDINS[qualname] = type(qualname.rsplit(".", 1)[-1], (StandIn,), {"upstream_name": qualname})
    return cls


# Classes of upstream's models/ package that may appear in a file (only some can be rebuilt here; the
# others fail later with "unsupported module" from parse_model, which is clearer than a refusal).
UPSTREAM_CLASSES = {
    "models.yolo": {"DetectionModel", "Model", "Detect", "BaseModel"},
    "models.common": {"Conv", "C3", "Bottleneck", "SPPF", "Concat", "SPP", "Focus", "DWConv",
                      "BottleneckCSP", "C3TR", "C3SPP", "C3Ghost", "C3x", "GhostConv", "GhostBottleneck",
                      "Contract", "Expand", "CrossConv", "TransformerBlock", "TransformerLayer"},
}


def _is_torch_module_class(module: str, name: str) -> bool:
    """torch.nn.modules.<file>.<Class> where torch.nn.<Class> is an nn.Module subclass."""
    obj = getattr(nn, name, None)
    return module.startswith("torch.nn.modules.") and isinstance(obj, type) and issubclass(obj, nn.Module)


# ---- reconstructors: thin checked wrappers; hooks and extra metadata from the file are dropped ----
def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError(f"tensor data is a {type(storage).__name__}, not a storage")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, bool(requires_grad),
                                           collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, *state):
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"parameter data is a {type(data).__name__}, not a tensor")
    return nn.Parameter(data, requires_grad=bool(requires_grad))


def _latin1_bytes(text, encoding="latin1"):
    """How protocol-2 pickles spell bytes (e.g. a numpy array's raw data): _codecs.encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("_codecs.encode refused (latin1 text to bytes only)")
    return text.encode("latin1")


_NUMERIC_KINDS = set("biufc")  # bool, int, uint, float, complex


def _np_dtype(obj, align=False, copy=False):
    dt = np.dtype(obj) if isinstance(obj, str) and len(obj) <= 4 else None
    if dt is None or dt.kind not in _NUMERIC_KINDS:
        raise CheckpointError(f"numpy dtype {obj!r} refused (numeric dtypes only)")
    return dt


def _np_scalar(dtype, data=None):
    """numpy scalar (e.g. an upstream best_fitness) from its raw bytes."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or not isinstance(data, bytes):
        raise CheckpointError("numpy scalar refused (numeric dtypes from raw bytes only)")
    return np.frombuffer(data, dtype=dtype)[0]


_NDARRAY = _standin("numpy.ndarray")  # only meaningful as the first argument of _reconstruct


def _np_reconstruct(cls, shape, typecode):
    """Empty ndarray that pickle's BUILD then fills through numpy's own __setstate__ (raw bytes)."""
    if cls is not _NDARRAY:
        raise CheckpointError(f"numpy reconstruct of {cls!r} refused")
    return np.ndarray.__new__(np.ndarray, shape, dtype=np.uint8)


def _path_as_text(flavour):
    """A pickled pathlib path -> its text, without instantiating the concrete class.

    Pickles hold a path as (class, parts): ('/', 'x', 'y') on Python <= 3.12, the raw strings ('/x/y',)
    on newer ones. Joining them with the pure path class of the same flavour gives the text on every OS,
    so a checkpoint written on Windows opens on Linux and the reverse (the concrete WindowsPath or
    PosixPath cannot be instantiated on the other system)."""
    def rebuild(*parts):
        if not all(isinstance(p, str) for p in parts):
            raise CheckpointError(f"path parts must be text, got {[type(p).__name__ for p in parts]}")
        return str(flavour(*parts))
    return rebuild


_PATH_FLAVOURS = {"Path": pathlib.PurePath, "PurePath": pathlib.PurePath,  # the host's flavour
                  "PosixPath": pathlib.PurePosixPath, "PurePosixPath": pathlib.PurePosixPath,
                  "WindowsPath": pathlib.PureWindowsPath, "PureWindowsPath": pathlib.PureWindowsPath}

ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): _np_dtype,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
}
# upstream train.py stores paths in `opt` (evolve_population, save_dir, project); Python 3.13+ spells the
# module pathlib._local
ALLOWED.update({(module, name): _path_as_text(flavour) for name, flavour in _PATH_FLAVOURS.items()
                for module in ("pathlib", "pathlib._local")})
# torch.load resolves torch.<X>Storage names itself (before find_class), so they are not listed here.


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # protocol-2 files use Python 2 names ('__builtin__.set', 'commands.call'): map them the way the
        # stock unpickler would, so the allow-list and the error messages speak Python 3
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        fn = ALLOWED.get((module, name))
        if fn is not None:
            return fn
        if name in UPSTREAM_CLASSES.get(module, ()) or _is_torch_module_class(module, name):
            return _standin(f"{module}.{name}")
        raise CheckpointError(f"refused global '{module}.{name}' (not a model class or tensor reconstructor)")


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# The object handed to torch.load(pickle_module=...): torch subclasses its Unpickler.
restricted_pickle = types.ModuleType("restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.UnpicklingError = pickle.UnpicklingError


def load_restricted(path):
    """torch.load of a zip-format file through the restricted unpickler (tensors on CPU)."""
    return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)


def is_standin(obj, *qualnames) -> bool:
    return isinstance(obj, StandIn) and (not qualnames or obj.upstream_name in qualnames)


def standin_state_dict(obj, prefix="", _path=()) -> dict:
    """state_dict of a pickled nn.Module stand-in: walk _parameters, persistent _buffers, _modules.

    Shared children (upstream's one SiLU) are walked once per path, as nn.Module.state_dict does.
    """
    if id(obj) in _path or len(_path) > 64:
        raise CheckpointError(f"module graph has a cycle or is too deep at '{prefix}'")
    _path = (*_path, id(obj))
    out = collections.OrderedDict()
    skip = getattr(obj, "_non_persistent_buffers_set", set())
    for attr in ("_parameters", "_buffers"):
        entries = getattr(obj, attr, {})
        if not isinstance(entries, dict):
            raise CheckpointError(f"'{prefix}{attr}' is a {type(entries).__name__}, not a dict")
        for k, v in entries.items():
            if v is None or (attr == "_buffers" and k in skip):
                continue
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"'{prefix}{k}' is a {type(v).__name__}, not a tensor")
            out[prefix + k] = v.detach()
    children = getattr(obj, "_modules", {})
    if not isinstance(children, dict):
        raise CheckpointError(f"'{prefix}_modules' is a {type(children).__name__}, not a dict")
    for k, m in children.items():
        if m is None:
            continue
        if not isinstance(m, StandIn):
            raise CheckpointError(f"'{prefix}{k}' is a {type(m).__name__}, not a module")
        out.update(standin_state_dict(m, f"{prefix}{k}.", _path))
    return out
