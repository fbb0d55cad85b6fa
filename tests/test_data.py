"""Data layer: data yaml forms, label checks and their cache, the Dataset/DataLoader contract, shapes set."""
import functools
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import utils.data_config as data_config
import utils.dataloaders as dl
from utils.data_config import check_dataset
from utils.dataloaders import create_dataloader
from utils.labels import img2label_paths, list_image_files, verify_image_label


# ----------------------------------------------------------------------------- helpers

def write_pair(root, split, name, label=None, w=96, h=64, colour=(200, 60, 30)):
    """An image root/images/split/name.jpg with a filled box per label row; label text as given (None: no file)."""
    im = np.full((h, w, 3), 40, np.uint8)
    if label:
        for row in label.strip().splitlines():
            try:
                _, x, y, bw, bh = map(float, row.split())
                cv2.rectangle(im, (int((x - bw / 2) * w), int((y - bh / 2) * h)),
                              (int((x + bw / 2) * w) - 1, int((y + bh / 2) * h) - 1), colour, -1)
            except ValueError:
                pass
    f = root / "images" / split / f"{name}.jpg"
    f.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(f), im)
    if label is not None:
        lb = root / "labels" / split / f"{name}.txt"
        lb.parent.mkdir(parents=True, exist_ok=True)
        lb.write_text(label)
    return f


def good_set(root, split="train", n=4):
    for i in range(n):
        write_pair(root, split, f"im{i}", f"{i % 2} 0.5 0.5 0.4 0.5\n0 0.2 0.3 0.2 0.2\n")
    return root / "images" / split


def closed_port_url(name):
    """An http URL on a local port nobody listens on: a download that fails fast, offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


# ----------------------------------------------------------------------------- paths and yaml

def test_img2label_paths():
    assert img2label_paths(["/a/images/b/c.jpg"]) == ["/a/labels/b/c.txt"]
    assert img2label_paths(["/images/x/images/y.png"]) == ["/images/x/labels/y.txt"]  # the last images/
    assert img2label_paths(["/a/pics/c.jpeg"]) == ["/a/pics/c.txt"]  # no images/: beside the image


def test_check_dataset_forms(tmp_path):
    good_set(tmp_path, "train")
    good_set(tmp_path, "val", 2)
    good_set(tmp_path, "extra", 2)
    (tmp_path / "val.txt").write_text("images/val/im0.jpg\n" + str(tmp_path / "images/val/im1.jpg") + "\n")
    d = check_dataset({"path": str(tmp_path), "train": ["images/train", "images/extra"], "val": "val.txt",
                       "names": {0: "a", 1: "b"}, "nc": 2})
    assert d["names"] == ["a", "b"] and d["nc"] == 2 and d["test"] is None
    assert d["train"] == [str(tmp_path / "images/train"), str(tmp_path / "images/extra")]
    assert len(list_image_files(d["train"])) == 6
    assert len(list_image_files(d["val"])) == 2  # the list file: relative lines resolve beside it

    f = tmp_path / "set.yaml"
    f.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: [x, y, z]\n")
    d = check_dataset(str(f))
    assert d["nc"] == 3 and d["yaml_file"] == str(f) and d["val"] == str(tmp_path / "images/val")

    with pytest.raises(ValueError, match="nc=5 but 3 names"):
        check_dataset({"path": str(tmp_path), "train": "images/train", "val": "images/val", "names": ["x"] * 3, "nc": 5})
    with pytest.raises(ValueError, match="keys must be 0..1"):
        check_dataset({"path": str(tmp_path), "train": "images/train", "val": "images/val", "names": {0: "a", 2: "b"}})
    with pytest.raises(ValueError, match="missing required key 'val'"):
        check_dataset({"path": str(tmp_path), "train": "images/train", "names": ["a"]})


def test_relative_path_and_missing_split(tmp_path, monkeypatch):
    monkeypatch.setattr(data_config, "DATASETS_DIR", tmp_path)
    good_set(tmp_path / "myset", "val", 1)
    good_set(tmp_path / "myset", "train", 1)
    for path in ("myset", "../datasets/myset"):  # ours and upstream's spelling
        assert check_dataset({"path": path, "train": "images/train", "val": "images/val", "names": ["a", "b"]})["path"] \
            == str(tmp_path / "myset")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        check_dataset({"path": "myset", "train": "images/train", "val": "images/nowhere", "names": ["a"]})


def test_download_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(data_config, "DATASETS_DIR", tmp_path)
    base = {"path": "zipped", "train": "images/train", "val": "images/val", "names": ["a", "b"]}
    with pytest.raises(ValueError, match="must name a module"):
        check_dataset({**base, "download": "python:os"})
    with pytest.raises(ValueError, match="must name a module"):
        check_dataset({**base, "download": "python:data.no_such_module"})
    with pytest.raises(ValueError, match="bad download item"):
        check_dataset({**base, "download": [{"url": "http://x/y.zip", "dir": "../../elsewhere"}]})
    url = closed_port_url("zipped.zip")
    with pytest.raises(ConnectionError, match="put it at .*zipped.zip"):  # offline: says where the file goes
        check_dataset({**base, "download": url})
    # an archive put in place by hand is unpacked instead of downloaded
    src = tmp_path / "build"
    good_set(src / "zipped", "train", 1)
    good_set(src / "zipped", "val", 1)
    with zipfile.ZipFile(tmp_path / "zipped.zip", "w") as z:
        for f in src.rglob("*"):
            z.write(f, f.relative_to(src))
    d = check_dataset({**base, "download": url})
    assert Path(d["val"]).is_dir() and (tmp_path / "zipped.zip").is_file()  # the user's archive is kept


def _archive(path, entries):
    """A zip or tar archive holding each (name, text) entry under exactly that name."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as z:
            for name, text in entries:
                z.writestr(name, text)
        return path
    with tarfile.open(path, "w") as t:
        for name, text in entries:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            t.addfile(info, io.BytesIO(text.encode()))
    return path


@pytest.mark.parametrize("kind", [".zip", ".tar"])
@pytest.mark.parametrize("bad", ["../escape.txt", "/tmp/abs_escape.txt", "zipped/../../escape.txt"])
def test_archive_entries_outside_the_set_are_refused(tmp_path, monkeypatch, kind, bad):
    """A hand-placed archive with one entry that climbs out: refused naming the entry, before the good
    entries are written, and the archive is left where the user put it."""
    root = tmp_path / "datasets"
    root.mkdir()
    monkeypatch.setattr(data_config, "DATASETS_DIR", root)
    archive = _archive(root / f"zipped{kind}", [("zipped/images/train/a.txt", "first"), (bad, "x"),
                                               ("zipped/images/val/b.txt", "last")])
    d = {"path": "zipped", "train": "images/train", "val": "images/val", "names": ["a"],
         "download": f"http://127.0.0.1:9/zipped{kind}"}
    with pytest.raises(ValueError, match=rf"zipped\{kind}: entry '{re.escape(bad)}' points outside"):
        check_dataset(d)
    assert sorted(p.name for p in root.iterdir()) == [f"zipped{kind}"]  # nothing unpacked, archive kept
    assert not (tmp_path / "escape.txt").exists()


def test_downloaded_archive_is_deleted_once_unpacked(tmp_path, monkeypatch):
    monkeypatch.setattr(data_config, "DATASETS_DIR", tmp_path)
    served = _archive(tmp_path / "served.zip", [("dl/images/train/a.jpg", "x"), ("dl/images/val/b.jpg", "y")])
    monkeypatch.setattr(data_config, "_fetch", lambda url, f, src: shutil.copy(served, f))
    d = check_dataset({"path": "dl", "train": "images/train", "val": "images/val", "names": ["a"],
                       "download": "http://127.0.0.1:9/dl.zip"})
    assert Path(d["train"], "a.jpg").read_text() == "x" and not (tmp_path / "dl.zip").exists()


def test_voc_conversion_offline(tmp_path):
    """VOC.yaml with its VOCdevkit put in place by hand: converted to YOLO folders without downloading."""
    from utils.files import find_file, yaml_load
    d = yaml_load(find_file("VOC.yaml"))
    d["path"] = str(tmp_path / "VOC")
    xml = ("<annotation><size><width>100</width><height>50</height></size>"
           "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>6</ymin><xmax>51</xmax>"
           "<ymax>36</ymax></bndbox></object><object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin>"
           "<ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
    for year, splits in (("2007", ("train", "val", "test")), ("2012", ("train", "val"))):
        voc = tmp_path / "VOC/images/VOCdevkit" / f"VOC{year}"
        for sub in ("ImageSets/Main", "Annotations", "JPEGImages"):
            (voc / sub).mkdir(parents=True)
        for split in splits:
            i = f"{year}_{split}"
            (voc / "ImageSets/Main" / f"{split}.txt").write_text(i + "\n")
            (voc / "Annotations" / f"{i}.xml").write_text(xml)
            cv2.imwrite(str(voc / "JPEGImages" / f"{i}.jpg"), np.zeros((50, 100, 3), np.uint8))
    d = check_dataset(d)
    assert len(d["train"]) == 4 and all(Path(p).is_dir() for p in d["train"] + d["val"])
    row = (tmp_path / "VOC/labels/test2007/2007_test.txt").read_text().split()
    assert row[0] == str(d["names"].index("dog")) and len(row) == 5  # the difficult cat is left out
    np.testing.assert_allclose([float(v) for v in row[1:]], [0.3, 0.4, 0.4, 0.6])


def test_shapes_hook(tmp_path, monkeypatch):
    """shapes.yaml's python:data hook generates the set when it is missing."""
    import data.shapes_generator as sg
    monkeypatch.setattr(data_config, "DATASETS_DIR", tmp_path)
    monkeypatch.setattr(sg, "generate", functools.partial(sg.generate, n_train=3, n_val=2, size=96))
    d = check_dataset("shapes.yaml")
    assert d["path"] == str(tmp_path / "shapes") and d["nc"] == 6
    assert len(list((tmp_path / "shapes/images/train").glob("*.jpg"))) == 3
    assert len(list((tmp_path / "shapes/labels/val").glob("*.txt"))) == 2


# ----------------------------------------------------------------------------- label checks and cache

def test_corrupt_files_skipped_and_counted(tmp_path, logs):
    r = tmp_path
    write_pair(r, "t", "good", "0 0.5 0.5 0.5 0.5\n")
    write_pair(r, "t", "dup", "1 0.5 0.5 0.5 0.5\n1 0.5 0.5 0.5 0.5\n0 0.3 0.3 0.2 0.2\n")
    write_pair(r, "t", "tolerated", "0 0.5 0.5 1.0005 0.5\n")  # rounding slack
    write_pair(r, "t", "nolabel")
    write_pair(r, "t", "empty", "")
    bad_labels = {
        "four": "0 0.5 0.5 0.5\n", "six": "0 0.5 0.5 0.5 0.5 0.1\n", "text": "0 a 0.5 0.5 0.5\n",
        "negcls": "-1 0.5 0.5 0.5 0.5\n", "fraccls": "0.5 0.5 0.5 0.5 0.5\n", "negxy": "0 -0.1 0.5 0.5 0.5\n",
        "big": "0 0.5 1.2 0.5 0.5\n", "nan": "0 nan 0.5 0.5 0.5\n", "clsnc": "7 0.5 0.5 0.5 0.5\n",
    }
    for name, lb in bad_labels.items():
        write_pair(r, "t", name, lb)
    img_dir = r / "images" / "t"
    (img_dir / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    (img_dir / "zero.jpg").write_bytes(b"")
    whole = (img_dir / "good.jpg").read_bytes()
    (img_dir / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    cv2.imwrite(str(img_dir / "tiny.png"), np.zeros((5, 5, 3), np.uint8))

    ds = dl.LoadImagesAndLabels(img_dir, img_size=64, nc=3)
    names = sorted(Path(f).stem for f in ds.im_files)
    assert names == ["dup", "empty", "good", "nolabel", "tolerated"]
    summary = [m for m in logs if "found," in m]
    assert summary and summary[-1].endswith("3 found, 1 missing, 1 empty, 13 corrupt")
    assert sum(m.startswith("WARNING ⚠️ ") for m in logs) == 10  # one per file, capped
    assert any("... and 4 more" in m for m in logs)  # 13 corrupt + 1 duplicate note = 14 messages
    lb = ds.labels[ds.im_files.index(str(img_dir / "dup.jpg"))]
    np.testing.assert_allclose(lb, [[1, 0.5, 0.5, 0.5, 0.5], [0, 0.3, 0.3, 0.2, 0.2]])  # duplicate gone, order kept
    assert len(ds.labels[ds.im_files.index(str(img_dir / "nolabel.jpg"))]) == 0
    assert ds.labels[ds.im_files.index(str(img_dir / "tolerated.jpg"))][0, 3] == 1.0  # clipped


def test_a_list_scanned_as_train_and_val_warns_once(tmp_path, logs):
    """train and val naming the same .txt list (or folder, as coco128.yaml does): a missing entry is one
    warning, though both splits count it."""
    for i in range(2):
        write_pair(tmp_path, "t", f"im{i}", "0 0.5 0.5 0.4 0.4\n")
    lst = tmp_path / "list.txt"
    lst.write_text("images/t/im0.jpg\nimages/t/gone.jpg\nimages/t/im1.jpg\n")
    for prefix in ("train: ", "val: "):
        assert len(dl.LoadImagesAndLabels(lst, img_size=64, prefix=prefix)) == 2
    assert sum("gone.jpg" in m and "WARNING" in m for m in logs) == 1
    assert sum(m.endswith("2 found, 0 missing, 0 empty, 1 corrupt") for m in logs) == 1
    assert sum(m.endswith("2 found, 0 missing, 0 empty, 1 corrupt (from cache)") for m in logs) == 1


def test_corrupt_reasons_named(tmp_path):
    write_pair(tmp_path, "t", "a", "0 0.5 0.5 0.5\n")
    e = verify_image_label(str(tmp_path / "images/t/a.jpg"), str(tmp_path / "labels/t/a.txt"))
    assert e["status"] == "corrupt" and "row 1 has 4 values" in e["msg"]


def test_only_bad_files_is_an_error(tmp_path):
    write_pair(tmp_path, "t", "a", "0 0.5 0.5 0.5\n")
    (tmp_path / "images/t/b.jpg").write_bytes(b"\x00" * 50)
    with pytest.raises(RuntimeError, match=f"No usable images in {tmp_path / 'images/t'}"):
        dl.LoadImagesAndLabels(tmp_path / "images/t", img_size=64)
    with pytest.raises(FileNotFoundError, match="No images found"):
        dl.LoadImagesAndLabels(tmp_path / "labels", img_size=64)
    with pytest.raises(FileNotFoundError, match="missing_dir does not exist"):
        dl.LoadImagesAndLabels(tmp_path / "missing_dir", img_size=64)


def test_cache_reuse_and_rebuild(tmp_path, logs):
    img_dir = good_set(tmp_path, "train", 3)
    cache = tmp_path / "labels" / "train.cache"
    dl.LoadImagesAndLabels(img_dir, img_size=64)
    assert cache.is_file() and any("New cache created" in m for m in logs)
    json.loads(cache.read_text())  # plain JSON: loading it cannot run code
    logs.clear()
    dl.LoadImagesAndLabels(img_dir, img_size=64)
    assert any("(from cache)" in m for m in logs) and not any("New cache" in m for m in logs)

    (tmp_path / "labels/train/im0.txt").write_text("1 0.5 0.5 0.1 0.1\n")  # a label changes: rebuilt
    logs.clear()
    ds = dl.LoadImagesAndLabels(img_dir, img_size=64)
    assert any("New cache created" in m for m in logs)
    np.testing.assert_allclose(ds.labels[0], [[1, 0.5, 0.5, 0.1, 0.1]])

    cache.write_text("{ not json")  # unreadable: rebuilt, no crash
    logs.clear()
    dl.LoadImagesAndLabels(img_dir, img_size=64)
    assert any("New cache created" in m for m in logs)

    c = json.loads(cache.read_text())  # right key, malformed entries: rebuilt
    c["entries"] = [1, 2, 3]
    cache.write_text(json.dumps(c))
    logs.clear()
    ds = dl.LoadImagesAndLabels(img_dir, img_size=64)
    assert any("New cache created" in m for m in logs) and len(ds.labels) == 3


def test_unreadable_after_scan_substitutes(tmp_path, logs):
    img_dir = good_set(tmp_path, "train", 3)
    ds = dl.LoadImagesAndLabels(img_dir, img_size=64)
    Path(ds.im_files[1]).write_bytes(b"gone")
    for _ in range(5):
        im, labels, path, _ = ds[1]
        assert path != ds.im_files[1] and im.shape == (3, 64, 64)
    assert any("cannot read image" in m for m in logs)


# ----------------------------------------------------------------------------- loader

def test_dataloader_batch_format(tmp_path):
    img_dir = good_set(tmp_path, "train", 5)
    loader, ds = create_dataloader(img_dir, 64, 4, 32, workers=0, prefix="t: ")
    ims, targets, paths, shapes = next(iter(loader))
    assert ims.dtype == torch.uint8 and ims.shape == (4, 3, 64, 64)
    assert targets.shape == (8, 6) and targets[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all()
    assert len(paths) == 4 and paths[0] == ds.im_files[0]
    (h0, w0), ((rh, rw), (padw, padh)) = shapes[0]
    assert (h0, w0) == (64, 96) and rh == pytest.approx(64 / 96, abs=0.01) and rw == 64 / 96 and padw == 0
    # RGB out: the box was drawn as BGR (200, 60, 30), so it must come out as R=30, G=60, B=200
    px = ims[0, :, 32, 32].tolist()  # centre of the first image's box
    assert px[0] < px[2] and abs(px[2] - 200) < 15
    assert isinstance(ds.labels[0], np.ndarray) and ds.labels[0].shape == (2, 5)
    assert ds.shapes.tolist()[0] == [96, 64]  # w, h


def test_rect_val_batches(tmp_path):
    for i, (w, h) in enumerate([(96, 40), (96, 48), (50, 96), (60, 96), (80, 80)]):
        write_pair(tmp_path, "v", f"im{i}", "0 0.5 0.5 0.5 0.5\n", w=w, h=h)
    loader, ds = create_dataloader(tmp_path / "images/v", 96, 2, 32, rect=True, pad=0.5, workers=0, shuffle=True)
    assert (ds.batch_shapes % 32 == 0).all()
    for ims, _, paths, shapes in loader:
        b = ds.batch[ds.im_files.index(paths[0])]
        assert tuple(ims.shape[2:]) == tuple(ds.batch_shapes[b])
        for (h0, w0), ((rh, rw), _) in shapes:
            assert h0 * rh <= ims.shape[2] and w0 * rw <= ims.shape[3]


@pytest.mark.parametrize("w, h, size", [(103, 131, (160, 126)),  # 125.8 px: ceil = round > floor
                                          (100, 131, (160, 123)),  # 122.1 px: ceil > round = floor
                                          (131, 100, (123, 160))])
def test_load_image_rounds_sizes_up(tmp_path, w, h, size):
    """The short side of a resized image is the scaled size rounded up (the rule upstream's val sees)."""
    write_pair(tmp_path, "v", "im", "0 0.5 0.5 0.5 0.5\n", w=w, h=h)
    _, ds = create_dataloader(tmp_path / "images/v", 160, 1, 32, rect=True, pad=0.5, workers=0)
    im, hw0, hw = ds.load_image(0)
    assert hw0 == (h, w) and hw == size and im.shape[:2] == size


def test_cache_ram_and_disk(tmp_path):
    img_dir = good_set(tmp_path, "train", 3)
    _, ds = create_dataloader(img_dir, 64, 2, 32, workers=0, cache="ram")
    assert all(im is not None for im in ds.ims)
    _, ds = create_dataloader(img_dir, 64, 2, 32, workers=0, cache="disk")
    assert all(Path(f).is_file() for f in ds.npy_files)
    a = ds[0][0]
    Path(ds.im_files[0]).unlink()  # the .npy now serves the image
    assert torch.equal(ds[0][0], a)


def test_seeded_workers_reproducible_and_mosaic_switch(tmp_path):
    img_dir = good_set(tmp_path, "train", 8)

    def first_batch(seed, **kw):
        loader, ds = create_dataloader(img_dir, 64, 4, 32, augment=True, workers=2, shuffle=True, seed=seed, **kw)
        return next(iter(loader)), loader, ds

    (a, ta, pa, sa), loader, ds = first_batch(1)
    (b, tb, pb, _), *_ = first_batch(1)
    (c, *_), *_ = first_batch(2)
    assert torch.equal(a, b) and torch.equal(ta, tb) and pa == pb
    assert not torch.equal(a, c)
    assert sa[0] is None  # mosaic
    ds.mosaic = False  # close-mosaic: a new iterator sees it
    _, _, _, shapes = next(iter(loader))
    assert shapes[0] is not None


def test_ddp_sampler(tmp_path):
    import torch.distributed as dist
    img_dir = good_set(tmp_path, "train", 4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        loader, _ = create_dataloader(img_dir, 64, 2, 32, rank=0, workers=0, shuffle=True)
        assert isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler)
        assert sum(len(p) for _, _, p, _ in loader) == 4
    finally:
        dist.destroy_process_group()


def test_rect_turns_shuffle_off_with_a_warning(tmp_path, logs):
    img_dir = good_set(tmp_path, "train", 2)
    create_dataloader(img_dir, 64, 2, 32, workers=0, rect=True, shuffle=True)
    assert "setting shuffle=False" in "\n".join(logs)


@pytest.mark.parametrize("flag", ["--quad", "--image-weights"])
def test_flags_not_implemented_are_refused_not_ignored(flag):
    import train_distill
    with pytest.raises(SystemExit):
        train_distill.parse_opt(argv=[flag])


# ----------------------------------------------------------------------------- shapes generator

def test_generator_deterministic(tmp_path):
    from data.shapes_generator import CLASSES, main
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        main(["--out", str(tmp_path / name), "--n-train", "4", "--n-val", "2", "--seed", str(seed), "--size", "96"])

    def files(d):
        return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}

    a, b, c = (files(tmp_path / n) for n in "abc")
    assert len(a) == 12 and a == b
    assert a.keys() == c.keys() and a != c
    for f, content in a.items():
        if f.endswith(".txt"):
            rows = np.array([r.split() for r in content.decode().splitlines()], dtype=float).reshape(-1, 5)
            assert 1 <= len(rows) <= 8 and (rows[:, 0] < len(CLASSES)).all()
            assert (rows[:, 1:] > 0).all() and (rows[:, 1:] <= 1).all()
        else:
            h, w = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR).shape[:2]
            assert 76 <= h <= 116 and 76 <= w <= 116  # 96 +/- 20%
    with pytest.raises(FileExistsError):
        main(["--out", str(tmp_path / "a"), "--n-train", "1", "--n-val", "1"])


def test_generator_two_at_once(tmp_path, monkeypatch):
    """Two runs that start together on a missing set (benchmark jobs side by side) both succeed: each
    builds a private copy, the first to finish provides the set, the other discards its copy."""
    import data.shapes_generator as sg
    real = sg.make_image
    state = {"other": False}

    def make_image(*a, **k):  # halfway through, the "other process" finishes the same set
        if not state["other"]:
            state["other"] = True
            monkeypatch.setattr(sg, "make_image", real)
            sg.generate(tmp_path, n_train=2, n_val=1, seed=5, size=64)
        return real(*a, **k)

    monkeypatch.setattr(sg, "make_image", make_image)
    sg.generate(tmp_path, n_train=2, n_val=1, seed=5, size=64)
    assert state["other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "labels"]  # no temporary folder left
    assert len(list((tmp_path / "images/train").glob("*.jpg"))) == 2
    assert len(list((tmp_path / "labels/val").glob("*.txt"))) == 1


def test_generator_failure_leaves_nothing(tmp_path, monkeypatch):
    """A generation that fails halfway leaves neither a half-made set nor its temporary copy."""
    import data.shapes_generator as sg

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sg, "make_image", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        sg.generate(tmp_path, n_train=2, n_val=1, seed=5, size=64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["script", "module"])
def test_generator_runs_as_a_script_and_as_a_module(tmp_path, how):
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "data" / "shapes_generator.py")] if how == "script" else \
        [sys.executable, "-m", "data.shapes_generator"]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "s"), "--n-train", "1", "--n-val", "1", "--size", "32"],
                       cwd=tmp_path if how == "script" else root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((tmp_path / "s" / "images").rglob("*.jpg"))) == 2


def test_generator_labels_match_pixels():
    """Each label box bounds a region that differs from the background: a shape is really there."""
    from data.shapes_generator import make_image
    for i in range(5):
        im, labels = make_image(0, "train", i, 160)
        h, w = im.shape[:2]
        assert len(labels)
        for _, x, y, bw, bh in labels:
            assert bw * w >= 5 and bh * h >= 5
            x1, y1, x2, y2 = int((x - bw / 2) * w), int((y - bh / 2) * h), int((x + bw / 2) * w), int((y + bh / 2) * h)
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    im, labels = make_image(0, "val", 0, 160, obj_size=(30, 40), max_objects=2)  # an easier variant
    assert 1 <= len(labels) <= 2
    assert (np.maximum(labels[:, 3] * im.shape[1], labels[:, 4] * im.shape[0]) >= 0.8 * 30 - 1).all()
