"""YOLOv5 detection model: the Detect head, the yaml parser and DetectionModel."""
import math
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

from models.common import C3, SPPF, Bottleneck, Concat, Conv, fuse_conv_and_bn
from utils.files import find_file, yaml_load
from utils.logging import LOGGER


class Detect(nn.Module):
    """One 1x1 conv per level predicting na * (5 + nc) channels, plus YOLOv5 v6+ box decoding."""

    export = False  # True: eval-mode forward returns only the decoded tensor (ONNX export)

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5  # x, y, w, h, objectness, classes
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        # anchors [nl, na, 2]: given in pixels, divided by the stride once it is known (DetectionModel)
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        # not persistent: absent from the state_dict, like upstream's plain attribute
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self._grid = [None] * self.nl  # per level: cell offsets [1, 1, ny, nx, 2], rebuilt on shape change

    def forward(self, x):
        """x: list of nl maps [bs, c_i, ny, nx] (left untouched). Training: raw maps; eval: (decoded, raw)."""
        raw = []
        for i, xi in enumerate(x):
            bs, _, ny, nx = xi.shape
            # [bs, na*no, ny, nx] -> [bs, na, ny, nx, no]
            raw.append(self.m[i](xi).view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        if self.training:
            return raw
        decoded = torch.cat([self._decode(i, p) for i, p in enumerate(raw)], 1)
        return decoded if self.export else (decoded, raw)

    def _decode(self, i, p):
        """Raw [bs, na, ny, nx, no] -> [bs, na*ny*nx, no]: xywh in input pixels, sigmoid scores."""
        bs, na, ny, nx, no = p.shape
        grid = self._cell_grid(i, ny, nx, p.device, p.dtype)
        xy, wh, conf = p.sigmoid().split((2, 2, self.nc + 1), 4)
        xy = (xy * 2 + grid) * self.stride[i]  # (2*sigmoid - 0.5 + cell) * stride
        wh = (wh * 2) ** 2 * (self.anchors[i] * self.stride[i]).view(1, na, 1, 1, 2)  # anchors in pixels
        return torch.cat((xy, wh, conf), 4).view(bs, na * ny * nx, no)

    def _cell_grid(self, i, ny, nx, device, dtype):
        g = self._grid[i]
        if g is None or g.shape[2:4] != (ny, nx) or g.device != device or g.dtype != dtype:
            yv, xv = torch.meshgrid(torch.arange(ny, device=device, dtype=dtype),
                                    torch.arange(nx, device=device, dtype=dtype), indexing="ij")
            g = (torch.stack((xv, yv), 2) - 0.5).view(1, 1, ny, nx, 2)  # the -0.5 of 2*sigmoid - 0.5
            if self.export or torch.jit.is_tracing() or torch.compiler.is_compiling():
                return g  # computed from the traced shape, never a cached constant
            self._grid[i] = g
        return g


MODULES = {"Conv": Conv, "Bottleneck": Bottleneck, "C3": C3, "SPPF": SPPF, "Concat": Concat,
           "nn.Upsample": nn.Upsample, "Upsample": nn.Upsample, "Detect": Detect}


def make_divisible(x, divisor=8):
    return math.ceil(x / divisor) * divisor


def _resolve_arg(a, d):
    """yaml strings: 'nc' and 'anchors' refer to the yaml's values, 'None' is None, others stay text."""
    if a in ("nc", "anchors"):
        return d[a]
    return None if a == "None" else a


def parse_model(d, ch):
    """Build the layers of a model dict. ch: [input channels]. Returns (nn.Sequential, save_list).

    Each layer gets attributes i (index), f (from), n (repeats), mtype, np (parameters), args.
    """
    anchors, nc = d["anchors"], d["nc"]
    gd, gw = d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0)
    if d.get("activation"):
        LOGGER.warning(f"WARNING ⚠️ model yaml 'activation: {d['activation']}' is not supported; using SiLU")
    na = len(anchors[0]) // 2 if isinstance(anchors, (list, tuple)) else int(anchors)
    no = na * (nc + 5)
    layers, save, ch = [], [], list(ch)
    for i, (f, n, name, args) in enumerate(d["backbone"] + d["head"]):
        m = MODULES.get(name)
        if m is None:
            raise ValueError(f"model yaml layer {i}: unsupported module '{name}' (supported: {', '.join(MODULES)})")
        args = [_resolve_arg(a, d) if isinstance(a, str) else a for a in args]
        n = n_ = max(round(n * gd), 1) if n > 1 else n  # depth multiple
        if m in (Conv, Bottleneck, C3, SPPF):
            c1, c2 = ch[f], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * gw, 8)  # width multiple, rounded up to a multiple of 8
            args = [c1, c2, *args[1:]]
            if m is C3:
                args.insert(2, n)  # C3 repeats its bottlenecks internally
                n = 1
        elif m is Concat:
            c2 = sum(ch[x] for x in f)
        elif m is Detect:
            args = [args[0], deepcopy(args[1]), [ch[x] for x in f]]
            if isinstance(args[1], int):  # number of anchors only: placeholders for autoanchor
                args[1] = [list(range(args[1] * 2))] * len(f)
        else:
            c2 = ch[f]
        m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        m_.i, m_.f, m_.n, m_.mtype, m_.args = i, f, n_, name, args
        m_.np = sum(p.numel() for p in m_.parameters())
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(m_)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


def check_anchor_order(m: Detect, strides) -> None:
    """Anchors must grow with the stride (small anchors on the fine P3 level); flip them if not."""
    if m.anchors.device.type == "meta":
        return  # shapes-only build (summaries): values unknown, order irrelevant
    area = m.anchors.prod(-1).mean(-1).view(-1)  # mean anchor area per level
    da, ds = area[-1] - area[0], strides[-1] - strides[0]
    if da != 0 and (da > 0) != (ds > 0):
        LOGGER.info("Reversing anchor order to match the stride order")
        m.anchors[:] = m.anchors.flip(0)


class DetectionModel(nn.Module):
    """YOLOv5 detector built from a yaml file name/path or an already-loaded dict."""

    def __init__(self, cfg="yolov5s.yaml", ch=3, nc=None, anchors=None):
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml = deepcopy(cfg)
        else:
            path = find_file(cfg)
            self.yaml = yaml_load(path)
            self.yaml["yaml_file"] = path.name  # lets the summary say "YOLOv5s", also after a reload
        missing = [k for k in ("nc", "anchors", "backbone", "head") if k not in self.yaml]
        if missing:
            raise ValueError(f"model yaml {cfg if not isinstance(cfg, dict) else '(dict)'} lacks {missing}")
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        if anchors:
            LOGGER.info(f"Overriding model.yaml anchors with anchors={anchors}")
            self.yaml["anchors"] = round(anchors) if isinstance(anchors, (int, float)) else anchors
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch])
        self.nc = self.yaml["nc"]
        self.names = [f"class{i}" for i in range(self.nc)]
        self.hyp = None  # set by the trainer for the loss

        m = self.model[-1]
        if not isinstance(m, Detect):
            raise ValueError("model yaml: the last layer must be Detect")
        strides = self._probe_strides(ch)
        m.stride = torch.tensor(strides, device=m.anchors.device)
        self.stride = torch.tensor(strides, device="cpu")  # CPU copy for consumers (int(model.stride.max()))
        with torch.no_grad():
            check_anchor_order(m, strides)
            m.anchors /= m.stride.view(-1, 1, 1)  # pixels -> stride units
            self._initialize_biases(strides)

    def _probe_strides(self, ch, s=256):
        """Strides from the sizes of the maps Detect receives in one forward pass of a [1, ch, s, s]
        input. The pass runs on meta-device stand-ins of the weights: only shapes are computed (fast,
        and BN statistics stay untouched)."""
        meta = {k: torch.empty_like(v, device="meta") for k, v in
                [*self.named_parameters(), *self.named_buffers()]}
        x = torch.empty(1, ch, s, s, device="meta")
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                _, feats = torch.func.functional_call(self, meta, (x,), {"return_features": True})
        finally:
            self.train(was_training)
            self.model[-1]._grid = [None] * self.model[-1].nl  # drop grids cached on meta
        return [s / f.shape[-2] for f in feats]

    def _initialize_biases(self, strides):
        """Priors: ~8 objects per 640x640 image spread over the cells of a level; class prob 0.6/(nc-0.99)."""
        m = self.model[-1]
        for conv, s in zip(m.m, strides):
            b = conv.bias.view(m.na, -1)  # [na, no]
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5:5 + m.nc] += math.log(0.6 / (m.nc - 0.99))

    def forward(self, x, return_features=False):
        """Detect's output; with return_features also the list of maps Detect consumed (same pass)."""
        out, feats = self._forward_once(x)
        return (out, feats) if return_features else out

    def features(self, x):
        """Only the maps Detect consumes (one [bs, c_i, ny_i, nx_i] per level): Detect is not run, which
        spares a frozen teacher its head and box decoding when only its neck is imitated."""
        return self._forward_once(x, stop_at_detect=True)[1]

    def _forward_once(self, x, stop_at_detect=False):
        y, feats = [], None
        detect = self.model[-1]
        for m in self.model:
            if m.f != -1:  # inputs from earlier layers
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if m is detect:
                feats = list(x)  # one [bs, c_i, ny_i, nx_i] per level
                if stop_at_detect:
                    return None, feats
            x = m(x)
            y.append(x if m.i in self.save else None)  # keep only outputs used later
        return x, feats

    def fuse(self):
        """Fold every Conv's BatchNorm into its conv (inference only; the BN modules are removed)."""
        LOGGER.info("Fusing layers... ")
        for m in self.model.modules():
            if isinstance(m, Conv) and m.bn is not None:
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                m.bn = None
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def info(self, verbose=False, imgsz=640):
        """Log upstream's one-line summary (and the per-layer table if verbose); return
        (layers, parameters, gradients, GFLOPs or None)."""
        if verbose:
            LOGGER.info(f"\n{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
            for m in self.model:
                module = f"models.yolo.{m.mtype}" if m.mtype == "Detect" else m.mtype
                module = module if "." in module else f"models.common.{module}"
                args = m.args if m.mtype != "Detect" else [m.args[0], "anchors", m.args[2]]
                LOGGER.info(f"{m.i:>3}{str(m.f):>18}{m.n:>3}{m.np:10.0f}  {module:<40}{str(args):<30}")
        n_l = len(list(self.modules()))
        n_p = self.num_params()
        n_g = sum(p.numel() for p in self.parameters() if p.requires_grad)
        gflops = model_gflops(self, imgsz)
        fs = f", {gflops:.1f} GFLOPs" if gflops is not None else ""
        name = Path(self.yaml.get("yaml_file", "")).stem.replace("yolov5", "YOLOv5") or "Model"
        LOGGER.info(f"{name} summary: {n_l} layers, {n_p} parameters, {n_g} gradients{fs}")
        return n_l, n_p, n_g, gflops


def model_gflops(model: nn.Module, imgsz=640):
    """GFLOPs at imgsz measured by torch.utils.flop_counter on a meta-device copy (shapes only, no
    arithmetic, so even yolov5x at 640 is instant). None if it cannot be measured."""
    from utils.torch_utils import count_flops

    try:
        p = next(model.parameters())
        if p.device.type != "meta":
            model = deepcopy(model).float().to("meta")
        return count_flops(model, imgsz, ch=model.yaml.get("ch", 3) if hasattr(model, "yaml") else 3)
    except Exception as e:  # the summary must never break a run
        LOGGER.debug(f"GFLOPs not computed: {e}")
        return None


Model = DetectionModel  # upstream's older name, kept for scripts that use it
