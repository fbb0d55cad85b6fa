"""Paths, run folders and yaml I/O."""
import glob
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]  # repository root


def increment_path(path, exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """runs/train/exp -> runs/train/exp2, exp3, ... unless exist_ok; optionally create the folder."""
    path = Path(path)
    if path.exists() and not exist_ok:
        path, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        pattern = re.compile(rf"^{re.escape(path.name)}{re.escape(sep)}(\d+)$")
        taken = [int(m.group(1)) for p in glob.glob(f"{glob.escape(str(path))}{sep}*")
                 if (m := pattern.match(Path(p).with_suffix("").name if suffix else Path(p).name))]
        n = max(taken + [1]) + 1
        path = Path(f"{path}{sep}{n}{suffix}")
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


def find_file(file, subdirs=("models", "data", "data/hyps")) -> Path:
    """Resolve a user-given file: as given, else by name under the repository's models/, data/, data/hyps/.

    Raises FileNotFoundError naming where it looked.
    """
    p = Path(str(file)).expanduser()
    if p.is_file():
        return p
    looked = [str(p)]
    for d in subdirs:
        candidate = ROOT / d / p.name
        looked.append(str(candidate))
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"'{file}' not found (looked in: {', '.join(looked)})")


def yaml_load(file) -> dict:
    with open(file, errors="ignore") as f:
        return yaml.safe_load(f) or {}


def yaml_save(file, data: dict) -> None:
    """Write a dict as yaml; Paths become strings so the file stays safe_load-able."""
    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    with open(file, "w") as f:
        yaml.safe_dump(plain(data), f, sort_keys=False)


def as_list(x) -> list:
    """None -> [], a list or tuple -> a list, anything else -> [x] (a yaml value that may be one path or several)."""
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
