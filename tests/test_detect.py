"""detect.py and utils/sources.py: outputs and label format, .pt vs .onnx, video, filters, bad sources."""
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect
from tests.conftest import log_lines
from utils import sources
from utils.files import find_file, yaml_load

NAMES = ["circle", "square", "star"]
IMGSZ = 96


def make_weights(path, seed=0):
    """Tiny untrained YOLOv5n (width 1/16) that still fires: BN statistics calibrated on noise so features
    keep their scale, head weights x3 and objectness bias -1 so a few to a few dozen boxes pass conf 0.25."""
    from models.checkpoint import save_checkpoint
    from models.yolo import DetectionModel

    torch.manual_seed(seed)
    cfg = yaml_load(find_file("yolov5n.yaml"))
    cfg.update(nc=len(NAMES), width_multiple=0.0625)
    model = DetectionModel(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running stats = plain average of what the calibration pass sees
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, IMGSZ, IMGSZ))
        head = model.model[-1]
        for conv in head.m:
            conv.weight *= 3
            b = conv.bias.view(head.na, -1)  # [na, 5 + nc]
            b[:, 4], b[:, 5:] = -1.0, 0.0
    model.eval()
    model.names = list(NAMES)
    save_checkpoint(path, model)
    return path


def write_images(folder, sizes, seed=0, ext="png"):
    """Blurred-noise images with a filled circle; distinct content keeps detection scores free of ties."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        im = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (9, 9), 3)
        cv2.circle(im, (w // 2, h // 2), min(h, w) // 4, (0, 0, 255), -1)
        paths.append(folder / f"im{i}.{ext}")
        cv2.imwrite(str(paths[-1]), im)
    return paths


def write_video(path, n=6, size=(128, 96), fps=12.0, seed=0):
    rng = np.random.default_rng(seed)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert vw.isOpened()
    for _ in range(n):
        vw.write(cv2.GaussianBlur(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), (9, 9), 3))
    vw.release()
    return path



@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("w") / "tiny.pt")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    write_images(folder, [(96, 128), (128, 128), (80, 64)])
    return folder


def run(weights, source, tmp_path, **kw):
    kw.setdefault("imgsz", [IMGSZ])
    return detect.run(weights=weights, source=source, device="cpu", project=tmp_path, **kw)


def test_folder_outputs_and_txt_format(weights, images, tmp_path):
    with log_lines() as logs:
        save_dir, res = run(weights, images, tmp_path, save_txt=True, save_conf=True, save_crop=True)
    assert save_dir == tmp_path / "exp" and len(res) == 3
    assert sum(len(r["det"]) for r in res) > 0, "fixture model should detect something"
    for r in res:
        src = cv2.imread(r["path"])
        out = cv2.imread(str(save_dir / Path(r["path"]).name))
        assert out is not None and out.shape == src.shape  # annotated at the original size
        stem = Path(r["path"]).stem
        txt = save_dir / "labels" / f"{stem}.txt"
        assert txt.exists() == (len(r["det"]) > 0)
        if not len(r["det"]):
            continue
        rows = np.array([[float(v) for v in line.split()] for line in txt.read_text().splitlines()])
        assert rows.shape == (len(r["det"]), 6)
        assert set(rows[:, 0]) <= set(range(len(NAMES))) and (rows[:, 1:] >= 0).all() and (rows[:, 1:] <= 1).all()
        h, w = src.shape[:2]  # txt = det normalised to the original image
        d = r["det"]
        xywhn = np.stack([(d[:, 0] + d[:, 2]) / 2 / w, (d[:, 1] + d[:, 3]) / 2 / h,
                          (d[:, 2] - d[:, 0]) / w, (d[:, 3] - d[:, 1]) / h], 1)
        np.testing.assert_allclose(rows[:, 1:5], xywhn, atol=1e-5)
        np.testing.assert_allclose(rows[:, 5], d[:, 4], atol=1e-5)
        assert (d[:, [0, 2]] <= w).all() and (d[:, [1, 3]] <= h).all() and (d[:, :4] >= 0).all()
    n_det = {c: sum(int((r["det"][:, 5] == i).sum()) for r in res) for i, c in enumerate(NAMES)}
    for c, n in n_det.items():
        assert len(list((save_dir / "crops" / c).glob("*.jpg"))) == n
    img_lines = [x for x in logs if x.startswith("image ")]
    assert len(img_lines) == 3 and all(re.match(r"image \d/3 .+: \d+x\d+ .*\d+\.\dms$", x) for x in img_lines)
    assert any(re.match(r"Speed: [\d.]+ms pre-process, [\d.]+ms inference, [\d.]+ms NMS per image at shape "
                        rf"\(1, 3, {IMGSZ}, {IMGSZ}\)", x) for x in logs)

    save_dir2, _ = run(weights, images, tmp_path, save_txt=True, nosave=True)  # 5 columns without --save-conf
    assert save_dir2 == tmp_path / "exp2" and not list(save_dir2.glob("*.png"))
    for txt in (save_dir2 / "labels").glob("*.txt"):
        assert all(len(line.split()) == 5 for line in txt.read_text().splitlines())


def test_classes_and_max_det(weights, images, tmp_path):
    _, everything = run(weights, images, tmp_path, nosave=True)
    _, only1 = run(weights, images, tmp_path, nosave=True, classes=[1])
    _, capped = run(weights, images, tmp_path, nosave=True, max_det=2)
    for a, b, c in zip(everything, only1, capped):
        assert (b["det"][:, 5] == 1).all()
        np.testing.assert_allclose(b["det"], a["det"][a["det"][:, 5] == 1])  # same boxes, others filtered out
        assert len(c["det"]) == min(2, len(a["det"]))
        np.testing.assert_allclose(c["det"], a["det"][:2])  # the two most confident
    assert max(len(a["det"]) for a in everything) > 2


def match(a, b, tol=1.0):
    """Same detections up to tol pixels and 1e-3 confidence, same classes, in the same (confidence) order."""
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=tol)
    np.testing.assert_allclose(a[:, 4], b[:, 4], atol=1e-3)
    np.testing.assert_array_equal(a[:, 5], b[:, 5])


@pytest.mark.slow
def test_pt_and_onnx_agree(weights, images, tmp_path):
    import export

    w = tmp_path / "w.pt"
    w.write_bytes(weights.read_bytes())
    square = write_images(tmp_path / "sq", [(128, 128), (96, 96)], seed=1)[0].parent
    f = export.run(weights=w, imgsz=[IMGSZ])  # static [1, 3, 96, 96]: fixed square letterbox
    _, r_pt = run(w, square, tmp_path, nosave=True)
    _, r_onnx = run(f, square, tmp_path, nosave=True, imgsz=[320])  # static input wins over --imgsz
    for a, b in zip(r_pt, r_onnx):
        match(a["det"], b["det"])
    assert sum(len(r["det"]) for r in r_pt) > 0

    f = export.run(weights=w, imgsz=[IMGSZ], dynamic=True)  # dynamic: minimal padding like .pt
    _, r_pt = run(w, images, tmp_path, nosave=True)
    _, r_onnx = run(f, images, tmp_path, nosave=True)
    for a, b in zip(r_pt, r_onnx):
        match(a["det"], b["det"])


def test_video_in_out(weights, tmp_path):
    src = write_video(tmp_path / "clip.mp4", n=6, size=(128, 96), fps=12.0)
    save_dir, res = run(weights, src, tmp_path, save_txt=True)
    assert [r["frame"] for r in res] == [1, 2, 3, 4, 5, 6]
    cap = cv2.VideoCapture(str(save_dir / "clip.mp4"))
    assert cap.isOpened()
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6 and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (128, 96)
    cap.release()
    labels = {p.name for p in (save_dir / "labels").glob("*.txt")}
    assert labels == {f"clip_{r['frame']}.txt" for r in res if len(r["det"])}

    _, res = run(weights, src, tmp_path, nosave=True, vid_stride=2)
    assert [r["frame"] for r in res] == [1, 2, 3]


def test_bad_sources(weights, images, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        run(weights, tmp_path / "nope.jpg", tmp_path)
    (tmp_path / "notes.xyz").write_text("hi")
    with pytest.raises(ValueError, match="notes.xyz"):
        run(weights, tmp_path / "notes.xyz", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="No images or videos"):
        run(weights, empty, tmp_path)
    with pytest.raises(FileNotFoundError, match="glob"):
        run(weights, str(tmp_path / "*.none"), tmp_path)

    mixed = tmp_path / "mixed"
    good = write_images(mixed, [(64, 64), (64, 96)])
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with log_lines() as logs:
        save_dir, res = run(weights, mixed, tmp_path)
    assert sorted(r["path"] for r in res) == sorted(map(str, good))
    assert any("broken.jpg" in x and "cannot be read" in x for x in logs)
    assert sorted(p.name for p in save_dir.glob("*.png")) == ["im0.png", "im1.png"]


def test_sources_lists_and_globs(images, tmp_path):
    (tmp_path / "list.txt").write_text(f"# comment\n{images / 'im0.png'}\nim1.png\nmissing.png\n")
    (tmp_path / "im1.png").write_bytes((images / "im1.png").read_bytes())  # relative to the list's folder
    with log_lines() as logs:
        frames = list(sources.load_source(tmp_path / "list.txt"))
    assert [f.name for f in frames] == ["im0.png", "im1.png"] and any("missing.png" in x for x in logs)
    frames = list(sources.load_source(str(images / "im[02].png")))
    assert [f.name for f in frames] == ["im0.png", "im2.png"]
    assert frames[0].describe() == f"image 1/2 {images / 'im0.png'}: " and frames[0].im0.shape == (96, 128, 3)


class FakeCapture:
    """cv2.VideoCapture stand-in: 5 frames, the 3rd unreadable; or a device that never opens."""

    def __init__(self, src, *a):
        self.src, self.i = src, 0

    def isOpened(self):
        return not isinstance(self.src, int)

    def get(self, prop):
        return {cv2.CAP_PROP_FRAME_COUNT: 5, cv2.CAP_PROP_FPS: 10}.get(prop, 0)

    def grab(self):
        self.i += 1
        return self.i <= 5

    def read(self):
        self.i += 1
        ok = self.i <= 5 and self.i != 3
        return ok, (np.full((8, 8, 3), self.i, np.uint8) if ok else None)

    def release(self):
        pass


def test_unreadable_video_frame_and_webcam(monkeypatch):
    monkeypatch.setattr(sources.cv2, "VideoCapture", FakeCapture)
    with log_lines() as logs:
        frames = list(sources.iter_video("clip.mp4"))
    assert [int(f.im0[0, 0, 0]) for f in frames] == [1, 2, 4, 5] and [f.frame for f in frames] == [1, 2, 3, 4]
    assert any("frame 3/5 unreadable" in x for x in logs) and frames[0].fps == 10
    with pytest.raises(ConnectionError, match="webcam 7"):
        sources.load_source("7")


def test_stream_reader_on_a_file(tmp_path):
    """The latest-frame stream reader, fed a video file: yields frames, then ends cleanly."""
    src = write_video(tmp_path / "s.avi", n=4)
    frames = list(sources.iter_stream(str(src)))
    assert 1 <= len(frames) <= 4 and frames[0].kind == "stream" and frames[0].im0.shape == (96, 128, 3)


def test_url_image(monkeypatch):
    ok, buf = cv2.imencode(".jpg", np.zeros((20, 30, 3), np.uint8))

    class Resp:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def read(self):
            return buf.tobytes()

    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout: Resp())
    (f,) = list(sources.load_source("https://example.com/imgs/bus.jpg?x=1"))
    assert f.name == "bus.jpg" and f.im0.shape == (20, 30, 3)

    def offline(url, timeout):
        raise OSError("no network")

    monkeypatch.setattr(sources.urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match="example.com"):
        list(sources.load_source("https://example.com/bus.jpg"))


def test_default_source(tmp_path):
    data = tmp_path / "mini.yaml"
    data.write_text(f"path: {tmp_path / 'mini'}\ntrain: images/train\nval: images/val\nnames: [a]\n")
    with pytest.raises(FileNotFoundError, match="--source"):
        detect.run(weights="unused.pt", source=None, data=data, project=tmp_path)
    for split in ("train", "val"):
        (tmp_path / "mini" / "images" / split).mkdir(parents=True)
    assert detect.default_source(data) == str(tmp_path / "mini" / "images" / "val")


def test_cli(weights, images, tmp_path):
    opt = detect.parse_opt([])
    assert (opt.imgsz, opt.conf_thres, opt.iou_thres, opt.max_det, opt.line_thickness, opt.vid_stride) == \
        ([640], 0.25, 0.45, 1000, 3, 1)
    assert opt.project.endswith("runs/detect") and opt.name == "exp" and opt.source is None
    argv = ["--weights", str(weights), "--source", str(images / "im0.png"), "--imgsz", "64", "--project", str(tmp_path),
            "--save-txt", "--hide-conf", "--device", "cpu"]
    with log_lines() as logs:
        save_dir, _ = detect.main(detect.parse_opt(argv))
    assert any(x.startswith("image 1/1") for x in logs) and (save_dir / "im0.png").exists()
