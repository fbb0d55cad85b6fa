"""Run a detector on images, folders, globs, .txt lists, videos, webcams or URLs.

    python detect.py --weights best.pt --source data/images/       # folder
    python detect.py --weights best.onnx --source clip.mp4 --save-txt --save-conf
    python detect.py --weights best.pt --source 0                  # webcam

Outputs go to runs/detect/exp*: annotated images and videos, labels/*.txt (`class x y w h [conf]`,
normalised to the original image) and crops/<class>/*.jpg.
"""
import argparse
import ast
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.augmentations import check_img_size
from utils.boxes import non_max_suppression, scale_boxes, xyxy2xywh
from utils.data_config import names_list
from utils.files import ROOT, find_file, increment_path, yaml_load
from utils.logging import LOGGER, cli_main
from utils.sources import load_source
from utils.torch_utils import select_device, time_sync


def names_from_data(data) -> list:
    """Class names from a dataset yaml ('names' as a list or an {index: name} mapping)."""
    names = yaml_load(find_file(data)).get("names")
    if not names:
        raise ValueError(f"{data} has no 'names'")
    return names_list(names, str(data))


def parse_names(text) -> list:
    """ONNX metadata names: "{0: 'a', 1: 'b'}" (upstream's style) or "['a', 'b']"."""
    return names_list(ast.literal_eval(text), "ONNX metadata")  # literals only, never arbitrary code


class Backend:
    """A .pt model (PyTorch) or an .onnx file (onnxruntime) behind one call.

    __call__: float image batch [bs, 3, H, W] in 0-1 -> decoded predictions [bs, N, 5 + nc] (torch).
    `fixed_hw` is the input (h, w) a static-shape .onnx demands, else None.
    """

    def __init__(self, weights, device="cpu", data=None, half=False):
        w = Path(str(weights))
        self.device = select_device(device) if not isinstance(device, torch.device) else device
        self.cuda = self.device.type == "cuda"
        self.onnx = w.suffix.lower() == ".onnx"
        self.fixed_hw = None
        if half and not self.cuda and not self.onnx:
            LOGGER.warning("WARNING ⚠️ --half needs a CUDA device; running in float32 on CPU")
        self.half = bool(half and self.cuda)
        if self.onnx:
            self._load_onnx(w, data)
        else:
            from models.checkpoint import load_model  # imported here: .onnx inference needs no model code

            self.model = load_model(str(weights), device=self.device, fuse=True)
            self.model = self.model.half() if self.half else self.model.float()
            self.stride = int(max(self.model.stride))
            self.names = [str(n) for n in self.model.names]
            if data:  # an explicit dataset overrides the checkpoint's names (e.g. upstream 'class0' defaults)
                self.names = self._checked_names(names_from_data(data), len(self.names), data)

    def _load_onnx(self, w: Path, data):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(".onnx weights need onnxruntime: pip install onnxruntime (or onnxruntime-gpu)") from e
        if not w.is_file():
            raise FileNotFoundError(f"ONNX weights '{w}' not found")
        providers = ["CPUExecutionProvider"]
        if self.cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(w), providers=providers)
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        bs, _, h, wd = inp.shape  # ints for static dims, strings (or None) for dynamic ones
        self.fixed_hw = (h, wd) if isinstance(h, int) and isinstance(wd, int) else None
        if isinstance(bs, int) and bs != 1:
            raise ValueError(f"{w} has a fixed batch size of {bs}; detect.py feeds one image at a time: "
                             f"export with --batch-size 1 or --dynamic")
        nc = out.shape[-1] - 5 if isinstance(out.shape[-1], int) else None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.stride = int(meta.get("stride", 32))
        try:
            names = parse_names(meta["names"]) if "names" in meta else None
        except (ValueError, SyntaxError, TypeError):
            LOGGER.warning(f"WARNING ⚠️ {w}: unreadable 'names' metadata {meta['names'][:80]!r}, ignored")
            names = None
        if names:
            self.names = names
        elif data:
            self.names = names_from_data(data)
        else:
            LOGGER.warning(f"WARNING ⚠️ {w} has no class names in its metadata; pass --data for real names")
            self.names = [f"class{i}" for i in range(nc or 0)]
        if nc is not None:
            self.names = self._checked_names(self.names, nc, data or w)

    @staticmethod
    def _checked_names(names, nc, origin):
        if len(names) < nc:
            LOGGER.warning(f"WARNING ⚠️ {origin}: {len(names)} names for {nc} classes; padding with 'classN'")
            names = names + [f"class{i}" for i in range(len(names), nc)]
        return names

    def __call__(self, im: torch.Tensor) -> torch.Tensor:
        if self.onnx:
            x = im.cpu().numpy().astype(self.input_dtype)
            y = self.session.run(None, {self.input_name: x})[0]
            return torch.from_numpy(y).float().to(im.device)
        y = self.model(im)
        return y[0] if isinstance(y, (tuple, list)) else y

    def warmup(self, imgsz):
        """One dummy pass on CUDA so the first real image's timing excludes kernel setup."""
        if self.cuda:
            self(torch.zeros(1, 3, *imgsz, device=self.device, dtype=torch.half if self.half else torch.float))


def default_source(data="shapes.yaml") -> str:
    """The val images of a data set (shapes by default) when they are present, else a clear error."""
    from utils.data_config import check_dataset

    try:
        val = check_dataset(data, autodownload=False)["val"]
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(f"No --source given and the {data} val images are not available ({e}); pass "
                                f"--source, or generate the shapes set: python -m data.shapes_generator --out "
                                f"datasets/shapes") from e
    return str(val[0] if isinstance(val, (list, tuple)) else val)


def preprocess(im0: np.ndarray, imgsz, stride: int, auto: bool, device, half: bool) -> torch.Tensor:
    """BGR [h, w, 3] uint8 -> letterboxed RGB float [1, 3, H, W] in 0-1."""
    from utils.augmentations import letterbox

    im = letterbox(im0, imgsz, stride=stride, auto=auto)[0]
    im = np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])  # HWC BGR -> CHW RGB
    im = torch.from_numpy(im).to(device)
    return (im.half() if half else im.float())[None] / 255


def crop_box(xyxy, im: np.ndarray, file: Path, gain=1.02, pad=10) -> Path:
    """Save a slightly enlarged box crop of a BGR image; numbered names never overwrite (x.jpg, x2.jpg...)."""
    b = xyxy2xywh(torch.as_tensor(xyxy, dtype=torch.float32).view(1, 4))
    b[:, 2:] = b[:, 2:] * gain + pad
    x1, y1 = (b[0, :2] - b[0, 2:] / 2).round().int().tolist()
    x2, y2 = (b[0, :2] + b[0, 2:] / 2).round().int().tolist()
    h, w = im.shape[:2]
    crop = im[max(y1, 0):min(y2, h), max(x1, 0):min(x2, w)]
    file.parent.mkdir(parents=True, exist_ok=True)
    file = increment_path(file).with_suffix(".jpg")
    cv2.imwrite(str(file), crop)
    return file


def label_lines(det: torch.Tensor, shape, save_conf: bool) -> list:
    """[k, 6] xyxy px -> 'cls x y w h [conf]' lines normalised to the (h, w) image."""
    gn = torch.tensor(shape)[[1, 0, 1, 0]].float()
    xywhn = (xyxy2xywh(det[:, :4].float().cpu()) / gn).tolist()
    lines = []
    for (x, y, w, h), conf, c in zip(xywhn, det[:, 4].tolist(), det[:, 5].tolist()):
        row = (int(c), x, y, w, h, conf) if save_conf else (int(c), x, y, w, h)
        lines.append(("%g " * len(row)).rstrip() % row)
    return lines


def imshow_ok() -> bool:
    """Whether cv2 can open windows (headless builds and servers cannot)."""
    try:
        cv2.imshow("test", np.zeros((8, 8, 3), np.uint8))
        cv2.waitKey(1)
        cv2.destroyAllWindows()
        return True
    except Exception:
        return False


def annotate(im0: np.ndarray, det: torch.Tensor, names, line_width, hide_labels=False, hide_conf=False):
    """Boxes with 'name conf' tags drawn on a copy of the BGR image."""
    from utils.plots import Annotator, colors

    annotator = Annotator(im0.copy(), line_width=line_width)
    for *xyxy, conf, c in det.tolist():
        c = int(c)
        label = None if hide_labels else (names[c] if hide_conf else f"{names[c]} {conf:.2f}")
        annotator.box_label(xyxy, label, color=colors(c, True))
    return annotator.result()


def summary(det: torch.Tensor, names) -> str:
    """'2 circles, 1 star, ' or '(no detections), '."""
    c, n = det[:, 5].unique(return_counts=True)
    return "".join(f"{k} {names[int(i)]}{'s' * (k > 1)}, " for i, k in zip(c.tolist(), n.tolist())) or \
        "(no detections), "


class VideoSaver:
    """One mp4v writer per video/stream path, opened on its first frame with the source's fps and size."""

    def __init__(self):
        self.writers = {}

    def write(self, key: str, save_path: Path, im: np.ndarray, fps: float):
        if key not in self.writers:
            h, w = im.shape[:2]
            path = str(save_path.with_suffix(".mp4"))
            self.writers[key] = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            if not self.writers[key].isOpened():
                LOGGER.warning(f"WARNING ⚠️ cannot open a video writer for {path}")
        self.writers[key].write(im)

    def close(self, keep=None):
        """Release every writer except `keep` (the video still being read)."""
        for k in [k for k in self.writers if k != keep]:
            self.writers.pop(k).release()


@torch.no_grad()
def run(
    weights="yolov5s.pt",
    source=None,
    data=None,
    imgsz=(640, 640),
    conf_thres=0.25,
    iou_thres=0.45,
    max_det=1000,
    device="",
    view_img=False,
    save_txt=False,
    save_conf=False,
    save_crop=False,
    nosave=False,
    classes=None,
    agnostic_nms=False,
    project=ROOT / "runs/detect",
    name="exp",
    exist_ok=False,
    line_thickness=3,
    hide_labels=False,
    hide_conf=False,
    half=False,
    vid_stride=1,
):
    """Detect and save; returns (save_dir, results) with one dict per processed image or frame:
    {'path', 'frame', 'shape': (h0, w0), 'det': float32 [k, 6] (x1, y1, x2, y2, conf, cls) in original pixels}
    (none for live streams, which never end).
    """
    source = str(source) if source is not None else default_source(data or "shapes.yaml")
    frames = load_source(source, vid_stride=vid_stride)  # validates the source before loading the model
    save_img = not nosave
    backend = Backend(weights, device, data=data, half=half)
    stride, names = backend.stride, backend.names
    imgsz = check_img_size(imgsz, stride, as_hw=True)
    if backend.fixed_hw and tuple(backend.fixed_hw) != imgsz:
        LOGGER.warning(f"WARNING ⚠️ {weights} takes a fixed {list(backend.fixed_hw)} input; "
                       f"--imgsz {list(imgsz)} ignored")
        imgsz = tuple(backend.fixed_hw)
    auto = backend.fixed_hw is None  # minimal padding unless the ONNX graph has a static input shape
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    if view_img and not imshow_ok():
        LOGGER.warning("WARNING ⚠️ --view-img: this environment cannot display images (headless OpenCV?)")
        view_img = False

    backend.warmup(imgsz)
    videos, results, dt, seen = VideoSaver(), [], [0.0, 0.0, 0.0], 0
    try:
        for f in frames:
            t0 = time_sync()
            im = preprocess(f.im0, imgsz, stride, auto, backend.device, backend.half)
            t1 = time_sync()
            pred = backend(im)
            t2 = time_sync()
            det = non_max_suppression(pred, conf_thres, iou_thres, classes, agnostic_nms, max_det=max_det)[0]
            t3 = time_sync()
            dt = [dt[0] + t1 - t0, dt[1] + t2 - t1, dt[2] + t3 - t2]
            seen += 1

            if len(det):
                det[:, :4] = scale_boxes(im.shape[2:], det[:, :4], f.im0.shape).round()
            LOGGER.info(f"{f.describe()}{im.shape[2]}x{im.shape[3]} {summary(det, names)}{(t2 - t1) * 1e3:.1f}ms")
            if f.kind != "stream":  # a live stream never ends: keep nothing per frame
                results.append({"path": f.path, "frame": f.frame, "shape": f.im0.shape[:2],
                                "det": det.float().cpu().numpy()})

            stem = Path(f.name).stem
            if save_txt and len(det):
                txt = save_dir / "labels" / (stem + ("" if f.kind == "image" else f"_{f.frame}") + ".txt")
                txt.write_text("\n".join(label_lines(det, f.im0.shape[:2], save_conf)) + "\n")
            if save_crop:
                for *xyxy, conf, c in det.tolist():
                    crop_box(xyxy, f.im0, save_dir / "crops" / names[int(c)] / f"{stem}.jpg")
            if not (save_img or view_img):
                continue
            im0 = annotate(f.im0, det, names, line_thickness, hide_labels, hide_conf)
            if view_img:
                cv2.imshow(f.path, im0)
                cv2.waitKey(1)
            if save_img and f.kind == "image":
                videos.close()
                if not cv2.imwrite(str(save_dir / f.name), im0):
                    LOGGER.warning(f"WARNING ⚠️ could not write {save_dir / f.name}")
            elif save_img:
                videos.close(keep=f.path)  # the previous video is complete
                videos.write(f.path, save_dir / f.name, im0, f.fps)
    finally:
        videos.close()

    if not seen:
        LOGGER.warning(f"WARNING ⚠️ no readable images or frames in '{source}'")
    else:
        t = tuple(x / seen * 1e3 for x in dt)
        LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape "
                    f"{(1, 3, *imgsz)}" % t)
    if save_txt or save_img:
        n = len(list((save_dir / "labels").glob("*.txt")))
        extra = f"\n{n} label{'s' * (n != 1)} saved to {save_dir / 'labels'}" if save_txt else ""
        LOGGER.info(f"Results saved to {save_dir}{extra}")
    return save_dir, results


def parse_opt(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+", type=str, default="yolov5s.pt",
                   help=".pt (project or upstream format) or .onnx")
    p.add_argument("--source", type=str, default=None,
                   help="file/dir/glob/.txt list/video/URL/webcam index (default: shapes val images)")
    p.add_argument("--data", type=str, default=None, help="dataset yaml with class names (for .onnx without them)")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="inference size h,w")
    p.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or cpu")
    p.add_argument("--view-img", action="store_true", help="show results")
    p.add_argument("--save-txt", action="store_true", help="save results to labels/*.txt")
    p.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    p.add_argument("--save-crop", action="store_true", help="save cropped prediction boxes")
    p.add_argument("--nosave", action="store_true", help="do not save images/videos")
    p.add_argument("--classes", nargs="+", type=int, help="filter by class: --classes 0, or --classes 0 2 3")
    p.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    p.add_argument("--project", default=str(ROOT / "runs/detect"), help="save results to project/name")
    p.add_argument("--name", default="exp", help="save results to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--line-thickness", default=3, type=int, help="bounding box thickness (pixels)")
    p.add_argument("--hide-labels", action="store_true", help="hide labels")
    p.add_argument("--hide-conf", action="store_true", help="hide confidences")
    p.add_argument("--half", action="store_true", help="use FP16 half-precision inference (CUDA only)")
    p.add_argument("--vid-stride", type=int, default=1, help="video frame-rate stride")
    opt = p.parse_args(argv)
    if isinstance(opt.weights, list):
        if len(opt.weights) > 1:
            p.error("detect.py takes one --weights file")
        opt.weights = opt.weights[0]
    return opt


def main(opt):
    return run(**vars(opt))


if __name__ == "__main__":
    cli_main(main, parse_opt)
