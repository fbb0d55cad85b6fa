"""Data yaml files: resolving the set's root and splits, class names, and the `download:` steps (archives
checked before unpacking, VOC conversion, a module of this repository's data/ package). Nothing in a yaml
is executed as code."""
import importlib
import os
import re
import shutil
import tarfile
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from tqdm import tqdm

from utils.files import ROOT, as_list, find_file, yaml_load
from utils.logging import LOGGER

DATASETS_DIR = ROOT / "datasets"  # where a relative yaml `path` lives (upstream's ../datasets)


def names_list(names, src="names"):
    """Class names as a list or an {index: name} mapping -> list of str; mapping keys must be 0..n-1 and
    every name text or a number. ValueError naming `src` otherwise."""
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise ValueError(f"{src}: 'names' keys must be class indices 0..n-1") from None
        if keys != list(range(len(keys))):
            raise ValueError(f"{src}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        names = [names[k] if k in names else names[str(k)] for k in keys]
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"{src}: 'names' must be a list or a {{index: name}} mapping, got {type(names).__name__}")
    if not all(isinstance(n, (str, int, float)) for n in names):
        raise ValueError(f"{src}: class names must be text or numbers")
    return [str(n) for n in names]


def class_name(names, c) -> str:
    """The name of class c from a list or mapping of names; the index itself when there is none."""
    c = int(c)
    if isinstance(names, dict):
        return str(names.get(c, c))
    return str(names[c]) if names is not None and 0 <= c < len(names) else str(c)


def _dataset_root(path, yaml_file):
    """Absolute data set root: absolute stays; relative resolves under ROOT/datasets."""
    if path in (None, ""):
        return Path(yaml_file).parent.resolve() if yaml_file else Path.cwd()
    p = Path(str(path)).expanduser()
    if p.is_absolute():
        return p
    parts = p.parts
    if parts[:2] == ("..", "datasets"):  # upstream yaml files say ../datasets/<name>
        p = Path(*parts[2:]) if len(parts) > 2 else Path()
    return (DATASETS_DIR / p).resolve()


def _resolve_split(value, root):
    """A split entry (str or list of str) -> absolute path string(s)."""
    if value in (None, ""):
        return None
    if isinstance(value, (list, tuple)):
        return [str(root / v) for v in value]
    return str(root / value)


def check_dataset(data, autodownload=True):
    """Load and check a data yaml (name, path or dict): absolute paths, names list, nc; fetch if missing.

    Returns a dict with absolute `path`, `train`, `val`, `test` (str, list or None), `names` (list),
    `nc`, and `yaml_file`. A missing split triggers the yaml's `download` step (see _run_download).
    """
    yaml_file = None
    if isinstance(data, (str, Path)):
        yaml_file = find_file(data)
        d = yaml_load(yaml_file)
    elif isinstance(data, dict):
        d = dict(data)
    else:
        raise TypeError(f"check_dataset expects a yaml path or a dict, got {type(data).__name__}")
    src = str(yaml_file or "data dict")
    for k in ("train", "val", "names"):
        if k not in d:
            raise ValueError(f"{src}: missing required key '{k}'")
    names = names_list(d["names"], src)
    if d.get("nc") is not None and int(d["nc"]) != len(names):
        raise ValueError(f"{src}: nc={d['nc']} but {len(names)} names are given")
    root = _dataset_root(d.get("path"), yaml_file)
    d.update(path=str(root), names=names, nc=len(names), yaml_file=yaml_file and str(yaml_file))
    for k in ("train", "val", "test"):
        d[k] = _resolve_split(d.get(k), root)

    missing = [p for k in ("train", "val") for p in as_list(d[k]) if not Path(p).exists()]
    if missing:
        if not (autodownload and d.get("download")):
            raise FileNotFoundError(f"{src}: data set not found: {', '.join(missing)}"
                                    " (and no 'download' step is given)")
        LOGGER.info(f"Data set not found ({', '.join(missing)}), running the download step of {src}")
        _run_download(d["download"], d, src)
        still = [p for p in as_list(d["val"]) if not Path(p).exists()]
        if still:
            raise FileNotFoundError(f"{src}: download step ran but {', '.join(still)} is still missing")
        for p in as_list(d["train"]):
            if not Path(p).exists():
                LOGGER.warning(f"WARNING ⚠️ {src}: train split {p} is missing")
    return d


# ----------------------------------------------------------------------------- download steps
def _run_download(spec, d, src):
    """Run a yaml `download` step. Allowed forms (nothing from the yaml is executed as code):

    - 'python:data.<module>': calls download(data_dict) of that module of this repository's data/ package
    - a URL, or a list of URLs / {url, dir} items: archives unpacked into `dir` relative to `path`
      (default: the parent of `path`, as archives hold the set's top folder)
    - {urls: <list as above>, convert: voc}: then converts Pascal VOC xml annotations to YOLO labels
    """
    if isinstance(spec, str) and spec.startswith("python:"):
        m = re.fullmatch(r"python:data\.([A-Za-z_]\w*)", spec.strip())
        if not m or not (ROOT / "data" / f"{m.group(1)}.py").is_file():
            raise ValueError(f"{src}: download hook '{spec}' must name a module of {ROOT / 'data'}")
        module = importlib.import_module(f"data.{m.group(1)}")
        if Path(module.__file__).resolve().parent != (ROOT / "data").resolve():
            raise ValueError(f"{src}: 'data.{m.group(1)}' does not resolve inside {ROOT / 'data'}")
        module.download(d)
        return
    convert = None
    if isinstance(spec, dict):
        spec, convert = spec.get("urls", []), spec.get("convert")
    root = Path(d["path"])
    if convert == "voc" and (root / "images" / "VOCdevkit").is_dir():
        spec = []  # already unpacked (e.g. by hand, offline): only convert
    for item in as_list(spec):
        url, sub = (item.get("url"), item.get("dir")) if isinstance(item, dict) else (item, None)
        dest = (root / sub).resolve() if sub else root.parent.resolve()
        if not str(url).startswith(("http://", "https://")) or not dest.is_relative_to(root.parent.resolve()):
            raise ValueError(f"{src}: bad download item {item!r} (need an http(s) URL and a relative dir)")
        _fetch_and_unpack(url, dest, src)
    if convert == "voc":
        _voc_to_yolo(root, d["names"])
    elif convert:
        raise ValueError(f"{src}: unknown download convert step '{convert}' (known: voc)")


def _fetch_and_unpack(url, dest, src):
    """Download an archive into dest and unpack it there; an archive already in dest (put there by hand) is
    unpacked and kept, a downloaded one is deleted once unpacked."""
    dest.mkdir(parents=True, exist_ok=True)
    f = dest / Path(url).name
    by_hand = f.is_file()
    if by_hand:
        LOGGER.info(f"Unpacking {f} (already present)")
    else:
        _fetch(url, f, src)
    if f.suffix == ".zip":
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():  # every entry checked before anything is written
                _check_archive_entry(f, info.filename)
            z.extractall(dest)
    elif f.name.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(f) as t:
            members = t.getmembers()
            for m in members:
                _check_archive_entry(f, m.name)
                if m.issym() or m.islnk():
                    _check_archive_entry(f, m.linkname, f"link '{m.name}' ->")
                elif not (m.isfile() or m.isdir()):
                    raise ValueError(f"{f}: entry '{m.name}' is not a file or folder; refusing to unpack the archive")
            t.extractall(dest, members=members, filter="data")
    else:
        return
    if not by_hand:
        f.unlink()


def _check_archive_entry(archive, name, what="entry"):
    """Refuse an archive entry (or link target) that is absolute or climbs out with '..': it would land
    outside the set's folder (zipfile silently drops such parts, tarfile's data filter stops halfway)."""
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise ValueError(f"{archive}: {what} '{name}' points outside the folder it unpacks into; refusing to unpack "
                         f"the archive (nothing was unpacked)")


def _fetch(url, f, src):
    LOGGER.info(f"Downloading {url} to {f}...")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(f.with_suffix(".part"), "wb") as out:
            shutil.copyfileobj(r, out)
        os.replace(f.with_suffix(".part"), f)
    except OSError as e:
        f.with_suffix(".part").unlink(missing_ok=True)
        raise ConnectionError(f"Download of {url} failed ({e}). Without network, fetch it by hand and put it "
                              f"at {f} (it is unpacked on the next use of {src}).") from e


def _voc_to_yolo(root, names):
    """VOCdevkit (unpacked under root/images) -> images/<split><year>/ + labels/<split><year>/ YOLO files."""
    devkit = root / "images" / "VOCdevkit"
    for year, split in (("2012", "train"), ("2012", "val"), ("2007", "train"), ("2007", "val"), ("2007", "test")):
        voc = devkit / f"VOC{year}"
        ids = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        im_dir, lb_dir = root / "images" / f"{split}{year}", root / "labels" / f"{split}{year}"
        im_dir.mkdir(parents=True, exist_ok=True)
        lb_dir.mkdir(parents=True, exist_ok=True)
        for i in tqdm(ids, desc=f"VOC{year} {split}"):
            tree = ET.parse(voc / "Annotations" / f"{i}.xml").getroot()
            w, h = (int(tree.find("size").find(k).text) for k in ("width", "height"))
            rows = []
            for obj in tree.iter("object"):
                name, difficult = obj.find("name").text, obj.find("difficult")
                if name not in names or (difficult is not None and int(difficult.text)):
                    continue
                b = [float(obj.find("bndbox").find(k).text) for k in ("xmin", "xmax", "ymin", "ymax")]
                # VOC pixels are 1-based inclusive: shift the centre by one pixel, as upstream does
                x, y = ((b[0] + b[1]) / 2 - 1) / w, ((b[2] + b[3]) / 2 - 1) / h
                rows.append(f"{names.index(name)} {x:.6f} {y:.6f} {(b[1] - b[0]) / w:.6f} {(b[3] - b[2]) / h:.6f}")
            (lb_dir / f"{i}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
            (voc / "JPEGImages" / f"{i}.jpg").rename(im_dir / f"{i}.jpg")
